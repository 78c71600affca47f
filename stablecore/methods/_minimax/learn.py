"""Learn the augmented graph for causal minimax: CoLiDE DAG + environment-varying mechanisms.

The paper uses CD-NOD with the environment index as context. Here the DAG over the observed
variables comes from CoLiDE (:class:`stablecore.methods.colide.CoLiDE`) on the pooled training
data, and a variable is **mutable** (child of ``env``) when its mechanism, regressed on its learned
parents, is not invariant across the environments: a Chow F-test of per-environment against
pooled least squares (intercept + parents), Bonferroni-corrected over the variables. This detects
changes of the mean function (the shipped benchmark scales the mechanism by ``alpha_e``); a change
of the noise variance alone is not detected.
"""

from __future__ import annotations

import numpy as np
from scipy import stats


def _chow_pvalue(x: np.ndarray, P: np.ndarray, env: np.ndarray) -> float:
    """``x: [n]``, ``P: [n, k]`` parents, ``env: [n]``: p-value of "same regression in every env"."""
    D = np.column_stack([np.ones(len(x)), P])
    k = D.shape[1]

    def rss(rows):
        coef, *_ = np.linalg.lstsq(D[rows], x[rows], rcond=None)
        return float(np.square(x[rows] - D[rows] @ coef).sum())

    envs = [env == e for e in np.unique(env)]
    envs = [m for m in envs if m.sum() > k]  # an environment needs more rows than coefficients
    if len(envs) < 2:
        return 1.0
    rows = np.any(envs, axis=0)
    rss0, rss1 = rss(rows), sum(rss(m) for m in envs)
    df1, df2 = k * (len(envs) - 1), int(rows.sum()) - k * len(envs)
    if df2 <= 0 or rss1 <= 0:
        return 0.0 if rss0 > rss1 else 1.0
    return float(stats.f.sf(((rss0 - rss1) / df1) / (rss1 / df2), df1, df2))


def learn_graph(
    data,
    target: str = "Y",
    env: str = "E",
    *,
    variant: str = "ev",
    lambda1: float = 0.05,
    w_threshold: float = 0.3,
    alpha: float = 0.01,
    mutable=None,
    center_by_env: bool = True,
    progress: bool = False,
    **colide_kwargs,
) -> dict[str, list[str]]:
    """``parents`` of the augmented DAG over ``data``'s columns learned from pooled data.

    ``data: {name: [n] array}`` with an ``env`` column (integer ids) unless ``mutable`` (list of
    names) is given. ``center_by_env``: CoLiDE sees the data centred within each environment
    (the Chow test always uses the raw data). ``colide_kwargs`` go to ``CoLiDE`` (e.g. ``T``,
    ``warm_iter``, ``max_iter``). Returns ``{node: [parents]}`` including ``env`` (no parents; parent of the
    mutable nodes). Raises ``ValueError`` if the ``target``'s own mechanism is found to vary.

    Example::

        parents = learn_graph(data, "Y", "E")     # then CausalMinimax(parents).fit(data)
    """
    from stablecore.methods.colide import CoLiDE

    cols = [c for c in data if c != env]
    if target not in cols:
        raise ValueError(f"data lacks the target column {target!r}")
    X = np.column_stack([np.asarray(data[c], dtype=float) for c in cols])
    if X.shape[0] < 2 or not np.isfinite(X).all():
        raise ValueError(f"data must have >= 2 finite rows, got shape {X.shape}")
    Xc = X
    if center_by_env and env in data:
        # An additive shift of a mechanism makes E a hidden common cause of the pooled data;
        # centring inside each environment removes it (exactly, for mean shifts).
        e = np.asarray(data[env])
        Xc = X.copy()
        for v in np.unique(e):
            Xc[e == v] -= Xc[e == v].mean(0)
    est = CoLiDE(variant, lambda1, w_threshold, progress=progress, **colide_kwargs).fit(Xc)
    adj = np.asarray(est.adjacency_) != 0  # adj[i, j]: cols[i] -> cols[j]
    parents = {c: [cols[i] for i in np.flatnonzero(adj[:, j])] for j, c in enumerate(cols)}
    if mutable is None:
        if env not in data:
            raise ValueError(f"data lacks the environment column {env!r} (or pass mutable=)")
        e = np.asarray(data[env])
        pv = {c: _chow_pvalue(X[:, j], X[:, adj[:, j]], e) for j, c in enumerate(cols)}
        mutable = [c for c in cols if pv[c] < alpha / len(cols)]
    if target in mutable:
        raise ValueError(f"the mechanism of the target {target!r} varies across {env!r}")
    for m in mutable:
        parents[m].append(env)
    parents[env] = []
    return parents
