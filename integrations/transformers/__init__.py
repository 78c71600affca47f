"""transformers adapters: model patches and ``TrainerCallback`` s (imports transformers)."""

from __future__ import annotations

from stablecore.integrations.transformers.four_bit import apply_4bit_training
from stablecore.integrations.transformers.sharpness_callback import SharpnessCallback
from stablecore.integrations.transformers.stablemax import (
    SoftmaxCollapseCallback,
    apply_stablemax,
    remove_stablemax,
)

__all__ = [
    "SharpnessCallback",
    "SoftmaxCollapseCallback",
    "apply_4bit_training",
    "apply_stablemax",
    "remove_stablemax",
]
