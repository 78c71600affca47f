"""Causal minimax stable-subset selection ("Which invariance should we transfer?", Liu et al., ICML 2023).

Given the augmented DAG over (Y, X, E) (``parents``: node -> list of parents; ``E`` the environment
index) -- or ``"learn"`` to estimate it from the pooled training data with CoLiDE -- the
**mutable** variables ``X_M`` are the children of ``E`` and the **stable** ones ``X_S`` the rest.
For ``S' in 2^S`` the predictor ``f_S'(x) = E[Y | x_S', do(x_M)]`` is invariant; the method picks
``argmin_S' h*(S')``, ``h*(S') = sup over mutable mechanisms of E[(Y - f_S')^2]``.

Pipeline (all classes of one search fitted as one grouped model, ``G`` groups):

1. structural equations ``x_j = f_j(pa_j) + e_j`` of the stable descendants of ``X_M`` (tiny MLPs,
   one masked grouped model), residuals ``e_j`` kept (abduction);
2. interventional training data: rows of ``X_M`` shuffled jointly (``do(x_M)`` with its pooled
   marginal), descendants regenerated with the fitted equations + residuals;
3. equivalence classes of stable subsets by the paper's MAG recursion
   (:func:`~stablecore.methods._minimax.graph.search_classes`, polynomial in the number of
   classes; ``classes="enumerate"`` for the ``2^|S|`` brute force); one ``f`` per class;
4. ``f_S'`` = MLP of ``Y`` on ``[x_S', x_M]`` (input mask per group) on that data;
5. ``h*(S')``: each mutable mechanism replaced by ``J_theta(pa) = c + r tanh(MLP(pa))`` (bounded to
   the observed range ``c +- r`` of ``x_M``: a linear output would make the sup infinite),
   descendants regenerated, ``MSE(Y, f_S') - penalty * sum ||W||_2`` maximised by Adam.

Example::

    mm = CausalMinimax(parents, target="Y", env="E").fit(data)   # data: {name: [n] array}
    mm.best_subset_, mm.hstar_                                    # chosen S', {class rep: h*}
    CausalMinimax("learn").fit(data).parents                      # graph learned with CoLiDE
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from stablecore.methods._minimax.experiment import simulation_experiment
from stablecore.methods._minimax.graph import (
    EqClass,
    d_separated,
    descendants,
    enumerate_classes,
    equivalence_classes,
    read_gml,
    search_classes,
    stable_sets,
    topological,
)
from stablecore.methods._minimax.learn import learn_graph
from stablecore.methods._minimax.nets import GroupedMLP, threads

__all__ = [
    "CausalMinimax",
    "EqClass",
    "GroupedMLP",
    "d_separated",
    "enumerate_classes",
    "equivalence_classes",
    "learn_graph",
    "read_gml",
    "search_classes",
    "simulation_experiment",
    "stable_sets",
]


class CausalMinimax:
    """Minimax-optimal stable subset for predicting ``target`` under shifts of the mutable mechanisms.

    ``parents``: DAG over all variables including ``target`` and ``env``, or ``"learn"``
    (:func:`learn_graph`: CoLiDE on the pooled data, mutable = mechanisms that change across the
    ``env`` column; ``learn_kwargs`` go there). ``fit(data)`` with ``data: {name: [n] array}``
    (pooled training environments; ``env`` column needed only to learn the graph) sets
    ``parents``, ``mutable_``, ``stable_``, ``classes_`` (representative -> members),
    ``search_stats_``, ``hstar_`` (representative -> estimated worst-case MSE, standardised
    target) and ``best_subset_``. ``init``: ``"ones"`` (the official single-index networks, the
    default) or ``"random"`` (see :class:`GroupedMLP`).
    """

    def __init__(
        self,
        parents,
        target="Y",
        env="E",
        *,
        hidden=12,
        fit_iters=2000,
        adv_iters=400,
        lr=0.02,
        penalty=0.01,
        adv_rows=None,
        init="ones",
        classes="search",
        learn_kwargs=None,
        seed=0,
        progress=True,
    ):
        self.target, self.env = target, env
        self.hidden, self.fit_iters, self.adv_iters = hidden, fit_iters, adv_iters
        self.lr, self.penalty, self.seed, self.progress = lr, penalty, seed, progress
        self.adv_rows, self.init, self.classes = adv_rows, init, classes
        self.learn_kwargs = dict(learn_kwargs or {})
        if isinstance(parents, str):
            if parents != "learn":
                raise ValueError(f"parents must be a dict or 'learn', got {parents!r}")
            self.parents = None
        else:
            self._setup({k: list(v) for k, v in parents.items()})

    def _setup(self, parents):
        self.parents = parents
        info = stable_sets(parents, self.target, self.env)
        self.mutable_, self.stable_ = info["mutable"], info["stable"]
        self.full_set_optimal_ = info["full_set_optimal"]
        self.order_ = [v for v in topological(parents) if v != self.env]
        self.col_ = {v: i for i, v in enumerate(self.order_)}
        desc = descendants(parents, self.mutable_) - set(self.mutable_)
        if self.target in desc:
            raise ValueError(f"target {self.target!r} is a descendant of a mutable variable")
        self.regen_ = [v for v in self.order_ if v in desc]

    def _mask(self, rows) -> torch.Tensor:
        m = torch.zeros(len(rows), len(self.order_))
        for g, cols in enumerate(rows):
            m[g, [self.col_[c] for c in cols if c != self.env]] = 1
        return m

    def _tensor(self, data) -> torch.Tensor:
        missing = [v for v in self.order_ if v not in data]
        if missing:
            raise ValueError(f"data lacks columns {missing}")
        Z = np.column_stack([np.asarray(data[v], dtype=float) for v in self.order_])
        if Z.shape[0] < 2 or not np.isfinite(Z).all():
            raise ValueError(f"data must have >= 2 finite rows, got shape {Z.shape}")
        return torch.as_tensor((Z - self.mean_) / self.std_, dtype=torch.float32)

    def _net(self, rows, hidden, seed) -> GroupedMLP:
        return GroupedMLP(self._mask(rows), hidden, seed, self.init)

    def _propagate(self, Z, mutable_fn, resid):
        """Regenerate ``X_M`` (via ``mutable_fn(v, Z)``) and their descendants in causal order."""
        for v in self.order_:
            j = self.col_[v]
            if v in self.mutable_:
                new = mutable_fn(v, Z)
            elif v in self.regen_:
                g = self.regen_.index(v)
                new = self.se_.forward_group(Z, g) + resid[:, g]
            else:
                continue
            Z = torch.cat([Z[..., :j], new[..., None], Z[..., j + 1 :]], -1)
        return Z

    def fit(self, data) -> CausalMinimax:
        torch.manual_seed(self.seed)
        if self.parents is None:
            kw = {"target": self.target, "env": self.env, **self.learn_kwargs}
            self._setup(learn_graph(data, **kw))
        raw = np.column_stack([np.asarray(data[v], dtype=float) for v in self.order_])
        self.mean_, self.std_ = raw.mean(0), raw.std(0) + 1e-12
        Z = self._tensor(data)
        n, y = Z.shape[0], self.col_[self.target]
        gen = torch.Generator().manual_seed(self.seed)
        # 1. structural equations of the regenerated descendants, residuals kept (abduction)
        self.resid_ = torch.zeros(n, 0)
        if self.regen_:
            self.se_ = self._net([self.parents[v] for v in self.regen_], self.hidden, self.seed)
            tgt = Z[:, [self.col_[v] for v in self.regen_]].T
            self.se_.fit(Z, tgt, self.fit_iters, self.lr, self.progress).requires_grad_(False)
            with torch.no_grad():
                self.resid_ = (tgt - self.se_(Z)).T  # [n, |regen|]
        # 2. do(x_M): shuffle the mutable rows jointly, regenerate their descendants
        perm = torch.randperm(n, generator=gen)
        with torch.no_grad():
            Zint = self._propagate(Z, lambda v, Zc: Zc[perm, self.col_[v]], self.resid_)
        # 3. equivalence classes; one predictor per class (only the full set if known optimal)
        self.search_stats_ = {}
        self.classes_ = equivalence_classes(
            self.parents, self.target, self.env, self.classes, stats=self.search_stats_
        )
        full = self._rep_of(tuple(self.stable_))
        self.reps_ = [full] if self.full_set_optimal_ else list(self.classes_)
        self.f_ = self._net(
            [list(r) + self.mutable_ for r in self.reps_], self.hidden, self.seed + 1
        )
        self.f_.fit(Zint, Zint[:, y], self.fit_iters, self.lr, self.progress).requires_grad_(False)
        # 4. adversarial worst-case risk, all classes at once
        rows = torch.arange(n) if self.adv_rows is None else torch.randperm(n, generator=gen)
        rows = rows[: self.adv_rows or n]
        with threads(1):
            h = self._worst_case(Z[rows], self.resid_[rows], y)
        self.hstar_ = dict(zip(self.reps_, h.tolist()))
        self.best_subset_ = min(self.hstar_, key=self.hstar_.get)
        return self

    def _rep_of(self, subset):
        s = tuple(sorted(subset))
        return next(r for r, members in self.classes_.items() if s in members)

    def _worst_case(self, Z, resid, y) -> torch.Tensor:
        G, M_cols = len(self.reps_), [self.col_[m] for m in self.mutable_]
        lo, hi = Z[:, M_cols].min(0).values, Z[:, M_cols].max(0).values
        centre, half = (hi + lo) / 2, (hi - lo) / 2
        adv = {
            m: self._net([self.parents[m]] * G, max(2, len(self.parents[m]) // 2), self.seed + k)
            for k, m in enumerate(self.mutable_)
        }
        opt = torch.optim.Adam([p for a in adv.values() for p in a.parameters()], lr=self.lr)
        Zg, best = Z.expand(G, -1, -1), torch.zeros(G)

        def mech(v, Zc):
            k = self.mutable_.index(v)
            return centre[k] + half[k] * torch.tanh(adv[v](Zc))

        for _ in tqdm(range(self.adv_iters), disable=not self.progress, desc="worst case"):
            opt.zero_grad(set_to_none=True)
            Zadv = self._propagate(Zg, mech, resid)
            mse = (Zadv[..., y] - self.f_(Zadv)).square().mean(-1)  # [G]
            norm = sum(a.weight_norm() for a in adv.values())
            (-(mse - self.penalty * norm).sum()).backward()
            opt.step()
            best = torch.maximum(best, mse.detach())
        return best

    @torch.no_grad()
    def predict(self, data, subset=None) -> np.ndarray:
        """``[n]`` predictions of ``f_S'`` in the original units of ``target``."""
        rep = self.best_subset_ if subset is None else self._rep_of(subset)
        pred = self.f_(self._tensor(data))[self.reps_.index(rep)].double().numpy()
        return pred * self.std_[self.col_[self.target]] + self.mean_[self.col_[self.target]]

    @torch.no_grad()
    def risk(self, data, subset=None, standardise: str = "train") -> float:
        """MSE (standardised target) of ``f_S'`` on ``data``; ``subset`` defaults to the chosen one.

        ``standardise="train"``: training statistics; ``"env"``: ``data``'s own mean/std (the
        official evaluation standardises every test environment by itself)."""
        rep = self.best_subset_ if subset is None else self._rep_of(subset)
        Z = self._tensor(data)
        if standardise == "env":
            Z = (Z - Z.mean(0)) / (Z.std(0, unbiased=False) + 1e-12)
        elif standardise != "train":
            raise ValueError(f"standardise must be 'train' or 'env', got {standardise!r}")
        pred = self.f_(Z)[self.reps_.index(rep)]
        return float((pred - Z[:, self.col_[self.target]]).square().mean())
