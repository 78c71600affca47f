"""The stability estimate R-hat of T-Rex, batched (one forward pass) and per-draw."""

from __future__ import annotations

import torch
from torch import Tensor

from ._common import Model, _check_points, class_probability


def _draw_noise(x: Tensor, k: int, noise: Tensor | None, generator: torch.Generator | None):
    b, d = x.shape
    if noise is None:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        return torch.randn(b, k, d, generator=generator, dtype=x.dtype, device=x.device)
    if noise.ndim == 2:
        noise = noise.unsqueeze(0)
    if noise.ndim != 3 or noise.shape[-1] != d or noise.shape[0] not in (1, b):
        raise ValueError(f"noise must be [K, {d}] or [{b}, K, {d}], got {tuple(noise.shape)}")
    return noise.to(dtype=x.dtype, device=x.device)


def stability(
    model: Model,
    x: Tensor,
    target: int = 1,
    *,
    k: int = 1000,
    sigma: float = 0.05,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
    output: str = "logits",
    max_rows: int | None = None,
) -> Tensor:
    """Batched stability R-hat of ``x: [B, d]`` -> ``[B]``, differentiable in ``x``.

    ``noise`` (standard normal, ``[K, d]`` shared by all points or ``[B, K, d]``) fixes the draws
    (common random numbers); otherwise ``K = k`` draws come from ``generator``. Rows go through the
    model in chunks of at most ``max_rows`` rows (default 2^14 on CPU, where activations of
    cache-sized chunks beat one huge pass by ~1.8x; 2^22 elsewhere, i.e. one pass).
    """
    _check_points(x)
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    eps = _draw_noise(x, k, noise, generator)
    b, d = x.shape
    kk = eps.shape[1]
    if max_rows is None:
        max_rows = 1 << 14 if x.device.type == "cpu" else 1 << 22
    per_chunk = max(1, max_rows // (kk + 1))
    out = []
    for s in range(0, b, per_chunk):
        xc = x[s : s + per_chunk]
        ec = eps if eps.shape[0] == 1 else eps[s : s + per_chunk]
        # The factual row rides along with its K draws, so one model call serves both terms.
        pts = torch.cat(
            [xc.unsqueeze(1), xc.unsqueeze(1) + sigma * ec.expand(xc.shape[0], -1, -1)], 1
        )
        m = class_probability(model, pts.reshape(-1, d), target, output).view(xc.shape[0], kk + 1)
        mx, mi = m[:, :1], m[:, 1:]
        out.append(mi.mean(1) - (mx - mi).abs().mean(1))
    return torch.cat(out)


def stability_loop(
    model: Model, x: Tensor, target: int = 1, *, noise: Tensor, sigma: float = 0.05, output="logits"
) -> Tensor:
    """Reference R-hat: one model call per point and per draw (what public code does); ``[B]``."""
    _check_points(x)
    eps = _draw_noise(x, 0, noise, None).expand(x.shape[0], -1, -1)
    res = []
    for b in range(x.shape[0]):
        mx = class_probability(model, x[b : b + 1], target, output)[0]
        mi = [class_probability(model, (x[b] + sigma * e)[None], target, output)[0] for e in eps[b]]
        mi = torch.stack(mi)
        res.append(mi.mean() - (mx - mi).abs().mean())
    return torch.stack(res)
