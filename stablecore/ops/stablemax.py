"""StableMax and log-StableMax: the exemplar op, end to end through every layer.

StableMax (Prieto et al., "Grokking at the Edge of Numerical Stability", 2025) replaces exp in
softmax with

    s(x) = x + 1        (x >= 0)
    s(x) = 1 / (1 - x)  (x < 0),        stablemax(x)_i = s(x_i) / sum_j s(x_j).

Because s(x) = exp(g(x)) with g(x) = sign(x) * log1p(|x|), log_stablemax(x) = log_softmax(g(x))
and the gradient is that of log_softmax times g'(x) = 1 / (1 + |x|).

Layers, in the order every op of stablecore follows:

1. reference (plain PyTorch, computing in ``promote_types(dtype, float32)``): the spec;
2. custom ops ``stablecore::stablemax`` / ``stablecore::log_stablemax`` returning
   ``(out, log_norm)``, where ``log_norm = log(sum_j s(x_j))`` per row is saved for backward
   (it lets backward recompute p from x instead of reading the output);
3. ``register_fake`` that validates and gives the output layout;
4. ``register_autograd``; the backward is its own op ``stablecore::stablemax_backward`` (so it
   dispatches per device too), itself differentiable through the reference (double backward);
5. Triton launchers for CUDA (and CPU under ``TRITON_INTERPRET=1``) from ``stablecore.kernels``;
6. the public functions :func:`stablemax` and :func:`log_stablemax`.

Output layout: contiguous in the order where ``dim`` is last (for ``dim=-1`` and a contiguous
input, plain contiguous). Every backend returns exactly this layout.
"""

from __future__ import annotations

import torch
from torch import Tensor

from stablecore.ops import _dispatch

__all__ = ["log_stablemax", "stablemax"]

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ----------------------------------------------------------------------------- layout helpers
def _moved_shape(x: Tensor, dim: int) -> torch.Size:
    return x.movedim(dim, -1).shape if x.dim() > 0 else torch.Size([1])


def _restore(out_moved: Tensor, x: Tensor, dim: int) -> Tensor:
    return out_moved.movedim(-1, dim) if x.dim() > 0 else out_moved.reshape(())


def _new_outputs(x: Tensor, dim: int) -> tuple[Tensor, Tensor, Tensor]:
    """(out in the op's layout, the same memory with dim last, log_norm [rows...])."""
    moved = _moved_shape(x, dim)
    out_moved = torch.empty(moved, dtype=x.dtype, device=x.device)
    compute_dtype = torch.promote_types(x.dtype, torch.float32)
    log_norm = torch.empty(moved[:-1], dtype=compute_dtype, device=x.device)
    return _restore(out_moved, x, dim), out_moved, log_norm


def _rows(t: Tensor, dim: int) -> Tensor:
    """``t`` as [rows, cols] with ``dim`` as the unit-stride column axis (a copy only if needed)."""
    moved = t.movedim(dim, -1) if t.dim() > 0 else t.reshape(1)
    t2d = moved.reshape(-1, moved.shape[-1])
    return t2d if t2d.stride(-1) == 1 else t2d.contiguous()


def _validate(x: Tensor, dim: int) -> int:
    _dispatch.check_floating("x", x)
    return _dispatch.normalize_dim(dim, x.dim(), tuple(x.shape))


# ----------------------------------------------------------------------------- 1. reference
def _s(x: Tensor) -> Tensor:
    # 1 / (1 + |x|) equals 1 / (1 - x) where it is selected, and never divides by zero.
    t = 1 + x.abs()
    return torch.where(x >= 0, t, t.reciprocal())


def _g(x: Tensor) -> Tensor:
    return torch.log1p(x.abs()).copysign(x)


def _reference_moved(xm: Tensor, log: bool) -> tuple[Tensor, Tensor]:
    """StableMax over the last dim of ``xm`` (already in the compute dtype); differentiable."""
    s = _s(xm)
    # Summing s / max(s) keeps a row of huge logits from overflowing the sum; p is unchanged.
    inv_max = s.amax(-1, keepdim=True).reciprocal()
    total = (s * inv_max).sum(-1, keepdim=True)
    log_norm = total.log() - inv_max.log()
    out = _g(xm) - log_norm if log else s * (inv_max / total)
    return out, log_norm.squeeze(-1)


