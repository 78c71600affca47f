"""Top eigenvalues (Lanczos, block Lanczos, power iteration) and the eigenvalue density (SLQ).

Part of :mod:`stablecore.methods.sharpness` (import from there).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from stablecore.methods._hessian.lanczos import (
    LanczosState,
    RitzState,
    block_lanczos,
    lanczos,
    power_iteration,
)
from stablecore.methods._hessian.operator import HessianOperator

__all__ = [
    "EigenResult",
    "SpectralDensity",
    "as_operator",
    "eigenvalue_density",
    "plot_eigenvalue_density",
    "top_eigenvalues",
]


def as_operator(model: Any, loss_fn: Any, data: Any, op_kwargs: dict) -> HessianOperator:
    """``model`` itself if it is a :class:`HessianOperator`, else one built from the arguments."""
    if isinstance(model, HessianOperator):
        if op_kwargs:
            raise TypeError(f"operator keywords {sorted(op_kwargs)} given with a ready operator")
        return model
    if data is None:
        raise ValueError("data is required (one batch or a re-iterable of batches)")
    return HessianOperator(model, loss_fn, data, **op_kwargs)


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
    block_size: int = 1,
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

    ``block_size=b > 1`` (Lanczos only): block Lanczos, ``b`` vectors per batched matvec call;
    ``max_iters`` then counts matvecs (``max_iters / b`` block steps), so results compare at equal
    HVP counts. A batched HVP of ``b`` probes costs much less than ``b`` single ones, so for a
    fixed matvec budget a block is faster; the Krylov degree is lower, so it converges in more
    matvecs. Residuals are exact (``||Hy - theta y||`` from the stored products).

    Raises ``ValueError`` for ``k`` outside ``1..D``. Example::

        >>> top_eigenvalues(nn.Linear(3, 1), nn.MSELoss(), (torch.randn(8, 3), torch.randn(8, 1)), k=2)
    """
    op = as_operator(model, loss_fn, data, op_kwargs)
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
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be an int >= 1; got {block_size!r}")
    steps = min(op.dim, max_iters or max(100, 4 * k))
    if block_size > 1:
        return _block_eigenvalues(
            op, k, which, steps, tol, block_size, return_eigenvectors, gen, progress
        )
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


def _block_eigenvalues(
    op: HessianOperator,
    k: int,
    which: str,
    max_matvecs: int,
    tol: float,
    block_size: int,
    return_eigenvectors: bool,
    gen: torch.Generator,
    progress: bool,
) -> EigenResult:
    b = min(block_size, op.dim)
    start = op.num_matvecs

    def wanted(state: RitzState) -> tuple[Tensor, Tensor]:
        idx = _pick(state.theta, min(k, state.size), which)
        return idx, state.residuals(idx)

    def done(state: RitzState) -> bool:
        if state.size < min(op.dim, max(2 * k + 1, 10)):
            return False
        idx, res = wanted(state)
        return bool((res <= tol * state.theta[idx].abs().max().clamp_min(1e-300)).all())

    v0 = torch.randn(b, op.dim, dtype=op.dtype, device=op.device, generator=gen)
    state = block_lanczos(
        op.matvec, v0, max(max_matvecs, b), stop=done, generator=gen, progress=progress
    )
    idx, res = wanted(state)
    theta = state.theta[idx]
    converged = state.size == op.dim or bool((res <= tol * theta.abs().max()).all())
    vecs = state.vectors(idx).to(op.dtype) if return_eigenvectors else None
    return EigenResult(theta, vecs, res, op.num_matvecs - start, converged, "block_lanczos")


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
    op = as_operator(model, loss_fn, data, op_kwargs)
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
