"""diffusers attention processors for NASA (SNOOPI), PPD user embeddings and SpeedUpNet.

Each processor is a drop-in for ``AttnProcessor2_0`` on a ``UNet2DConditionModel`` (install with
``unet.set_attn_processor`` or the ``apply_*`` helpers of :mod:`.install`). Per-call inputs are
NAMED parameters of ``__call__``: diffusers' ``Attention.forward`` filters
``cross_attention_kwargs`` by the processor's signature, so a ``**kwargs`` catch-all would receive
nothing. ``cross_attention_kwargs`` reaches self- and cross-attention layers alike; the processors
only act on cross-attention (``encoder_hidden_states`` given) and behave like ``AttnProcessor2_0``
elsewhere.

The extra streams go through :func:`stablecore.ops.multi_cross_attention.multi_cross_attention`
(one fused pass over the queries on CUDA, SDPA-exact reference elsewhere).

Example::

    >>> unet.set_attn_processor(NASAAttnProcessor(alpha=0.1))
    >>> eps = unet(x, t, encoder_hidden_states=pos,
    ...            cross_attention_kwargs={"neg_encoder_hidden_states": neg})
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stablecore.ops.multi_cross_attention import multi_cross_attention

__all__ = [
    "NASA_DEFAULT_ALPHA",
    "NASAAttnProcessor",
    "SpeedUpAttnProcessor",
    "UserEmbeddingAttnProcessor",
]

#: SNOOPI v3: alpha per model family (SD1.5-based 0.1, SD2.1-based 0.2, PixArt-alpha 0.5).
NASA_DEFAULT_ALPHA: dict[str, float] = {"sd15": 0.1, "sd21": 0.2, "pixart": 0.5}


# ----------------------------------------------------------------------------- shared plumbing
def _prepare(attn, hidden_states: Tensor, temb: Tensor | None):
    """The pre-projection part of ``AttnProcessor2_0``: spatial norm, 4-D to tokens, group norm.
    Returns (tokens [B, L, C], residual, original 4-D shape or None)."""
    residual = hidden_states
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    shape4 = None
    if hidden_states.ndim == 4:
        shape4 = hidden_states.shape
        b, c, h, w = shape4
        hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    return hidden_states, residual, shape4


def _finish(attn, out: Tensor, residual: Tensor, shape4) -> Tensor:
    """to_out, back to 4-D, residual, rescale: the tail of ``AttnProcessor2_0``."""
    out = attn.to_out[1](attn.to_out[0](out))
    if shape4 is not None:
        out = out.transpose(-1, -2).reshape(shape4)
    if attn.residual_connection:
        out = out + residual
    return out / attn.rescale_output_factor


def _heads(attn, x: Tensor) -> Tensor:
    """[B, S, H*d] -> [B, H, S, d]."""
    b, s, inner = x.shape
    return x.view(b, s, attn.heads, inner // attn.heads).transpose(1, 2)


def _merge(x: Tensor) -> Tensor:
    """[B, H, S, d] -> [B, S, H*d]."""
    b, h, s, d = x.shape
    return x.transpose(1, 2).reshape(b, s, h * d)


def _kv(attn, context: Tensor, to_k=None, to_v=None):
    k = _heads(attn, (to_k or attn.to_k)(context))
    v = _heads(attn, (to_v or attn.to_v)(context))
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    return k, v


def _query(attn, tokens: Tensor) -> Tensor:
    q = _heads(attn, attn.to_q(tokens))
    return attn.norm_q(q) if attn.norm_q is not None else q


def _key_mask(attention_mask: Tensor | None, batch: int, keys: int) -> Tensor | None:
    """diffusers' cross-attention mask (bool [B, S], or the UNet's additive [B, 1, S] bias of
    0 / -10000) as a bool key-padding mask [B, S] (True = attend)."""
    if attention_mask is None:
        return None
    m = attention_mask
    if m.dim() == 3 and m.shape[1] == 1:
        m = m[:, 0]
    if m.dim() != 2 or tuple(m.shape) != (batch, keys):
        raise ValueError(
            f"cross-attention mask must be [batch, keys] = {(batch, keys)} or [batch, 1, keys], "
            f"got {tuple(attention_mask.shape)}"
        )
    if m.dtype == torch.bool:
        return m
    # Float masks are additive biases (diffusers' convention: 0 keep, -10000 or -inf drop).
    return m > -1.0


def _match_batch(name: str, x: Tensor, batch: int) -> Tensor:
    if x.dim() != 3:
        raise ValueError(f"{name} must be [batch, tokens, dim], got shape {tuple(x.shape)}")
    if x.shape[0] == batch:
        return x
    if x.shape[0] == 1:
        return x.expand(batch, -1, -1)
    raise ValueError(f"{name} has batch {x.shape[0]}, expected 1 or {batch} (the UNet batch)")


def _check_context(name: str, x: Tensor, ref: Tensor, dim: int) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.device != ref.device:
        raise ValueError(f"{name} is on {x.device} but the hidden states are on {ref.device}")
    if x.shape[-1] != dim:
        raise ValueError(
            f"{name} has feature size {x.shape[-1]} (shape {tuple(x.shape)}), the layer's key/value "
            f"projections expect {dim}"
        )


def _plain(attn, tokens: Tensor, context: Tensor, attention_mask: Tensor | None) -> Tensor:
    """``AttnProcessor2_0``'s attention core: [B, L, C] -> [B, L, inner]."""
    q = _query(attn, tokens)
    k, v = _kv(attn, context)
    if attention_mask is not None:
        mask = attn.prepare_attention_mask(attention_mask, context.shape[1], tokens.shape[0])
        attention_mask = mask.view(tokens.shape[0], attn.heads, -1, mask.shape[-1])
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask)
    return _merge(out).to(q.dtype)


