"""Multi-stream cross-attention: ``out = sum_i w_i * softmax(q k_i^T * scale) v_i``.

One op for the attention variants of SNOOPI (NASA: positive minus alpha x negative prompt), PPD
(text plus a user-embedding stream), IP-Adapter (text plus image tokens) and SpeedUpNet (its
negative-prompt adapter): every stream has its own keys, values, length and key-padding mask, and
is normalised by its own softmax. A stream whose keys are all masked (for some batch element)
contributes exactly zero there, never NaN.

Layers as in :mod:`stablecore.ops.stablemax`: reference (one explicit attention per stream, in
``promote_types(dtype, float32)``), custom op ``stablecore::multi_cross_attention`` returning
``(out, lse)`` with the per-stream log-sum-exp saved for backward, the backward as its own op,
and a fused Triton forward/backward (``kernels/multi_cross_attention.py``) that reads q once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from stablecore.ops import _dispatch

__all__ = ["multi_cross_attention"]

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _validate(
    q: Tensor,
    keys: Sequence[Tensor],
    values: Sequence[Tensor],
    weights: Sequence[float],
    masks: Sequence[Tensor | None],
) -> None:
    _dispatch.check_floating("q", q)
    if q.dim() != 4:
        raise ValueError(f"q must be [batch, heads, queries, head_dim], got shape {tuple(q.shape)}")
    if not keys:
        raise ValueError("at least one stream (keys[0], values[0]) is required")
    if not len(keys) == len(values) == len(weights) == len(masks):
        raise ValueError(
            f"streams disagree: {len(keys)} keys, {len(values)} values, {len(weights)} weights, "
            f"{len(masks)} masks"
        )
    batch, heads, _, head_dim = q.shape
    for i, (k, v, m) in enumerate(zip(keys, values, masks)):
        _dispatch.check_same_device(q=q, **{f"keys[{i}]": k, f"values[{i}]": v})
        if k.dtype != q.dtype or v.dtype != q.dtype:
            raise TypeError(
                f"stream {i}: keys {k.dtype} / values {v.dtype} differ from q {q.dtype}"
            )
        if k.dim() != 4 or k.shape != v.shape:
            raise ValueError(
                f"stream {i}: keys {tuple(k.shape)} and values {tuple(v.shape)} must both be "
                "[batch, heads, keys, head_dim]"
            )
        if (k.shape[0], k.shape[1], k.shape[3]) != (batch, heads, head_dim):
            raise ValueError(
                f"stream {i}: keys {tuple(k.shape)} do not match q {tuple(q.shape)} in batch, "
                "heads or head_dim"
            )
        if m is not None:
            _dispatch.check_same_device(q=q, **{f"masks[{i}]": m})
            if m.dtype != torch.bool or tuple(m.shape) != (batch, k.shape[2]):
                raise ValueError(
                    f"stream {i}: key-padding mask must be bool [batch, keys] = "
                    f"{(batch, k.shape[2])}, got {m.dtype} {tuple(m.shape)}"
                )


# ----------------------------------------------------------------------------- reference
def _stream_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float):
    """(normalised output, log-sum-exp) of one stream, in q's (compute) dtype; differentiable."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    row_max = scores.amax(-1, keepdim=True).detach()
    row_max = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)
    p = torch.exp(scores - row_max)
    denom = p.sum(-1, keepdim=True)
    has_keys = denom > 0
    out = torch.matmul(p, v) / torch.where(has_keys, denom, torch.ones_like(denom))
    lse = torch.where(has_keys, row_max + denom.log(), torch.full_like(denom, float("inf")))
    return out, lse.squeeze(-1)


def _reference_outputs(q, keys, values, weights, masks, scale):
    compute = torch.promote_types(q.dtype, torch.float32)
    out = torch.zeros(q.shape, dtype=compute, device=q.device)
    lses = []
    for k, v, w, m in zip(keys, values, weights, masks):
        o, lse = _stream_attention(q.to(compute), k.to(compute), v.to(compute), m, scale)
        out = out + w * o
        lses.append(lse)
    return out, torch.stack(lses, dim=-1)


def _reference_forward(q, keys, values, weights, masks, scale):
    _validate(q, keys, values, weights, masks)
    out, lse = _reference_outputs(q, keys, values, weights, masks, scale)
    return out.to(q.dtype), lse


