"""LoRA layers with a fused forward/backward: ``y = W x + b + s * B (A d(x))``.

``d`` is dropout on the LoRA path only (as peft: the base layer sees the clean ``x``).

Design (what is fused and why):

* **Linear** (:func:`lora_linear`, a ``torch.autograd.Function``). Forward: ``out = x W^T + b``,
  ``u = d(x) A^T`` (``[M, r]``, computed once), then ``out += s * u B^T`` as the epilogue of a
  single ``addmm_`` (no separate scaling pass and no separate add pass over ``[M, N]`` as in
  peft). Backward reuses the saved ``u`` for ``grad_B = s g^T u``; ``gB = g B`` (``[M, r]``) is
  computed once and reused for ``grad_A = s gB^T d(x)`` and ``grad_x = g W + s gB A`` (again
  one ``addmm_``). With a frozen base, ``grad_W`` is never formed. peft runs 4 GEMMs plus 2
  elementwise passes over the output in the forward and extra passes in the backward.
* **Conv2d** (:func:`lora_conv2d`): when there is no dropout, ``x`` is read **once**: one
  convolution with the stacked kernel ``[W; A]`` gives the base output and ``u = A * x`` together
  (the ``r`` extra output channels are cheap), followed by the 1x1 ``B`` conv. The backward
  computes ``grad_x`` in one transposed convolution with the stacked kernel and ``grad_A`` over
  the ``r`` LoRA channels only (``grad_W`` only if the base is trainable).

Not done here: a Triton GEMM with the LoRA epilogue (notes §13), many adapters per batch.

Example::

    >>> layer = LoRALinear(64, 32, rank=8, alpha=16, dropout=0.1)
    >>> y = layer(torch.randn(5, 64))            # [5, 32]
    >>> layer.weight.requires_grad                # base frozen by default
    False
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["LoRAConv2d", "LoRALinear", "lora_conv2d", "lora_linear"]


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


def _check_linear_args(x: Tensor, weight: Tensor, bias, lora_a: Tensor, lora_b: Tensor) -> None:
    for name, t in (("x", x), ("weight", weight), ("lora_A", lora_a), ("lora_B", lora_b)):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {type(t).__name__}")
    n, k = weight.shape
    r = lora_a.shape[0]
    if x.shape[-1] != k:
        raise ValueError(f"x has shape {tuple(x.shape)} but weight expects {k} input features")
    if lora_a.shape != (r, k) or lora_b.shape != (n, r):
        raise ValueError(
            f"lora_A {tuple(lora_a.shape)} and lora_B {tuple(lora_b.shape)} do not match "
            f"weight {tuple(weight.shape)}: expected lora_A [r, {k}] and lora_B [{n}, r]"
        )
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({n},)")
    dtypes = {t.dtype for t in (x, weight, lora_a, lora_b)}
    if len(dtypes) > 1:
        raise TypeError(
            f"x, weight, lora_A, lora_B must share one dtype, got {sorted(map(str, dtypes))}"
        )
    devices = {t.device for t in (x, weight, lora_a, lora_b)}
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")


def _dropout(x: Tensor, p: float, training: bool) -> tuple[Tensor, Tensor | None]:
    """(d(x), scaled mask or None). ``torch.native_dropout`` gives the mask back directly."""
    if p == 0.0 or not training:
        return x, None
    xd, mask = torch.native_dropout(x, p, True)
    return xd, mask.to(x.dtype) / (1.0 - p)


# ----------------------------------------------------------------------------- linear
class _LoRALinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling, p, training):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        xd, mask = _dropout(x2, p, training)
        out = F.linear(x2, weight, bias)
        u = xd @ lora_a.t()  # [M, r]: the only product of x with A, reused in backward
        out.addmm_(u, lora_b.t(), alpha=scaling)
        need_w = ctx.needs_input_grad[1]
        ctx.save_for_backward(
            x2 if need_w else None,
            xd if ctx.needs_input_grad[3] else None,
            mask,
            weight,
            lora_a,
            lora_b,
            u,
        )
        ctx.scaling, ctx.shape = scaling, shape
        return out.reshape(*shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        x2, xd, mask, weight, lora_a, lora_b, u = ctx.saved_tensors
        s = ctx.scaling
        g = grad.reshape(-1, weight.shape[0])
        gb = g @ lora_b  # [M, r], reused for grad_x and grad_A
        grad_x = grad_w = grad_bias = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = g @ weight
            if mask is None:
                grad_x.addmm_(gb, lora_a, alpha=s)
            else:
                grad_x += (gb @ lora_a).mul_(mask).mul_(s)
            grad_x = grad_x.reshape(ctx.shape)
        if ctx.needs_input_grad[1]:
            grad_w = g.t() @ x2
        if ctx.needs_input_grad[2]:
            grad_bias = g.sum(0)
        if ctx.needs_input_grad[3]:
            grad_a = (gb.t() @ xd).mul_(s)
        if ctx.needs_input_grad[4]:
            grad_b = (g.t() @ u).mul_(s)
        return grad_x, grad_w, grad_bias, grad_a, grad_b, None, None, None


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
    """``x W^T + b + scaling * d(x) A^T B^T`` with a fused forward and backward.

    Args:
        x: ``[..., K]``; weight: ``[N, K]``; bias: ``[N]`` or None; lora_A: ``[r, K]``;
            lora_B: ``[N, r]``, all one floating dtype and device.
        scaling: ``alpha / r`` (peft's ``scaling``); dropout: probability on the LoRA input,
            applied only when ``training``.

    Returns:
        ``[..., N]`` in ``x``'s dtype. Gradients flow to every tensor that requires them.
    """
    _check_linear_args(x, weight, bias, lora_A, lora_B)
    _check_dropout(dropout)
    return _LoRALinearFn.apply(x, weight, bias, lora_A, lora_B, float(scaling), dropout, training)


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


# ----------------------------------------------------------------------------- modules
class _LoRAMixin(nn.Module):
    def _init_lora(self, rank: int, alpha: float | None, dropout: float, train_base: bool) -> None:
        self.rank = rank
        self.alpha = float(rank if alpha is None else alpha)
        self.scaling = self.alpha / rank
        self.dropout = dropout
        # peft's default init: A Kaiming-uniform, B zero (the adapter starts as a no-op).
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)
        self.set_base_trainable(train_base)

    def set_base_trainable(self, trainable: bool) -> None:
        """Freeze (default) or unfreeze the base weight and bias."""
        self.weight.requires_grad_(trainable)
        if self.bias is not None:
            self.bias.requires_grad_(trainable)

    @torch.no_grad()
    def delta_weight(self) -> Tensor:
        """``scaling * B A`` in the base weight's shape."""
        a = self.lora_A.reshape(self.rank, -1)
        return (self.scaling * (self.lora_B.reshape(-1, self.rank) @ a)).reshape(self.weight.shape)


class LoRALinear(_LoRAMixin):
    """``nn.Linear`` plus a rank-``r`` adapter: ``y = x W^T + b + (alpha/r) d(x) A^T B^T``.

    Args:
        in_features, out_features, bias: as ``nn.Linear``; rank: ``r <= min(in, out)``;
        alpha: scale numerator (default ``r``, i.e. scaling 1); dropout: on the LoRA input;
        train_base: keep ``weight``/``bias`` trainable (default frozen).

    Parameters: ``weight [N, K]``, ``bias [N]``, ``lora_A [r, K]``, ``lora_B [N, r]``.
    Input ``[..., K]`` -> output ``[..., N]``. Use :meth:`from_linear` to wrap an existing layer
    (its parameters are shared, not copied).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        alpha: float | None = None,
        dropout: float = 0.0,
        bias: bool = True,
        train_base: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        _check_rank(rank, in_features, out_features)
        _check_dropout(dropout)
        base = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.in_features, self.out_features = in_features, out_features
        self.weight, self.bias = base.weight, base.bias
        kw = {"device": device, "dtype": dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, **kw))
        self.lora_B = nn.Parameter(torch.empty(out_features, rank, **kw))
        self._init_lora(rank, alpha, dropout, train_base)

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, **kwargs) -> LoRALinear:
        """Wrap ``linear``: its ``weight``/``bias`` Parameters are shared with the new layer."""
        layer = cls(
            linear.in_features,
            linear.out_features,
            rank,
            bias=linear.bias is not None,
            device=linear.weight.device,
            dtype=linear.weight.dtype,
            **kwargs,
        )
        layer.weight, layer.bias = linear.weight, linear.bias
        layer.set_base_trainable(kwargs.get("train_base", False))
        return layer

    def forward(self, x: Tensor) -> Tensor:
        return lora_linear(
            x, self.weight, self.bias, self.lora_A, self.lora_B, self.scaling,
            self.dropout, self.training,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"rank={self.rank}, scaling={self.scaling:g}, dropout={self.dropout}"
        )


class LoRAConv2d(_LoRAMixin):
    """``nn.Conv2d`` (groups=1, zero padding) plus a LoRA branch ``B(1x1) . A(k x k)``, as peft.

    Parameters: ``weight [N, C, kh, kw]``, ``bias [N]``, ``lora_A [r, C, kh, kw]`` (same
    stride/padding/dilation as the base), ``lora_B [N, r, 1, 1]``. Works for the 1x1 and 3x3
    convolutions of UNets. Input ``[B, C, H, W]`` -> ``[B, N, H', W']``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        rank: int,
        stride=1,
        padding=0,
        dilation=1,
        alpha: float | None = None,
        dropout: float = 0.0,
        bias: bool = True,
        train_base: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        kh, kw = _pair(kernel_size)
        _check_rank(rank, in_channels * kh * kw, out_channels)
        _check_dropout(dropout)
        base = nn.Conv2d(
            in_channels, out_channels, (kh, kw), stride, padding, dilation, bias=bias,
            device=device, dtype=dtype,
        )  # fmt: skip
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride = (kh, kw), base.stride
        self.padding, self.dilation = base.padding, base.dilation
        self.weight, self.bias = base.weight, base.bias
        kw_ = {"device": device, "dtype": dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, in_channels, kh, kw, **kw_))
        self.lora_B = nn.Parameter(torch.empty(out_channels, rank, 1, 1, **kw_))
        self._init_lora(rank, alpha, dropout, train_base)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, rank: int, **kwargs) -> LoRAConv2d:
        """Wrap ``conv`` (groups=1, zero padding, numeric padding); parameters are shared."""
        if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(
                f"LoRAConv2d needs groups=1, padding_mode='zeros' and numeric padding, got "
                f"groups={conv.groups}, padding_mode={conv.padding_mode!r}, padding={conv.padding!r}"
            )
        layer = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, rank, conv.stride,
            conv.padding, conv.dilation, bias=conv.bias is not None,
            device=conv.weight.device, dtype=conv.weight.dtype, **kwargs,
        )  # fmt: skip
        layer.weight, layer.bias = conv.weight, conv.bias
        layer.set_base_trainable(kwargs.get("train_base", False))
        return layer

    def forward(self, x: Tensor) -> Tensor:
        return lora_conv2d(
            x, self.weight, self.bias, self.lora_A, self.lora_B, self.scaling, self.stride,
            self.padding, self.dilation, self.dropout, self.training,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, rank={self.rank}, "
            f"scaling={self.scaling:g}, dropout={self.dropout}"
        )
