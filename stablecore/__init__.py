"""stablecore: fused kernels, optimizers and methods for numerically stable training.

Subpackages load on first use, so ``import stablecore`` stays light (no transformers,
diffusers or torch_geometric, and CUDA is never initialised):

* :mod:`stablecore.ops`     torch.library custom ops (``stablecore::*``) with reference and Triton backends
* :mod:`stablecore.nn`      modules: losses, layers, attention processors
* :mod:`stablecore.optim`   optimizers
* :mod:`stablecore.methods` one module per paper algorithm
* :mod:`stablecore.testing` tolerance table and helpers for tests
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_SUBMODULES = ("ops", "nn", "optim", "methods", "testing", "demos", "kernels", "integrations")


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"stablecore.{name}")
    if name == "quantize_linear_layers":  # 4-bit training entry point, at the top level
        from stablecore.nn.quant_linear import quantize_linear_layers

        return quantize_linear_layers
    raise AttributeError(f"module 'stablecore' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_SUBMODULES, "quantize_linear_layers"])
