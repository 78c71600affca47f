"""Simulated 4-bit training: a drop-in ``nn.Linear`` whose forward sees 4-bit weights and inputs.

This is "4-bit training" as Stable-SPAM's code runs it (notes §3): in the forward pass the
weight and the input activation of each chosen linear layer are fake-quantized group by group
(:func:`stablecore.ops.fake_quant.fake_quant`), the matmul runs in the parameters' dtype, and
the gradient passes straight through both quantizers. Master weights, gradients and optimizer
states stay in full precision. The formats (``fmt``):

========== ================================ ==========================================
``fmt``    weights                          input activations
========== ================================ ==========================================
``int4``   asymmetric INT4, 16 levels,      symmetric INT4, 15 levels (absmax / 7),
           min/max + zero-point, no         ``keep_outliers`` largest |x| per group
           outliers (as the paper)          kept exact
``fp4``    the paper's "FP4": 9 levels      the same grid
           {0, +-1/4, +-1/2, +-3/4, +-1} x
           absmax, outliers kept exact
``e2m1``   true FP4 E2M1 (15 levels,        the same grid
           absmax / 6), outliers kept exact
========== ================================ ==========================================

The gradients are those of the paper's ``A8Linear``: grad_x = grad_y @ W_q and
grad_W = grad_y^T @ x_q. Parameters and ``state_dict`` keys are those of ``nn.Linear``, so a
quantized model loads a plain checkpoint and the other way round.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

import torch.nn.functional as F
from torch import Tensor, nn

from stablecore.ops.fake_quant import fake_quant

__all__ = ["FOUR_BIT_FORMATS", "QuantLinear", "quantize_linear_layers"]

#: fmt -> (weight format, weight keeps outliers?, activation format)
FOUR_BIT_FORMATS: dict[str, tuple[str, bool, str]] = {
    "int4": ("int4_asym", False, "int4_sym"),
    "fp4": ("fp4_paper", True, "fp4_paper"),
    "e2m1": ("e2m1", True, "e2m1"),
}


def _check_config(fmt: str, group_size: int, keep_outliers: int) -> None:
    if fmt not in FOUR_BIT_FORMATS:
        raise ValueError(f"fmt must be one of {tuple(FOUR_BIT_FORMATS)}, got {fmt!r}")
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if not isinstance(keep_outliers, int) or not 0 <= keep_outliers < group_size:
        raise ValueError(
            f"keep_outliers must be an int in [0, group_size={group_size}), got {keep_outliers!r}"
        )


class QuantLinear(nn.Linear):
    """``nn.Linear`` with group-wise 4-bit fake quantization of its weight and input.

    Args:
        in_features, out_features, bias, device, dtype: as ``nn.Linear``.
        fmt: ``"int4"`` (default), ``"fp4"`` (the paper's 9-level grid) or ``"e2m1"``.
        group_size: elements per quantization group, over the flattened tensor (paper: 256).
        keep_outliers: largest-|x| entries per group kept exact (paper: 2). INT4 weights keep
            none, as in the paper.

    Shapes: input ``[..., in_features]`` -> output ``[..., out_features]``.

    Example::

        >>> layer = QuantLinear(256, 128, fmt="int4")
        >>> layer(torch.randn(4, 256)).shape
        torch.Size([4, 128])
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        fmt: str = "int4",
        group_size: int = 256,
        keep_outliers: int = 2,
    ) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.set_format(fmt, group_size, keep_outliers)

    def set_format(self, fmt: str, group_size: int = 256, keep_outliers: int = 2) -> None:
        """Change the format in place (the parameters are untouched)."""
        _check_config(fmt, group_size, keep_outliers)
        self.fmt, self.group_size, self.keep_outliers = fmt, group_size, keep_outliers

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, fmt: str = "int4", group_size: int = 256, keep_outliers: int = 2
    ) -> QuantLinear:
        """A QuantLinear that shares ``linear``'s parameter objects (an optimizer built on the
        original model keeps working)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"expected an nn.Linear, got {type(linear).__name__}")
        new = cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            device="meta",
            fmt=fmt,
            group_size=group_size,
            keep_outliers=keep_outliers,
        )
        new.weight = linear.weight
        new.bias = linear.bias
        new.train(linear.training)
        return new

    def quantized_weight(self) -> Tensor:
        """The weight as the forward pass sees it (same shape and dtype; STE gradient)."""
        weight_fmt, weight_outliers, _ = FOUR_BIT_FORMATS[self.fmt]
        k = self.keep_outliers if weight_outliers else 0
        return fake_quant(self.weight, weight_fmt, self.group_size, k)

    def forward(self, input: Tensor) -> Tensor:
        act_fmt = FOUR_BIT_FORMATS[self.fmt][2]
        x_q = fake_quant(input, act_fmt, self.group_size, self.keep_outliers)
        return F.linear(x_q, self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, fmt={self.fmt}, group_size={self.group_size}, "
            f"keep_outliers={self.keep_outliers}"
        )


Targets = Collection[str] | Callable[[str, nn.Module], bool] | None


def _selected(targets: Targets, name: str, module: nn.Module) -> bool:
    if targets is None:
        return True
    if callable(targets):
        return bool(targets(name, module))
    return name in targets or name.rsplit(".", 1)[-1] in targets


def quantize_linear_layers(
    model: nn.Module,
    fmt: str = "int4",
    group_size: int = 256,
    keep_outliers: int = 2,
    targets: Targets = None,
) -> nn.Module:
    """Replace ``nn.Linear`` layers of ``model`` by :class:`QuantLinear` in place.

    Args:
        model: any module; its linear layers keep their parameter objects.
        fmt, group_size, keep_outliers: see :class:`QuantLinear`.
        targets: which linears: ``None`` (all), names (a layer matches by its full dotted name
            or its last component, e.g. ``{"q_proj", "down_proj"}``), or a predicate
            ``(name, module) -> bool``. Layers already quantized are reconfigured.

    Returns:
        ``model`` (modified in place).

    Raises:
        ValueError: bad format or sizes, or no linear layer matched.

    Example::

        >>> mlp = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 10))
        >>> quantize_linear_layers(mlp, "int4", targets={"0"})[0].fmt
        'int4'
    """
    _check_config(fmt, group_size, keep_outliers)
    chosen = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name and _selected(targets, name, module)
    ]
    if not chosen:
        raise ValueError(f"no nn.Linear in {type(model).__name__} matched targets={targets!r}")
    for name, module in chosen:
        if isinstance(module, QuantLinear):
            module.set_format(fmt, group_size, keep_outliers)
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, QuantLinear.from_linear(module, fmt, group_size, keep_outliers))
    return model