def _reference_forward(x: Tensor, dim: int, log: bool) -> tuple[Tensor, Tensor]:
    dim = _validate(x, dim)
    out, out_moved, log_norm = _new_outputs(x, dim)
    if x.numel() == 0:
        return out, log_norm.fill_(float("-inf"))
    compute_dtype = torch.promote_types(x.dtype, torch.float32)
    xm = (x.movedim(dim, -1) if x.dim() > 0 else x.reshape(1)).to(compute_dtype)
    y, ln = _reference_moved(xm, log)
    out_moved.copy_(y)
    log_norm.copy_(ln)
    return out, log_norm


def _reference_backward(grad: Tensor, x: Tensor, log_norm: Tensor, dim: int, log: bool) -> Tensor:
    _, grad_x_moved, _ = _new_outputs(x, dim)
    grad_x = _restore(grad_x_moved, x, dim)
    if x.numel() == 0:
        return grad_x
    compute_dtype = torch.promote_types(x.dtype, torch.float32)
    xm = (x.movedim(dim, -1) if x.dim() > 0 else x.reshape(1)).to(compute_dtype)
    gm = (grad.movedim(dim, -1) if grad.dim() > 0 else grad.reshape(1)).to(compute_dtype)
    p = torch.exp(_g(xm) - log_norm.to(compute_dtype).unsqueeze(-1))
    if log:
        gz = gm - p * gm.sum(-1, keepdim=True)
    else:
        gz = p * (gm - (gm * p).sum(-1, keepdim=True))
    grad_x_moved.copy_(gz / (1 + xm.abs()))
    return grad_x


# ----------------------------------------------------------------------------- 2-4. custom ops
def _make_forward_op(name: str, log: bool):
    @torch.library.custom_op(f"stablecore::{name}", mutates_args=())
    def op(x: Tensor, dim: int) -> tuple[Tensor, Tensor]:
        return _reference_forward(x, dim, log)

    @op.register_fake
    def _(x, dim):
        dim = _validate(x, dim)
        out, _, log_norm = _new_outputs(x, dim)
        return out, log_norm

    def setup_context(ctx, inputs, output):
        x, dim = inputs
        _, log_norm = output
        ctx.mark_non_differentiable(log_norm)
        ctx.save_for_backward(x, log_norm)
        ctx.dim = dim

    def backward(ctx, grad_out, _grad_log_norm):
        x, log_norm = ctx.saved_tensors
        return torch.ops.stablecore.stablemax_backward(grad_out, x, log_norm, ctx.dim, log), None

    op.register_autograd(backward, setup_context=setup_context)
    return op


@torch.library.custom_op("stablecore::stablemax_backward", mutates_args=())
def _stablemax_backward(grad: Tensor, x: Tensor, log_norm: Tensor, dim: int, log: bool) -> Tensor:
    return _reference_backward(grad, x, log_norm, dim, log)


@_stablemax_backward.register_fake
def _(grad, x, log_norm, dim, log):
    dim = _validate(x, dim)
    _dispatch.check_same_device(grad=grad, x=x, log_norm=log_norm)
    if grad.shape != x.shape:
        raise ValueError(f"grad has shape {tuple(grad.shape)} but x has {tuple(x.shape)}")
    out, _, _ = _new_outputs(x, dim)
    return out


def _backward_setup(ctx, inputs, output):
    grad, x, _log_norm, dim, log = inputs
    ctx.save_for_backward(grad, x)
    ctx.dim, ctx.log = dim, log


