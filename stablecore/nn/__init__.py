"""Modules: losses, layers and multimodal models built on :mod:`stablecore.ops`."""

from __future__ import annotations

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
    "CascadedModalityTransformer",
    "ImageEncoder",
    "MultimodalOutput",
    "QuantLinear",
    "StableMaxCrossEntropyLoss",
    "TabularEncoder",
    "drop_modalities",
    "quantize_linear_layers",
]
