"""Fused StableMax cross-entropy: loss and logit gradient in one pass, no probabilities stored.

StableMax cross-entropy (Prieto et al. 2025) is ``-log(s(x_y) / sum_j s(x_j))`` with
s(x) = x + 1 (x >= 0), 1 / (1 - x) (x < 0); equivalently softmax cross-entropy of
g(x) = sign(x) log1p|x|, whose gradient is (p_j - 1[j = y]) g'(x_j), g'(x) = 1 / (1 + |x|).

Layers (the pattern of :mod:`stablecore.ops.stablemax`):

1. reference in plain PyTorch, computing in ``promote_types(dtype, float32)``; it computes
   1 - p_y as sum_{k != y} s_k / S (no cancellation) and the gradient analytically;
2. ``stablecore::stablemax_cross_entropy`` -> ``(loss, grad_logits)``: the gradient is computed
   in the forward (Liger-style, one read of the logits) and saved, already scaled for ``mean``;
3. ``register_fake`` validates;
4. ``register_autograd``; its backward op ``stablecore::cross_entropy_scale_grad`` multiplies the
   saved gradient by the incoming one; when that is exactly 1 (``loss.backward()``) the saved
   buffer is handed over as is, so the backward allocates nothing;
5. Triton launcher (``kernels/stablemax_cross_entropy.py``) for CUDA and CPU-under-interpreter;
   ``stablecore::stablemax_cross_entropy_inplace_`` writes the gradient over the logits (its
   backward scales that buffer in place: ``stablecore::cross_entropy_scale_grad_``, so only one
   backward per forward there);
6. :func:`stablemax_cross_entropy`.

Semantics follow ``F.cross_entropy`` with class dim last: ignored rows contribute 0 loss and 0
gradient; ``mean`` divides by the number of non-ignored rows, so an all-ignored batch gives NaN
loss and zero gradient, exactly like torch. An out-of-range target raises ``ValueError`` for CPU
tensors and gives a NaN loss on CUDA (checking there would cost a device sync).
"""

from __future__ import annotations

import torch
from torch import Tensor

from stablecore.ops import _dispatch

__all__ = ["stablemax_cross_entropy"]

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_REDUCTIONS = ("mean", "sum", "none")
_KINDS = ("stablemax", "softmax")


# ----------------------------------------------------------------------------- validation
def validate(
    logits: Tensor, target: Tensor, reduction: str, label_smoothing: float, name: str = "logits"
) -> None:
    """Shared by every cross-entropy op: logits [N, V] floating, target [N] integer."""
    _dispatch.check_floating(name, logits)
    if not isinstance(target, Tensor) or target.dtype.is_floating_point or target.is_complex():
        raise TypeError(
            f"target must be an integer tensor of class indices, got "
            f"{getattr(target, 'dtype', type(target).__name__)}"
        )
    _dispatch.check_same_device(**{name: logits, "target": target})
    if logits.dim() != 2 or target.dim() != 1 or target.shape[0] != logits.shape[0]:
        raise ValueError(
            f"expected {name} [N, V] and target [N], got {name} {tuple(logits.shape)} and "
            f"target {tuple(target.shape)}"
        )
    if logits.shape[1] == 0:
        raise ValueError(f"{name} has no classes: shape {tuple(logits.shape)}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")


def check_target_range(target: Tensor, n_classes: int, ignore_index: int) -> None:
    """ValueError for a target outside [0, V) on CPU (free there; on CUDA the kernels give NaN)."""
    if target.device.type != "cpu" or target.numel() == 0:
        return
    bad = (target != ignore_index) & ((target < 0) | (target >= n_classes))
    if bool(bad.any()):
        value = int(target[bad][0])
        raise ValueError(f"target {value} is out of range for {n_classes} classes")