def _backward_backward(ctx, grad_grad_x):
    # Second derivatives through the differentiable reference. log_norm is a function of x, so
    # it is recomputed from x here (its own gradient slot stays None).
    grad, x = ctx.saved_tensors
    with torch.enable_grad():
        g = grad.detach().requires_grad_()
        xx = x.detach().requires_grad_()
        compute_dtype = torch.promote_types(x.dtype, torch.float32)
        xm = (xx.movedim(ctx.dim, -1) if xx.dim() > 0 else xx.reshape(1)).to(compute_dtype)
        gm = (g.movedim(ctx.dim, -1) if g.dim() > 0 else g.reshape(1)).to(compute_dtype)
        out, _ = _reference_moved(xm, ctx.log)
        first = torch.autograd.grad(out, xm, gm, create_graph=True)[0]
        ggm = grad_grad_x.movedim(ctx.dim, -1) if x.dim() > 0 else grad_grad_x.reshape(1)
        d_grad, d_x = torch.autograd.grad(first, (g, xx), ggm.to(compute_dtype), allow_unused=True)
    return d_grad, d_x, None, None, None


_stablemax_backward.register_autograd(_backward_backward, setup_context=_backward_setup)
_stablemax_op = _make_forward_op("stablemax", log=False)
_log_stablemax_op = _make_forward_op("log_stablemax", log=True)


# ----------------------------------------------------------------------------- 5. Triton backend
def _unsupported(x: Tensor, *args, **kwargs) -> str | None:
    if x.dtype not in _TRITON_DTYPES:
        return f"dtype {x.dtype} has no Triton kernel (float16/bfloat16/float32 do)"
    return None


def _triton_forward(log: bool):
    def launch(x: Tensor, dim: int) -> tuple[Tensor, Tensor]:
        from stablecore.kernels import stablemax as kernels

        dim = _validate(x, dim)
        out, out_moved, log_norm = _new_outputs(x, dim)
        if x.numel() == 0:
            return out, log_norm.fill_(float("-inf"))
        n_cols = out_moved.shape[-1]
        kernels.stablemax_fwd(_rows(x, dim), out_moved.view(-1, n_cols), log_norm.view(-1), log)
        return out, log_norm

    return launch


def _triton_backward(grad: Tensor, x: Tensor, log_norm: Tensor, dim: int, log: bool) -> Tensor:
    from stablecore.kernels import stablemax as kernels

    _, grad_x_moved, _ = _new_outputs(x, dim)
    grad_x = _restore(grad_x_moved, x, dim)
    if x.numel() == 0:
        return grad_x
    n_cols = grad_x_moved.shape[-1]
    kernels.stablemax_bwd(
        _rows(grad, dim),
        _rows(x, dim),
        log_norm.reshape(-1).contiguous(),
        grad_x_moved.view(-1, n_cols),
        log,
    )
    return grad_x


def _unsupported_backward(grad: Tensor, x: Tensor, log_norm: Tensor, *args) -> str | None:
    if grad.dtype != x.dtype:
        return f"grad dtype {grad.dtype} differs from x dtype {x.dtype}"
    if log_norm.dtype != torch.float32:
        return f"log_norm dtype {log_norm.dtype} is not float32"
    return _unsupported(x)


for _op, _log in ((_stablemax_op, False), (_log_stablemax_op, True)):
    _dispatch.register_triton_kernel(
        _op,
        _triton_forward(_log),
        lambda x, dim, _l=_log: _reference_forward(x, dim, _l),
        _unsupported,
    )
_dispatch.register_triton_kernel(
    _stablemax_backward, _triton_backward, _reference_backward, _unsupported_backward
)


# ----------------------------------------------------------------------------- native CPU backend
# csrc/stablemax_cpu.cpp, when the extension is built: multithreaded float32 rows.
def _native_forward(log: bool):
    def launch(x: Tensor, dim: int) -> tuple[Tensor, Tensor]:
        dim = _validate(x, dim)
        if x.numel() == 0:
            return _reference_forward(x, dim, log)
        out2d, log_norm = torch.ops.stablecore_C.stablemax_fwd(_rows(x, dim), log)
        moved = _moved_shape(x, dim)
        return _restore(out2d.view(moved), x, dim), log_norm.view(moved[:-1])

    return launch


