"""DAG simulation and structure-learning metrics, compatible with the ``dagma`` / NOTEARS utilities.

Everything here is numpy (graphs are tiny) and takes an explicit ``np.random.Generator`` so a
seed reproduces the data bit for bit (the reference code mixes global and local generators).

Conventions: ``B[i, j] != 0`` (or ``W[i, j]``) means the edge ``i -> j``; samples are rows.

Example::

    rng = np.random.default_rng(0)
    B = simulate_dag(20, 80, "ER", rng=rng)          # [20, 20] binary, 80 edges
    W = simulate_parameter(B, rng=rng)               # weights in +-[0.5, 2]
    X = simulate_linear_sem(W, 1000, noise_scale=np.sqrt(rng.uniform(0.5, 10, 20)), rng=rng)
    count_accuracy(B, B)["shd"]                      # 0
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = [
    "count_accuracy",
    "is_dag",
    "normalized_shd",
    "simulate_dag",
    "simulate_linear_sem",
    "simulate_parameter",
    "to_dag",
    "topological_order",
]


def _as_square(W, name: str = "W") -> np.ndarray:
    W = np.asarray(W)
    if W.ndim != 2 or W.shape[0] != W.shape[1]:
        raise ValueError(f"{name} must be a square [d, d] matrix, got shape {W.shape}")
    return W


def topological_order(W) -> list[int] | None:
    """Kahn's algorithm on the support of ``W: [d, d]``; ``None`` when there is a cycle."""
    A = _as_square(W) != 0
    indeg = A.sum(axis=0).astype(np.int64)
    order = [int(i) for i in np.flatnonzero(indeg == 0)]
    head = 0
    while head < len(order):
        i = order[head]
        head += 1
        for j in np.flatnonzero(A[i]):
            indeg[j] -= 1
            if indeg[j] == 0:
                order.append(int(j))
    return order if len(order) == A.shape[0] else None


def is_dag(W) -> bool:
    """True when the support of ``W: [d, d]`` has no directed cycle (self-loops are cycles)."""
    return topological_order(W) is not None


