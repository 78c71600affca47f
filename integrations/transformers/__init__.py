"""transformers adapters: model patches and ``TrainerCallback`` s (imports transformers)."""

from __future__ import annotations

from stablecore.integrations.transformers.stablemax import (
    SoftmaxCollapseCallback,
    apply_stablemax,
    remove_stablemax,
)

__all__ = ["SoftmaxCollapseCallback", "apply_stablemax", "remove_stablemax"]
