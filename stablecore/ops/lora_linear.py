"""LoRA linear as one op: ``y = x Wᵀ (+ b) + s · (d(x) Aᵀ) Bᵀ``, ``d(x) = x ∘ mask``.

Layers (as every stablecore op, see :mod:`stablecore.ops.stablemax`):

1. reference in plain PyTorch, computing in ``promote_types(dtype, float32)``;
2. ``stablecore::lora_linear(x, weight, bias, lora_A, lora_B, dropout_mask, scaling)`` returning
   ``(out, u)`` with ``u = d(x) Aᵀ`` (``[M, r]``, compute dtype) saved for backward;
3. ``register_fake`` that validates shapes/dtypes/devices;
4. ``register_autograd`` whose backward is the op ``stablecore::lora_linear_backward``, returning
   the five gradients (an empty tensor for each one not needed, so a frozen base never forms
   ``grad_W``);
5. Triton launchers (``kernels/lora.py``) for CUDA, and CPU under ``TRITON_INTERPRET=1``: the
   forward reads ``x`` once for both the base GEMM and ``d(x) Aᵀ``, and adds ``s · u Bᵀ`` in
   the epilogue; the backward computes ``grad_x = g W + s ((g B) A) ∘ mask`` with the same
   kernel (``g`` read once), the weight gradients with plain GEMMs;
6. the public :func:`lora_linear`.

Dropout travels as a ``mask`` tensor (``0`` or ``1/(1-p)``, ``x``'s shape and dtype): the forward
and backward see the same mask without keeping ``d(x)`` alive. No double backward.
"""

from __future__ import annotations

import torch
from torch import Tensor

from stablecore.ops import _dispatch

__all__ = ["lora_linear"]

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_GRADS = ("x", "weight", "bias", "lora_A", "lora_B")


# ----------------------------------------------------------------------------- validation
def _validate(x, weight, bias, lora_a, lora_b, mask) -> None:
    for name, t in (("x", x), ("weight", weight), ("lora_A", lora_a), ("lora_B", lora_b)):
        _dispatch.check_floating(name, t)
    if x.dim() != 2 or weight.dim() != 2 or lora_a.dim() != 2 or lora_b.dim() != 2:
        raise ValueError(
            f"expected 2-d x [M, K], weight [N, K], lora_A [r, K], lora_B [N, r]; got "
            f"{tuple(x.shape)}, {tuple(weight.shape)}, {tuple(lora_a.shape)}, {tuple(lora_b.shape)}"
        )
    n, k = weight.shape
    r = lora_a.shape[0]
    if x.shape[1] != k:
        raise ValueError(f"x has shape {tuple(x.shape)} but weight expects {k} input features")
    if lora_a.shape != (r, k) or lora_b.shape != (n, r):
        raise ValueError(
            f"lora_A {tuple(lora_a.shape)} and lora_B {tuple(lora_b.shape)} do not match "
            f"weight {tuple(weight.shape)}: expected lora_A [r, {k}] and lora_B [{n}, r]"
        )
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({n},)")
    if mask is not None:
        _dispatch.check_floating("dropout_mask", mask)
    if mask is not None and mask.shape != x.shape:
        raise ValueError(f"dropout_mask has shape {tuple(mask.shape)}, x has {tuple(x.shape)}")
    dtypes = {t.dtype for t in (x, weight, lora_a, lora_b)}
    if len(dtypes) > 1:
        raise TypeError(
            f"x, weight, lora_A, lora_B must share one dtype, got {sorted(map(str, dtypes))}"
        )
    _dispatch.check_same_device(x=x, weight=weight, bias=bias, lora_A=lora_a, lora_B=lora_b,
                                dropout_mask=mask)  # fmt: skip


