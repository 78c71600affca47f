"""Fused linear + cross-entropy (StableMax or softmax) without the [N, V] logits in memory.

``loss = CE(hidden @ weight.T + bias, target)`` computed over chunks of rows: per chunk the
logits [C, V] are formed by one matmul, the fused cross-entropy kernel turns them into the
logit gradient *in place*, and that gradient is immediately contracted into grad_hidden[chunk]
(``dlogits @ W``), grad_weight (``+= dlogits.T @ h``, accumulated in float32) and grad_bias.
All gradients are computed in the forward (6 N H V FLOPs, no recompute, Liger's design); backward
only rescales them (a no-op hand-over for ``loss.backward()``). No double backward. Peak extra memory: one [C, V] chunk plus the float32 weight
accumulator when the weight is not float32 (``C`` defaults to ~2^26 / V rows: 128 MiB of bf16).

``reduction="none"`` cannot fold a per-row upstream gradient in after the weight contraction
(Liger PR 1298's bug), so there the forward only computes losses and the backward op recomputes
the chunks with the row weights applied before the contraction (8 N H V FLOPs).

Under ``torch.autocast`` the matmuls run in the autocast dtype (weight and hidden are cast once
inside the op); grad_weight is accumulated in float32 and returned in the weight's own dtype.

Ops: ``stablecore::linear_cross_entropy`` -> ``(loss, grad_hidden, grad_weight, grad_bias)`` and
``stablecore::linear_cross_entropy_backward`` (``none`` reduction); both take ``kind`` in
{"stablemax", "softmax"}. The reference backend runs the same chunk loop with the plain-PyTorch
row cross-entropy; the Triton backend swaps in the fused kernels.
"""

from __future__ import annotations

import importlib

import torch
from torch import Tensor

from stablecore.ops import _dispatch

# The module, not the function of the same name that stablecore.ops exports.
_ce = importlib.import_module("stablecore.ops.stablemax_cross_entropy")

__all__ = ["linear_cross_entropy", "stablemax_linear_cross_entropy"]

_KINDS = ("stablemax", "softmax")
#: Elements of one logits chunk (rows = this / V): 2^26 elements = 128 MiB in bf16.
CHUNK_ELEMENTS = 2**26
_ADDMM_OUT_DTYPE_OK = True


# ----------------------------------------------------------------------------- validation
def _validate(hidden, weight, target, bias, reduction, label_smoothing, kind, chunk_size):
    _dispatch.check_floating("hidden", hidden)
    _dispatch.check_floating("weight", weight)
    if bias is not None:
        _dispatch.check_floating("bias", bias)
    _dispatch.check_same_device(hidden=hidden, weight=weight, target=target, bias=bias)
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"expected hidden [N, H] and weight [V, H], got hidden {tuple(hidden.shape)} and "
            f"weight {tuple(weight.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must be [V] = [{weight.shape[0]}], got {tuple(bias.shape)}")
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")
    if chunk_size < 0:
        raise ValueError(f"chunk_size must be >= 0 (0 = automatic), got {chunk_size}")
    fake_logits = hidden.new_empty((hidden.shape[0], weight.shape[0]), device="meta")
    _ce.validate(fake_logits, target.to("meta"), reduction, label_smoothing)