def _permute(B: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    p = rng.permutation(B.shape[0])
    return B[np.ix_(p, p)]


def _barabasi_albert(d: int, m: int, rng: np.random.Generator) -> np.ndarray:
    """Directed preferential attachment: node t links to m earlier nodes (t -> older)."""
    B = np.zeros((d, d))
    targets: list[int] = []  # multiset of endpoints, so sampling from it is degree-proportional
    for t in range(1, d):
        k = min(m, t)
        if not targets:
            chosen = rng.choice(t, size=k, replace=False)
        else:
            chosen_set: set[int] = set()
            while len(chosen_set) < k:
                chosen_set.add(int(targets[rng.integers(len(targets))]))
            chosen = np.fromiter(chosen_set, dtype=np.int64)
        B[t, chosen] = 1.0
        targets.extend(int(c) for c in chosen)
        targets.extend([t] * k)
    return B


def simulate_dag(d: int, s0: int, graph_type: str = "ER", *, rng=None) -> np.ndarray:
    """Random DAG as a ``[d, d]`` float 0/1 matrix with randomly permuted node order.

    ``"ER"``: exactly ``s0`` edges drawn uniformly among the ``d(d-1)/2`` pairs (igraph's
    ``Erdos_Renyi(n=d, m=s0)``), oriented along a random order. ``"SF"``: Barabasi-Albert with
    ``m = round(s0 / d)`` edges per new node.
    """
    rng = np.random.default_rng(rng)
    if d < 1:
        raise ValueError(f"d must be >= 1, got {d}")
    pairs = d * (d - 1) // 2
    if graph_type == "ER":
        if not 0 <= s0 <= pairs:
            raise ValueError(f"s0={s0} edges impossible for d={d} (max {pairs})")
        iu = np.triu_indices(d, k=1)
        pick = rng.choice(pairs, size=s0, replace=False)
        B = np.zeros((d, d))
        B[iu[0][pick], iu[1][pick]] = 1.0
    elif graph_type == "SF":
        B = _barabasi_albert(d, max(1, int(round(s0 / d))), rng)
    else:
        raise ValueError(f"unknown graph_type {graph_type!r}; use 'ER' or 'SF'")
    return _permute(B, rng)


def simulate_parameter(
    B, w_ranges: Sequence[tuple[float, float]] = ((-2.0, -0.5), (0.5, 2.0)), *, rng=None
) -> np.ndarray:
    """Weights for the edges of ``B: [d, d]``, uniform on a randomly chosen range per edge."""
    rng = np.random.default_rng(rng)
    B = _as_square(B, "B")
    which = rng.integers(len(w_ranges), size=B.shape)
    W = np.zeros(B.shape)
    for i, (lo, hi) in enumerate(w_ranges):
        W += (B != 0) * (which == i) * rng.uniform(lo, hi, size=B.shape)
    return W


def simulate_linear_sem(
    W, n: float, sem_type: str = "gauss", noise_scale=None, *, rng=None
) -> np.ndarray:
    """Samples ``X: [n, d]`` of ``X = X W + Z``; ``Z_j`` has scale ``noise_scale[j]`` (std).

    ``noise_scale`` None -> 1 (equal variance), scalar, or length-``d`` (non-equal variances: pass
    ``sqrt(variances)``). ``sem_type``: gauss, exp, gumbel, uniform, laplace. ``n=np.inf`` returns
    the population square root ``sqrt(d) diag(scale) (I - W)^{-1}`` (so ``X.T @ X / d`` is the
    covariance), Gaussian only.
    """
    rng = np.random.default_rng(rng)
    W = _as_square(W)
    d = W.shape[0]
    scale = np.ones(d) if noise_scale is None else np.broadcast_to(noise_scale, (d,)).astype(float)
    order = topological_order(W)
    if order is None:
        raise ValueError("W must be a DAG")
    if np.isinf(n):
        if sem_type != "gauss":
            raise ValueError("population data (n=inf) only for sem_type='gauss'")
        return np.sqrt(d) * np.diag(scale) @ np.linalg.inv(np.eye(d) - W)
    n = int(n)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    draws = {
        "gauss": lambda s: rng.normal(scale=s, size=n),
        "exp": lambda s: rng.exponential(scale=s, size=n),
        "gumbel": lambda s: rng.gumbel(scale=s, size=n),
        "uniform": lambda s: rng.uniform(-s, s, size=n),
        "laplace": lambda s: rng.laplace(scale=s, size=n),
    }
    if sem_type not in draws:
        raise ValueError(f"unknown sem_type {sem_type!r}; choose from {sorted(draws)}")
    X = np.zeros((n, d))
    for j in order:
        X[:, j] = X @ W[:, j] + draws[sem_type](scale[j])
    return X


def count_accuracy(B_true, B_est) -> dict[str, float]:
    """fdr, tpr, fpr, shd, nnz of ``B_est`` against ``B_true`` (both ``[d, d]``), as in DAGMA.

    ``B_est`` holds 0/1 (a DAG) or also -1 for an undirected CPDAG edge, counted favourably.
    SHD = extra + missing skeleton edges + reversed edges.
    """
    B_true = _as_square(B_true, "B_true") != 0
    B_est = _as_square(B_est, "B_est")
    if B_est.shape != B_true.shape:
        raise ValueError(f"shape mismatch: B_true {B_true.shape} vs B_est {B_est.shape}")
    if (B_est == -1).any():
        if not np.isin(B_est, (-1, 0, 1)).all():
            raise ValueError("B_est should take values in {0, 1, -1}")
        if ((B_est == -1) & (B_est.T == -1)).any():
            raise ValueError("an undirected edge should appear once (B_est[i, j] = -1 only)")
    else:
        if not np.isin(B_est, (0, 1)).all():
            raise ValueError("B_est should take values in {0, 1}")
        if not is_dag(B_est):
            raise ValueError("B_est should be a DAG")
    d = B_true.shape[0]
    und = B_est == -1
    pred = B_est == 1
    skel = B_true | B_true.T
    true_pos = (pred & B_true).sum() + (und & skel).sum()
    false_pos = (pred & ~skel).sum() + (und & ~skel).sum()
    reverse = (pred & ~B_true & B_true.T).sum()
    pred_size = pred.sum() + und.sum()
    cond = B_true.sum()
    cond_neg = 0.5 * d * (d - 1) - cond
    est_skel = np.tril((B_est != 0) | (B_est != 0).T)
    true_skel = np.tril(skel)
    shd = (est_skel & ~true_skel).sum() + (true_skel & ~est_skel).sum() + reverse
    return {
        "fdr": float(reverse + false_pos) / max(pred_size, 1),
        "tpr": float(true_pos) / max(cond, 1),
        "fpr": float(reverse + false_pos) / max(cond_neg, 1),
        "shd": int(shd),
        "nnz": int(pred_size),
    }


def normalized_shd(B_true, B_est) -> float:
    """SHD divided by the number of true edges (CoLiDE's nSHD)."""
    return count_accuracy(B_true, B_est)["shd"] / max(int((np.asarray(B_true) != 0).sum()), 1)


def to_dag(W, threshold: float = 0.3) -> np.ndarray:
    """Zero ``|w| <= threshold``, then drop the smallest-``|w|`` edges until ``W: [d, d]`` is a DAG.

    Equivalent to CoLiDE's ``to_dag`` (greedy removal of the weakest edge); acyclicity is monotone
    in the number of removed edges, so a binary search over that number finds the same cut.
    """
    W = np.array(_as_square(W), dtype=float, copy=True)
    W[np.abs(W) <= threshold] = 0.0
    if is_dag(W):
        return W
    rows, cols = np.nonzero(W)
    order = np.argsort(np.abs(W[rows, cols]), kind="stable")
    lo, hi = 1, len(order)  # removing all edges is always acyclic
    while lo < hi:
        mid = (lo + hi) // 2
        trial = W.copy()
        trial[rows[order[:mid]], cols[order[:mid]]] = 0.0
        if is_dag(trial):
            hi = mid
        else:
            lo = mid + 1
    W[rows[order[:lo]], cols[order[:lo]]] = 0.0
    return W