def _reference_backward(grad, q, keys, values, weights, masks, lse, scale):
    """Explicit attention gradients per stream (the op body runs below autograd, so no
    autograd here): with P the stream's probabilities and dO_i = w_i dO,
    dV = P^T dO_i, dS = P * (dO_i V^T - rowsum(dO_i * O_i)), dQ += dS K s, dK = dS^T Q s."""
    compute = torch.promote_types(q.dtype, torch.float32)
    qc, gc = q.to(compute), grad.to(compute)
    dq = torch.zeros_like(qc)
    dks, dvs = [], []
    for i, (k, v, w, m) in enumerate(zip(keys, values, weights, masks)):
        kc, vc = k.to(compute), v.to(compute)
        scores = torch.matmul(qc, kc.transpose(-1, -2)) * scale
        p = torch.exp(scores - lse[..., i : i + 1].to(compute))  # lse = +inf: p = 0
        if m is not None:
            p = p.masked_fill(~m[:, None, None, :], 0.0)
        d_out = w * gc
        o = torch.matmul(p, vc)
        ds = p * (torch.matmul(d_out, vc.transpose(-1, -2)) - (d_out * o).sum(-1, keepdim=True))
        ds = ds * scale
        dq += torch.matmul(ds, kc)
        dks.append(torch.matmul(ds.transpose(-1, -2), qc).to(q.dtype))
        dvs.append(torch.matmul(p.transpose(-1, -2), d_out).to(q.dtype))
    return dq.to(q.dtype), dks, dvs


# ----------------------------------------------------------------------------- custom ops
@torch.library.custom_op("stablecore::multi_cross_attention", mutates_args=())
def _mca_op(
    q: Tensor,
    keys: list[Tensor],
    values: list[Tensor],
    weights: list[float],
    masks: list[Tensor | None],
    scale: float,
) -> tuple[Tensor, Tensor]:
    return _reference_forward(q, keys, values, weights, masks, scale)


@_mca_op.register_fake
def _(q, keys, values, weights, masks, scale):
    _validate(q, keys, values, weights, masks)
    lse = q.new_empty((*q.shape[:3], len(keys)), dtype=torch.promote_types(q.dtype, torch.float32))
    return torch.empty_like(q, memory_format=torch.contiguous_format), lse


@torch.library.custom_op("stablecore::multi_cross_attention_backward", mutates_args=())
def _mca_backward_op(
    grad: Tensor,
    q: Tensor,
    keys: list[Tensor],
    values: list[Tensor],
    weights: list[float],
    masks: list[Tensor | None],
    lse: Tensor,
    scale: float,
) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    return _reference_backward(grad, q, keys, values, weights, masks, lse, scale)


@_mca_backward_op.register_fake
def _(grad, q, keys, values, weights, masks, lse, scale):
    return (
        torch.empty_like(q, memory_format=torch.contiguous_format),
        [torch.empty_like(k, memory_format=torch.contiguous_format) for k in keys],
        [torch.empty_like(v, memory_format=torch.contiguous_format) for v in values],
    )


def _setup_context(ctx, inputs, output):
    q, keys, values, weights, masks, scale = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.n_streams = len(keys)
    ctx.save_for_backward(q, output[1], *keys, *values)
    ctx.weights, ctx.masks, ctx.scale = weights, masks, scale


def _backward(ctx, grad_out, _grad_lse):
    q, lse, *kv = ctx.saved_tensors
    keys, values = kv[: ctx.n_streams], kv[ctx.n_streams :]
    dq, dks, dvs = _mca_backward_op(
        grad_out.contiguous(), q, list(keys), list(values), ctx.weights, ctx.masks, lse, ctx.scale
    )
    # torch.library treats a masks list holding only tensors as a list of inputs, and one
    # holding any None as a single non-tensor input: the gradient must mirror that.
    all_tensors = all(m is not None for m in ctx.masks)
    no_mask_grads = [None] * len(ctx.masks) if all_tensors else None
    return dq, list(dks), list(dvs), None, no_mask_grads, None


_mca_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- Triton backend
def _packed(q, keys, values, weights, masks):
    """Keys/values of all streams concatenated along the key axis, with offsets and keep flags."""
    k_all = torch.cat([k for k in keys], dim=2).contiguous()
    v_all = torch.cat([v for v in values], dim=2).contiguous()
    keep = (
        torch.cat(
            [
                (
                    m
                    if m is not None
                    else torch.ones(q.shape[0], k.shape[2], dtype=torch.bool, device=q.device)
                )
                for k, m in zip(keys, masks)
            ],
            dim=1,
        )
        .to(torch.int8)
        .contiguous()
    )
    lengths = [0] + [k.shape[2] for k in keys]
    offsets = torch.tensor(
        [sum(lengths[: i + 1]) for i in range(len(lengths))], dtype=torch.int32, device=q.device
    )
    w = torch.tensor(list(weights), dtype=torch.float32, device=q.device)
    return k_all, v_all, keep, offsets, w


