"""A-SDM-style GRI self-attention as a diffusers processor (window + pooled global tokens).

The form is the most defensible reading of an unverified design (see
:mod:`stablecore.ops.gri_attention`). Self-attention receives flattened tokens ``[B, h*w, C]``,
so the processor needs the layer's grid: :func:`stablecore.integrations.diffusers.apply_gri`
adds a forward pre-hook on the UNet that records the latent size, and each layer finds the
downsampling factor ``f`` (a power of two) with ``ceil(H/f) * ceil(W/f) = tokens``. Without the
hook (or when nothing fits) a square grid is assumed, else a ``ValueError`` is raised.
"""

from __future__ import annotations

import math

from torch import Tensor

from stablecore.ops.gri_attention import gri_attention

from .processors import _default_attention, _finish, _kv, _merge, _prepare, _query

__all__ = ["GRIAttnProcessor", "GridState"]


class GridState:
    """The latent ``(height, width)`` of the current UNet call, shared by the GRI processors."""

    def __init__(self) -> None:
        self.latent_hw: tuple[int, int] | None = None

    def hook(self, module, args, kwargs):  # forward pre-hook with_kwargs=True
        sample = args[0] if args else kwargs.get("sample")
        if isinstance(sample, Tensor) and sample.dim() == 4:
            self.latent_hw = (int(sample.shape[-2]), int(sample.shape[-1]))
        return None

    def grid_for(self, tokens: int) -> tuple[int, int]:
        if self.latent_hw is not None:
            height, width = self.latent_hw
            f = 1
            while f <= max(height, width):
                gh, gw = -(-height // f), -(-width // f)
                if gh * gw == tokens:
                    return gh, gw
                f *= 2
        side = math.isqrt(tokens)
        if side * side == tokens:
            return side, side
        raise ValueError(
            f"cannot infer the spatial grid of {tokens} tokens (latent size "
            f"{self.latent_hw}); install with apply_gri(unet) so the latent size is recorded"
        )


class GRIAttnProcessor:
    """Self-attention replaced by window-local + pooled-global attention (one softmax).

    Args:
        window_size: side of the local windows on the layer's token grid.
        pool_size: side of the average-pooling cells giving the global tokens
            (default ``window_size``).
        grid_state: shared :class:`GridState` (``apply_gri`` creates and hooks one).
        min_tokens: layers with fewer tokens keep exact attention (GRI only pays off on
            large grids; the 8x8 SD bottleneck costs nothing).

    Cross-attention calls (``encoder_hidden_states`` given) fall back to plain attention.
    """

    def __init__(
        self,
        window_size: int = 8,
        pool_size: int | None = None,
        grid_state: GridState | None = None,
        min_tokens: int = 0,
    ) -> None:
        if window_size < 1 or (pool_size is not None and pool_size < 1):
            raise ValueError(f"window_size/pool_size must be >= 1, got {window_size}/{pool_size}")
        self.window_size, self.pool_size = int(window_size), pool_size
        self.grid_state = grid_state if grid_state is not None else GridState()
        self.min_tokens = int(min_tokens)

    def __call__(
        self,
        attn,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
        # Accepted and ignored: cross_attention_kwargs reach self-attention layers too, and
        # diffusers warns once per layer per call about names a processor does not declare.
        neg_encoder_hidden_states: Tensor | None = None,
        nasa_alpha: float | None = None,
        neg_attention_mask: Tensor | None = None,
        user_embeds: Tensor | None = None,
        user_scale: float | None = None,
        user_mask: Tensor | None = None,
    ) -> Tensor:
        input_hw = hidden_states.shape[-2:] if hidden_states.ndim == 4 else None
        tokens, residual, shape4 = _prepare(attn, hidden_states, temb)
        n = tokens.shape[1]
        if encoder_hidden_states is not None or attention_mask is not None or n < self.min_tokens:
            return _default_attention(
                attn, tokens, encoder_hidden_states, attention_mask, residual, shape4
            )
        grid = tuple(input_hw) if input_hw is not None else self.grid_state.grid_for(n)
        q = _query(attn, tokens)
        k, v = _kv(attn, tokens)
        out = gri_attention(q, k, v, grid, self.window_size, self.pool_size)
        return _finish(attn, _merge(out), residual, shape4)
