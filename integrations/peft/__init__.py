"""peft integration: swap peft's LoRA layers for stablecore's fused ones (imports peft)."""

from __future__ import annotations

from stablecore.integrations.peft.accelerate import (
    StablecoreLoraConv2d,
    StablecoreLoraLinear,
    accelerate,
    restore,
)

__all__ = ["StablecoreLoraConv2d", "StablecoreLoraLinear", "accelerate", "restore"]
