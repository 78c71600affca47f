"""The op layer: ``torch.library`` custom ops in the ``stablecore::`` namespace.

Each op's default kernel is its pure-PyTorch reference (runs on any device and is the spec);
Triton kernels serve CUDA (and CPU under ``TRITON_INTERPRET=1``); see ``python -m stablecore.info``.
"""

from __future__ import annotations

from stablecore.ops._dispatch import reference_mode
from stablecore.ops.stablemax import log_stablemax, stablemax

__all__ = ["log_stablemax", "reference_mode", "stablemax"]
