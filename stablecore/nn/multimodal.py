"""3MAT: a cascaded multimodal transformer that keeps working when modalities are missing.

Liu et al., "Cascaded Multi-Modal Mixing Transformers for Alzheimer's Disease Classification with
Incomplete Data", NeuroImage 277:120267, 2023 (arXiv:2210.00255). No official code exists; the
mechanism follows the paper's abstract and a third-party description (see the project notes):

* every modality ``m`` has an encoder ``E_m: x_m [n, ...] -> tokens [n, T_m, D]``;
* a running representation ``h`` (learned query tokens ``[Q, D]``) passes one stage per modality:
  ``h <- h + CrossAttn(h, E_m(x_m))``, ``h <- h + SelfAttn(h)``, ``h <- h + FFN(h)`` (pre-norm),
  each stage with an auxiliary classifier on the pooled ``h``;
* a sample without modality ``m`` skips stage ``m`` (``h`` passes through unchanged). The stage
  and the encoder only ever see the rows that have the modality (gathered, then scattered back),
  so missing inputs may hold anything, NaN included, and no attention row is ever fully masked
  (the SDPA all-masked-row NaN pitfall cannot occur);
* modality dropout (training only) hides each (sample, modality) pair with probability ``p`` and
  never hides all of a sample's present modalities.

Example::

    >>> import torch
    >>> from stablecore.nn.multimodal import (
    ...     CascadedModalityTransformer, ImageEncoder, TabularEncoder)
    >>> net = CascadedModalityTransformer(
    ...     {"clinical": TabularEncoder(5, 32), "mri": ImageEncoder(1, 32)}, d_model=32, num_classes=3)
    >>> x = {"clinical": torch.randn(4, 5), "mri": torch.randn(4, 1, 16, 16)}
    >>> present = {"mri": torch.tensor([True, False, True, False])}
    >>> out = net(x, present)
    >>> out.logits.shape, out.aux_logits.shape
    (torch.Size([4, 3]), torch.Size([2, 4, 3]))
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "CascadedModalityTransformer",
    "ImageEncoder",
    "MultimodalOutput",
    "TabularEncoder",
    "drop_modalities",
]


class TabularEncoder(nn.Module):
    """One token per feature (feature tokenizer): ``x: [n, F] -> [n, F, D]``, token j =
    ``x_j * w_j + b_j``, so a feature's identity lives in its own embedding."""

    def __init__(self, in_features: int, d_model: int) -> None:
        super().__init__()
        if in_features < 1 or d_model < 1:
            raise ValueError(f"in_features and d_model must be >= 1, got {in_features}, {d_model}")
        self.in_features = in_features
        self.weight = nn.Parameter(torch.randn(in_features, d_model) / d_model**0.5)
        self.bias = nn.Parameter(torch.randn(in_features, d_model) / d_model**0.5)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 2 or x.shape[1] != self.in_features:
            raise ValueError(
                f"TabularEncoder expects [n, {self.in_features}] features, got {tuple(x.shape)}"
            )
        return x.unsqueeze(-1) * self.weight + self.bias


