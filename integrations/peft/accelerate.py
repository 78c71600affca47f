"""Run the LoRA layers of a peft (or diffusers ``add_adapter``) model on stablecore's fused path.

:func:`accelerate` changes the class of every plain peft ``lora.Linear`` / ``lora.Conv2d`` in
``model`` **in place** to a subclass (:class:`StablecoreLoraLinear`, :class:`StablecoreLoraConv2d`)
whose ``forward`` calls :func:`stablecore.nn.lora.lora_linear` / :func:`lora_conv2d`. Nothing is
copied: the module objects, their parameters, ``state_dict`` keys and everything peft or
diffusers does to them (``set_adapter``, ``disable_adapters``, ``fuse_lora``, ``scale_lora_layers``,
``merge_and_unload``, saving) are unchanged, because ``isinstance(layer, peft LoraLayer)`` still
holds. :func:`restore` puts the original classes back.

The fused path serves the common case: one active vanilla adapter (no DoRA or other variant,
no ``lora_bias``), not merged, adapters enabled, no ``adapter_names=`` mixed batch,
``fan_in_fan_out=False``, and input, base and LoRA weights of one dtype (for conv: groups=1,
zero padding, the LoRA ``A`` conv with the base's stride/padding/dilation). Anything else is
forwarded to peft's own ``forward`` on every call, so outputs are always peft's (equal up to
float rounding: the fused form adds ``s * u B^T`` inside one GEMM instead of scaling then adding).

Example::

    model = get_peft_model(base, LoraConfig(r=16, target_modules=["q_proj", "v_proj"]))
    n = accelerate(model)       # number of layers switched
    ...train or infer...
    restore(model)              # plain peft again
"""

from __future__ import annotations

import torch.nn as nn
from peft.tuners.lora import layer as lora_layer
from torch import Tensor

from stablecore.nn.lora import lora_conv2d, lora_linear

__all__ = ["StablecoreLoraConv2d", "StablecoreLoraLinear", "accelerate", "restore"]


def _single_vanilla_adapter(layer, x: Tensor) -> str | None:
    """The active adapter name when the fused path applies to this call, else None."""
    if layer.disable_adapters or layer.merged:
        return None
    active = [a for a in layer.active_adapters if a in layer.lora_A]
    if len(active) != 1:
        return None
    name = active[0]
    if name in layer.lora_variant or layer.lora_bias.get(name, False):
        return None
    drop = layer.lora_dropout[name]
    if not isinstance(drop, (nn.Identity, nn.Dropout)):
        return None
    w = layer.get_base_layer().weight
    if not (
        x.dtype == w.dtype == layer.lora_A[name].weight.dtype == layer.lora_B[name].weight.dtype
    ):
        return None
    return name


def _dropout_p(drop: nn.Module) -> float:
    return float(drop.p) if isinstance(drop, nn.Dropout) else 0.0


class StablecoreLoraLinear(lora_layer.Linear):
    """peft ``lora.Linear`` whose forward runs :func:`stablecore.nn.lora.lora_linear`."""

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        base = self.get_base_layer()
        name = None
        if not args and not kwargs and type(base) is nn.Linear and not self.fan_in_fan_out:
            name = _single_vanilla_adapter(self, x)
        if name is None:
            return super().forward(x, *args, **kwargs)
        drop = self.lora_dropout[name]
        return lora_linear(
            x, base.weight, base.bias, self.lora_A[name].weight, self.lora_B[name].weight,
            self.scaling[name], _dropout_p(drop), drop.training,
        )  # fmt: skip


def _conv_ok(base: nn.Module, lora_a: nn.Module) -> bool:
    return (
        type(base) is nn.Conv2d
        and base.groups == 1
        and base.padding_mode == "zeros"
        and not isinstance(base.padding, str)
        and tuple(lora_a.stride) == tuple(base.stride)
        and tuple(lora_a.padding) == tuple(base.padding)
        and tuple(lora_a.dilation) == tuple(base.dilation)
        and lora_a.groups == 1
    )


class StablecoreLoraConv2d(lora_layer.Conv2d):
    """peft ``lora.Conv2d`` whose forward runs :func:`stablecore.nn.lora.lora_conv2d`."""

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        base = self.get_base_layer()
        name = None if args or kwargs else _single_vanilla_adapter(self, x)
        if name is None or not _conv_ok(base, self.lora_A[name]):
            return super().forward(x, *args, **kwargs)
        drop = self.lora_dropout[name]
        return lora_conv2d(
            x, base.weight, base.bias, self.lora_A[name].weight, self.lora_B[name].weight,
            self.scaling[name], base.stride, base.padding, base.dilation, _dropout_p(drop),
            drop.training,
        )  # fmt: skip


_SWAPS = {lora_layer.Linear: StablecoreLoraLinear, lora_layer.Conv2d: StablecoreLoraConv2d}
_BACK = {v: k for k, v in _SWAPS.items()}


def accelerate(model: nn.Module) -> int:
    """Switch every plain peft ``lora.Linear``/``lora.Conv2d`` in ``model`` to stablecore's
    forward, in place. Returns how many layers were switched (0 if ``model`` has no peft LoRA
    layers). Subclasses of those peft layers (bitsandbytes, torchao, ...) are left alone."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    count = 0
    for module in model.modules():
        new_cls = _SWAPS.get(type(module))
        if new_cls is not None:
            module.__class__ = new_cls
            count += 1
    return count


def restore(model: nn.Module) -> int:
    """Undo :func:`accelerate`: put peft's classes back. Returns how many layers changed."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    count = 0
    for module in model.modules():
        old_cls = _BACK.get(type(module))
        if old_cls is not None:
            module.__class__ = old_cls
            count += 1
    return count