def _native_backward(grad: Tensor, x: Tensor, log_norm: Tensor, dim: int, log: bool) -> Tensor:
    if x.numel() == 0:
        return _reference_backward(grad, x, log_norm, dim, log)
    grad_x2d = torch.ops.stablecore_C.stablemax_bwd(
        _rows(grad, dim), _rows(x, dim), log_norm.reshape(-1).contiguous(), log
    )
    return _restore(grad_x2d.view(_moved_shape(x, dim)), x, dim)


def _native_unsupported(x: Tensor, *args) -> str | None:
    return None if x.dtype == torch.float32 else f"dtype {x.dtype}: the CPU kernel is float32"


def _native_unsupported_backward(grad: Tensor, x: Tensor, log_norm: Tensor, *args) -> str | None:
    if grad.dtype != torch.float32 or log_norm.dtype != torch.float32:
        return "the CPU kernel is float32"
    return _native_unsupported(x)


_NATIVE_SERVES = "float32; other dtypes use the reference"
for _op, _log in ((_stablemax_op, False), (_log_stablemax_op, True)):
    _dispatch.register_native_kernel(
        _op,
        "cpu",
        _native_forward(_log),
        lambda x, dim, _l=_log: _reference_forward(x, dim, _l),
        _native_unsupported,
        _NATIVE_SERVES,
    )
_dispatch.register_native_kernel(
    _stablemax_backward,
    "cpu",
    _native_backward,
    _reference_backward,
    _native_unsupported_backward,
    _NATIVE_SERVES,
)
for _name in ("stablemax", "log_stablemax", "stablemax_backward"):
    _dispatch.describe_op(_name, triton_dtypes=_TRITON_DTYPES)


# ----------------------------------------------------------------------------- 6. public API
def stablemax(x: Tensor, dim: int = -1) -> Tensor:
    """StableMax along ``dim``: ``s(x_i) / sum_j s(x_j)``, a drop-in for ``torch.softmax``.

    Args:
        x: ``[..., V, ...]`` float16, bfloat16, float32 or float64 tensor, any strides.
        dim: the dimension that sums to one (default: the last).

    Returns:
        A tensor of ``x``'s shape and dtype (computed in float32, or float64 for float64 input),
        contiguous in the order where ``dim`` is last.

    Raises:
        TypeError: ``x`` is not floating point. ValueError: ``dim`` is out of range.

    Example::

        >>> stablemax(torch.tensor([0.0, 1.0, -1.0]))
        tensor([0.2857, 0.5714, 0.1429])
    """
    dim = _validate(x, dim)
    if _dispatch.plain_reference_requested():
        return _reference_forward_differentiable(x, dim, log=False)
    return _stablemax_op(x, dim)[0]


def log_stablemax(x: Tensor, dim: int = -1) -> Tensor:
    """log of :func:`stablemax`, computed as ``g(x) - log sum_j s(x_j)`` with
    ``g(x) = sign(x) log1p|x|`` (accurate where ``log(stablemax(x))`` would round to 0 or -inf).

    Shapes, dtypes and errors as :func:`stablemax`. Use it with ``F.nll_loss`` for StableMax
    cross-entropy. Example::

        >>> log_stablemax(torch.tensor([[1e4, -1e4]])).exp()
        tensor([[1.0000e+00, 9.9980e-09]])
    """
    dim = _validate(x, dim)
    if _dispatch.plain_reference_requested():
        return _reference_forward_differentiable(x, dim, log=True)
    return _log_stablemax_op(x, dim)[0]


def _reference_forward_differentiable(x: Tensor, dim: int, log: bool) -> Tensor:
    """The reference without the custom op, so autograd and torch.func see plain torch ops."""
    if x.numel() == 0:
        return _reference_forward(x, dim, log)[0]
    compute_dtype = torch.promote_types(x.dtype, torch.float32)
    xm = (x.movedim(dim, -1) if x.dim() > 0 else x.reshape(1)).to(compute_dtype)
    out, _ = _reference_moved(xm, log)
    out = out.to(x.dtype)
    return out.movedim(-1, dim) if x.dim() > 0 else out.reshape(())
