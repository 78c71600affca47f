"""Optimizers: Stable-SPAM and SPAM with 32/16/8/4-bit states, and ⊥Grad (OrthoGrad)."""

from __future__ import annotations

from stablecore.optim._distributed import get_optimizer_extra, set_optimizer_extra
from stablecore.optim.orthograd import NLMAlignment, OrthoGrad, nlm_alignment, orthogonalize_
from stablecore.optim.spam import SPAM
from stablecore.optim.stable_spam import StableSPAM

__all__ = [
    "SPAM",
    "NLMAlignment",
    "OrthoGrad",
    "StableSPAM",
    "get_optimizer_extra",
    "nlm_alignment",
    "orthogonalize_",
    "set_optimizer_extra",
]
