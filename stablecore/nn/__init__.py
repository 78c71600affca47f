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

__all__ = [
    "CascadedModalityTransformer",
    "ImageEncoder",
    "MultimodalOutput",
    "StableMaxCrossEntropyLoss",
    "TabularEncoder",
    "drop_modalities",
]
