"""``apply_*`` helpers: install stablecore processors on a ``UNet2DConditionModel``.

Each helper replaces only the processors of the layers it targets (cross-attention ``attn2``
layers for NASA, PPD and SpeedUpNet; self-attention ``attn1`` for GRI) and leaves every other
processor as it was, then returns the list of new trainable parameters (empty for NASA and GRI).
Trainable processors are ``nn.Module``s created on the layer's device and dtype; they become
submodules of their ``Attention`` layer, so they are in ``unet.state_dict()``.

Example::

    >>> params = apply_user_embedding(unet, user_dim=3584, scale=1.0)
    >>> opt = torch.optim.AdamW(params, lr=1e-4)
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .gri import GRIAttnProcessor, GridState
from .processors import NASAAttnProcessor, SpeedUpAttnProcessor, UserEmbeddingAttnProcessor

__all__ = ["apply_gri", "apply_nasa", "apply_speedup", "apply_user_embedding", "attention_layers"]


def attention_layers(unet: nn.Module, kind: str) -> dict[str, nn.Module]:
    """``{processor key: Attention module}`` of ``kind`` ``"cross"`` (attn2) or ``"self"``
    (attn1); keys as in ``unet.attn_processors``."""
    from diffusers.models.attention_processor import Attention

    if kind not in ("cross", "self"):
        raise ValueError(f"kind must be 'cross' or 'self', got {kind!r}")
    if not hasattr(unet, "attn_processors") or not hasattr(unet, "set_attn_processor"):
        raise TypeError(f"expected a diffusers UNet with attention processors, got {type(unet)}")
    layers = {}
    for name, module in unet.named_modules():
        if isinstance(module, Attention):
            is_cross = getattr(module, "is_cross_attention", name.endswith("attn2"))
            if is_cross == (kind == "cross"):
                layers[f"{name}.processor"] = module
    return layers


def _install(unet: nn.Module, kind: str, make: Callable[[nn.Module], object]) -> list:
    layers = attention_layers(unet, kind)
    if not layers:
        raise ValueError(f"the UNet has no {kind}-attention layers")
    processors = dict(unet.attn_processors)
    new = {}
    for key, module in layers.items():
        proc = make(module)
        if isinstance(proc, nn.Module):
            proc.to(device=module.to_q.weight.device, dtype=module.to_q.weight.dtype)
        new[key] = proc
    processors.update(new)
    unet.set_attn_processor(processors)
    return [p for proc in new.values() if isinstance(proc, nn.Module) for p in proc.parameters()]


def apply_nasa(unet: nn.Module, alpha: float | None = None, family: str = "sd15") -> list:
    """NASA on every cross-attention layer; per call pass
    ``cross_attention_kwargs={"neg_encoder_hidden_states": neg}``. No trainable parameters."""
    proc = NASAAttnProcessor(alpha, family)  # shared: stateless
    return _install(unet, "cross", lambda module: proc)


def apply_user_embedding(unet: nn.Module, user_dim: int, scale: float = 1.0) -> list:
    """PPD user branch on every cross-attention layer; returns its ``to_k_user``/``to_v_user``
    weights. Per call: ``cross_attention_kwargs={"user_embeds": u}`` with u ``[B, U, user_dim]``."""
    return _install(
        unet,
        "cross",
        lambda m: UserEmbeddingAttnProcessor(m.to_k.out_features, user_dim, scale),
    )


def apply_speedup(
    unet: nn.Module, norm: str = "batch", add_pos: bool = False, init_from_layer: bool = True
) -> list:
    """SpeedUpNet adapter on every cross-attention layer; returns its projections and per-channel
    alpha/beta. Per call: ``cross_attention_kwargs={"neg_encoder_hidden_states": neg}``."""
    return _install(
        unet,
        "cross",
        lambda m: SpeedUpAttnProcessor(
            m.to_k.out_features,
            m.to_k.in_features,
            norm=norm,
            add_pos=add_pos,
            init_from=m if init_from_layer else None,
        ),
    )


def apply_gri(
    unet: nn.Module, window_size: int = 8, pool_size: int | None = None, min_tokens: int = 0
) -> list:
    """GRI attention on every self-attention layer, plus a pre-hook recording the latent size
    (so each layer knows its grid). Returns ``[]`` (no new parameters)."""
    state = GridState()
    if getattr(unet, "_stablecore_gri_hook", None) is not None:
        unet._stablecore_gri_hook.remove()
    unet._stablecore_gri_hook = unet.register_forward_pre_hook(state.hook, with_kwargs=True)
    proc = GRIAttnProcessor(window_size, pool_size, state, min_tokens)
    return _install(unet, "self", lambda module: proc)
