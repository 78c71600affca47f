"""diffusers integration: attention processors for NASA (SNOOPI), PPD user embeddings,
SpeedUpNet and GRI-style attention, ``apply_*`` installers and generation helpers, A-SDM feature
inheritance and multi-UNet switching, and UNet assembly (removing blocks, copying kept weights).

Example::

    >>> from stablecore.integrations.diffusers import apply_nasa
    >>> apply_nasa(pipe.unet, family="sd15")
    >>> pipe(prompt, cross_attention_kwargs={"neg_encoder_hidden_states": neg}, guidance_scale=0)
"""

from __future__ import annotations

from .assembly import AssembledUNet, AssemblyMap, assemble_unet, bk_sdm_removals
from .feature_inheritance import FeatureInheritance, UNetSwitch, inheritance_schedule
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
    "AssembledUNet",
    "AssemblyMap",
    "FeatureInheritance",
    "UNetSwitch",
    "assemble_unet",
    "bk_sdm_removals",
    "inheritance_schedule",
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