def _chunk_rows(n: int, v: int, chunk_size: int) -> int:
    if chunk_size > 0:
        return chunk_size
    return max(1, min(n, 1 << max(0, (CHUNK_ELEMENTS // max(v, 1)).bit_length() - 1)))


# ----------------------------------------------------------------------------- the chunk loop
def _reference_chunk_ce(kind, logits, target, ignore_index, smoothing, compute_grad, scale):
    compute_dtype = torch.promote_types(logits.dtype, torch.float32)
    rows, grad = _ce.reference_rows(
        logits.to(compute_dtype), target, ignore_index, smoothing, kind, compute_grad
    )
    if compute_grad:
        logits.copy_(grad * scale.to(compute_dtype))
    return rows


def _triton_chunk_ce(kind, logits, target, ignore_index, smoothing, compute_grad, scale):
    rows, _ = _ce.triton_rows(
        kind,
        logits,
        target,
        ignore_index,
        smoothing,
        compute_grad,
        scale,
        logits if compute_grad else None,
    )
    return rows


#: CPU BLAS sends a product of fewer than 4 rows to a matrix-vector kernel whose float32 error
#: over a long reduction is about 30x that of its blocked matrix kernel (measured: 2.5e-5 against
#: 8.5e-7 for [2, 20000] @ [20000, 16]); padding a short chunk to 4 rows takes the accurate one.
_CPU_MIN_ROWS = 4


def _rows_times_weight(dlogits: Tensor, w: Tensor) -> Tensor:
    """grad_hidden rows = dlogits [C, V] @ w [V, H]."""
    rows = dlogits.shape[0]
    if dlogits.device.type == "cpu" and 0 < rows < _CPU_MIN_ROWS:
        pad = dlogits.new_zeros(_CPU_MIN_ROWS - rows, dlogits.shape[1])
        return torch.cat([dlogits, pad]).mm(w)[:rows]
    return dlogits.mm(w)


def _accumulate_weight_grad(acc: Tensor, dlogits: Tensor, h: Tensor) -> None:
    """acc [V, H] += dlogits.T @ h, in acc's dtype without a [V, H] temporary where possible."""
    global _ADDMM_OUT_DTYPE_OK
    if acc.dtype == dlogits.dtype:
        acc.addmm_(dlogits.t(), h)
        return
    if _ADDMM_OUT_DTYPE_OK and acc.device.type == "cuda":
        try:  # torch >= 2.8 on CUDA: bf16/fp16 inputs, float32 accumulation and output
            torch.addmm(acc, dlogits.t(), h, out_dtype=acc.dtype, out=acc)
            return
        except (RuntimeError, TypeError):
            _ADDMM_OUT_DTYPE_OK = False
    acc.add_(dlogits.t().mm(h))


def _run(hidden, weight, target, bias, cfg, scale, row_scale, compute_grad, chunk_ce):
    """Per-row losses [N] and (if ``compute_grad``) grads of hidden, weight, bias.

    ``cfg = (ignore_index, label_smoothing, kind, chunk_size, compute_dtype, accum_dtype)``.
    """
    ignore_index, smoothing, kind, chunk_size, compute_dtype, accum_dtype = cfg
    n, v = hidden.shape[0], weight.shape[0]
    cd = compute_dtype or torch.promote_types(hidden.dtype, weight.dtype)
    acc_dtype = torch.promote_types(cd, torch.float32)
    with torch.autocast(hidden.device.type, enabled=False):
        w = weight.to(cd)
        b = bias.to(cd) if bias is not None else None
        rows = torch.empty(n, dtype=acc_dtype, device=hidden.device)
        if compute_grad:
            grad_h = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device)
            grad_w = torch.zeros(weight.shape, dtype=accum_dtype or acc_dtype, device=w.device)
            grad_b = torch.zeros(v, dtype=acc_dtype, device=weight.device)
        step = _chunk_rows(n, v, chunk_size)
        for start in range(0, n, step):
            end = min(n, start + step)
            h = hidden[start:end].to(cd)
            logits = torch.addmm(b, h, w.t()) if b is not None else h.mm(w.t())
            rows[start:end] = chunk_ce(
                kind, logits, target[start:end], ignore_index, smoothing, compute_grad, scale
            )
            if not compute_grad:
                continue
            if row_scale is not None:
                logits.mul_(row_scale[start:end, None].to(logits.dtype))
            grad_h[start:end] = _rows_times_weight(logits, w)
            _accumulate_weight_grad(grad_w, logits, h)
            if b is not None:
                grad_b += logits.sum(0, dtype=acc_dtype)
    if not compute_grad:  # three distinct tensors: custom-op outputs may not alias each other
        return rows, hidden.new_empty(0), hidden.new_empty(0), hidden.new_empty(0)
    grad_b = grad_b.to(bias.dtype) if bias is not None else hidden.new_empty(0)
    return rows, grad_h, grad_w.to(weight.dtype), grad_b


def _forward(chunk_ce):
    def forward(hidden, weight, target, bias, ignore_index, reduction, *rest):
        label_smoothing, kind, chunk_size, compute_dtype, accum_dtype, compute_grad = rest
        _validate(hidden, weight, target, bias, reduction, label_smoothing, kind, chunk_size)
        _ce.check_target_range(target, weight.shape[0], ignore_index)
        cd = compute_dtype or torch.promote_types(hidden.dtype, weight.dtype)
        scale = _ce.grad_scale(
            target, ignore_index, reduction, torch.promote_types(cd, torch.float32)
        )
        cfg = (ignore_index, *rest[:-1])
        rows, gh, gw, gb = _run(
            hidden, weight, target, bias, cfg, scale, None, compute_grad, chunk_ce
        )
        return _ce.reduce_loss(rows, target, ignore_index, reduction), gh, gw, gb

    return forward


def _backward_none(chunk_ce):
    def backward(grad_rows, hidden, weight, target, bias, *cfg):
        ones = torch.ones(1, dtype=grad_rows.dtype, device=hidden.device)
        _, gh, gw, gb = _run(hidden, weight, target, bias, cfg, ones, grad_rows, True, chunk_ce)
        return gh, gw, gb

    return backward


_reference_forward = _forward(_reference_chunk_ce)
_reference_backward_none = _backward_none(_reference_chunk_ce)


# ----------------------------------------------------------------------------- custom ops
# (hidden, weight, target, bias, ignore_index, reduction, label_smoothing, kind, chunk_size,
#  compute_dtype, accum_dtype, compute_grad) -> (loss, grad_hidden, grad_weight, grad_bias)
@torch.library.custom_op("stablecore::linear_cross_entropy", mutates_args=())
def _lce_op(
    hidden: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None, ignore_index: int,
    reduction: str, label_smoothing: float, kind: str, chunk_size: int,
    compute_dtype: torch.dtype | None, accum_dtype: torch.dtype | None, compute_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    return _reference_forward(
        hidden, weight, target, bias, ignore_index, reduction, label_smoothing, kind,
        chunk_size, compute_dtype, accum_dtype, compute_grad,
    )  # fmt: skip


@_lce_op.register_fake
def _(hidden, weight, target, bias, ignore_index, reduction, label_smoothing, kind, *rest):
    chunk_size, compute_dtype, _accum_dtype, compute_grad = rest
    _validate(hidden, weight, target, bias, reduction, label_smoothing, kind, chunk_size)
    cd = compute_dtype or torch.promote_types(hidden.dtype, weight.dtype)
    acc = torch.promote_types(cd, torch.float32)
    loss = hidden.new_empty((hidden.shape[0],) if reduction == "none" else (), dtype=acc)
    if not compute_grad:
        return loss, hidden.new_empty(0), hidden.new_empty(0), hidden.new_empty(0)
    gb = torch.empty_like(bias) if bias is not None else hidden.new_empty(0)
    return loss, torch.empty_like(hidden), torch.empty_like(weight), gb


@torch.library.custom_op("stablecore::linear_cross_entropy_backward", mutates_args=())
def _lce_backward_op(
    grad_rows: Tensor, hidden: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None,
    ignore_index: int, label_smoothing: float, kind: str, chunk_size: int,
    compute_dtype: torch.dtype | None, accum_dtype: torch.dtype | None,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    return _reference_backward_none(
        grad_rows, hidden, weight, target, bias, ignore_index, label_smoothing, kind,
        chunk_size, compute_dtype, accum_dtype,
    )  # fmt: skip


@_lce_backward_op.register_fake
def _(grad_rows, hidden, weight, target, bias, ignore_index, label_smoothing, kind, *rest):
    _validate(hidden, weight, target, bias, "none", label_smoothing, kind, rest[0])
    if tuple(grad_rows.shape) != (hidden.shape[0],):
        raise ValueError(f"grad_rows must be [{hidden.shape[0]}], got {tuple(grad_rows.shape)}")
    gb = torch.empty_like(bias) if bias is not None else hidden.new_empty(0)
    return torch.empty_like(hidden), torch.empty_like(weight), gb


def _setup_context(ctx, inputs, output):
    hidden, weight, target, bias, ignore_index, reduction, *rest = inputs
    _, gh, gw, gb = output
    ctx.mark_non_differentiable(gh, gw, gb)
    ctx.reduction, ctx.has_bias, ctx.compute_grad = reduction, bias is not None, rest[-1]
    if reduction == "none":
        ctx.save_for_backward(hidden, weight, target, bias)
        ctx.args = (ignore_index, *rest[:-1])
    else:
        ctx.save_for_backward(gh, gw, gb)


def _backward(ctx, grad_loss, *_unused):
    if ctx.reduction == "none":
        hidden, weight, target, bias = ctx.saved_tensors
        gh, gw, gb = torch.ops.stablecore.linear_cross_entropy_backward(
            grad_loss.contiguous(), hidden, weight, target, bias, *ctx.args
        )
    else:
        if not ctx.compute_grad:
            raise RuntimeError("linear_cross_entropy ran with compute_grad=False")
        gh, gw, gb = (_ce.scale_saved_grad(g, grad_loss) for g in ctx.saved_tensors)
    return gh, gw, None, gb if ctx.has_bias else None, *([None] * 8)


_lce_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- Triton backend
def _unsupported(hidden: Tensor, weight: Tensor, *args, **kwargs) -> str | None:
    compute_dtype = args[7] if len(args) > 7 else kwargs.get("compute_dtype")
    cd = compute_dtype or torch.promote_types(hidden.dtype, weight.dtype)
    if cd not in _ce._TRITON_DTYPES:
        return f"compute dtype {cd} has no Triton kernel (float16/bfloat16/float32 do)"
    return None


def _unsupported_backward(grad_rows: Tensor, hidden: Tensor, weight: Tensor, *args, **kwargs):
    return _unsupported(hidden, weight, *args[:2], None, *args[2:], **kwargs)


_dispatch.register_triton_kernel(
    _lce_op, _forward(_triton_chunk_ce), _reference_forward, _unsupported
)
_dispatch.register_triton_kernel(
    _lce_backward_op,
    _backward_none(_triton_chunk_ce),
    _reference_backward_none,
    _unsupported_backward,
)
for _name in ("linear_cross_entropy", "linear_cross_entropy_backward"):
    _dispatch.describe_op(_name, triton_dtypes=_ce._TRITON_DTYPES, note="chunked; matmuls by torch")


# ----------------------------------------------------------------------------- public API
def _reference_differentiable(
    hidden, weight, target, bias, ignore_index, reduction, smoothing, kind, compute_dtype
):
    cd = compute_dtype or torch.promote_types(hidden.dtype, weight.dtype)
    with torch.autocast(hidden.device.type, enabled=False):
        logits = torch.nn.functional.linear(
            hidden.to(cd), weight.to(cd), bias.to(cd) if bias is not None else None
        )
        acc = torch.promote_types(cd, torch.float32)
        rows, _ = _ce.reference_rows(logits.to(acc), target, ignore_index, smoothing, kind)
    return _ce.reduce_loss(rows, target, ignore_index, reduction)


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    kind: str = "softmax",
    chunk_size: int = 0,
    accum_dtype: torch.dtype | None = None,
) -> Tensor:
    """Cross-entropy of ``hidden @ weight.T + bias`` without materialising the logits.

    Args:
        hidden: ``[N, H]`` (or ``[..., H]``) float16/bfloat16/float32/float64.
        weight: ``[V, H]`` (an ``nn.Linear`` / LM-head weight). bias: optional ``[V]``.
        target: ``[N]`` (or ``[...]``) integer classes in ``[0, V)`` or ``ignore_index``.
        reduction: ``"mean"`` (over non-ignored rows; NaN if none, like torch), ``"sum"``,
            ``"none"`` (shape of ``target``). label_smoothing: as ``F.cross_entropy``.
        kind: ``"softmax"`` (default here) or ``"stablemax"``.
        chunk_size: rows per chunk (0: about 2^26 / V rows).
        accum_dtype: dtype of the grad_weight accumulator across chunks. Default float32
            (float64 for float64): accurate, but for a bf16 weight it costs 4 V H extra bytes;
            ``torch.bfloat16`` accumulates in the weight's dtype instead (Liger's default).

    Returns:
        The float32 loss (float64 for float64 inputs). The compute dtype is the autocast dtype
        when autocast is on, else ``promote_types(hidden.dtype, weight.dtype)``. Gradients for
        hidden, weight and bias are computed in the forward; one backward per forward.
        :func:`stablecore.ops.reference_mode` gives the unfused, arbitrarily differentiable
        version.

    Example::

        >>> h = torch.randn(8, 16, requires_grad=True); w = torch.randn(100, 16, requires_grad=True)
        >>> linear_cross_entropy(h, w, torch.randint(0, 100, (8,))).backward()
    """
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")
    for name, t in (("hidden", hidden), ("weight", weight)):
        _dispatch.check_floating(name, t)
    if hidden.dim() >= 1 and target.shape == hidden.shape[:-1]:
        h2d, t1d = hidden.reshape(target.numel(), hidden.shape[-1]), target.reshape(-1)
    else:
        h2d, t1d = hidden, target
    _validate(h2d, weight, t1d, bias, reduction, label_smoothing, kind, chunk_size)
    if accum_dtype is not None and not accum_dtype.is_floating_point:
        raise TypeError(f"accum_dtype must be a floating dtype, got {accum_dtype}")
    _ce.check_target_range(t1d, weight.shape[0], ignore_index)
    device_type = hidden.device.type
    compute_dtype = (
        torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    )
    if _dispatch.plain_reference_requested():
        loss = _reference_differentiable(
            h2d, weight, t1d, bias, ignore_index, reduction, label_smoothing, kind, compute_dtype
        )
    else:
        needs_grad = any(t is not None and t.requires_grad for t in (hidden, weight, bias))
        compute_grad = needs_grad and torch.is_grad_enabled() and reduction != "none"
        args = (ignore_index, reduction, label_smoothing, kind, chunk_size, compute_dtype)
        loss = _lce_op(h2d, weight, t1d, bias, *args, accum_dtype, compute_grad)[0]
    return loss.reshape(target.shape) if reduction == "none" else loss


def stablemax_linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    chunk_size: int = 0,
    accum_dtype: torch.dtype | None = None,
) -> Tensor:
    """StableMax cross-entropy of ``hidden @ weight.T + bias``, chunked and fused; see
    :func:`linear_cross_entropy` (this is ``kind="stablemax"``) for shapes and semantics.

    Example::

        >>> h = torch.randn(8, 16, requires_grad=True); w = torch.randn(100, 16, requires_grad=True)
        >>> stablemax_linear_cross_entropy(h, w, torch.randint(0, 100, (8,))).backward()
    """
    return linear_cross_entropy(
        hidden, weight, target, bias, ignore_index, reduction, label_smoothing,
        kind="stablemax", chunk_size=chunk_size, accum_dtype=accum_dtype,
    )  # fmt: skip
