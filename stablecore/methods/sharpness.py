"""Sharpness of a loss landscape: Hessian trace, top eigenvalues, Frobenius norm, eigen-density.

Matrix-free estimators on batched Hessian-vector products: hand-written R-op rules for
``nn.Sequential`` MLPs with cross-entropy/MSE, else ``torch.func`` vmapped over probes (see
:class:`HessianOperator` for the fallback chain to double backward and to
``stablecore.ops.reference_mode``). Eigenvalues and SLQ live in ``_hessian/spectral.py``. Every estimator takes ``(model, loss_fn, data)`` or a ready
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

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from stablecore.methods._hessian.operator import (
    HessianOperator,
    softmax_ce_logit_hvp,
    stablemax_ce_logit_hvp,
)
from stablecore.methods._hessian.spectral import (
    EigenResult,
    SpectralDensity,
    as_operator,
    eigenvalue_density,
    plot_eigenvalue_density,
    top_eigenvalues,
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
    op = as_operator(model, loss_fn, data, op_kwargs)
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


@functools.lru_cache(maxsize=8)
def _sign_table(dtype: torch.dtype, device: torch.device) -> Tensor:
    # row b holds the 8 bits of b as +-1: one random byte gives 8 independent fair signs
    bits = (torch.arange(256)[:, None] >> torch.arange(8)) & 1
    return (bits * 2 - 1).to(device=device, dtype=dtype)


def rademacher(rows: int, dim: int, generator: torch.Generator, dtype: torch.dtype) -> Tensor:
    """``[rows, dim]`` independent fair +-1 entries, on ``generator``'s device. One random byte
    per 8 entries, expanded by a table lookup: 8x less generator work than ``randint(0, 2)``."""
    count = rows * dim
    codes = torch.randint(0, 256, ((count + 7) // 8,), generator=generator, device=generator.device)
    signs = F.embedding(codes, _sign_table(dtype, generator.device))
    return signs.view(-1)[:count].view(rows, dim)


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
    quadratic_only: bool = False,
):
    if num_probes is not None and num_probes < 1:
        raise ValueError(f"num_probes must be >= 1; got {num_probes}")
    if min_probes < 2 or max_probes < min_probes:
        raise ValueError(f"need 2 <= min_probes <= max_probes; got {min_probes}, {max_probes}")
    gen = torch.Generator(device=op.device).manual_seed(seed)
    limit = num_probes if num_probes is not None else max_probes
    quad, sq, blocks = [], [], []
    bar = tqdm(total=limit, desc=f"hutchinson {target}", disable=not progress, leave=False)
    f64 = torch.float64
    while (m := sum(q.shape[0] for q in quad)) < limit:
        if num_probes is None and m >= min_probes:
            vals = torch.cat(quad if target == "trace" else sq)
            mean, se = _mean_se(vals)
            if se <= rtol * abs(mean):
                break
        b = min(probe_batch, limit - m)
        V = rademacher(b, op.dim, gen, op.dtype)
        if quadratic_only:  # v^T H v alone: no H v (forward only on the structured backend)
            quad.append(op.quadratic_forms(V))
        else:
            HV = op.matvec(V)
            prod = V * HV  # exact: v_i = +-1
            # per-parameter sums of v_i (Hv)_i, accumulated in float64: unbiased for the trace
            # of each diagonal block; their total is v^T H v
            per = torch.stack([c.sum(-1, dtype=f64) for c in prod.split(op.numels, -1)], -1)
            blocks.append(per)
            quad.append(per.sum(-1))
            sq.append(torch.linalg.vector_norm(HV, dim=-1, dtype=f64) ** 2)
        bar.update(b)
    bar.close()
    if quadratic_only:
        return torch.cat(quad), None, None
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
    quadratic_only: bool = False,
    seed: int = 0,
    progress: bool = False,
    **op_kwargs: Any,
) -> TraceEstimate:
    """Tr(H) by Hutchinson with Rademacher probes, ``probe_batch`` HVPs per vmapped call.

    ``num_probes`` fixes the count; otherwise it stops once ``stderr <= rtol * |trace|`` (after at
    least ``min_probes``, at most ``max_probes``). Per-group block traces come for free
    (``groups``: ``None``/``"module"``, ``"parameter"``, ``name -> group`` or ``{group: names}``).
    ``quadratic_only=True`` computes only the quadratic forms ``v^T H v`` (what the trace needs):
    on the structured MLP backend they cost about half an HVP each, forward only; the Frobenius
    estimate and the per-group traces, which need ``H v``, are then NaN and empty.
    Returns a :class:`TraceEstimate` (float64 statistics). Example::

        >>> hessian_trace(nn.Linear(3, 1), nn.MSELoss(), (torch.randn(8, 3), torch.randn(8, 1))).trace
    """
    op = as_operator(model, loss_fn, data, op_kwargs)
    quad, sq, blocks = _hutchinson(
        op,
        "trace",
        num_probes,
        rtol,
        min_probes,
        max_probes,
        probe_batch,
        seed,
        progress,
        quadratic_only,
    )
    trace, se = _mean_se(quad)
    if quadratic_only:
        nan = math.nan
        return TraceEstimate(trace, se, quad.shape[0], nan, nan, {}, quad, op.backend_used)
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
    op = as_operator(model, loss_fn, data, op_kwargs)
    _, sq, _ = _hutchinson(
        op, "frobenius", num_probes, rtol, min_probes, max_probes, probe_batch, seed, progress
    )
    f2, se = _mean_se(sq)
    return FrobeniusEstimate(math.sqrt(max(f2, 0.0)), f2, se, sq.shape[0])


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
