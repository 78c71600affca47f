"""Functional LoRA: ``y = W x + b + s * B (A d(x))`` for linear and 2-d convolution layers.

``d`` is dropout on the LoRA path only (as peft: the base layer sees the clean ``x``).

* **Linear** (:func:`lora_linear`) runs the op ``stablecore::lora_linear``
  (:mod:`stablecore.ops.lora_linear`): on CUDA one Triton kernel reads each tile of ``x`` once
  for both the base GEMM and ``u = d(x) Aᵀ`` and adds ``s · u Bᵀ`` in its epilogue; the
  backward is its own op (``grad_x = g W + s ((g B) A) ∘ mask`` fused the same way, ``u`` and
  ``g B`` reused for ``grad_B`` and ``grad_A``; with a frozen base ``grad_W`` is never formed).
  Dropout is a mask tensor drawn here, so forward and backward share it.
* **Conv2d** (:func:`lora_conv2d`): when there is no dropout, ``x`` is read **once**: one
  convolution with the stacked kernel ``[W; A]`` gives the base output and ``u = A * x`` together
  (the ``r`` extra output channels are cheap), followed by the 1x1 ``B`` conv. The backward
  computes ``grad_x`` in one transposed convolution with the stacked kernel and ``grad_A`` over
  the ``r`` LoRA channels only (``grad_W`` only if the base is trainable).

Example::

    >>> y = lora_linear(torch.randn(5, 64), w, None, a, b, scaling=2.0, dropout=0.1, training=True)
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F
from torch import Tensor

# By module name: stablecore.ops may export a function called lora_linear.
_op = importlib.import_module("stablecore.ops.lora_linear")

__all__ = ["dropout_mask", "lora_conv2d", "lora_linear", "lora_linear_multi"]


# ----------------------------------------------------------------------------- validation
def _check_rank(rank: int, in_dim: int, out_dim: int) -> None:
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA rank must be a positive int, got {rank!r}")
    if rank > min(in_dim, out_dim):
        raise ValueError(
            f"LoRA rank {rank} is larger than the layer dims (in={in_dim}, out={out_dim}); "
            f"a rank above min(in, out) = {min(in_dim, out_dim)} adds nothing"
        )


def _check_dropout(p: float) -> None:
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {p}")


# ----------------------------------------------------------------------------- linear
def dropout_mask(x: Tensor, p: float, training: bool) -> Tensor | None:
    """``0`` / ``1/(1-p)`` of ``x``'s shape and dtype, or None without dropout. Drawn by
    ``torch.native_dropout`` (so a seeded run matches ``F.dropout`` on the same RNG state)."""
    _check_dropout(p)
    if p == 0.0 or not training:
        return None
    keep = torch.native_dropout(x, p, True)[1]
    return keep.to(x.dtype).mul_(1.0 / (1.0 - p))


def lora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    dropout: float = 0.0,
    training: bool = False,
) -> Tensor:
    """``x Wᵀ + b + scaling * d(x) Aᵀ Bᵀ`` with a fused forward and backward.

    Args:
        x: ``[..., K]``; weight: ``[N, K]``; bias: ``[N]`` or None; lora_A: ``[r, K]``;
            lora_B: ``[N, r]``, all one floating dtype and device.
        scaling: ``alpha / r`` (peft's ``scaling``); dropout: probability on the LoRA input,
            applied only when ``training``.

    Returns:
        ``[..., N]`` in ``x``'s dtype. Gradients flow to every tensor that requires them.
    """
    for name, t in (("x", x), ("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B)):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {type(t).__name__}")
    mask = dropout_mask(x, dropout, training)
    return _op.lora_linear(x, weight, bias, lora_A, lora_B, float(scaling), mask)


def lora_linear_multi(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float | Tensor,
    adapter_ids: Tensor,
    dropout: float = 0.0,
    training: bool = False,
) -> Tensor:
    """Many adapters in one batch: sample ``i`` gets adapter ``adapter_ids[i]`` on one base.

    ``y[i] = x[i] Wᵀ + b + s[e] · d(x[i]) A[e]ᵀ B[e]ᵀ`` with ``e = adapter_ids[i]``; ``e = -1``
    means no adapter (the base output only).

    Args:
        x: ``[B, ..., K]``; weight: ``[N, K]``; bias: ``[N]`` or None; lora_A: ``[E, r, K]``;
            lora_B: ``[E, N, r]``; scaling: a float or an ``[E]`` tensor (per-adapter
            ``alpha / r``); adapter_ids: ``[B]`` integers in ``[-1, E)``.

    Returns:
        ``[B, ..., N]``. One base GEMM for the whole batch; the adapters are gathered per sample
        and applied with two batched GEMMs (``[B, T, K] x [B, K, r]``, ``[B, T, r] x [B, r, N]``),
        so the cost is the base GEMM plus ``O(B · T · r · (K + N))``, whatever the mix of
        adapters. Plain autograd: gradients reach every adapter that served a sample.
    """
    if (
        not isinstance(adapter_ids, Tensor)
        or adapter_ids.dtype.is_floating_point
        or (adapter_ids.dtype in (torch.bool, torch.complex64, torch.complex128))
    ):
        raise TypeError(f"adapter_ids must be an integer tensor, got {adapter_ids!r:.80}")
    if lora_A.dim() != 3 or lora_B.dim() != 3:
        raise ValueError(
            f"lora_A must be [E, r, K] and lora_B [E, N, r], got {tuple(lora_A.shape)} and "
            f"{tuple(lora_B.shape)}"
        )
    e, r, k = lora_A.shape
    n = weight.shape[0]
    if lora_B.shape != (e, n, r) or weight.shape[1] != k:
        raise ValueError(
            f"lora_A {tuple(lora_A.shape)}, lora_B {tuple(lora_B.shape)} and weight "
            f"{tuple(weight.shape)} do not match: expected lora_B [{e}, {n}, {r}], weight [N, {k}]"
        )
    if x.dim() < 2 or x.shape[-1] != k:
        raise ValueError(f"x has shape {tuple(x.shape)}, expected [B, ..., {k}]")
    if adapter_ids.shape != (x.shape[0],):
        raise ValueError(
            f"adapter_ids has shape {tuple(adapter_ids.shape)}, expected ({x.shape[0]},): one "
            f"adapter per sample of x {tuple(x.shape)}"
        )
    if adapter_ids.device != x.device:
        raise ValueError(f"adapter_ids is on {adapter_ids.device}, x on {x.device}")
    if adapter_ids.numel() and not torch.compiler.is_compiling():
        lo, hi = int(adapter_ids.min()), int(adapter_ids.max())  # one sync, for a clear error
        if lo < -1 or hi >= e:
            raise ValueError(f"adapter_ids must lie in [-1, {e}), got values in [{lo}, {hi}]")
    if len({x.dtype, weight.dtype, lora_A.dtype, lora_B.dtype}) > 1:
        raise TypeError("x, weight, lora_A, lora_B must share one dtype")
    mask = dropout_mask(x, dropout, training)
    out = F.linear(x, weight, bias)
    ids = adapter_ids.clamp(min=0)
    scale = torch.as_tensor(scaling, dtype=x.dtype, device=x.device)
    scale = scale[ids] if scale.dim() == 1 else scale.expand(ids.shape)
    scale = torch.where(adapter_ids >= 0, scale, torch.zeros_like(scale))
    xd = (x if mask is None else x * mask).reshape(x.shape[0], -1, k)
    u = torch.bmm(xd, lora_A[ids].transpose(1, 2))  # [B, T, r]
    side = torch.bmm(u * scale[:, None, None], lora_B[ids].transpose(1, 2))  # [B, T, N]
    return out + side.reshape(out.shape)


# ----------------------------------------------------------------------------- conv2d
def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


class _LoRAConv2dFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling, stride, padding, dilation):
        n = weight.shape[0]
        # One pass over x: the base kernel and A stacked along the output channels.
        stacked = torch.cat([weight, lora_a], 0)
        y = F.conv2d(x, stacked, None, stride, padding, dilation)
        u = y[:, n:]
        out = y[:, :n] + F.conv2d(u, lora_b[:, :, None, None]).mul_(scaling)
        if bias is not None:
            out += bias[:, None, None]
        ctx.save_for_backward(x, weight, lora_a, lora_b, u)
        ctx.conf = (scaling, stride, padding, dilation)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, lora_a, lora_b, u = ctx.saved_tensors
        s, stride, padding, dilation = ctx.conf
        n = weight.shape[0]
        # grad of u: s * B^T g, a 1x1 conv with the transposed B.
        gu = F.conv2d(grad, lora_b.t()[:, :, None, None]).mul_(s)
        grad_x = grad_w = grad_bias = grad_a = grad_b = None
        need = ctx.needs_input_grad
        conv_bwd = torch.ops.aten.convolution_backward
        if need[0]:
            stacked = torch.cat([weight, lora_a], 0)
            grad_x = conv_bwd(
                torch.cat([grad, gu], 1), x, stacked, None, stride, padding, dilation,
                False, [0, 0], 1, [True, False, False],
            )[0]  # fmt: skip
        if need[1] or need[3]:
            if need[1] and need[3]:
                go, w = torch.cat([grad, gu], 1), torch.cat([weight, lora_a], 0)
            elif need[1]:
                go, w = grad, weight
            else:
                go, w = gu, lora_a
            gw = conv_bwd(
                go, x, w, None, stride, padding, dilation, False, [0, 0], 1, [False, True, False]
            )[1]
            if need[1]:
                grad_w = gw[:n]
            if need[3]:
                grad_a = gw[-lora_a.shape[0] :]
        if need[2]:
            grad_bias = grad.sum((0, 2, 3))
        if need[4]:
            grad_b = torch.einsum("bnhw,brhw->nr", grad, u).mul_(s)
        return grad_x, grad_w, grad_bias, grad_a, grad_b, None, None, None, None


def lora_conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    stride=1,
    padding=0,
    dilation=1,
    dropout: float = 0.0,
    training: bool = False,
) -> Tensor:
    """``conv(x, W) + b + scaling * conv1x1(conv(d(x), A), B)`` (peft's conv LoRA).

    Args:
        x: ``[B, C, H, W]``; weight: ``[N, C, kh, kw]``; bias: ``[N]`` or None;
            lora_A: ``[r, C, kh, kw]`` (same geometry as the base); lora_B: ``[N, r]`` or
            ``[N, r, 1, 1]``. ``groups`` must be 1.

    Returns:
        ``[B, N, H', W']``. Without dropout ``x`` is read once (stacked kernel); with dropout
        the LoRA branch runs on ``d(x)`` as a second convolution (plain autograd).
    """
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise ValueError(f"x must be [B, C, H, W], got {getattr(x, 'shape', type(x))}")
    if weight.dim() != 4 or lora_A.dim() != 4:
        raise ValueError(
            f"weight and lora_A must be 4-d, got {tuple(weight.shape)}, {tuple(lora_A.shape)}"
        )
    lora_b = lora_B.reshape(lora_B.shape[0], -1)
    n, c, kh, kw = weight.shape
    r = lora_A.shape[0]
    if x.shape[1] != c:
        raise ValueError(f"x has {x.shape[1]} channels but weight expects {c} (groups must be 1)")
    if lora_A.shape != (r, c, kh, kw) or lora_b.shape != (n, r):
        raise ValueError(
            f"lora_A {tuple(lora_A.shape)} / lora_B {tuple(lora_B.shape)} do not match weight "
            f"{tuple(weight.shape)}: expected [r, {c}, {kh}, {kw}] and [{n}, r(, 1, 1)]"
        )
    if len({x.dtype, weight.dtype, lora_A.dtype, lora_B.dtype}) > 1:
        raise TypeError("x, weight, lora_A, lora_B must share one dtype")
    _check_dropout(dropout)
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    if dropout > 0.0 and training:
        base = F.conv2d(x, weight, bias, stride, padding, dilation)
        u = F.conv2d(F.dropout(x, dropout, True), lora_A, None, stride, padding, dilation)
        return base + F.conv2d(u, lora_b[:, :, None, None]) * scaling
    return _LoRAConv2dFn.apply(
        x, weight, bias, lora_A, lora_b, float(scaling), stride, padding, dilation
    )
