"""T-Rex: counterfactual explanations that stay valid when the model is retrained.

Hamman et al., "Robust Counterfactual Explanations for Neural Networks With Probabilistic
Guarantees", ICML 2023 (arXiv:2305.11997). The stability of a counterfactual ``x`` for a model
``m`` (``m(x)`` = probability of the counterfactual class) is estimated with K Gaussian draws
``x_i ~ N(x, sigma^2 I)`` as (the practical form of the official code)::

    R(x) = mean_i m(x_i) - mean_i |m(x) - m(x_i)|

:func:`stability` evaluates it for B points and K draws in ONE forward pass of ``B * (K + 1)`` rows
(the per-draw loop of public implementations, :func:`stability_loop`, is the reference and the
benchmark peer). :func:`trex_i` raises R above ``tau`` by normalised gradient ascent inside an
L2 ball around a base counterfactual; :func:`trex_nn` picks the nearest training point whose R
exceeds ``tau``. :func:`closest_counterfactual` (elastic-net attack, EAD-like) is the non-robust
base. Metrics: :func:`cost`, :func:`validity` (under retrained models, see :func:`fit_classifier`)
and :func:`lof` (local outlier factor, no scikit-learn needed).

Model contract: ``model(x: [N, d]) -> [N, C]`` logits (softmax) or ``[N]``/``[N, 1]`` one logit
(sigmoid, class 1); ``output="probs"`` if it already returns probabilities. Rows must be
independent (put BatchNorm/Dropout models in ``eval()`` mode).

Example::

    >>> import torch
    >>> from stablecore.methods.counterfactual import closest_counterfactual, trex_i
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    >>> x = torch.rand(8, 4)
    >>> base = closest_counterfactual(net, x, target=1)
    >>> robust = trex_i(net, base.x_cf, target=1, tau=0.6, k=200)
    >>> robust.x_cf.shape, robust.stability.shape
    (torch.Size([8, 4]), torch.Size([8]))
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "Counterfactuals",
    "class_probability",
    "closest_counterfactual",
    "cost",
    "fit_classifier",
    "lof",
    "lof_inlier",
    "make_mlp",
    "nearest_counterfactual",
    "predict",
    "stability",
    "stability_loop",
    "trex_i",
    "trex_nn",
    "validity",
]

Model = Callable[[Tensor], Tensor]


@dataclass
class Counterfactuals:
    """Result of a search: ``x_cf: [B, d]``; ``valid: [B]`` bool (model predicts the target);
    ``stability: [B]`` R-hat (NaN where not computed); ``steps: [B]`` int64 iterations used."""

    x_cf: Tensor
    valid: Tensor
    stability: Tensor
    steps: Tensor


def _check_points(x: Tensor, name: str = "x") -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} must have shape [B, d] with B, d > 0, got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be floating point, got dtype {x.dtype}")


def _outputs(model: Model, x: Tensor) -> Tensor:
    out = model(x)
    if not isinstance(out, Tensor):
        raise TypeError(f"model must return a torch.Tensor, got {type(out).__name__}")
    if not out.is_floating_point():
        raise TypeError(f"model must return floating logits/probabilities, got dtype {out.dtype}")
    if out.ndim == 2 and out.shape[1] == 1:
        out = out[:, 0]
    if out.shape[0] != x.shape[0] or out.ndim not in (1, 2):
        raise ValueError(
            f"model output must be [N, C] or [N] for input {tuple(x.shape)}, got {tuple(out.shape)}"
        )
    if x.requires_grad and not out.requires_grad and torch.is_grad_enabled():
        raise TypeError(
            "model output does not depend differentiably on its input (no autograd graph: "
            "detached, numpy-based or run under torch.no_grad); T-Rex needs d m(x) / d x"
        )
    return out


def class_probability(model: Model, x: Tensor, target: int, output: str = "logits") -> Tensor:
    """``m(x)``: probability of class ``target`` for ``x: [N, d]``, shape ``[N]``."""
    if output not in ("logits", "probs"):
        raise ValueError(f"output must be 'logits' or 'probs', got {output!r}")
    out = _outputs(model, x)
    n_cls = 2 if out.ndim == 1 else out.shape[1]
    if not 0 <= int(target) < n_cls:
        raise ValueError(f"target {target} out of range for a model with {n_cls} classes")
    if out.ndim == 1:
        p1 = torch.sigmoid(out) if output == "logits" else out
        return p1 if target == 1 else 1.0 - p1
    probs = out.softmax(dim=1) if output == "logits" else out
    return probs[:, target]


def predict(model: Model, x: Tensor, output: str = "logits") -> Tensor:
    """Predicted class ``[N]`` (int64) of ``x: [N, d]`` (no autograd)."""
    with torch.no_grad():
        out = _outputs(model, x)
    return (out > (0.0 if output == "logits" else 0.5)).long() if out.ndim == 1 else out.argmax(1)


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


def cost(x: Tensor, x_cf: Tensor, p: int = 1) -> Tensor:
    """Per-point Lp distance ``||x_cf - x||_p``, ``x, x_cf: [B, d]`` -> ``[B]``."""
    _check_points(x)
    if x_cf.shape != x.shape:
        raise ValueError(f"x {tuple(x.shape)} and x_cf {tuple(x_cf.shape)} must have equal shapes")
    return (x_cf - x).norm(p=p, dim=1)


def validity(models, x_cf: Tensor, target: int = 1, *, output: str = "logits") -> Tensor:
    """Fraction of ``x_cf: [B, d]`` each model predicts as ``target``: ``[len(models)]`` float.

    With models retrained from other seeds, ``.mean()`` is the paper's robust validity.
    """
    _check_points(x_cf, "x_cf")
    if isinstance(models, (list, tuple, torch.nn.ModuleList)):
        models = list(models)
    elif callable(models):
        models = [models]
    else:
        raise TypeError(f"models must be a model or a list of models, got {type(models).__name__}")
    if len(models) == 0:
        raise ValueError("validity needs at least one model")
    return torch.stack([(predict(m, x_cf, output) == target).double().mean() for m in models])


def lof(reference: Tensor, query: Tensor, n_neighbors: int = 1) -> Tensor:
    """Local outlier factor of ``query: [Q, d]`` against ``reference: [M, d]`` -> ``[Q]``.

    Novelty-mode LOF (as scikit-learn's ``LocalOutlierFactor(novelty=True)``): the neighbours of
    a reference point exclude itself; reach-dist(q, o) = max(k-dist(o), d(q, o)); values near 1 are
    inliers. Duplicated reference points make densities huge, as in scikit-learn (same 1e-10 guard).
    """
    _check_points(reference, "reference")
    _check_points(query, "query")
    if query.shape[1] != reference.shape[1]:
        raise ValueError(
            f"query {tuple(query.shape)} and reference {tuple(reference.shape)} differ"
        )
    k = int(n_neighbors)
    if not 1 <= k < reference.shape[0]:
        raise ValueError(f"n_neighbors must be in [1, {reference.shape[0] - 1}], got {n_neighbors}")
    ref = reference.double()
    d_rr = torch.cdist(ref, ref)
    d_rr.fill_diagonal_(float("inf"))
    dist_r, nn_r = d_rr.topk(k, dim=1, largest=False)
    kdist = dist_r[:, -1]
    lrd_ref = 1.0 / (torch.maximum(dist_r, kdist[nn_r]).mean(1) + 1e-10)
    dist_q, nn_q = torch.cdist(query.double(), ref).topk(k, dim=1, largest=False)
    lrd_q = 1.0 / (torch.maximum(dist_q, kdist[nn_q]).mean(1) + 1e-10)
    return (lrd_ref[nn_q].mean(1) / lrd_q).to(query.dtype)


def lof_inlier(reference: Tensor, query: Tensor, n_neighbors: int = 1) -> Tensor:
    """+1 (inlier) / -1 (outlier) per query, scikit-learn's ``predict`` rule (LOF <= 1.5)."""
    score = lof(reference, query, n_neighbors)
    return torch.where(score <= 1.5, 1, -1)


def make_mlp(
    d_in: int, hidden: tuple[int, ...] = (128, 128), n_classes: int = 2
) -> torch.nn.Module:
    """The paper's classifier: ReLU MLP ``d_in -> hidden... -> n_classes`` logits."""
    layers: list[torch.nn.Module] = []
    for h in hidden:
        layers += [torch.nn.Linear(d_in, h), torch.nn.ReLU()]
        d_in = h
    return torch.nn.Sequential(*layers, torch.nn.Linear(d_in, n_classes))


def fit_classifier(
    x: Tensor,
    y: Tensor,
    *,
    seed: int,
    hidden: tuple[int, ...] = (128, 128),
    epochs: int = 50,
    batch_size: int = 256,
    lr: float = 1e-3,
) -> torch.nn.Module:
    """Train :func:`make_mlp` on ``x: [N, d]``, ``y: [N]`` int64 (Adam, cross-entropy) and
    return it in eval mode; ``seed`` sets both the init and the batch order (a "retrained model")."""
    _check_points(x)
    if y.shape != (x.shape[0],) or y.dtype != torch.long:
        raise ValueError(f"y must be int64 of shape [{x.shape[0]}], got {y.dtype} {tuple(y.shape)}")
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = make_mlp(x.shape[1], hidden, max(2, int(y.max()) + 1)).to(x.device, x.dtype)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    for _ in range(epochs):
        perm = torch.randperm(x.shape[0], generator=gen).to(x.device)
        for s in range(0, x.shape[0], batch_size):
            idx = perm[s : s + batch_size]
            loss = torch.nn.functional.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return net.eval()
