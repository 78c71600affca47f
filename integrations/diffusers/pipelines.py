"""Generation helpers on a standard ``StableDiffusionPipeline`` (or any pipeline with
``encode_prompt`` and ``cross_attention_kwargs``): NASA negative prompts for one/few-step
models, PPD user embeddings, SpeedUpNet sampling without classifier-free guidance.

Each helper encodes what the processors need, passes it through ``cross_attention_kwargs`` and
returns the pipeline's output. Installing the processors is explicit for PPD and SpeedUpNet
(their weights are trained or loaded); ``nasa_generate`` installs NASA itself when absent.

Example::

    >>> pipe = StableDiffusionPipeline.from_pretrained("stabilityai/sd-turbo")
    >>> image = nasa_generate(pipe, "a cat", negative_prompt="blurry", num_inference_steps=1).images[0]
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import Tensor

from .install import apply_nasa
from .processors import NASAAttnProcessor, SpeedUpAttnProcessor, UserEmbeddingAttnProcessor

__all__ = ["nasa_generate", "speedup_generate", "user_embedding_generate"]


@contextlib.contextmanager
def _quiet_unused_kwargs():
    """cross_attention_kwargs also reach the self-attention layers, whose default processor
    does not declare them: diffusers then logs a warning per layer per step. Silence exactly
    that logger for the call."""
    log = logging.getLogger("diffusers.models.attention_processor")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _prompt_batch(prompt, prompt_embeds) -> int:
    if prompt_embeds is not None:
        return prompt_embeds.shape[0]
    if isinstance(prompt, str):
        return 1
    if isinstance(prompt, (list, tuple)) and prompt:
        return len(prompt)
    raise ValueError("give a prompt (str or non-empty list) or prompt_embeds")


def _encode_negative(
    pipe,
    negative_prompt,
    batch: int,
    num_images: int,
    guidance_scale: float,
    negative_embeds: Tensor | None,
) -> Tensor:
    """Negative-prompt embeddings matching the UNet batch: [B * n (x2 under CFG), 77, C]."""
    if negative_embeds is None:
        if negative_prompt is None:
            raise ValueError("give negative_prompt or negative_prompt_embeds")
        prompts = [negative_prompt] * batch if isinstance(negative_prompt, str) else negative_prompt
        if len(prompts) != batch:
            raise ValueError(f"{len(prompts)} negative prompts for a batch of {batch} prompts")
        negative_embeds, _ = pipe.encode_prompt(prompts, pipe._execution_device, 1, False)
    elif negative_embeds.shape[0] not in (1, batch):
        raise ValueError(
            f"negative_prompt_embeds has batch {negative_embeds.shape[0]}, expected 1 or {batch}"
        )
    neg = negative_embeds.expand(batch, -1, -1).repeat_interleave(num_images, dim=0)
    # Under CFG the UNet batch is [uncond, cond]: both halves steer away from the negative.
    return torch.cat([neg, neg]) if guidance_scale > 1.0 else neg


def _processors_of(pipe, kind) -> list:
    return [p for p in pipe.unet.attn_processors.values() if isinstance(p, kind)]


def nasa_generate(
    pipe,
    prompt=None,
    negative_prompt: str | list[str] | None = None,
    *,
    alpha: float | None = None,
    family: str = "sd15",
    negative_prompt_embeds: Tensor | None = None,
    num_inference_steps: int = 1,
    guidance_scale: float = 0.0,
    num_images_per_prompt: int = 1,
    **kwargs,
):
    """Generate with a negative prompt applied INSIDE cross-attention (SNOOPI's NASA), so it
    works on one/few-step models run without CFG (sd-turbo, LCM, DMD2, SwiftBrush).

    ``alpha`` defaults to the family's value (sd15 0.1, sd21 0.2). Installs
    :class:`NASAAttnProcessor` on the cross-attention layers when none is installed; other
    kwargs go to ``pipe(...)``.
    """
    if not _processors_of(pipe, NASAAttnProcessor):
        apply_nasa(pipe.unet, alpha, family)
    batch = _prompt_batch(prompt, kwargs.get("prompt_embeds"))
    neg = _encode_negative(
        pipe, negative_prompt, batch, num_images_per_prompt, guidance_scale, negative_prompt_embeds
    )
    cak = dict(kwargs.pop("cross_attention_kwargs", None) or {})
    cak.update(neg_encoder_hidden_states=neg, nasa_alpha=alpha)
    with _quiet_unused_kwargs():
        return pipe(
            prompt,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            num_images_per_prompt=num_images_per_prompt,
            cross_attention_kwargs=cak,
            **kwargs,
        )


def user_embedding_generate(
    pipe,
    prompt=None,
    user_embeds: Tensor | None = None,
    *,
    user_scale: float | None = None,
    guidance_scale: float = 7.5,
    num_images_per_prompt: int = 1,
    **kwargs,
):
    """Generate conditioned on a PPD user embedding ``[1 or B, U, user_dim]`` (processors from
    :func:`apply_user_embedding`, trained). Under CFG the unconditional half gets a zero user
    embedding (a no-op), as IP-Adapter does with its image tokens."""
    if not _processors_of(pipe, UserEmbeddingAttnProcessor):
        raise ValueError("no UserEmbeddingAttnProcessor installed: call apply_user_embedding first")
    if not isinstance(user_embeds, Tensor) or user_embeds.dim() != 3:
        raise ValueError(
            "user_embeds must be a [batch, tokens, user_dim] tensor, got "
            f"{getattr(user_embeds, 'shape', type(user_embeds))}"
        )
    batch = _prompt_batch(prompt, kwargs.get("prompt_embeds"))
    if user_embeds.shape[0] not in (1, batch):
        raise ValueError(f"user_embeds has batch {user_embeds.shape[0]}, expected 1 or {batch}")
    user = user_embeds.to(pipe._execution_device, pipe.unet.dtype)
    user = user.expand(batch, -1, -1).repeat_interleave(num_images_per_prompt, dim=0)
    if guidance_scale > 1.0:
        user = torch.cat([torch.zeros_like(user), user])
    cak = dict(kwargs.pop("cross_attention_kwargs", None) or {})
    cak.update(user_embeds=user, user_scale=user_scale)
    with _quiet_unused_kwargs():
        return pipe(
            prompt,
            guidance_scale=guidance_scale,
            num_images_per_prompt=num_images_per_prompt,
            cross_attention_kwargs=cak,
            **kwargs,
        )


def speedup_generate(
    pipe,
    prompt=None,
    negative_prompt: str | list[str] | None = "",
    *,
    negative_prompt_embeds: Tensor | None = None,
    num_inference_steps: int = 4,
    trailing: bool = True,
    num_images_per_prompt: int = 1,
    **kwargs,
):
    """Generate with SpeedUpNet: no classifier-free guidance (``guidance_scale=0``), the negative
    prompt through the adapter (processors from :func:`apply_speedup`, trained or loaded).
    ``trailing=True`` uses ``timestep_spacing="trailing"`` for this call, as the paper's code."""
    if not _processors_of(pipe, SpeedUpAttnProcessor):
        raise ValueError("no SpeedUpAttnProcessor installed: call apply_speedup first")
    batch = _prompt_batch(prompt, kwargs.get("prompt_embeds"))
    neg = _encode_negative(
        pipe, negative_prompt, batch, num_images_per_prompt, 0.0, negative_prompt_embeds
    )
    cak = dict(kwargs.pop("cross_attention_kwargs", None) or {})
    cak.update(neg_encoder_hidden_states=neg)
    scheduler = pipe.scheduler
    if trailing and scheduler.config.get("timestep_spacing") != "trailing":
        pipe.scheduler = type(scheduler).from_config(scheduler.config, timestep_spacing="trailing")
    try:
        with _quiet_unused_kwargs():
            return pipe(
                prompt,
                num_inference_steps=num_inference_steps,
                guidance_scale=0.0,
                num_images_per_prompt=num_images_per_prompt,
                cross_attention_kwargs=cak,
                **kwargs,
            )
    finally:
        pipe.scheduler = scheduler
