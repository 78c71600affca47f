"""Moved: A-SDM feature inheritance lives in
:mod:`stablecore.integrations.diffusers.feature_inheritance` (it hooks diffusers UNets).

This name keeps old imports working. The names are resolved lazily (module ``__getattr__``) so
that importing :mod:`stablecore.methods` never imports an integration (the core stays lean).
"""

from __future__ import annotations

__all__ = ["FeatureInheritance", "UNetSwitch", "inheritance_schedule"]  # noqa: F822 (lazy)


def __getattr__(name: str):
    if name in __all__:
        from stablecore.integrations.diffusers import feature_inheritance

        return getattr(feature_inheritance, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
