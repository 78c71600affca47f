"""Multi-stream cross-attention: ``out = sum_i w_i * softmax(q k_i^T * scale) v_i``.

One op for the attention variants of SNOOPI (NASA: positive minus alpha x negative prompt), PPD
(text plus a user-embedding stream), IP-Adapter (text plus image tokens) and SpeedUpNet (its
negative-prompt adapter): every stream has its own keys, values, length and key-padding mask, and
is normalised by its own softmax. A stream whose keys are all masked (for some batch element)
contributes exactly zero there, never NaN. Streams may optionally be rescaled to the Frobenius
norm of stream 0's output and then scaled and shifted per channel (SpeedUpNet; see
:mod:`stablecore.ops._mca_norm` for the definition and its gradients).

Layers as in :mod:`stablecore.ops.stablemax`: reference (one explicit attention per stream, in
``promote_types(dtype, float32)``), custom op ``stablecore::multi_cross_attention`` returning
``(out, lse, z_norm, sumsq)`` (per-stream log-sum-exp; the normalised streams' raw outputs and
the per-sample sums of squares, saved for backward), the backward as its own op, and a fused
Triton forward/backward (``kernels/multi_cross_attention.py``) that reads q once.

Normalisation design (Triton): the norm is global (whole batch, all heads), so no query block
can finish its rows alone. The main kernel computes every stream in one pass over q; it writes
the plain streams' weighted sum plus the shifts into an fp32 accumulator, each normalised
stream's raw output into an fp32 buffer (also what backward needs), and per (batch, head,
query-block) partial sums of squares (plain stores, deterministic). A torch sum folds the
partials to [N+1, B] and a small epilogue kernel applies ``acc + r_i * w_i * gamma_i * Z_i``.
The alternative, a second full attention pass once the norms are known, re-reads q and redoes
all the QK^T/PV work to save one fp32 write and read per normalised stream.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from stablecore.ops import _dispatch, _mca_norm, _mca_triton

__all__ = ["multi_cross_attention"]

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _validate(q, keys, values, weights, masks, norm_streams=(), scales=(), shifts=(), eps=1.0):
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
        _dispatch.check_floating(f"keys[{i}]", k)
        _dispatch.check_floating(f"values[{i}]", v)
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
            if not isinstance(m, Tensor):
                raise TypeError(f"stream {i}: key-padding mask must be a tensor or None")
            _dispatch.check_same_device(q=q, **{f"masks[{i}]": m})
            if m.dtype != torch.bool or tuple(m.shape) != (batch, k.shape[2]):
                raise ValueError(
                    f"stream {i}: key-padding mask must be bool [batch, keys] = "
                    f"{(batch, k.shape[2])}, got {m.dtype} {tuple(m.shape)}"
                )
    _mca_norm.validate_norm(q, len(keys), norm_streams, scales, shifts, eps)


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


def _reference_outputs(q, keys, values, weights, masks, scale, norm=((), (), (), False, 1.0)):
    """Differentiable reference: (out, lse [B, H, L, S], z_norm, sumsq) in the compute dtype.
    ``weights``: floats, or a [S] tensor (then differentiable too)."""
    compute = torch.promote_types(q.dtype, torch.float32)
    outs, lses = [], []
    for k, v, m in zip(keys, values, masks):
        o, lse = _stream_attention(q.to(compute), k.to(compute), v.to(compute), m, scale)
        outs.append(o)
        lses.append(lse)
    if isinstance(weights, Tensor):
        weights = weights.to(compute).unbind()
    norm_streams, scales, shifts, per_sample, eps = norm
    if norm_streams:
        out, z_norm, sumsq = _mca_norm.reference_combine(
            outs, weights, masks, norm_streams, scales, shifts, per_sample, eps
        )
    else:
        out = torch.zeros(q.shape, dtype=compute, device=q.device)
        for o, w in zip(outs, weights):
            out = out + w * o
        z_norm = q.new_empty((0, *q.shape), dtype=compute)
        sumsq = q.new_zeros((1, q.shape[0]), dtype=compute)
    return out, torch.stack(lses, dim=-1), z_norm, sumsq


def _reference_forward(q, keys, values, weights, masks, scale, *norm):
    """``norm = (norm_streams, scales, shifts, per_sample, eps, weight_tensor)``; a weight
    tensor [S] (when given) replaces the float ``weights``."""
    _validate(q, keys, values, weights, masks, *norm[:3], norm[4])
    w = weights if norm[5] is None else norm[5]
    out, lse, z_norm, sumsq = _reference_outputs(q, keys, values, w, masks, scale, norm[:5])
    return out.to(q.dtype), lse, z_norm, sumsq


def _reference_backward(grad, q, keys, values, weights, masks, lse, scale, *rest):
    """Explicit attention gradients per stream (the op body runs below autograd, so no
    autograd here): with P the stream's probabilities and dO_s its upstream gradient
    (``w_s dO`` without normalisation, see :mod:`._mca_norm` with it), dV = P^T dO_s,
    dS = P * (dO_s V^T - rowsum(dO_s * O_s)), dQ += dS K s, dK = dS^T Q s, and for a weight
    tensor dw_s = sum(dO * O_s) (plain streams)."""
    norm_streams, scales, shifts, per_sample, eps, z_norm, sumsq, weight_tensor = rest
    compute = torch.promote_types(q.dtype, torch.float32)
    qc, gc = q.to(compute), grad.to(compute)
    w_all = weights if weight_tensor is None else weight_tensor.detach().to(compute)
    dscales, dshifts, dw = [], [], torch.zeros(len(keys), dtype=compute, device=q.device)
    if norm_streams:
        a, mult, c, dscales, dshifts, dw = _mca_norm.backward_coefficients(
            gc, z_norm, sumsq, w_all, masks, norm_streams, scales, shifts, per_sample, eps
        )
    dq = torch.zeros_like(qc)
    dks, dvs = [], []
    for i, (k, v, m) in enumerate(zip(keys, values, masks)):
        kc, vc = k.to(compute), v.to(compute)
        scores = torch.matmul(qc, kc.transpose(-1, -2)) * scale
        p = torch.exp(scores - lse[..., i : i + 1].to(compute))  # lse = +inf: p = 0
        if m is not None:
            p = p.masked_fill(~m[:, None, None, :], 0.0)
        o = torch.matmul(p, vc)
        if norm_streams:
            d_out = mult[i][:, None, None, None] * a[i][None, :, None, :] * gc
            d_out = d_out + c[i][:, None, None, None] * o
        else:
            d_out = w_all[i] * gc
        if weight_tensor is not None and i not in norm_streams:
            dw[i] = (gc * o).sum()
        ds = p * (torch.matmul(d_out, vc.transpose(-1, -2)) - (d_out * o).sum(-1, keepdim=True))
        ds = ds * scale
        dq += torch.matmul(ds, kc)
        dks.append(torch.matmul(ds.transpose(-1, -2), qc).to(q.dtype))
        dvs.append(torch.matmul(p.transpose(-1, -2), d_out).to(q.dtype))
    return dq.to(q.dtype), dks, dvs, *param_grads(dscales, dshifts, dw, scales, shifts, rest[7])


def param_grads(dscales, dshifts, dw, scales, shifts, weight_tensor):
    """Scale/shift/weight gradients in their parameters' shapes and dtypes (an empty tensor for
    the weights when they are floats)."""
    return (
        [d.reshape(t.shape).to(t.dtype) for d, t in zip(dscales, scales)],
        [d.reshape(t.shape).to(t.dtype) for d, t in zip(dshifts, shifts)],
        dw.new_empty(0) if weight_tensor is None else dw.to(weight_tensor.dtype),
    )


# ----------------------------------------------------------------------------- custom ops
@torch.library.custom_op("stablecore::multi_cross_attention", mutates_args=())
def _mca_op(
    q: Tensor,
    keys: list[Tensor],
    values: list[Tensor],
    weights: list[float],
    masks: list[Tensor | None],
    scale: float,
    norm_streams: list[int],
    norm_scales: list[Tensor],
    norm_shifts: list[Tensor],
    norm_per_sample: bool,
    norm_eps: float,
    weight_tensor: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _reference_forward(
        q, keys, values, weights, masks, scale,
        norm_streams, norm_scales, norm_shifts, norm_per_sample, norm_eps, weight_tensor,
    )  # fmt: skip


@_mca_op.register_fake
def _(q, keys, values, weights, masks, scale, norm_streams, scales, shifts, per_sample, eps, wt):
    _validate(q, keys, values, weights, masks, norm_streams, scales, shifts, eps)
    f32 = torch.promote_types(q.dtype, torch.float32)
    lse = q.new_empty((*q.shape[:3], len(keys)), dtype=f32)
    z_norm = q.new_empty((len(norm_streams), *q.shape), dtype=f32)
    sumsq = q.new_empty((len(norm_streams) + 1, q.shape[0]), dtype=f32)
    return torch.empty_like(q, memory_format=torch.contiguous_format), lse, z_norm, sumsq


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
    norm_streams: list[int],
    norm_scales: list[Tensor],
    norm_shifts: list[Tensor],
    norm_per_sample: bool,
    norm_eps: float,
    z_norm: Tensor,
    sumsq: Tensor,
    weight_tensor: Tensor | None,
) -> tuple[Tensor, list[Tensor], list[Tensor], list[Tensor], list[Tensor], Tensor]:
    return _reference_backward(
        grad, q, keys, values, weights, masks, lse, scale, norm_streams, norm_scales,
        norm_shifts, norm_per_sample, norm_eps, z_norm, sumsq, weight_tensor,
    )  # fmt: skip


@_mca_backward_op.register_fake
def _(grad, q, keys, values, weights, masks, lse, scale, norm_streams, scales, shifts, *rest):
    like = lambda ts: [torch.empty_like(t, memory_format=torch.contiguous_format) for t in ts]  # noqa: E731
    wt = rest[-1]
    return (
        torch.empty_like(q, memory_format=torch.contiguous_format),
        like(keys),
        like(values),
        like(scales),
        like(shifts),
        q.new_empty(0, dtype=torch.promote_types(q.dtype, torch.float32))
        if wt is None
        else torch.empty_like(wt, memory_format=torch.contiguous_format),
    )


def _setup_context(ctx, inputs, output):
    q, keys, values, weights, masks, scale, norm_streams, scales, shifts, per_sample, eps, wt = (
        inputs
    )
    _, lse, z_norm, sumsq = output
    ctx.mark_non_differentiable(lse, z_norm, sumsq)
    ctx.n_streams, ctx.n_norm = len(keys), len(norm_streams)
    ctx.save_for_backward(q, lse, z_norm, sumsq, wt, *keys, *values, *scales, *shifts)
    ctx.weights, ctx.masks, ctx.scale = weights, masks, scale
    ctx.norm = (norm_streams, per_sample, eps)


def _backward(ctx, grad_out, *_unused):
    q, lse, z_norm, sumsq, wt, *rest = ctx.saved_tensors
    s, n = ctx.n_streams, ctx.n_norm
    keys, values = rest[:s], rest[s : 2 * s]
    scales, shifts = rest[2 * s : 2 * s + n], rest[2 * s + n :]
    norm_streams, per_sample, eps = ctx.norm
    dq, dks, dvs, dscales, dshifts, dw = _mca_backward_op(
        grad_out.contiguous(), q, list(keys), list(values), ctx.weights, ctx.masks, lse,
        ctx.scale, norm_streams, list(scales), list(shifts), per_sample, eps, z_norm, sumsq, wt,
    )  # fmt: skip
    # torch.library treats a list holding only tensors (an empty one too) as a list of inputs,
    # and any other list as a single non-tensor input: the gradient must mirror that.
    all_tensors = all(m is not None for m in ctx.masks)
    no_mask_grads = [None] * len(ctx.masks) if all_tensors else None
    no_stream_grads = None if norm_streams else []
    return (
        dq, list(dks), list(dvs), None, no_mask_grads, None,
        no_stream_grads, list(dscales), list(dshifts), None, None, None if wt is None else dw,
    )  # fmt: skip


_mca_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- Triton backend
def _triton_forward(q, keys, values, weights, masks, scale, *norm):
    _validate(q, keys, values, weights, masks, *norm[:3], norm[4])
    return _mca_triton.forward(q, keys, values, weights, masks, scale, *norm)


def _triton_backward(*args):
    return param_grads_wrapped(_mca_triton.backward(*args), args)


def param_grads_wrapped(result, args):
    """The launcher's raw gradients, with the scale/shift/weight ones cast like the reference's."""
    dq, dks, dvs, dscales, dshifts, dw = result
    scales, shifts, weight_tensor = args[9], args[10], args[15]
    return dq, dks, dvs, *param_grads(dscales, dshifts, dw, scales, shifts, weight_tensor)


_dispatch.register_triton_kernel(
    _mca_op, _triton_forward, _reference_forward, _mca_triton.unsupported
)
_dispatch.register_triton_kernel(
    _mca_backward_op, _triton_backward, _reference_backward, _mca_triton.unsupported_backward
)
_dispatch.describe_op("multi_cross_attention", triton_dtypes=_TRITON_DTYPES)
_dispatch.describe_op("multi_cross_attention_backward", triton_dtypes=_TRITON_DTYPES)


# ----------------------------------------------------------------------------- public API
def multi_cross_attention(
    q: Tensor,
    keys: Sequence[Tensor],
    values: Sequence[Tensor],
    weights: Sequence[float] | Tensor,
    key_padding_masks: Sequence[Tensor | None] | None = None,
    scale: float | None = None,
    *,
    norm_streams: Sequence[int] | int = (),
    norm_scales: Sequence[Tensor | None] | None = None,
    norm_shifts: Sequence[Tensor | None] | None = None,
    norm_mode: str = "batch",
    norm_eps: float = 1e-12,
) -> Tensor:
    """Weighted sum of cross-attentions of one query over several key/value streams.

    Args:
        q: ``[B, H, L, D]`` queries (float16/bfloat16/float32/float64).
        keys, values: per stream ``i``, ``[B, H, S_i, D]`` in q's dtype and device.
        weights: per stream, a float ``w_i`` (NASA: ``[1.0, -alpha]``; IP-Adapter/PPD: ``[1.0, s]``),
            or a float tensor ``[S]`` on q's device that gets a gradient (a learned scale).
        key_padding_masks: per stream ``None`` or bool ``[B, S_i]`` (True = attend). A stream
            with no key left contributes zero for that batch element.
        scale: softmax scale, default ``1 / sqrt(D)``.
        norm_streams: streams (indices >= 1) rescaled as in SpeedUpNet: with ``Z_s`` a stream's
            attention output before its weight, stream ``i`` contributes
            ``w_i * (gamma_i * ||Z_0|| / max(||Z_i||, norm_eps) * Z_i + beta_i)``.
        norm_scales, norm_shifts: per normalised stream, ``gamma_i`` / ``beta_i`` per channel,
            ``[H*D]`` (diffusers' merged ``[B, L, H*D]`` channel order) or ``[H, D]``, any float
            dtype on q's device, differentiable; ``None`` = ones / zeros.
        norm_mode: ``"batch"``: ``||.||`` is one Frobenius norm over the whole ``[B, H, L, D]``
            tensor, batch included (SpeedUpNet's released ``torch.norm``); ``"sample"``: one
            norm per batch element (over ``H, L, D``), so samples do not interact.
        norm_eps: clamp of the denominator norm (the released code has none). Where a
            normalised stream has no key left its shift is not added: it contributes zero.

    Returns:
        ``[B, H, L, D]`` in q's dtype: ``sum_i w_i softmax(q k_i^T * scale) v_i`` (normalised
        streams as above).

    Example::

        >>> q = torch.randn(2, 8, 4096, 40); pos = torch.randn(2, 8, 77, 40); neg = torch.randn(2, 8, 77, 40)
        >>> out = multi_cross_attention(q, [pos, neg], [pos, neg], [1.0, -0.1])
        >>> gamma, beta = torch.ones(320), torch.zeros(320)  # SpeedUpNet: Z+ - (gamma Z~- + beta)
        >>> sun = multi_cross_attention(q, [pos, neg], [pos, neg], [1.0, -1.0], norm_streams=[1],
        ...                             norm_scales=[gamma], norm_shifts=[beta])
    """
    if isinstance(keys, Tensor) or isinstance(values, Tensor):
        raise TypeError("keys and values must each be a sequence of tensors (one per stream)")
    masks = list(key_padding_masks) if key_padding_masks is not None else [None] * len(keys)
    weight_tensor = None
    if isinstance(weights, Tensor):
        weight_tensor = _mca_norm.check_weight_tensor(q, weights, len(keys))
        weights = [1.0] * len(keys)  # placeholders: the op reads the tensor
    weights = [float(w) for w in weights]
    _validate(q, list(keys), list(values), weights, masks)
    norm = _mca_norm.public_norm_args(
        q, len(keys), norm_streams, norm_scales, norm_shifts, norm_mode, norm_eps
    )
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if _dispatch.plain_reference_requested():
        w = weights if weight_tensor is None else weight_tensor
        out = _reference_outputs(q, list(keys), list(values), w, masks, scale, norm)[0]
        return out.to(q.dtype)
    return _mca_op(q, list(keys), list(values), weights, masks, scale, *norm, weight_tensor)[0]
