"""Multi-expert conditional convolutions (A-SDM's ME-CondConv / CLME-CondConv; CondConv base form).

CondConv (Yang et al. 2019) mixes ``E`` expert kernels **in weight space** with per-sample
routing weights and runs one convolution per sample::

    alpha = sigmoid(R [GAP(x); temb] + r0)          # [B, E], sigmoid as in CondConv, not softmax
    out_b = (sum_e alpha_be W_e) * x_b + sum_e alpha_be b_e

Routing input (documented choice, the A-SDM papers' routing input is UNVERIFIED, notes §1-2):
``routing="pool"`` (default) uses the globally average-pooled layer input, exactly CondConv;
``routing="pool+temb"`` concatenates the UNet timestep embedding ``temb [B, temb_dim]`` (every
ResNet block of a diffusers UNet receives it), an option, not the paper's verified method.
Explicit ``routing_weights [B, E]`` may be passed to ``forward`` instead.

Implementations (``impl=``):

* ``"grouped"`` (default): mix the kernels per sample (one ``einsum`` over ``[E, O, C, k, k]``),
  then a single grouped convolution with ``x`` viewed as ``[1, B*C, H, W]`` and ``groups=B``
  (the MXNet trick). For ``B == 1`` this is a plain convolution.
* ``"loop"``: the reference, ``sum_e alpha_e * conv2d(x, W_e)`` (E convolutions).

Both are differentiable by autograd w.r.t. ``x``, the experts, the biases, the router and
``temb``. A fused Triton mix-and-convolve kernel is not written.

Example::

    >>> layer = MECondConv2d(8, 16, 3, num_experts=4, padding=1)
    >>> layer(torch.randn(2, 8, 10, 10)).shape
    torch.Size([2, 16, 10, 10])
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["CLMECondConv2d", "MECondConv2d", "condconv2d", "condconv2d_reference"]

_ROUTINGS = ("pool", "pool+temb")
_IMPLS = ("grouped", "loop")


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def _check(x: Tensor, weight: Tensor, bias: Tensor | None, alpha: Tensor, groups: int) -> None:
    if not isinstance(x, Tensor) or x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"x must be a floating [B, C, H, W] tensor, got {getattr(x, 'shape', x)}")
    if weight.dim() != 5:
        raise ValueError(f"weight must be [E, O, C/groups, kh, kw], got {tuple(weight.shape)}")
    e, o, cg = weight.shape[:3]
    if x.shape[1] != cg * groups:
        raise ValueError(
            f"x has {x.shape[1]} channels but the experts expect {cg} x groups={groups}"
        )
    if alpha.shape != (x.shape[0], e):
        raise ValueError(
            f"routing weights have shape {tuple(alpha.shape)}, expected [B={x.shape[0]}, E={e}]"
        )
    if bias is not None and bias.shape != (e, o):
        raise ValueError(f"bias has shape {tuple(bias.shape)}, expected [E={e}, O={o}]")
    if len({x.dtype, weight.dtype, alpha.dtype}) > 1:
        raise TypeError(
            f"x ({x.dtype}), weight ({weight.dtype}) and routing weights ({alpha.dtype}) "
            "must share one dtype"
        )


def condconv2d_reference(
    x: Tensor, weight: Tensor, bias: Tensor | None, alpha: Tensor,
    stride=1, padding=0, dilation=1, groups: int = 1,
) -> Tensor:  # fmt: skip
    """The spec: ``sum_e alpha[:, e] * conv2d(x, W_e, b_e)`` (one convolution per expert).

    x: ``[B, C, H, W]``; weight: ``[E, O, C/groups, kh, kw]``; bias: ``[E, O]`` or None;
    alpha: ``[B, E]``. Returns ``[B, O, H', W']``.
    """
    _check(x, weight, bias, alpha, groups)
    out = 0
    for e in range(weight.shape[0]):
        b = None if bias is None else bias[e]
        y = F.conv2d(x, weight[e], b, stride, padding, dilation, groups)
        out = out + alpha[:, e, None, None, None] * y
    return out


def condconv2d(
    x: Tensor, weight: Tensor, bias: Tensor | None, alpha: Tensor,
    stride=1, padding=0, dilation=1, groups: int = 1,
) -> Tensor:  # fmt: skip
    """Weight-space mixing + one grouped convolution; same arguments and result as
    :func:`condconv2d_reference` (up to float rounding)."""
    _check(x, weight, bias, alpha, groups)
    bsz, c, h, w = x.shape
    e, o = weight.shape[:2]
    mixed = (alpha @ weight.reshape(e, -1)).reshape(bsz * o, *weight.shape[2:])  # [B*O, C/g, k, k]
    mixed_bias = None if bias is None else (alpha @ bias).reshape(-1)
    if bsz == 1:
        return F.conv2d(x, mixed, mixed_bias, stride, padding, dilation, groups)
    y = F.conv2d(
        x.reshape(1, bsz * c, h, w), mixed, mixed_bias, stride, padding, dilation, bsz * groups
    )
    return y.reshape(bsz, o, *y.shape[2:])


class MECondConv2d(nn.Module):
    """Multi-expert conditional 2-d convolution (see the module docstring for the formula).

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias: as
            ``nn.Conv2d`` (numeric padding, zero padding mode).
        num_experts: ``E >= 1``.
        routing: ``"pool"`` (GAP of the input) or ``"pool+temb"`` (GAP and the timestep
            embedding, which then needs ``temb_dim``).
        impl: ``"grouped"`` (fast) or ``"loop"`` (reference).

    Parameters: ``weight [E, O, C/groups, kh, kw]``, ``bias [E, O]``, ``router`` (Linear from
    ``C (+ temb_dim)`` to ``E``). ``forward(x [B, C, H, W], temb=None, routing_weights=None)``
    returns ``[B, O, H', W']``; :meth:`routing` gives the ``[B, E]`` weights.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        num_experts: int,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        routing: str = "pool",
        temb_dim: int | None = None,
        impl: str = "grouped",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if not isinstance(num_experts, int) or num_experts < 1:
            raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
        if routing not in _ROUTINGS:
            raise ValueError(f"routing must be one of {_ROUTINGS}, got {routing!r}")
        if routing == "pool+temb" and not (isinstance(temb_dim, int) and temb_dim > 0):
            raise ValueError(f"routing='pool+temb' needs a positive temb_dim, got {temb_dim!r}")
        if impl not in _IMPLS:
            raise ValueError(f"impl must be one of {_IMPLS}, got {impl!r}")
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"channels {in_channels}->{out_channels} not divisible by {groups=}")
        kw = {"device": device, "dtype": dtype}
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride, self.padding = _pair(stride), _pair(padding)
        self.dilation, self.groups = _pair(dilation), groups
        self.num_experts, self.routing_mode, self.impl = num_experts, routing, impl
        self.temb_dim = temb_dim if routing == "pool+temb" else None
        shape = (num_experts, out_channels, in_channels // groups, *self.kernel_size)
        self.weight = nn.Parameter(torch.empty(shape, **kw))
        self.bias = nn.Parameter(torch.empty(num_experts, out_channels, **kw)) if bias else None
        self.router = nn.Linear(in_channels + (self.temb_dim or 0), num_experts, **kw)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Each expert as nn.Conv2d initialises its kernel and bias.
        fan_in = self.weight[0].numel() // self.out_channels
        for e in range(self.num_experts):
            nn.init.kaiming_uniform_(self.weight[e], a=math.sqrt(5))
            if self.bias is not None:
                bound = 1 / math.sqrt(fan_in)
                nn.init.uniform_(self.bias[e], -bound, bound)
        self.router.reset_parameters()

    def routing(self, x: Tensor, temb: Tensor | None = None) -> Tensor:
        """``sigmoid(router([GAP(x); temb]))``: ``[B, E]``."""
        feats = x.mean((2, 3))
        if self.routing_mode == "pool+temb":
            if temb is None or temb.shape != (x.shape[0], self.temb_dim):
                raise ValueError(
                    f"routing='pool+temb' needs temb of shape [B={x.shape[0]}, "
                    f"{self.temb_dim}], got {None if temb is None else tuple(temb.shape)}"
                )
            feats = torch.cat([feats, temb.to(feats.dtype)], 1)
        return torch.sigmoid(self.router(feats))

    def forward(
        self, x: Tensor, temb: Tensor | None = None, routing_weights: Tensor | None = None
    ) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() != 4:
            raise ValueError(f"x must be [B, C, H, W], got {getattr(x, 'shape', type(x))}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"x has {x.shape[1]} channels, the layer expects {self.in_channels}")
        if x.dtype != self.weight.dtype:
            raise TypeError(f"x has dtype {x.dtype}, the layer's weights {self.weight.dtype}")
        alpha = self.routing(x, temb) if routing_weights is None else routing_weights
        fn = condconv2d if self.impl == "grouped" else condconv2d_reference
        return fn(
            x, self.weight, self.bias, alpha, self.stride, self.padding, self.dilation, self.groups
        )

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"num_experts={self.num_experts}, stride={self.stride}, padding={self.padding}, "
            f"routing={self.routing_mode!r}, impl={self.impl!r}"
        )


class CLMECondConv2d(MECondConv2d):
    """Cross-layer ME-CondConv: the experts inherit the kernels of existing (pruned) convolutions.

    Args:
        convs: ``E`` ``nn.Conv2d`` of one geometry (in/out channels, kernel, stride, padding,
            dilation, groups); their weights (and biases, zero where missing) are copied.
        init: ``"mean"`` (default) sets the router to output ``alpha_e = 1/E`` for every input
            (zero weights, bias ``logit(1/E)``), so the layer starts as the average of the
            inherited convolutions; ``"random"`` keeps the default router init.
        Other keyword arguments (``routing``, ``temb_dim``, ``impl``) as :class:`MECondConv2d`.

    Which pruned layers to merge, and the router input, are A-SDM details that are UNVERIFIED.
    """

    def __init__(self, convs: Sequence[nn.Conv2d], init: str = "mean", **kwargs) -> None:
        convs = list(convs)
        if not convs or not all(isinstance(c, nn.Conv2d) for c in convs):
            raise TypeError("convs must be a non-empty sequence of nn.Conv2d")
        first = convs[0]
        geo = lambda c: (  # noqa: E731
            c.in_channels, c.out_channels, tuple(c.kernel_size), tuple(c.stride),
            c.padding, tuple(c.dilation), c.groups, c.padding_mode,
        )  # fmt: skip
        for i, c in enumerate(convs):
            if geo(c) != geo(first):
                raise ValueError(f"convs[{i}] has geometry {geo(c)}, convs[0] has {geo(first)}")
        if isinstance(first.padding, str) or first.padding_mode != "zeros":
            raise ValueError("CLMECondConv2d needs numeric zero padding")
        if init not in ("mean", "random"):
            raise ValueError(f"init must be 'mean' or 'random', got {init!r}")
        super().__init__(
            first.in_channels, first.out_channels, first.kernel_size, len(convs),
            first.stride, first.padding, first.dilation, first.groups, bias=True,
            device=first.weight.device, dtype=first.weight.dtype, **kwargs,
        )  # fmt: skip
        with torch.no_grad():
            for e, c in enumerate(convs):
                self.weight[e].copy_(c.weight)
                self.bias[e].copy_(c.bias if c.bias is not None else torch.zeros_like(self.bias[e]))
            if init == "mean":
                p = min(
                    1.0 / len(convs), 1 - 1e-3
                )  # E = 1: alpha ~ 1, not exactly (logit(1) = inf)
                self.router.weight.zero_()
                self.router.bias.fill_(math.log(p / (1 - p)))