def _cdt(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


# ----------------------------------------------------------------------------- 1. reference
def _reference_forward(x, weight, bias, lora_a, lora_b, mask, scaling) -> tuple[Tensor, Tensor]:
    cdt = _cdt(x)
    xc = x.to(cdt)
    xd = xc if mask is None else xc * mask.to(cdt)
    u = xd @ lora_a.to(cdt).t()
    w = weight.to(cdt).t()
    out = xc @ w if bias is None else torch.addmm(bias.to(cdt), xc, w)
    # the LoRA term lands in the same buffer: no extra pass over [M, N] for scale and add
    out.addmm_(u, lora_b.to(cdt).t(), alpha=scaling)
    return out.to(x.dtype), u


def _empty(like: Tensor) -> Tensor:
    return like.new_empty(0)


def _reference_backward(grad, x, weight, lora_a, lora_b, u, mask, scaling, needs):
    cdt = _cdt(x)
    g = grad.to(cdt)
    gb = g @ lora_b.to(cdt)  # [M, r], shared by grad_x and grad_A
    grad_x = grad_w = grad_bias = grad_a = grad_b = None
    if needs[0]:
        grad_x = g @ weight.to(cdt)
        if mask is None:
            grad_x.addmm_(gb, lora_a.to(cdt), alpha=scaling)
        else:
            grad_x.add_((gb @ lora_a.to(cdt)).mul_(mask.to(cdt)), alpha=scaling)
        grad_x = grad_x.to(x.dtype)
    if needs[1]:
        grad_w = (g.t() @ x.to(cdt)).to(weight.dtype)
    if needs[2]:
        grad_bias = g.sum(0).to(weight.dtype)
    if needs[3]:
        xd = x.to(cdt) if mask is None else x.to(cdt) * mask.to(cdt)
        grad_a = (scaling * (gb.t() @ xd)).to(lora_a.dtype)
    if needs[4]:
        grad_b = (scaling * (g.t() @ u.to(cdt))).to(lora_b.dtype)
    return _pack(x, weight, lora_a, lora_b, grad_x, grad_w, grad_bias, grad_a, grad_b)


def _pack(x, weight, lora_a, lora_b, *grads) -> tuple[Tensor, ...]:
    likes = (x, weight, weight, lora_a, lora_b)
    return tuple(_empty(like) if g is None else g for g, like in zip(grads, likes))


# ----------------------------------------------------------------------------- 2-4. custom ops
@torch.library.custom_op("stablecore::lora_linear", mutates_args=())
def _lora_linear_op(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    dropout_mask: Tensor | None,
    scaling: float,
) -> tuple[Tensor, Tensor]:
    return _reference_forward(x, weight, bias, lora_A, lora_B, dropout_mask, scaling)


@_lora_linear_op.register_fake
def _(x, weight, bias, lora_A, lora_B, dropout_mask, scaling):
    _validate(x, weight, bias, lora_A, lora_B, dropout_mask)
    out = x.new_empty(x.shape[0], weight.shape[0])
    return out, x.new_empty(x.shape[0], lora_A.shape[0], dtype=_cdt(x))


@torch.library.custom_op("stablecore::lora_linear_backward", mutates_args=())
def _lora_linear_backward_op(
    grad: Tensor,
    x: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    u: Tensor,
    dropout_mask: Tensor | None,
    scaling: float,
    needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _reference_backward(grad, x, weight, lora_A, lora_B, u, dropout_mask, scaling, needs)


@_lora_linear_backward_op.register_fake
def _(grad, x, weight, lora_A, lora_B, u, dropout_mask, scaling, needs):
    _validate(x, weight, None, lora_A, lora_B, dropout_mask)
    if grad.shape != (x.shape[0], weight.shape[0]):
        raise ValueError(
            f"grad has shape {tuple(grad.shape)}, expected {(x.shape[0], weight.shape[0])}"
        )
    if len(needs) != 5:
        raise ValueError(f"needs must hold 5 flags ({', '.join(_GRADS)}), got {len(needs)}")
    shapes = (x.shape, weight.shape, weight.shape[:1], lora_A.shape, lora_B.shape)
    likes = (x, weight, weight, lora_A, lora_B)
    return tuple(
        like.new_empty(shape if need else (0,)) for need, shape, like in zip(needs, shapes, likes)
    )


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, mask, scaling = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(x, weight, lora_a, lora_b, output[1], mask)
    ctx.scaling = scaling


def _backward(ctx, grad_out, _grad_u):
    x, weight, lora_a, lora_b, u, mask = ctx.saved_tensors
    needs = [bool(n) for n in ctx.needs_input_grad[:5]]
    grads = torch.ops.stablecore.lora_linear_backward(
        grad_out.contiguous(), x, weight, lora_a, lora_b, u, mask, ctx.scaling, needs
    )
    grads = [g if need else None for g, need in zip(grads, needs)]
    return (*grads, None, None)


_lora_linear_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- 5. Triton backend
def _unsupported(x, weight, bias, lora_a, *args, **kwargs) -> str | None:
    from stablecore.kernels.lora import MAX_RANK

    if x.dtype not in _TRITON_DTYPES:
        return f"dtype {x.dtype} has no Triton kernel (float16/bfloat16/float32 do)"
    if lora_a.shape[0] > MAX_RANK:
        return f"rank {lora_a.shape[0]} is above the kernel's {MAX_RANK}"
    if x.shape[0] == 0 or weight.shape[0] == 0 or x.shape[1] == 0:
        return "empty input"
    return None


def _triton_forward(x, weight, bias, lora_a, lora_b, mask, scaling):
    from stablecore.kernels.lora import lora_gemm

    out = torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)
    u = torch.empty(x.shape[0], lora_a.shape[0], dtype=torch.float32, device=x.device)
    lora_gemm(x, weight.t(), lora_a.t(), lora_b.t(), scaling, out, u, bias, pre_mask=mask)
    return out, u


def _triton_backward(grad, x, weight, lora_a, lora_b, u, mask, scaling, needs):
    from stablecore.kernels.lora import lora_gemm

    cdt = _cdt(x)
    grad_x = grad_w = grad_bias = grad_a = grad_b = None
    gb = None
    if needs[0]:
        grad_x = torch.empty_like(x)
        gb = torch.empty(x.shape[0], lora_a.shape[0], dtype=torch.float32, device=x.device)
        lora_gemm(grad, weight, lora_b, lora_a, scaling, grad_x, gb, post_mask=mask)
    elif needs[3]:
        gb = grad.to(cdt) @ lora_b.to(cdt)
    # The weight gradients are plain GEMMs over M: cuBLAS is the right tool for them.
    if needs[1]:
        grad_w = grad.t() @ x
    if needs[2]:
        grad_bias = grad.sum(0, dtype=cdt).to(weight.dtype)
    # s goes onto the small [M, r] factor (in fp32) so the result is rounded once.
    if needs[3]:
        xd = x if mask is None else x * mask
        grad_a = (gb * scaling).to(x.dtype).t() @ xd
    if needs[4]:
        grad_b = grad.t() @ (u * scaling).to(x.dtype)
    return _pack(x, weight, lora_a, lora_b, grad_x, grad_w, grad_bias, grad_a, grad_b)


def _unsupported_backward(grad, x, weight, lora_a, *args) -> str | None:
    if grad.dtype != x.dtype:
        return f"grad dtype {grad.dtype} differs from x dtype {x.dtype}"
    return _unsupported(x, weight, None, lora_a)


_dispatch.register_triton_kernel(_lora_linear_op, _triton_forward, _reference_forward, _unsupported)
_dispatch.register_triton_kernel(
    _lora_linear_backward_op, _triton_backward, _reference_backward, _unsupported_backward
)
for _name in ("lora_linear", "lora_linear_backward"):
    _dispatch.describe_op(_name, triton_dtypes=_TRITON_DTYPES)


# ----------------------------------------------------------------------------- 6. public API
def lora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    dropout_mask: Tensor | None = None,
) -> Tensor:
    """``x Wᵀ + b + scaling · ((x ∘ dropout_mask) Aᵀ) Bᵀ`` in one fused op.

    Args:
        x: ``[..., K]``; weight: ``[N, K]``; bias: ``[N]`` or None; lora_A: ``[r, K]``;
            lora_B: ``[N, r]``; one floating dtype (float16/bfloat16/float32/float64), one device.
        scaling: ``alpha / r``.
        dropout_mask: ``x``'s shape, ``0`` or ``1/(1-p)`` (None: no dropout on the LoRA input).

    Returns:
        ``[..., N]`` in ``x``'s dtype (computed with float32 accumulation). Differentiable in
        every tensor input except the mask.

    Raises:
        TypeError: non-floating or mixed dtypes. ValueError: shapes or devices do not match.

    Example::

        >>> y = lora_linear(torch.randn(5, 64), w, None, a, b, scaling=2.0)   # [5, N]
    """
    k = weight.shape[-1] if isinstance(weight, Tensor) and weight.dim() == 2 else None
    if not isinstance(x, Tensor) or x.dim() < 1 or (k is not None and x.shape[-1] != k):
        raise ValueError(
            f"x has shape {tuple(getattr(x, 'shape', ()))} but weight expects {k} input features"
        )
    if dropout_mask is not None and dropout_mask.shape != x.shape:
        raise ValueError(
            f"dropout_mask has shape {tuple(dropout_mask.shape)}, x has {tuple(x.shape)}"
        )
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    mask2 = None if dropout_mask is None else dropout_mask.reshape(x2.shape)
    _validate(x2, weight, bias, lora_A, lora_B, mask2)
    if _dispatch.plain_reference_requested():
        out = _reference_forward(x2, weight, bias, lora_A, lora_B, mask2, float(scaling))[0]
    else:
        out = _lora_linear_op(x2, weight, bias, lora_A, lora_B, mask2, float(scaling))[0]
    return out.reshape(*lead, weight.shape[0])
