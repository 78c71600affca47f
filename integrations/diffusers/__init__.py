"""diffusers integration: attention processors for NASA (SNOOPI), PPD user embeddings,
SpeedUpNet and GRI-style attention, ``apply_*`` installers and generation helpers.

Example::

    >>> from stablecore.integrations.diffusers import apply_nasa
    >>> apply_nasa(pipe.unet, family="sd15")
    >>> pipe(prompt, cross_attention_kwargs={"neg_encoder_hidden_states": neg}, guidance_scale=0)
"""

from __future__ import annotations

from .gri import GRIAttnProcessor, GridState
from .install import apply_gri, apply_nasa, apply_speedup, apply_user_embedding, attention_layers
from .pipelines import nasa_generate, speedup_generate, user_embedding_generate
from .processors import (
    NASA_DEFAULT_ALPHA,
    NASAAttnProcessor,
    SpeedUpAttnProcessor,
    UserEmbeddingAttnProcessor,
)

__all__ = [
    "NASA_DEFAULT_ALPHA",
    "GRIAttnProcessor",
    "GridState",
    "NASAAttnProcessor",
    "SpeedUpAttnProcessor",
    "UserEmbeddingAttnProcessor",
    "apply_gri",
    "apply_nasa",
    "apply_speedup",
    "apply_user_embedding",
    "attention_layers",
    "nasa_generate",
    "speedup_generate",
    "user_embedding_generate",
]
