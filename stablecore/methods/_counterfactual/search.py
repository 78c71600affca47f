"""Counterfactual searches: T-Rex:I, T-Rex:NN, nearest and closest (EAD-like) counterfactuals."""

from __future__ import annotations

import torch
from torch import Tensor

from ._common import Counterfactuals, Model, _check_points, _outputs, predict
from .stability import _draw_noise, stability


def _bounds(x: Tensor, lower, upper, immutable):
    d = x.shape[1]
    lo = torch.as_tensor(lower, dtype=x.dtype, device=x.device).expand(d)
    hi = torch.as_tensor(upper, dtype=x.dtype, device=x.device).expand(d)
    if bool((lo > hi).any()):
        raise ValueError("lower must be <= upper in every feature")
    free = torch.ones(d, dtype=x.dtype, device=x.device)
    if immutable is not None:
        immutable = torch.as_tensor(immutable, device=x.device)
        if immutable.dtype != torch.bool or immutable.shape != (d,):
            raise ValueError(
                f"immutable must be a bool mask of shape [{d}], got {immutable.dtype} "
                f"{tuple(immutable.shape)}"
            )
        free = (~immutable).to(x.dtype)
    return lo, hi, free


def trex_i(
    model: Model,
    x_cf: Tensor,
    target: int = 1,
    *,
    tau: float = 0.75,
    k: int = 1000,
    sigma: float = 0.05,
    step_size: float = 0.01,
    max_steps: int = 20,
    radius: float = 1.0,
    lower: float | Tensor = 0.0,
    upper: float | Tensor = 1.0,
    immutable: Tensor | None = None,
    generator: torch.Generator | None = None,
    output: str = "logits",
    progress: bool = False,
) -> Counterfactuals:
    """T-Rex:I, batched: from base counterfactuals ``x_cf: [B, d]``, while ``R < tau`` take
    ``x <- Proj_{||x - x_cf||_2 <= radius}(x + step_size * grad R / ||grad R||)``, clip to
    ``[lower, upper]``, keep ``immutable`` features; return the last iterate still in ``target``.

    The K draws are fixed across steps (common random numbers), so R is a smooth function of x.
    Defaults follow the official code (K=1000, sigma=0.05, tau=0.75, 20 steps, eta=0.01, eps=1).
    """
    from tqdm.auto import tqdm

    _check_points(x_cf, "x_cf")
    if not -1.0 <= tau <= 1.0:
        raise ValueError(f"tau must lie in [-1, 1] (the range of R-hat), got {tau}")
    lo, hi, free = _bounds(x_cf, lower, upper, immutable)
    x0 = x_cf.detach()
    eps = _draw_noise(x0, k, None, generator)
    x = x0.clone()
    best = x0.clone()
    steps = torch.zeros(x0.shape[0], dtype=torch.long, device=x0.device)
    # Only rows still below tau (and in the target class) are evaluated: finished rows cost nothing.
    act = torch.arange(x0.shape[0], device=x0.device)
    for it in tqdm(range(max_steps + 1), disable=not progress, desc="T-Rex:I"):
        xr = x[act].clone().requires_grad_(True)
        r = stability(model, xr, target, noise=eps[act], sigma=sigma, output=output)
        with torch.no_grad():
            in_class = predict(model, xr, output) == target
            best[act] = torch.where(in_class[:, None], xr, best[act])
            keep = (r.detach() < tau) & in_class
        if it == max_steps or not bool(keep.any()):
            break
        (g,) = torch.autograd.grad(r.sum(), xr)
        with torch.no_grad():
            act, g, xa = act[keep], g[keep] * free, xr[keep]
            g = g / g.norm(dim=1, keepdim=True).clamp_min(torch.finfo(g.dtype).tiny)
            delta = xa + step_size * g - x0[act]
            delta = delta * (radius / delta.norm(dim=1, keepdim=True).clamp_min(radius))
            x[act] = torch.minimum(torch.maximum(x0[act] + delta, lo), hi)
            steps[act] += 1
    with torch.no_grad():
        r_best = stability(model, best, target, noise=eps, sigma=sigma, output=output)
        valid = predict(model, best, output) == target
    return Counterfactuals(best, valid, r_best, steps)


def nearest_counterfactual(
    model: Model, x: Tensor, candidates: Tensor, target: int = 1, *, output: str = "logits"
) -> Counterfactuals:
    """Plain nearest-neighbour counterfactual: the closest (L2) candidate predicted ``target``."""
    return trex_nn(model, x, candidates, target, tau=None, output=output)