def flatten(logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """[..., V] logits and [...] target -> [N, V] and [N] (views when possible)."""
    if logits.dim() >= 1 and target.shape == logits.shape[:-1]:
        return logits.reshape(target.numel(), logits.shape[-1]), target.reshape(-1)
    return logits, target


# ----------------------------------------------------------------------------- 1. reference
def _s(x: Tensor) -> Tensor:
    return torch.where(x >= 0, x + 1, 1 / (1 + x.abs()))


def _g(x: Tensor) -> Tensor:
    return torch.sign(x) * torch.log1p(x.abs())


def reference_rows(
    x: Tensor,
    target: Tensor,
    ignore_index: int,
    smoothing: float,
    kind: str,
    compute_grad: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Per-row loss [N] (differentiable by autograd) and, if asked, the analytic gradient
    dloss_row/dx [N, V], both in the dtype of ``x`` (already the compute dtype)."""
    n, v = x.shape
    keep = target != ignore_index
    in_range = (target >= 0) & (target < v)
    y = torch.where(keep & in_range, target, 0).long()
    onehot = torch.zeros_like(x, dtype=torch.bool).scatter_(1, y[:, None], True)
    xy = x.gather(1, y[:, None])[:, 0]
    xy = torch.where(in_range | ~keep, xy, torch.full_like(xy, float("nan")))
    if kind == "stablemax":
        q_sum = _s(x).masked_fill(onehot, 0).sum(-1)
        total = q_sum + _s(xy)
        log_total, zy, mean_z = total.log(), _g(xy), None
    else:
        m = x.masked_fill(onehot, float("-inf")).amax(-1)
        big = torch.where(m == float("-inf"), xy, torch.maximum(m, xy)).detach()
        q_sum = (x - big[:, None]).exp().masked_fill(onehot, 0).sum(-1)
        total = q_sum + (xy - big).exp()
        log_total, zy = total.log() + big, xy
    q = q_sum / total
    # 1 - p_y = q exactly; -log1p(-q) is accurate as p_y -> 1, log S - z_y as p_y -> 0.
    nll = torch.where(q < 0.5, -torch.log1p(-q.clamp(max=0.5)), log_total - zy)
    if smoothing:
        mean_z = (_g(x) if kind == "stablemax" else x).mean(-1)
        nll = (1 - smoothing) * nll + smoothing * (log_total - mean_z)
    loss = torch.where(keep, nll, torch.zeros_like(nll))
    if not compute_grad:
        return loss, None
    with torch.no_grad():
        if kind == "stablemax":
            r = 1 / (1 + x.abs())
            d = torch.where(x >= 0, 1 / total[:, None], r * r / total[:, None])
            dy = -q[:, None] * r
            if smoothing:
                d = d - smoothing / v * r
                dy = dy + (smoothing - smoothing / v) * r
        else:
            d = (x - big[:, None]).exp() / total[:, None]
            dy = -q[:, None].expand_as(d)
            if smoothing:
                d = d - smoothing / v
                dy = dy + (smoothing - smoothing / v)
        grad = torch.where(onehot, dy, d)
        grad = torch.where(keep[:, None], grad, torch.zeros_like(grad))
    return loss, grad


def reduce_loss(rows: Tensor, target: Tensor, ignore_index: int, reduction: str) -> Tensor:
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "sum":
        return total
    return total / (target != ignore_index).sum()


def grad_scale(target: Tensor, ignore_index: int, reduction: str, dtype: torch.dtype) -> Tensor:
    """[1] tensor: 1 / (number of counted rows) for ``mean`` (a device tensor: no host sync)."""
    if reduction != "mean":
        return torch.ones(1, dtype=dtype, device=target.device)
    # clamp: an all-ignored batch has an all-zero gradient (its NaN loss comes from reduce_loss)
    return (1 / (target != ignore_index).sum().clamp_min(1).to(dtype)).reshape(1)


def _reference_forward(
    logits: Tensor,
    target: Tensor,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    compute_grad: bool,
    kind: str = "stablemax",
    grad_out: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    validate(logits, target, reduction, label_smoothing)
    check_target_range(target, logits.shape[1], ignore_index)
    compute_dtype = torch.promote_types(logits.dtype, torch.float32)
    rows, grad = reference_rows(
        logits.to(compute_dtype), target, ignore_index, label_smoothing, kind, compute_grad
    )
    loss = reduce_loss(rows, target, ignore_index, reduction)
    if not compute_grad:
        return loss, logits.new_empty(0)
    grad = grad * grad_scale(target, ignore_index, reduction, compute_dtype)
    if grad_out is None:
        return loss, grad.to(logits.dtype)
    grad_out.copy_(grad)
    return loss, grad_out


# ----------------------------------------------------------------------------- 2-4. custom ops
@torch.library.custom_op("stablecore::stablemax_cross_entropy", mutates_args=())
def _ce_op(
    logits: Tensor,
    target: Tensor,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    compute_grad: bool,
) -> tuple[Tensor, Tensor]:
    return _reference_forward(
        logits, target, ignore_index, reduction, label_smoothing, compute_grad
    )


def _fake_outputs(logits, target, reduction, compute_grad) -> tuple[Tensor, Tensor]:
    compute_dtype = torch.promote_types(logits.dtype, torch.float32)
    shape = (logits.shape[0],) if reduction == "none" else ()
    loss = logits.new_empty(shape, dtype=compute_dtype)
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
    return loss, grad if compute_grad else logits.new_empty(0)


@_ce_op.register_fake
def _(logits, target, ignore_index, reduction, label_smoothing, compute_grad):
    validate(logits, target, reduction, label_smoothing)
    return _fake_outputs(logits, target, reduction, compute_grad)


def _broadcast(grad_loss: Tensor, grad: Tensor) -> Tensor:
    return grad_loss if grad_loss.dim() == 0 else grad_loss.reshape(-1, *[1] * (grad.dim() - 1))


@torch.library.custom_op("stablecore::cross_entropy_scale_grad", mutates_args=())
def _scale_grad(grad: Tensor, grad_loss: Tensor) -> Tensor:
    """grad * grad_loss (a scalar, or one value per row), in grad's dtype."""
    return torch.mul(grad, _broadcast(grad_loss, grad)).to(grad.dtype)


@_scale_grad.register_fake
def _(grad, grad_loss):
    if grad_loss.dim() not in (0, 1):
        raise ValueError(f"grad_loss must be 0-d or [N], got {tuple(grad_loss.shape)}")
    return torch.empty_like(grad)


@torch.library.custom_op("stablecore::cross_entropy_scale_grad_", mutates_args=("grad",))
def _scale_grad_(grad: Tensor, grad_loss: Tensor) -> None:
    """In place: grad *= grad_loss (skipped when grad_loss is exactly 1, which syncs once)."""
    if grad_loss.dim() != 0 or not torch.equal(grad_loss, torch.ones_like(grad_loss)):
        grad.mul_(_broadcast(grad_loss, grad))


@_scale_grad_.register_fake
def _(grad, grad_loss):
    if grad_loss.dim() not in (0, 1):
        raise ValueError(f"grad_loss must be 0-d or [N], got {tuple(grad_loss.shape)}")
    return None


def scale_saved_grad(grad: Tensor, grad_loss: Tensor) -> Tensor:
    """The saved forward gradient times the incoming one. ``loss.backward()`` passes exactly 1:
    then the saved buffer itself is returned (no copy; the check syncs once, and is skipped
    under torch.compile, which always multiplies). The saved buffer is never modified, so
    ``retain_graph`` and gradcheck work."""
    if grad_loss.dim() == 0 and _is_plain_eager(grad_loss):
        if torch.equal(grad_loss, torch.ones_like(grad_loss)):
            return grad
    return torch.ops.stablecore.cross_entropy_scale_grad(grad, grad_loss)


def _is_plain_eager(t: Tensor) -> bool:
    """True when ``t`` holds real data outside any tracer (compile, fake, functionalisation)."""
    from torch._guards import detect_fake_mode
    from torch.fx.experimental.proxy_tensor import get_proxy_mode

    return not (
        torch.compiler.is_compiling()
        or type(t) is not torch.Tensor
        or torch._is_functional_tensor(t)
        or detect_fake_mode((t,)) is not None
        or get_proxy_mode() is not None
    )


def _setup_context(ctx, inputs, output):
    _, grad = output
    ctx.mark_non_differentiable(grad)
    ctx.save_for_backward(grad)
    ctx.compute_grad = inputs[-1]


def _backward(ctx, grad_loss, _grad_grad):
    if not ctx.compute_grad:
        raise RuntimeError(
            "stablemax_cross_entropy was called with compute_grad=False; call the public "
            "function with logits that require grad"
        )
    (grad,) = ctx.saved_tensors
    return scale_saved_grad(grad, grad_loss), None, None, None, None, None


_ce_op.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("stablecore::stablemax_cross_entropy_inplace_", mutates_args=("logits",))
def _ce_inplace_op(
    logits: Tensor, target: Tensor, ignore_index: int, reduction: str, label_smoothing: float
) -> Tensor:
    return _reference_inplace(logits, target, ignore_index, reduction, label_smoothing)


@_ce_inplace_op.register_fake
def _(logits, target, ignore_index, reduction, label_smoothing):
    validate(logits, target, reduction, label_smoothing)
    return _fake_outputs(logits, target, reduction, False)[0]


class _InplaceCE(torch.autograd.Function):
    """Writes the gradient over the logits (their storage is reused; the values are gone)."""

    @staticmethod
    def forward(ctx, logits, target, ignore_index, reduction, smoothing, op):
        loss = op(logits, target, ignore_index, reduction, smoothing)
        ctx.save_for_backward(logits.detach())
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        torch.ops.stablecore.cross_entropy_scale_grad_(grad, grad_loss)
        return grad, None, None, None, None, None


# ----------------------------------------------------------------------------- 5. Triton backend
def unsupported(logits: Tensor, *args, **kwargs) -> str | None:
    if logits.dtype not in _TRITON_DTYPES:
        return f"dtype {logits.dtype} has no Triton kernel (float16/bfloat16/float32 do)"
    if logits.dim() == 2 and logits.stride(-1) != 1:
        return "logits need a unit column stride"
    return None


def triton_rows(
    kind: str,
    logits: Tensor,
    target: Tensor,
    ignore_index: int,
    smoothing: float,
    compute_grad: bool,
    scale: Tensor,
    grad_out: Tensor | None,
) -> tuple[Tensor, Tensor | None]:
    """Launch the kernel of ``kind``: per-row loss [N] float32, gradient into ``grad_out``."""
    from stablecore.kernels import cross_entropy as softmax_kernels
    from stablecore.kernels import stablemax_cross_entropy as kernels

    rows = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    if logits.shape[0] == 0:
        return rows, grad_out
    fn = kernels.stablemax_ce_fwd if kind == "stablemax" else softmax_kernels.softmax_ce_fwd
    fn(
        logits,
        target.contiguous(),
        rows,
        grad_out,
        scale.to(torch.float32),
        ignore_index,
        smoothing,
        compute_grad,
    )
    return rows, grad_out


def _triton_forward(
    logits, target, ignore_index, reduction, label_smoothing, compute_grad, grad_out=None
):
    validate(logits, target, reduction, label_smoothing)
    check_target_range(target, logits.shape[1], ignore_index)
    scale = grad_scale(target, ignore_index, reduction, torch.float32)
    if compute_grad and grad_out is None:
        grad_out = torch.empty_like(logits, memory_format=torch.contiguous_format)
    rows, grad = triton_rows(
        "stablemax", logits, target, ignore_index, label_smoothing, compute_grad, scale, grad_out
    )
    loss = reduce_loss(rows, target, ignore_index, reduction)
    return loss, grad if compute_grad else logits.new_empty(0)


def _triton_inplace(logits, target, ignore_index, reduction, label_smoothing):
    return _triton_forward(
        logits, target, ignore_index, reduction, label_smoothing, True, grad_out=logits
    )[0]


def _reference_inplace(logits, target, ignore_index, reduction, label_smoothing):
    return _reference_forward(
        logits, target, ignore_index, reduction, label_smoothing, True, grad_out=logits
    )[0]


_dispatch.register_triton_kernel(_ce_op, _triton_forward, _reference_forward, unsupported)
_dispatch.register_triton_kernel(_ce_inplace_op, _triton_inplace, _reference_inplace, unsupported)
_dispatch.describe_op("stablemax_cross_entropy", triton_dtypes=_TRITON_DTYPES)
_dispatch.describe_op("stablemax_cross_entropy_inplace_", triton_dtypes=_TRITON_DTYPES)


# ----------------------------------------------------------------------------- 6. public API
def stablemax_cross_entropy(
    logits: Tensor,
    target: Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    inplace_grad: bool = False,
) -> Tensor:
    """StableMax cross-entropy, a drop-in for ``F.cross_entropy`` (class dimension last).

    Args:
        logits: ``[N, V]`` (or ``[..., V]``) float16/bfloat16/float32/float64.
        target: ``[N]`` (or ``[...]``) integer class indices in ``[0, V)`` or ``ignore_index``.
        ignore_index: rows with this target add 0 to the loss and get a 0 gradient.
        reduction: ``"mean"`` (over non-ignored rows; NaN if all are ignored, like torch),
            ``"sum"`` or ``"none"`` (shape of ``target``).
        label_smoothing: eps in ``[0, 1]``; target ``(1 - eps) e_y + eps / V`` as in torch.
        inplace_grad: write the gradient over ``logits`` during the forward (no extra
            ``[N, V]`` buffer; ``logits`` must not be used afterwards and need unit column
            stride). Default: a new buffer.

    Returns:
        The loss in ``logits.dtype`` (computed in float32, float64 for float64 input). The
        gradient is computed in the same pass (logits read once) when ``logits`` requires grad;
        backward only rescales it (with ``inplace_grad`` in place: one backward per forward).
        No double backward; use :func:`stablecore.ops.reference_mode` for higher orders.

    Raises:
        TypeError: non-floating logits or non-integer target. ValueError: shapes, devices,
        reduction, label_smoothing, or (CPU) a target out of range.

    Example::

        >>> logits = torch.tensor([[1e4, -1e4, 0.0]], requires_grad=True)
        >>> loss = stablemax_cross_entropy(logits, torch.tensor([0]))
        >>> loss.backward()   # float32 softmax would give loss 0 and gradient 0 here
    """
    x2d, t1d = flatten(logits, target)
    validate(x2d, t1d, reduction, label_smoothing)
    check_target_range(t1d, x2d.shape[1], ignore_index)
    if _dispatch.plain_reference_requested():
        compute_dtype = torch.promote_types(logits.dtype, torch.float32)
        rows, _ = reference_rows(
            x2d.to(compute_dtype), t1d, ignore_index, label_smoothing, "stablemax"
        )
        loss = reduce_loss(rows, t1d, ignore_index, reduction)
    else:
        compute_grad = logits.requires_grad and torch.is_grad_enabled()
        if inplace_grad and compute_grad:
            if x2d.stride(-1) != 1 or x2d.data_ptr() != logits.data_ptr():
                raise ValueError(
                    f"inplace_grad needs logits with a unit column stride, got strides "
                    f"{tuple(logits.stride())} for shape {tuple(logits.shape)}"
                )
            op = torch.ops.stablecore.stablemax_cross_entropy_inplace_
            loss = _InplaceCE.apply(x2d, t1d, ignore_index, reduction, label_smoothing, op)
        else:
            loss = _ce_op(x2d, t1d, ignore_index, reduction, label_smoothing, compute_grad)[0]
    if reduction == "none":
        loss = loss.reshape(target.shape)
    return loss.to(logits.dtype)