def _triton_forward(q, keys, values, weights, masks, scale):
    from stablecore.kernels import multi_cross_attention as kernels

    _validate(q, keys, values, weights, masks)
    qc = q.contiguous()
    out = torch.empty_like(qc)
    lse = torch.empty((*q.shape[:3], len(keys)), dtype=torch.float32, device=q.device)
    if q.numel() == 0:
        return out, lse.fill_(float("inf"))
    k_all, v_all, keep, offsets, w = _packed(q, keys, values, weights, masks)
    kernels.mca_fwd(qc, k_all, v_all, keep, offsets, w, out, lse, scale)
    return out, lse


def _triton_backward(grad, q, keys, values, weights, masks, lse, scale):
    from stablecore.kernels import multi_cross_attention as kernels

    qc, gc = q.contiguous(), grad.contiguous()
    k_all, v_all, keep, offsets, w = _packed(q, keys, values, weights, masks)
    dq = torch.empty_like(qc)
    dk = torch.zeros(k_all.shape, dtype=torch.float32, device=q.device)
    dv = torch.zeros_like(dk)
    if q.numel() > 0:
        kernels.mca_bwd(qc, k_all, v_all, keep, offsets, w, lse.contiguous(), gc, dq, dk, dv, scale)
    sizes = [k.shape[2] for k in keys]
    return (
        dq,
        [d.to(q.dtype, copy=True) for d in dk.split(sizes, dim=2)],
        [d.to(q.dtype, copy=True) for d in dv.split(sizes, dim=2)],
    )


def _unsupported(q, keys, *args) -> str | None:
    if q.dtype not in _TRITON_DTYPES:
        return f"dtype {q.dtype} has no Triton kernel"
    if q.shape[-1] > 256:
        return f"head_dim {q.shape[-1]} > 256 does not fit the kernel's registers"
    if any(k.shape[2] == 0 for k in keys):
        return "a stream with zero keys"
    return None


def _unsupported_backward(grad, q, keys, *args) -> str | None:
    return _unsupported(q, keys)


_dispatch.register_triton_kernel(_mca_op, _triton_forward, _reference_forward, _unsupported)
_dispatch.register_triton_kernel(
    _mca_backward_op, _triton_backward, _reference_backward, _unsupported_backward
)
_dispatch.describe_op("multi_cross_attention", triton_dtypes=_TRITON_DTYPES)
_dispatch.describe_op("multi_cross_attention_backward", triton_dtypes=_TRITON_DTYPES)


# ----------------------------------------------------------------------------- public API
def multi_cross_attention(
    q: Tensor,
    keys: Sequence[Tensor],
    values: Sequence[Tensor],
    weights: Sequence[float],
    key_padding_masks: Sequence[Tensor | None] | None = None,
    scale: float | None = None,
) -> Tensor:
    """Weighted sum of cross-attentions of one query over several key/value streams.

    Args:
        q: ``[B, H, L, D]`` queries (float16/bfloat16/float32/float64).
        keys, values: per stream ``i``, ``[B, H, S_i, D]`` in q's dtype and device.
        weights: per stream, a float ``w_i`` (NASA: ``[1.0, -alpha]``; IP-Adapter/PPD: ``[1.0, s]``).
        key_padding_masks: per stream ``None`` or bool ``[B, S_i]`` (True = attend). A stream
            with no key left contributes zero for that batch element.
        scale: softmax scale, default ``1 / sqrt(D)``.

    Returns:
        ``[B, H, L, D]`` in q's dtype: ``sum_i w_i softmax(q k_i^T * scale) v_i``.

    Example::

        >>> q = torch.randn(2, 8, 4096, 40); pos = torch.randn(2, 8, 77, 40); neg = torch.randn(2, 8, 77, 40)
        >>> out = multi_cross_attention(q, [pos, neg], [pos, neg], [1.0, -0.1])
    """
    if isinstance(keys, Tensor) or isinstance(values, Tensor):
        raise TypeError("keys and values must each be a sequence of tensors (one per stream)")
    masks = list(key_padding_masks) if key_padding_masks is not None else [None] * len(keys)
    weights = [float(w) for w in weights]
    _validate(q, list(keys), list(values), weights, masks)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if _dispatch.plain_reference_requested():
        out, _ = _reference_outputs(q, list(keys), list(values), weights, masks, scale)
        return out.to(q.dtype)
    return _mca_op(q, list(keys), list(values), weights, masks, scale)[0]
