"""Triton launchers of ``stablecore::multi_cross_attention`` (forward and backward).

Without normalisation one fused kernel writes the output. With SpeedUpNet normalisation (see
:mod:`stablecore.ops._mca_norm`) the forward is the same single pass over q plus a torch sum of
the partial sums of squares and one epilogue kernel; the backward gets the normalisation's
coefficients from a few [B, H, D]-sized torch reductions, then runs the same fused kernel.
"""

from __future__ import annotations

import torch

from stablecore.ops import _mca_norm


def packed(q, keys, values, weights, masks):
    """Keys/values of all streams concatenated along the key axis, with offsets and keep flags."""
    k_all = torch.cat(list(keys), dim=2).contiguous()
    v_all = torch.cat(list(values), dim=2).contiguous()
    ones = lambda k: torch.ones(q.shape[0], k.shape[2], dtype=torch.bool, device=q.device)  # noqa: E731
    keep = torch.cat([ones(k) if m is None else m for k, m in zip(keys, masks)], dim=1)
    keep = keep.to(torch.int8).contiguous()
    lengths = [0] + [k.shape[2] for k in keys]
    bounds = tuple(sum(lengths[: i + 1]) for i in range(len(lengths)))
    offsets = _mca_norm.constant(bounds, torch.int32, q.device)
    w = _mca_norm.constant(tuple(weights), torch.float32, q.device)
    return k_all, v_all, keep, offsets, w


def _per_channel(tensors, weights, norm_streams, heads, head_dim):
    """[N, H, D] fp32: ``w_i * t_i`` of each normalised stream's scale or shift."""
    return torch.stack(
        [weights[s] * t.float().reshape(heads, head_dim) for s, t in zip(norm_streams, tensors)]
    ).contiguous()


def forward(
    q, keys, values, weights, masks, scale, norm_streams, scales, shifts, per_sample, eps, wt
):
    from stablecore.kernels import multi_cross_attention as kernels
    from stablecore.kernels import multi_cross_attention_norm as norm_kernels

    batch, heads, _, head_dim = q.shape
    qc = q.contiguous()
    out = torch.empty_like(qc)
    lse = torch.empty((*q.shape[:3], len(keys)), dtype=torch.float32, device=q.device)
    n_norm = len(norm_streams)
    z_norm = torch.empty((n_norm, *q.shape), dtype=torch.float32, device=q.device)
    k_all, v_all, keep, offsets, w = packed(q, keys, values, weights, masks)
    if wt is not None:
        w, weights = wt.detach().float().contiguous(), wt.detach().float()
    if not norm_streams:
        kernels.mca_fwd(qc, k_all, v_all, keep, offsets, w, out, lse, scale)
        return out, lse, z_norm, torch.zeros((1, batch), dtype=torch.float32, device=q.device)
    slot_of = dict(zip(norm_streams, range(n_norm)))
    slots = [slot_of.get(s, -1) for s in range(len(keys))]
    acc = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    shift = _per_channel(shifts, weights, norm_streams, heads, head_dim)
    part = kernels.mca_fwd(
        qc, k_all, v_all, keep, offsets, w, acc, lse, scale, norm=(z_norm, shift, slots)
    )
    sumsq = part.sum(-1)  # [N+1, B]: fixed-order reduction of the per-block partials
    gamma = _per_channel(scales, weights, norm_streams, heads, head_dim)
    norm_kernels.mca_norm_epilogue(acc, z_norm, sumsq, gamma, out, eps, per_sample)
    return out, lse, z_norm, sumsq


def backward(grad, q, keys, values, weights, masks, lse, scale, *rest):
    """Raw gradients (dq, dks, dvs, dscales [H, D] fp32, dshifts, dw [S] fp32)."""
    from stablecore.kernels import multi_cross_attention as kernels

    norm_streams, scales, shifts, per_sample, eps, z_norm, sumsq, wt = rest
    qc, gc = q.contiguous(), grad.contiguous()
    k_all, v_all, keep, offsets, w = packed(q, keys, values, weights, masks)
    if wt is not None:
        w, weights = wt.detach().float().contiguous(), wt.detach().float()
    dq = torch.empty_like(qc)
    dk = torch.zeros(k_all.shape, dtype=torch.float32, device=q.device)
    dv = torch.zeros_like(dk)
    coef, dscales, dshifts = None, [], []
    dw = torch.zeros(len(keys), dtype=torch.float32, device=q.device)
    if norm_streams:
        a, mult, c, dscales, dshifts, dw = _mca_norm.backward_coefficients(
            gc.float(), z_norm, sumsq, weights, masks, norm_streams, scales, shifts, per_sample, eps
        )
        coef = (a.contiguous(), torch.stack([mult, c], dim=-1).contiguous())
    # sum_l dO . O_s per row and stream: the weight gradient of the plain streams.
    rowdot = None if wt is None else torch.empty_like(lse, dtype=torch.float32)
    kernels.mca_bwd(
        qc, k_all, v_all, keep, offsets, w, lse.contiguous(), gc, dq, dk, dv, scale,
        coef=coef, rowdot=rowdot,
    )  # fmt: skip
    if rowdot is not None:
        plain = tuple(s not in norm_streams for s in range(len(keys)))
        dw = torch.where(_mca_norm.constant(plain, torch.bool, q.device), rowdot.sum((0, 1, 2)), dw)
    sizes = [k.shape[2] for k in keys]
    return (
        dq,
        [d.to(q.dtype, copy=True) for d in dk.split(sizes, dim=2)],
        [d.to(q.dtype, copy=True) for d in dv.split(sizes, dim=2)],
        dscales,
        dshifts,
        dw,
    )


def unsupported(q, keys, *args) -> str | None:
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {q.dtype} has no Triton kernel"
    if q.shape[-1] > 256:
        return f"head_dim {q.shape[-1]} > 256 does not fit the kernel's registers"
    if any(k.shape[2] == 0 for k in keys):
        return "a stream with zero keys"
    if q.numel() == 0:
        return "an empty q"
    return None


def unsupported_backward(grad, q, keys, *args) -> str | None:
    return unsupported(q, keys)