def trex_nn(
    model: Model,
    x: Tensor,
    candidates: Tensor,
    target: int = 1,
    *,
    tau: float | None = 0.75,
    k: int = 1000,
    sigma: float = 0.05,
    generator: torch.Generator | None = None,
    output: str = "logits",
) -> Counterfactuals:
    """T-Rex:NN: for each ``x: [B, d]``, the nearest (L2) of ``candidates: [M, d]`` (training
    points) predicted ``target`` with ``R > tau``; the nearest one in ``target`` if none is robust
    (then ``stability <= tau`` marks it). ``tau=None`` gives the plain nearest-neighbour CF."""
    _check_points(x)
    _check_points(candidates, "candidates")
    if candidates.shape[1] != x.shape[1]:
        raise ValueError(f"candidates {tuple(candidates.shape)} and x {tuple(x.shape)} differ in d")
    with torch.no_grad():
        pool = candidates[predict(model, candidates, output) == target]
        if pool.shape[0] == 0:
            raise ValueError(f"no candidate is predicted in the target class {target}")
        if tau is None:
            r = torch.full((pool.shape[0],), float("nan"), dtype=x.dtype, device=x.device)
            score = torch.zeros_like(r)
        else:
            r = stability(model, pool, target, k=k, sigma=sigma, generator=generator, output=output)
            # Robust candidates first; among them (or, failing that, all) the nearest.
            score = (r <= tau).to(x.dtype)
        dist = torch.cdist(x, pool.to(x.dtype))
        big = dist.max() + 1.0
        idx = (dist + score[None, :] * big).argmin(1)
        n = x.shape[0]
        ones = torch.ones(n, dtype=torch.bool, device=x.device)
        return Counterfactuals(pool[idx].to(x.dtype), ones, r[idx], torch.zeros_like(idx))


def _margin(model: Model, x: Tensor, target: int, output: str) -> Tensor:
    out = _outputs(model, x)
    if out.ndim == 1:
        if output == "probs":
            out = torch.logit(out.clamp(1e-6, 1 - 1e-6))
        return out if target == 1 else -out
    if output == "probs":
        out = out.clamp_min(1e-12).log()
    other = out.masked_fill(
        torch.arange(out.shape[1], device=out.device) == target, float("-inf")
    ).amax(1)
    return out[:, target] - other


def closest_counterfactual(
    model: Model,
    x: Tensor,
    target: int = 1,
    *,
    beta: float = 0.01,
    c_init: float = 1.0,
    search_steps: int = 6,
    max_iter: int = 100,
    lr: float = 0.02,
    kappa: float = 0.0,
    lower: float | Tensor = 0.0,
    upper: float | Tensor = 1.0,
    immutable: Tensor | None = None,
    output: str = "logits",
    progress: bool = False,
) -> Counterfactuals:
    """Closest counterfactual (elastic-net attack, EAD-like; the non-robust base of T-Rex).

    For ``x: [B, d]`` minimise ``c * max(-margin, -kappa) + ||x' - x||_2^2 + beta ||x' - x||_1`` by
    ISTA (soft-thresholding for the L1 term), with a per-row binary search on ``c`` over
    ``search_steps`` rounds; keep the valid iterate of smallest elastic-net distance. Rows where no
    counterfactual was found return their last iterate with ``valid=False``.
    """
    from tqdm.auto import tqdm

    _check_points(x)
    lo, hi, free = _bounds(x, lower, upper, immutable)
    x0 = x.detach()
    b = x0.shape[0]
    c = torch.full((b,), float(c_init), dtype=x0.dtype, device=x0.device)
    c_lo = torch.zeros_like(c)
    c_hi = torch.full_like(c, float("inf"))
    best = x0.clone()
    best_d = torch.full_like(c, float("inf"))
    last = x0.clone()
    n_iter = torch.zeros(b, dtype=torch.long, device=x0.device)
    for _ in tqdm(range(search_steps), disable=not progress, desc="closest CF"):
        xa = x0.clone()
        found = torch.zeros(b, dtype=torch.bool, device=x0.device)
        for _ in range(max_iter):
            xr = xa.clone().requires_grad_(True)
            mg = _margin(model, xr, target, output)
            loss = (c * torch.clamp(-mg, min=-kappa)).sum() + ((xr - x0) ** 2).sum()
            (g,) = torch.autograd.grad(loss, xr)
            with torch.no_grad():
                y = xa - lr * g * free - x0
                y = torch.sign(y) * (y.abs() - lr * beta).clamp_min(0.0)  # L1 proximal step
                xa = torch.minimum(torch.maximum(x0 + y, lo), hi)
                ok = _margin(model, xa, target, output) > kappa
                dist = beta * (xa - x0).abs().sum(1) + ((xa - x0) ** 2).sum(1)
                better = ok & (dist < best_d)
                best = torch.where(better[:, None], xa, best)
                best_d = torch.where(better, dist, best_d)
                found |= ok
                n_iter += (~torch.isfinite(best_d)).long()
        last = torch.where(torch.isfinite(best_d)[:, None], best, xa)
        with torch.no_grad():
            c_hi = torch.where(found, torch.minimum(c_hi, c), c_hi)
            c_lo = torch.where(found, c_lo, torch.maximum(c_lo, c))
            c = torch.where(torch.isfinite(c_hi), (c_lo + c_hi) / 2, c * 10)
    valid = predict(model, last, output) == target
    nan = torch.full((b,), float("nan"), dtype=x0.dtype, device=x0.device)
    return Counterfactuals(last, valid, nan, n_iter)


# ----------------------------------------------------------------------------- metrics, harness