def _default_attention(attn, tokens, encoder_hidden_states, attention_mask, residual, shape4):
    """The layer exactly as ``AttnProcessor2_0`` computes it: every processor's fallback when
    its extra stream is absent (self-attention, no extra input, or a zero weight)."""
    context = tokens
    if encoder_hidden_states is not None:
        context = encoder_hidden_states
        if attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
    return _finish(attn, _plain(attn, tokens, context, attention_mask), residual, shape4)


# ----------------------------------------------------------------------------- NASA
class NASAAttnProcessor:
    """SNOOPI's Negative-Away Steer Attention: ``Z = softmax(QK+^T/sqrt d)V+ - alpha *
    softmax(QK-^T/sqrt d)V-`` with the layer's OWN key/value projections (no new parameters),
    then ``to_out``. Steers a one/few-step model away from a negative prompt at ~+4 % cost
    instead of CFG's doubled batch.

    Args:
        alpha: negative weight; default from ``family`` (:data:`NASA_DEFAULT_ALPHA`).
        family: ``"sd15"`` (0.1), ``"sd21"`` (0.2) or ``"pixart"`` (0.5).

    Per call (``cross_attention_kwargs``): ``neg_encoder_hidden_states`` [B or 1, S-, C_ctx]
    (none: plain attention), ``nasa_alpha`` (overrides ``alpha``), ``neg_attention_mask`` bool
    [B, S-]. With alpha = 0 it equals ``AttnProcessor2_0``.
    """

    def __init__(self, alpha: float | None = None, family: str = "sd15") -> None:
        if family not in NASA_DEFAULT_ALPHA:
            raise ValueError(f"family must be one of {sorted(NASA_DEFAULT_ALPHA)}, got {family!r}")
        self.alpha = NASA_DEFAULT_ALPHA[family] if alpha is None else float(alpha)

    def __call__(
        self,
        attn,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
        neg_encoder_hidden_states: Tensor | None = None,
        nasa_alpha: float | None = None,
        neg_attention_mask: Tensor | None = None,
    ) -> Tensor:
        tokens, residual, shape4 = _prepare(attn, hidden_states, temb)
        alpha = self.alpha if nasa_alpha is None else float(nasa_alpha)
        if encoder_hidden_states is None or neg_encoder_hidden_states is None or alpha == 0.0:
            return _default_attention(
                attn, tokens, encoder_hidden_states, attention_mask, residual, shape4
            )
        pos = encoder_hidden_states
        _check_context("neg_encoder_hidden_states", neg_encoder_hidden_states, pos, pos.shape[-1])
        neg = _match_batch("neg_encoder_hidden_states", neg_encoder_hidden_states, tokens.shape[0])
        if attn.norm_cross:
            pos, neg = attn.norm_encoder_hidden_states(pos), attn.norm_encoder_hidden_states(neg)
        q = _query(attn, tokens)
        k_pos, v_pos = _kv(attn, pos)
        k_neg, v_neg = _kv(attn, neg.to(pos.dtype))
        masks = [
            _key_mask(attention_mask, q.shape[0], k_pos.shape[2]),
            _key_mask(neg_attention_mask, q.shape[0], k_neg.shape[2]),
        ]
        out = multi_cross_attention(q, [k_pos, k_neg], [v_pos, v_neg], [1.0, -alpha], masks)
        return _finish(attn, _merge(out), residual, shape4)