class ImageEncoder(nn.Module):
    """Small conv encoder: ``x: [n, C, H, W] -> [n, ceil(H/4) * ceil(W/4), D]`` tokens.

    Two stride-2 conv blocks; two coordinate channels (CoordConv) give the tokens their position
    without a size-dependent positional table, so any ``H, W >= 4`` works with the same weights.
    """

    def __init__(self, in_channels: int, d_model: int, hidden: int = 16) -> None:
        super().__init__()
        if in_channels < 1 or d_model < 1:
            raise ValueError(f"in_channels and d_model must be >= 1, got {in_channels}, {d_model}")
        self.in_channels = in_channels
        self.conv1 = nn.Conv2d(in_channels + 2, hidden, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(hidden, d_model, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels or min(x.shape[2:]) < 4:
            raise ValueError(
                f"ImageEncoder expects [n, {self.in_channels}, H>=4, W>=4] images, "
                f"got {tuple(x.shape)}"
            )
        n, _, hh, ww = x.shape
        ys = torch.linspace(-1, 1, hh, device=x.device, dtype=x.dtype).view(1, 1, hh, 1)
        xs = torch.linspace(-1, 1, ww, device=x.device, dtype=x.dtype).view(1, 1, 1, ww)
        coords = torch.cat([ys.expand(n, 1, hh, ww), xs.expand(n, 1, hh, ww)], 1)
        z = self.conv2(F.gelu(self.conv1(torch.cat([x, coords], 1))))
        return z.flatten(2).transpose(1, 2)


class _Stage(nn.Module):
    def __init__(self, d: int, n_heads: int, ffn_mult: int, dropout: float) -> None:
        super().__init__()
        self.norm_q, self.norm_kv = nn.LayerNorm(d), nn.LayerNorm(d)
        self.cross = nn.MultiheadAttention(d, n_heads, dropout=dropout, batch_first=True)
        self.norm_s = nn.LayerNorm(d)
        self.self_attn = nn.MultiheadAttention(d, n_heads, dropout=dropout, batch_first=True)
        self.norm_f = nn.LayerNorm(d)
        self.ffn = nn.Sequential(
            nn.Linear(d, ffn_mult * d), nn.GELU(), nn.Dropout(dropout), nn.Linear(ffn_mult * d, d)
        )

    def forward(self, h: Tensor, tokens: Tensor) -> Tensor:
        kv = self.norm_kv(tokens)
        h = h + self.cross(self.norm_q(h), kv, kv, need_weights=False)[0]
        s = self.norm_s(h)
        h = h + self.self_attn(s, s, s, need_weights=False)[0]
        return h + self.ffn(self.norm_f(h))


@dataclass
class MultimodalOutput:
    """``logits: [N, C]``; ``aux_logits: [M, N, C]`` (after each stage, cascade order);
    ``present: [N, M]`` bool, the modalities each sample's stages actually used."""

    logits: Tensor
    aux_logits: Tensor
    present: Tensor


def drop_modalities(present: Tensor, p: float, generator: torch.Generator | None = None) -> Tensor:
    """Modality dropout: hide each True entry of ``present: [N, M]`` (bool) with probability
    ``p``; a sample that would lose all its modalities keeps one of them, drawn at random."""
    if present.dtype != torch.bool or present.ndim != 2:
        raise TypeError(f"present must be a bool [N, M] mask, got {present.dtype} {present.shape}")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"modality dropout probability must be in [0, 1], got {p}")
    u = torch.rand(present.shape, generator=generator, device=present.device)
    kept = present & (u >= p)
    lost = present.any(1) & ~kept.any(1)
    # Random survivor among the present ones: the largest u among present entries.
    pick = torch.where(present, u, -1.0).argmax(1)
    rescue = F.one_hot(pick, present.shape[1]).bool() & lost[:, None]
    return kept | rescue


class CascadedModalityTransformer(nn.Module):
    """3MAT classifier over named modalities with per-sample missingness.

    Args:
        encoders: ``{name: module}`` in cascade order; a module maps ``x_m: [n, ...]`` to tokens
            ``[n, T, d_model]`` (or one token ``[n, d_model]``). :class:`TabularEncoder` and
            :class:`ImageEncoder` are provided; any module works.
        d_model, num_classes: width and number of classes.
        n_heads, n_queries, ffn_mult, dropout: attention heads, learned query tokens (the initial
            ``h``, so a sample may miss any modality, the first included), FFN width multiplier,
            attention/FFN dropout.
        modality_dropout: probability of hiding a (sample, modality) pair in training mode.

    ``forward(inputs, present=None)``: ``inputs`` maps names to tensors ``[N, ...]`` (or ``None``
    when absent for the whole batch); ``present`` optionally maps names to bool ``[N]`` masks.
    Values of absent rows are never read. Returns :class:`MultimodalOutput`.
    """

    def __init__(
        self,
        encoders: Mapping[str, nn.Module],
        d_model: int,
        num_classes: int,
        *,
        n_heads: int = 4,
        n_queries: int = 4,
        ffn_mult: int = 2,
        dropout: float = 0.0,
        modality_dropout: float = 0.25,
    ) -> None:
        super().__init__()
        if not isinstance(encoders, Mapping) or len(encoders) == 0:
            raise TypeError("encoders must be a non-empty mapping {name: nn.Module}")
        for name, enc in encoders.items():
            if not isinstance(enc, nn.Module):
                raise TypeError(f"encoder {name!r} must be an nn.Module, got {type(enc).__name__}")
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        if num_classes < 2 or n_queries < 1:
            raise ValueError(
                f"need num_classes >= 2 and n_queries >= 1, got {num_classes}, {n_queries}"
            )
        if not 0.0 <= modality_dropout <= 1.0:
            raise ValueError(f"modality_dropout must be in [0, 1], got {modality_dropout}")
        self.modalities = tuple(encoders)
        self.d_model, self.num_classes = d_model, num_classes
        self.modality_dropout = modality_dropout
        self.encoders = nn.ModuleDict(dict(encoders))
        self.queries = nn.Parameter(torch.randn(n_queries, d_model) * 0.02)
        self.stages = nn.ModuleList(_Stage(d_model, n_heads, ffn_mult, dropout) for _ in encoders)
        self.aux_heads = nn.ModuleList(nn.Linear(d_model, num_classes) for _ in encoders)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, num_classes)

    def _present_mask(self, inputs, present) -> Tensor:
        if not isinstance(inputs, Mapping):
            raise TypeError(
                f"inputs must be a mapping {{name: tensor}}, got {type(inputs).__name__}"
            )
        present = dict(present or {})
        for name in [*inputs, *present]:
            if name not in self.modalities:
                raise ValueError(f"unknown modality {name!r}; expected one of {self.modalities}")
        sizes = {}
        for name, x in inputs.items():
            if x is not None:
                if not isinstance(x, Tensor):
                    raise TypeError(f"input {name!r} must be a tensor or None, got {type(x)}")
                if x.ndim == 0:
                    raise ValueError(f"input {name!r} needs a batch dimension, got a scalar")
                sizes[name] = x.shape[0]
        for name, mk in present.items():
            if not isinstance(mk, Tensor) or mk.dtype != torch.bool or mk.ndim != 1:
                raise TypeError(
                    f"present[{name!r}] must be a bool [N] tensor, got "
                    f"{getattr(mk, 'dtype', type(mk))} {getattr(mk, 'shape', '')}"
                )
            sizes[f"present[{name!r}]"] = mk.shape[0]
        if not sizes:
            raise ValueError("no modality input and no present mask: batch size unknown")
        if len(set(sizes.values())) != 1:
            raise ValueError(f"batch sizes disagree across modalities: {sizes}")
        n = next(iter(sizes.values()))
        dev = self.queries.device
        cols = []
        for name in self.modalities:
            given = inputs.get(name) is not None
            mk = present.get(name)
            if mk is None:
                mk = torch.full((n,), given, dtype=torch.bool, device=dev)
            elif not given and bool(mk.any()):
                raise ValueError(
                    f"present[{name!r}] marks samples present but inputs[{name!r}] is missing"
                )
            cols.append(mk.to(dev))
        return torch.stack(cols, 1)

    def _encode(self, name: str, x: Tensor) -> Tensor:
        try:
            tokens = self.encoders[name](x)
        except ValueError as e:
            raise ValueError(f"modality {name!r}: {e}") from e
        if tokens.ndim == 2:
            tokens = tokens.unsqueeze(1)
        if tokens.ndim != 3 or tokens.shape[0] != x.shape[0] or tokens.shape[2] != self.d_model:
            raise ValueError(
                f"encoder {name!r} must return [n, T, {self.d_model}] tokens for {x.shape[0]} "
                f"rows, got {tuple(tokens.shape)}"
            )
        return tokens

    def forward(
        self,
        inputs: Mapping[str, Tensor | None],
        present: Mapping[str, Tensor] | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> MultimodalOutput:
        mask = self._present_mask(inputs, present)
        if self.training and self.modality_dropout > 0:
            mask = drop_modalities(mask, self.modality_dropout, generator)
        n = mask.shape[0]
        h = self.queries.unsqueeze(0).expand(n, -1, -1)
        aux = []
        for j, name in enumerate(self.modalities):
            idx = mask[:, j].nonzero().squeeze(1)
            x = inputs.get(name)
            if x is not None and not idx.numel():
                with torch.no_grad():  # still validate the input's shape on an empty slice
                    self._encode(name, x[:0])
            if idx.numel():
                # Gather-run-scatter: absent rows never reach the encoder or the attention.
                tokens = self._encode(name, x.index_select(0, idx.to(x.device)))
                h = h.index_copy(0, idx, self.stages[j](h.index_select(0, idx), tokens.to(h.dtype)))
            aux.append(self.aux_heads[j](self.norm(h).mean(1)))
        logits = self.head(self.norm(h).mean(1))
        return MultimodalOutput(logits, torch.stack(aux), mask)

    def loss(self, out: MultimodalOutput, target: Tensor, aux_weight: float = 0.3) -> Tensor:
        """Cross-entropy of the final head plus ``aux_weight`` x the mean auxiliary loss, each
        auxiliary head scored only on the samples whose stage ran (0 if none did)."""
        if target.shape != out.logits.shape[:1] or target.dtype != torch.long:
            raise ValueError(
                f"target must be int64 [{out.logits.shape[0]}], got {target.dtype} "
                f"{tuple(target.shape)}"
            )
        loss = F.cross_entropy(out.logits, target)
        if aux_weight:
            m = out.present.t().to(out.logits.dtype)  # [M, N]
            ce = F.cross_entropy(
                out.aux_logits.flatten(0, 1), target.repeat(m.shape[0]), reduction="none"
            ).view_as(m)
            per_stage = (ce * m).sum(1) / m.sum(1).clamp_min(1.0)
            loss = loss + aux_weight * per_stage.mean()
        return loss
