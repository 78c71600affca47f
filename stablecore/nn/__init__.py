"""Modules: losses, LoRA and CondConv layers, quantized linears and multimodal models."""

from __future__ import annotations

from stablecore.nn.condconv import CLMECondConv2d, MECondConv2d
from stablecore.nn.lora import LoRAConv2d, LoRALinear, MultiLoRALinear
from stablecore.nn.losses import StableMaxCrossEntropyLoss
from stablecore.nn.multimodal import (
    CascadedModalityTransformer,
    ImageEncoder,
    MultimodalOutput,
    TabularEncoder,
    drop_modalities,
)
from stablecore.nn.quant_linear import QuantLinear, quantize_linear_layers

__all__ = [
    "CLMECondConv2d",
    "CascadedModalityTransformer",
    "ImageEncoder",
    "LoRAConv2d",
    "LoRALinear",
    "MultiLoRALinear",
    "MECondConv2d",
    "MultimodalOutput",
    "QuantLinear",
    "StableMaxCrossEntropyLoss",
    "TabularEncoder",
    "drop_modalities",
    "quantize_linear_layers",
]
