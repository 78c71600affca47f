"""LoRA layers with a fused forward/backward: ``y = W x + b + s * B (A d(x))``.

:class:`LoRALinear` and :class:`LoRAConv2d` hold the base ``weight``/``bias`` (shared with the
wrapped layer by ``from_linear``/``from_conv``) and the adapter ``lora_A``/``lora_B``; their
forward is :func:`~stablecore.nn.lora_functional.lora_linear` (the op
``stablecore::lora_linear``: one pass over ``x`` on CUDA) or
:func:`~stablecore.nn.lora_functional.lora_conv2d` (a stacked ``[W; A]`` convolution).

Example::

    >>> layer = LoRALinear(64, 32, rank=8, alpha=16, dropout=0.1)
    >>> y = layer(torch.randn(5, 64))            # [5, 32]
    >>> layer.weight.requires_grad                # base frozen by default
    False
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from stablecore.nn.lora_functional import (
    _check_dropout,
    _check_rank,
    _pair,
    lora_conv2d,
    lora_linear,
    lora_linear_multi,
)

__all__ = ["LoRAConv2d", "LoRALinear", "MultiLoRALinear", "lora_conv2d", "lora_linear"]


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


class MultiLoRALinear(nn.Module):
    """One ``nn.Linear`` base with ``E`` LoRA adapters; each sample picks its own adapter.

    ``forward(x, adapter_ids)``: ``x [B, ..., K]``, ``adapter_ids [B]`` in ``[-1, E)`` (``-1``:
    base only) -> ``[B, ..., N]``. Parameters: ``weight [N, K]``, ``bias [N]``,
    ``lora_A [E, r, K]``, ``lora_B [E, N, r]``, buffer ``scaling [E]``. Build it from trained
    :class:`LoRALinear` layers of one base with :meth:`from_lora_layers` (the adapters are
    copied, the base is shared). See :func:`~stablecore.nn.lora_functional.lora_linear_multi`.

    Example::

        >>> multi = MultiLoRALinear.from_lora_layers([style_a, style_b])
        >>> y = multi(x, torch.tensor([0, 1, -1, 0]))   # 4 samples, 3 different adapters
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        num_adapters: int,
        alpha: float | None = None,
        dropout: float = 0.0,
        bias: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        _check_rank(rank, in_features, out_features)
        _check_dropout(dropout)
        if not isinstance(num_adapters, int) or num_adapters < 1:
            raise ValueError(f"num_adapters must be a positive int, got {num_adapters!r}")
        base = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.weight, self.bias = base.weight, base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        kw = {"device": device, "dtype": dtype}
        self.lora_A = nn.Parameter(torch.empty(num_adapters, rank, in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(num_adapters, out_features, rank, **kw))
        for a in self.lora_A:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        s = float(rank if alpha is None else alpha) / rank
        self.register_buffer("scaling", torch.full((num_adapters,), s, **kw))
        self.dropout = dropout

    @classmethod
    def from_lora_layers(cls, layers: list[LoRALinear]) -> MultiLoRALinear:
        """Stack adapters trained on one base (same ``weight`` object, or equal values)."""
        if not layers:
            raise ValueError("from_lora_layers needs at least one LoRALinear")
        first = layers[0]
        for layer in layers[1:]:
            same = layer.weight is first.weight or torch.equal(layer.weight, first.weight)
            if not same or layer.rank != first.rank:
                raise ValueError("every layer must share the base weight and the rank")
        w = first.weight
        multi = cls(first.in_features, first.out_features, first.rank, len(layers),
                    bias=first.bias is not None, device=w.device, dtype=w.dtype)  # fmt: skip
        multi.weight, multi.bias = first.weight, first.bias
        with torch.no_grad():
            multi.lora_A.copy_(torch.stack([layer.lora_A for layer in layers]))
            multi.lora_B.copy_(torch.stack([layer.lora_B for layer in layers]))
            multi.scaling.copy_(torch.tensor([layer.scaling for layer in layers]))
        multi.dropout = first.dropout
        return multi

    def forward(self, x: Tensor, adapter_ids: Tensor) -> Tensor:
        return lora_linear_multi(
            x, self.weight, self.bias, self.lora_A, self.lora_B, self.scaling, adapter_ids,
            self.dropout, self.training,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"rank={self.rank}, num_adapters={self.lora_A.shape[0]}, dropout={self.dropout}"
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