# ----------------------------------------------------------------------------- PPD
class UserEmbeddingAttnProcessor(nn.Module):
    """PPD's decoupled cross-attention on user-preference embeddings (IP-Adapter style):
    ``Z = softmax(QK_t^T/sqrt d)V_t + s * softmax(Q(W_k^u u)^T/sqrt d)(W_v^u u)``.

    ``to_k_user``/``to_v_user`` = ``Linear(user_dim, hidden_size, bias=False)``; ``to_v_user`` is
    zero-initialised so that the freshly installed branch is a no-op for every user, and with no
    biases a zero user embedding is a no-op at any time (PPD's "zero user = no-op").

    Args:
        hidden_size: the layer's inner dim (``attn.to_k.out_features``).
        user_dim: feature size of the user embedding (29 x 3584 tokens for LLaVA-Qwen2-7B).
        scale: the branch weight ``s``.

    Per call: ``user_embeds`` [B or 1, U, user_dim], ``user_scale``, ``user_mask`` bool [B, U].
    """

    def __init__(self, hidden_size: int, user_dim: int, scale: float = 1.0) -> None:
        super().__init__()
        self.hidden_size, self.user_dim, self.scale = int(hidden_size), int(user_dim), float(scale)
        self.to_k_user = nn.Linear(self.user_dim, self.hidden_size, bias=False)
        self.to_v_user = nn.Linear(self.user_dim, self.hidden_size, bias=False)
        nn.init.zeros_(self.to_v_user.weight)

    def forward(self, *args, **kwargs):  # nn.Module plumbing; diffusers calls __call__
        return self.__call__(*args, **kwargs)

    def __call__(
        self,
        attn,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
        user_embeds: Tensor | None = None,
        user_scale: float | None = None,
        user_mask: Tensor | None = None,
    ) -> Tensor:
        tokens, residual, shape4 = _prepare(attn, hidden_states, temb)
        scale = self.scale if user_scale is None else float(user_scale)
        if encoder_hidden_states is None or user_embeds is None or scale == 0.0:
            return _default_attention(
                attn, tokens, encoder_hidden_states, attention_mask, residual, shape4
            )
        text = encoder_hidden_states
        if attn.norm_cross:
            text = attn.norm_encoder_hidden_states(text)
        _check_context("user_embeds", user_embeds, tokens, self.user_dim)
        user = _match_batch("user_embeds", user_embeds, tokens.shape[0]).to(tokens.dtype)
        q = _query(attn, tokens)
        k_t, v_t = _kv(attn, text)
        k_u, v_u = _heads(attn, self.to_k_user(user)), _heads(attn, self.to_v_user(user))
        masks = [_key_mask(attention_mask, q.shape[0], k_t.shape[2]), user_mask]
        out = multi_cross_attention(q, [k_t, k_u], [v_t, v_u], [1.0, scale], masks)
        return _finish(attn, _merge(out), residual, shape4)


