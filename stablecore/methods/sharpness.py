"""Sharpness of a loss landscape: Hessian trace, top eigenvalues, Frobenius norm, eigen-density.

Matrix-free estimators on Hessian-vector products (forward-over-reverse ``torch.func``, vmapped
over probes; see :class:`HessianOperator` for the fallback chain to double backward and to
``stablecore.ops.reference_mode``). Every estimator takes ``(model, loss_fn, data)`` or a ready
:class:`HessianOperator` as its first argument, plus the operator's keywords (``params``,
``kind="ggn"``, ``train``, ...). Paper notes: ``shared/papers/sgd_stability.md``.

Example::

    >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    >>> data = (torch.randn(32, 4), torch.randn(32, 1))
    >>> est = hessian_trace(model, nn.MSELoss(), data, rtol=0.05)
    >>> est.trace, est.stderr, est.frobenius                      # doctest: +SKIP
    >>> top_eigenvalues(model, nn.MSELoss(), data, k=3).eigenvalues  # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from stablecore.methods._hessian.lanczos import LanczosState, lanczos, power_iteration
from stablecore.methods._hessian.operator import (
    HessianOperator,
    softmax_ce_logit_hvp,
    stablemax_ce_logit_hvp,
)

__all__ = [
    "EigenResult",
    "FrobeniusEstimate",
    "HessianOperator",
    "SpectralDensity",
    "TraceEstimate",
    "eigenvalue_density",
    "hessian_frobenius_norm",
    "hessian_trace",
    "hessian_vector_product",
    "per_group_sharpness",
    "plot_eigenvalue_density",
    "softmax_ce_logit_hvp",
    "stablemax_ce_logit_hvp",
    "top_eigenvalues",
]

Groups = str | Callable[[str], str] | Mapping[str, Sequence[str]] | None


def _operator(model: Any, loss_fn: Any, data: Any, op_kwargs: dict) -> HessianOperator:
    if isinstance(model, HessianOperator):
        if op_kwargs:
            raise TypeError(f"operator keywords {sorted(op_kwargs)} given with a ready operator")
        return model
    if data is None:
        raise ValueError("data is required (one batch or a re-iterable of batches)")
    return HessianOperator(model, loss_fn, data, **op_kwargs)


def _group_of(groups: Groups) -> Callable[[str], str]:
    if groups is None or groups == "module":  # parameters of one module share a group
        return lambda n: n.rpartition(".")[0] or n
    if groups == "parameter":
        return lambda n: n
    if callable(groups):
        return groups
    if isinstance(groups, Mapping):
        lookup = {n: g for g, names in groups.items() for n in names}
        return lambda n: lookup.get(n, "(other)")
    raise ValueError(
        f"groups must be None, 'module', 'parameter', a callable or a dict; got {groups!r}"
    )


def hessian_vector_product(
    model: Any, loss_fn: Any = None, data: Any = None, vectors: Tensor | None = None, **op_kwargs
) -> Tensor:
    """``H v`` for ``vectors: [D]`` or ``[P, D]`` (flat over the selected parameters)."""
    op = _operator(model, loss_fn, data, op_kwargs)
    if vectors is None:
        raise ValueError("vectors is required")
    return op.matvec(vectors)


# ----------------------------------------------------------------------------- Hutchinson
@dataclass
class TraceEstimate:
    """Hutchinson estimate (Rademacher probes). ``trace`` +- ``stderr``; the same HVPs give
    ``frobenius_sq = E||Hv||^2``; ``groups`` maps a group to (trace of its diagonal block,
    stderr), free from the same probes. ``samples: [m]`` are the ``v^T H v``."""

    trace: float
    stderr: float
    num_probes: int
    frobenius_sq: float
    frobenius_sq_stderr: float
    groups: dict[str, tuple[float, float]] = field(default_factory=dict)
    samples: Tensor | None = None
    backend: str | None = None

    @property
    def frobenius(self) -> float:
        return math.sqrt(max(self.frobenius_sq, 0.0))


@dataclass
class FrobeniusEstimate:
    """``norm = sqrt(E||Hv||^2)``; ``norm_sq`` +- ``stderr_sq`` (Rademacher probes)."""

    norm: float
    norm_sq: float
    stderr_sq: float
    num_probes: int


def _mean_se(x: Tensor) -> tuple[float, float]:
    m = x.shape[0]
    se = float(x.std(unbiased=True, dim=0).max()) / math.sqrt(m) if m > 1 else math.inf
    return float(x.mean()), se


def _hutchinson(
    op: HessianOperator,
    target: str,
    num_probes: int | None,
    rtol: float,
    min_probes: int,
    max_probes: int,
    probe_batch: int,
    seed: int,
    progress: bool,
):
    if num_probes is not None and num_probes < 1:
        raise ValueError(f"num_probes must be >= 1; got {num_probes}")
    if min_probes < 2 or max_probes < min_probes:
        raise ValueError(f"need 2 <= min_probes <= max_probes; got {min_probes}, {max_probes}")
    gen = torch.Generator(device=op.device).manual_seed(seed)
    limit = num_probes if num_probes is not None else max_probes
    quad, sq, blocks = [], [], []
    bar = tqdm(total=limit, desc=f"hutchinson {target}", disable=not progress, leave=False)
    offsets = torch.tensor([0, *op.numels], device=op.device).cumsum(0)
    while (m := sum(q.shape[0] for q in quad)) < limit:
        if num_probes is None and m >= min_probes:
            vals = torch.cat(quad if target == "trace" else sq)
            mean, se = _mean_se(vals)
            if se <= rtol * abs(mean):
                break
        b = min(probe_batch, limit - m)
        V = torch.randint(0, 2, (b, op.dim), generator=gen, device=op.device).to(op.dtype) * 2 - 1
        HV = op.matvec(V).double()
        prod = V.double() * HV
        quad.append(prod.sum(-1))
        sq.append((HV * HV).sum(-1))
        # per-parameter sums of v_i (Hv)_i: unbiased for the trace of each diagonal block
        cums = torch.nn.functional.pad(prod.cumsum(-1), (1, 0))
        blocks.append(cums[:, offsets[1:]] - cums[:, offsets[:-1]])
        bar.update(b)
    bar.close()
    return torch.cat(quad), torch.cat(sq), torch.cat(blocks)


def hessian_trace(
    model: Any,
    loss_fn: Any = None,
    data: Any = None,
    *,
    num_probes: int | None = None,
    rtol: float = 0.02,
    min_probes: int = 8,
    max_probes: int = 1024,
    probe_batch: int = 32,
    groups: Groups = None,
    seed: int = 0,
    progress: bool = False,
    **op_kwargs: Any,
) -> TraceEstimate:
    """Tr(H) by Hutchinson with Rademacher probes, ``probe_batch`` HVPs per vmapped call.

    ``num_probes`` fixes the count; otherwise it stops once ``stderr <= rtol * |trace|`` (after at
    least ``min_probes``, at most ``max_probes``). Per-group block traces come for free
    (``groups``: ``None``/``"module"``, ``"parameter"``, ``name -> group`` or ``{group: names}``).
    Returns a :class:`TraceEstimate` (float64 statistics). Example::

        >>> hessian_trace(nn.Linear(3, 1), nn.MSELoss(), (torch.randn(8, 3), torch.randn(8, 1))).trace
    """
    op = _operator(model, loss_fn, data, op_kwargs)
    quad, sq, blocks = _hutchinson(
        op, "trace", num_probes, rtol, min_probes, max_probes, probe_batch, seed, progress
    )
    trace, se = _mean_se(quad)
    f2, f2se = _mean_se(sq)
    group_of = _group_of(groups)
    members: dict[str, list[int]] = {}
    for i, n in enumerate(op.names):
        members.setdefault(group_of(n), []).append(i)
    per = {g: _mean_se(blocks[:, idx].sum(-1)) for g, idx in members.items()}
    return TraceEstimate(trace, se, quad.shape[0], f2, f2se, per, quad, op.backend_used)


def hessian_frobenius_norm(
    model: Any,
    loss_fn: Any = None,
    data: Any = None,
    *,
    num_probes: int | None = None,
    rtol: float = 0.02,
    min_probes: int = 8,
    max_probes: int = 1024,
    probe_batch: int = 32,
    seed: int = 0,
    progress: bool = False,
    **op_kwargs: Any,
) -> FrobeniusEstimate:
    """``||H||_F`` from ``E||Hv||^2 = ||H||_F^2`` (Rademacher ``v``); stops once the standard error of
    ``||H||_F^2`` is below ``rtol`` of it. Arguments as :func:`hessian_trace`."""
    op = _operator(model, loss_fn, data, op_kwargs)
    _, sq, _ = _hutchinson(
        op, "frobenius", num_probes, rtol, min_probes, max_probes, probe_batch, seed, progress
    )
    f2, se = _mean_se(sq)
    return FrobeniusEstimate(math.sqrt(max(f2, 0.0)), f2, se, sq.shape[0])


# ----------------------------------------------------------------------------- eigenvalues
@dataclass
class EigenResult:
    """``eigenvalues: [k]`` float64 ordered by ``which`` (largest first for ``"LA"``/``"LM"``);
    ``eigenvectors: [k, D]`` (unit norm) when asked; ``residuals: [k]`` bounds ``||Hy - theta y||``."""

    eigenvalues: Tensor
    eigenvectors: Tensor | None
    residuals: Tensor
    num_matvecs: int
    converged: bool
    method: str


def _pick(theta: Tensor, k: int, which: str) -> Tensor:
    key = {"LA": theta, "SA": -theta, "LM": theta.abs()}[which]
    return key.argsort(descending=True)[:k]


def top_eigenvalues(
    model: Any,
    loss_fn: Any = None,
    data: Any = None,
    *,
    k: int = 1,
    which: str = "LA",
    method: str = "lanczos",
    max_iters: int | None = None,
    tol: float = 1e-6,
    return_eigenvectors: bool = False,
    seed: int = 0,
    progress: bool = False,
    **op_kwargs: Any,
) -> EigenResult:
    """The ``k`` extreme eigenvalues of H: ``which="LA"`` largest algebraic (lambda_max, the GD
    stability quantity), ``"SA"`` smallest, ``"LM"`` largest magnitude.

    ``method="lanczos"`` (default): full reorthogonalisation, stops when each wanted Ritz pair has
    residual ``<= tol * max|theta|`` (or after ``max_iters``, default ``min(D, max(100, 4k))``; at
    ``D`` steps the result is exact). Repeated eigenvalues may be found once only unless the
    Krylov space breaks down (then it restarts). ``method="power"``: deflated power iteration,
    largest magnitude only (PyHessian's method), ``max_iters`` per eigenvalue.

    Raises ``ValueError`` for ``k`` outside ``1..D``. Example::

        >>> top_eigenvalues(nn.Linear(3, 1), nn.MSELoss(), (torch.randn(8, 3), torch.randn(8, 1)), k=2)
    """
    op = _operator(model, loss_fn, data, op_kwargs)
    if not isinstance(k, int) or not 1 <= k <= op.dim:
        raise ValueError(
            f"k must be an int in 1..D where D={op.dim} (the number of parameters "
            f"measured); got k={k!r}"
        )
    if which not in ("LA", "SA", "LM"):
        raise ValueError(f"which must be 'LA', 'SA' or 'LM'; got {which!r}")
    gen = torch.Generator(device=op.device).manual_seed(seed)
    start = op.num_matvecs
    if method == "power":
        if which != "LM":
            raise ValueError(
                "method='power' finds the largest-magnitude eigenvalues: use which='LM'"
            )
        vals, vecs, _ = power_iteration(
            op.matvec,
            op.dim,
            k,
            num_iters=max_iters or 100,
            tol=tol,
            dtype=op.dtype,
            device=op.device,
            generator=gen,
            progress=progress,
        )
        res = (op.matvec(vecs).double() - vals[:, None] * vecs.double()).norm(dim=-1)
        return EigenResult(
            vals,
            vecs if return_eigenvectors else None,
            res,
            op.num_matvecs - start,
            bool((res <= 1e3 * tol * vals.abs().max()).all()),
            "power",
        )
    if method != "lanczos":
        raise ValueError(f"method must be 'lanczos' or 'power'; got {method!r}")
    steps = min(op.dim, max_iters or max(100, 4 * k))
    min_steps = min(op.dim, max(2 * k + 1, 10))

    def ritz_pairs(state: LanczosState) -> tuple[Tensor, Tensor, Tensor]:
        theta, s = state.ritz()
        idx = _pick(theta[0], min(k, state.steps), which)
        res = state.beta[0, -1].abs() * s[0, -1, idx].abs()
        return theta[0, idx], s[0][:, idx], res

    def done(state: LanczosState) -> bool:
        if state.steps < min_steps:
            return False
        theta, _, res = ritz_pairs(state)
        return bool((res <= tol * theta.abs().max().clamp_min(1e-300)).all())

    v0 = torch.randn(1, op.dim, dtype=op.dtype, device=op.device, generator=gen)
    state = lanczos(
        op.matvec,
        v0,
        steps,
        stop=done,
        generator=gen,
        progress=progress,
        desc="lanczos eigenvalues",
        check_every=4,
    )
    theta, s, res = ritz_pairs(state)
    converged = state.steps == op.dim or bool((res <= tol * theta.abs().max()).all())
    vecs = None
    if return_eigenvectors:
        vecs = torch.einsum("jd,ji->id", state.basis[:, 0].double(), s).to(op.dtype)
    return EigenResult(theta, vecs, res, op.num_matvecs - start, converged, "lanczos")


# ----------------------------------------------------------------------------- spectral density
@dataclass
class SpectralDensity:
    """Stochastic Lanczos quadrature: per probe, Gauss nodes ``[P, m]`` (Ritz values) and weights
    ``[P, m]`` (first components squared; each row sums to 1). ``dim`` is D."""

    nodes: Tensor
    weights: Tensor
    dim: int

    def evaluate(self, grid: Tensor, sigma: float | None = None) -> Tensor:
        """Gaussian-smoothed density ``[G]`` on ``grid: [G]`` (integrates to ~1)."""
        if sigma is None:
            span = float(self.nodes.max() - self.nodes.min())
            sigma = max(span, 1e-12) / 100
        g = grid.double().reshape(1, 1, -1)
        kern = torch.exp(-0.5 * ((g - self.nodes.unsqueeze(-1)) / sigma) ** 2)
        kern = kern / (sigma * math.sqrt(2 * math.pi))
        return (self.weights.unsqueeze(-1) * kern).sum(1).mean(0)

    def trace(self) -> float:
        """``D * mean_p sum_j w_pj theta_pj``: a Hutchinson-type estimate of Tr(H)."""
        return self.dim * float((self.weights * self.nodes).sum(-1).mean())


def eigenvalue_density(
    model: Any,
    loss_fn: Any = None,
    data: Any = None,
    *,
    num_steps: int = 40,
    num_probes: int = 4,
    seed: int = 0,
    progress: bool = False,
    **op_kwargs: Any,
) -> SpectralDensity:
    """Eigenvalue density of H by SLQ: ``num_probes`` Rademacher starts run their Lanczos
    recurrences together (one vmapped HVP call per step for all probes), ``num_steps`` each."""
    op = _operator(model, loss_fn, data, op_kwargs)
    if num_steps < 1 or num_probes < 1:
        raise ValueError(f"num_steps and num_probes must be >= 1; got {num_steps}, {num_probes}")
    gen = torch.Generator(device=op.device).manual_seed(seed)
    v0 = torch.randint(0, 2, (num_probes, op.dim), generator=gen, device=op.device) * 2 - 1
    state = lanczos(
        op.matvec, v0.to(op.dtype), num_steps, generator=gen, progress=progress, desc="SLQ"
    )
    theta, s = state.ritz()
    return SpectralDensity(theta, s[:, 0, :] ** 2, op.dim)


def plot_eigenvalue_density(
    density: SpectralDensity,
    path: str | Path,
    *,
    sigma: float | None = None,
    num_points: int = 1000,
    log: bool = True,
    title: str = "Hessian eigenvalue density",
) -> Path:
    """Write a PNG of the smoothed density (log scale by default, as in PyHessian)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lo, hi = float(density.nodes.min()), float(density.nodes.max())
    pad = 0.05 * max(hi - lo, 1e-12)
    grid = torch.linspace(lo - pad, hi + pad, num_points, dtype=torch.float64)
    dens = density.evaluate(grid, sigma)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(grid.numpy(), (dens + 1e-12).numpy() if log else dens.numpy())
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density")
    ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- per group
def per_group_sharpness(
    model: nn.Module,
    loss_fn: Any,
    data: Any,
    *,
    groups: Groups = None,
    measures: Sequence[str] = ("trace", "lambda_max", "frobenius"),
    num_probes: int = 32,
    seed: int = 0,
    progress: bool = False,
    **op_kwargs: Any,
) -> dict[str, dict[str, float]]:
    """Sharpness of each diagonal block ``H_gg`` (the Hessian in one group's parameters, the
    others fixed): ``{group: {"trace", "trace_stderr", "lambda_max", "frobenius", "dim"}}``.
    Groups as in :func:`hessian_trace` (default: one group per module)."""
    unknown = set(measures) - {"trace", "lambda_max", "frobenius"}
    if unknown:
        raise ValueError(f"unknown measures {sorted(unknown)}")
    if "params" in op_kwargs:
        raise TypeError("per_group_sharpness selects params itself; use groups=")
    group_of = _group_of(groups)
    members: dict[str, list[str]] = {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            members.setdefault(group_of(n), []).append(n)
    if not members:
        raise ValueError("the model has no parameters with requires_grad=True")
    out = {}
    for g, names in tqdm(members.items(), desc="groups", disable=not progress, leave=False):
        op = HessianOperator(model, loss_fn, data, params=names, **op_kwargs)
        row: dict[str, float] = {"dim": op.dim}
        if "trace" in measures or "frobenius" in measures:
            est = hessian_trace(op, num_probes=num_probes, seed=seed)
            row.update(trace=est.trace, trace_stderr=est.stderr, frobenius=est.frobenius)
        if "lambda_max" in measures:
            row["lambda_max"] = float(top_eigenvalues(op, k=1, seed=seed).eigenvalues[0])
        out[g] = row
    return out
