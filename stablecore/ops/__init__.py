"""The op layer: ``torch.library`` custom ops in the ``stablecore::`` namespace.

Each op's default kernel is its pure-PyTorch reference (runs on any device and is the spec);
Triton kernels serve CUDA (and CPU under ``TRITON_INTERPRET=1``); see ``python -m stablecore.info``.
"""

from __future__ import annotations

from stablecore.ops._dispatch import reference_mode
from stablecore.ops.fake_quant import fake_quant
from stablecore.ops.gri_attention import gri_attention
from stablecore.ops.linear_cross_entropy import linear_cross_entropy, stablemax_linear_cross_entropy
from stablecore.ops.lora_linear import lora_linear
from stablecore.ops.multi_cross_attention import multi_cross_attention
from stablecore.ops.orthogonalize import orthogonalize_, orthogonalize_stats
from stablecore.ops.softmax_collapse import softmax_collapse_stats
from stablecore.ops.stablemax import log_stablemax, stablemax
from stablecore.ops.stablemax_cross_entropy import stablemax_cross_entropy

__all__ = [
    "fake_quant",
    "gri_attention",
    "linear_cross_entropy",
    "log_stablemax",
    "lora_linear",
    "multi_cross_attention",
    "orthogonalize_",
    "orthogonalize_stats",
    "reference_mode",
    "softmax_collapse_stats",
    "stablemax",
    "stablemax_cross_entropy",
    "stablemax_linear_cross_entropy",
]