# ----------------------------------------------------------------------------- SpeedUpNet
class SpeedUpAttnProcessor(nn.Module):
    """SpeedUpNet's negative-prompt adapter (``SUNAttnProcessor``), for sampling without CFG::

        Z+ = Attn(Q, W_k c+, W_v c+)                  # the layer's own projections
        Z- = Attn(Q, W_k^neg c-, W_v^neg c-)          # new trainable to_k_neg / to_v_neg
        Z- = ||Z+||_F * Z- / ||Z-||_F                 # norm="batch": whole tensor, batch included
        Z- = alpha_neg * Z- + beta_neg                # per channel (init 1 / 0)
        [add_pos: Z_p = same normalisation of Attn(Q, W_k^pos c+, W_v^pos c+)]
        out = to_out(Z+ - Z- (+ Z_p))

    ``norm="batch"`` is the released code's behaviour (the norm couples the samples of a batch);
    ``norm="sample"`` takes one Frobenius norm per sample instead. ``eps`` clamps ``||Z-||``.
    All streams, the rescaling and the scale/shift run in ONE
    :func:`~stablecore.ops.multi_cross_attention.multi_cross_attention` call (``norm_streams``);
    where ``neg_attention_mask`` masks every negative token of a sample, the branch contributes
    zero there (no shift). The new projections start as copies of the layer's ``to_k``/``to_v``
    when given (``init_from=attn``), else default init.

    Per call: ``neg_encoder_hidden_states`` [B or 1, S-, C_ctx] (none: plain attention),
    ``neg_attention_mask`` bool [B, S-].
    """

    def __init__(
        self,
        hidden_size: int,
        cross_attention_dim: int,
        norm: str = "batch",
        add_pos: bool = False,
        init_from=None,
        eps: float = 1e-12,
    ) -> None:
        super().__init__()
        if norm not in ("batch", "sample"):
            raise ValueError(f"norm must be 'batch' (faithful) or 'sample', got {norm!r}")
        self.norm, self.add_pos, self.eps = norm, bool(add_pos), float(eps)
        branches = ["neg", "pos"] if add_pos else ["neg"]
        for name in branches:
            to_k = nn.Linear(cross_attention_dim, hidden_size, bias=False)
            to_v = nn.Linear(cross_attention_dim, hidden_size, bias=False)
            if init_from is not None:
                with torch.no_grad():
                    to_k.weight.copy_(init_from.to_k.weight)
                    to_v.weight.copy_(init_from.to_v.weight)
            setattr(self, f"to_k_{name}", to_k)
            setattr(self, f"to_v_{name}", to_v)
            setattr(self, f"alpha_{name}", nn.Parameter(torch.ones(hidden_size)))
            setattr(self, f"beta_{name}", nn.Parameter(torch.zeros(hidden_size)))

    def forward(self, *args, **kwargs):
        return self.__call__(*args, **kwargs)

    def __call__(
        self,
        attn,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
        neg_encoder_hidden_states: Tensor | None = None,
        neg_attention_mask: Tensor | None = None,
    ) -> Tensor:
        tokens, residual, shape4 = _prepare(attn, hidden_states, temb)
        if encoder_hidden_states is None or neg_encoder_hidden_states is None:
            return _default_attention(
                attn, tokens, encoder_hidden_states, attention_mask, residual, shape4
            )
        pos = encoder_hidden_states
        _check_context("neg_encoder_hidden_states", neg_encoder_hidden_states, pos, pos.shape[-1])
        neg = _match_batch("neg_encoder_hidden_states", neg_encoder_hidden_states, tokens.shape[0])
        if attn.norm_cross:
            pos, neg = attn.norm_encoder_hidden_states(pos), attn.norm_encoder_hidden_states(neg)
        q = _query(attn, tokens)
        k, v = _kv(attn, pos)
        k_neg, v_neg = _kv(attn, neg.to(pos.dtype), self.to_k_neg, self.to_v_neg)
        pos_mask = _key_mask(attention_mask, q.shape[0], k.shape[2])
        keys, values, masks = [k, k_neg], [v, v_neg], [pos_mask, neg_attention_mask]
        weights, normed = [1.0, -1.0], ["neg"]
        if self.add_pos:
            k_p, v_p = _kv(attn, pos, self.to_k_pos, self.to_v_pos)
            keys, values, masks = keys + [k_p], values + [v_p], masks + [pos_mask]
            weights, normed = weights + [1.0], normed + ["pos"]
        # One fused op: Z+ - (alpha_neg Z~- + beta_neg) (+ alpha_pos Z~p + beta_pos), with the
        # Frobenius rescaling to ||Z+|| done inside (stablecore.ops._mca_norm).
        out = multi_cross_attention(
            q,
            keys,
            values,
            weights,
            masks,
            norm_streams=list(range(1, len(keys))),
            norm_scales=[getattr(self, f"alpha_{n}") for n in normed],
            norm_shifts=[getattr(self, f"beta_{n}") for n in normed],
            norm_mode=self.norm,
            norm_eps=self.eps,
        )
        return _finish(attn, _merge(out), residual, shape4)
