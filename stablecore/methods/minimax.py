"""Causal minimax stable-subset selection ("Which invariance should we transfer?", Liu et al., ICML 2023).

Given the augmented DAG over (Y, X, E) (``parents``: node -> list of parents; ``E`` the environment
index), the **mutable** variables ``X_M`` are the children of ``E`` and the **stable** ones ``X_S``
the rest. For ``S' in 2^S`` the predictor ``f_S'(x) = E[Y | x_S', do(x_M)]`` is invariant; the
method picks ``argmin_S' h*(S')``, ``h*(S') = sup over mutable mechanisms of E[(Y - f_S')^2]``.

Pipeline (all subsets of one search fitted as one grouped model, ``G`` groups):

1. structural equations ``x_j = f_j(pa_j) + e_j`` of the stable descendants of ``X_M`` (tiny MLPs,
   one masked grouped model), residuals ``e_j`` kept (abduction);
2. interventional training data: rows of ``X_M`` shuffled jointly (``do(x_M)`` with its pooled
   marginal), descendants regenerated with the fitted equations + residuals;
3. ``f_S'`` = MLP of ``Y`` on ``[x_S', x_M]`` (input mask per group) on that data;
4. ``h*(S')``: each mutable mechanism replaced by ``J_theta(pa) = c + r tanh(MLP(pa))`` (bounded to
   the observed range ``c +- r`` of ``x_M``: a linear output would make the sup infinite),
   descendants regenerated, ``MSE(Y, f_S') - penalty * sum ||theta||_2`` maximised by Adam;
5. equivalence classes: ``S'`` is reduced to ``T`` by dropping ``v`` while
   ``Y _||_ v | (S' \\ v) u M`` in the graph with the arrows into ``M`` (and ``E``) cut; subsets with
   the same ``T`` share ``f`` and ``h*``, so only one model per class is fitted.

Example::

    mm = CausalMinimax(parents, target="Y", env="E").fit(data)   # data: {name: [n] array}
    mm.best_subset_, mm.hstar_                                    # chosen S', {class: h*}
"""

from __future__ import annotations

from contextlib import contextmanager
from itertools import combinations

import numpy as np
import torch
from tqdm.auto import tqdm

__all__ = [
    "CausalMinimax",
    "GroupedMLP",
    "d_separated",
    "equivalence_classes",
    "read_gml",
    "simulation_experiment",
    "stable_sets",
]


@contextmanager
def _threads(n: int | None):
    """Tiny matrices: extra torch threads only add contention (much slower on a loaded machine)."""
    old = torch.get_num_threads()
    torch.set_num_threads(n or old)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _children(parents: dict[str, list[str]], node: str) -> list[str]:
    return [c for c, ps in parents.items() if node in ps]


def _descendants(parents, nodes) -> set[str]:
    out, stack = set(), list(nodes)
    while stack:
        for c in _children(parents, stack.pop()):
            if c not in out:
                out.add(c)
                stack.append(c)
    return out


def topological(parents: dict[str, list[str]]) -> list[str]:
    order, seen = [], set()

    def visit(v, path=()):
        if v in path:
            raise ValueError(f"graph has a cycle through {v!r}")
        if v not in seen:
            for p in parents.get(v, []):
                visit(p, path + (v,))
            seen.add(v)
            order.append(v)

    for v in parents:
        visit(v)
    return order


def d_separated(parents: dict[str, list[str]], xs, ys, zs) -> bool:
    """``xs _||_ ys | zs`` in the DAG ``parents`` (moralised ancestral graph criterion)."""
    xs, ys, zs = set(xs), set(ys), set(zs)
    anc, stack = set(), list(xs | ys | zs)
    while stack:
        v = stack.pop()
        if v not in anc:
            anc.add(v)
            stack.extend(parents.get(v, []))
    nbr: dict[str, set[str]] = {v: set() for v in anc}
    for v in anc:
        ps = [p for p in parents.get(v, []) if p in anc]
        for p in ps:
            nbr[v].add(p)
            nbr[p].add(v)
        for a, b in combinations(ps, 2):  # marry the parents
            nbr[a].add(b)
            nbr[b].add(a)
    seen, stack = set(xs), list(xs)
    while stack:
        for w in nbr[stack.pop()]:
            if w in ys:
                return False
            if w not in seen and w not in zs:
                seen.add(w)
                stack.append(w)
    return True


def stable_sets(parents: dict[str, list[str]], target: str = "Y", env: str = "E") -> dict:
    """``mutable`` (children of ``env``), ``stable`` (other X), ``mutable_children_of_target``
    and ``full_set_optimal`` (no mutable child of Y: the whole stable set is minimax optimal)."""
    if target not in parents or env not in parents:
        raise ValueError(f"graph must contain the target {target!r} and environment {env!r}")
    mutable = sorted(_children(parents, env))
    if target in mutable:
        raise ValueError(f"the target {target!r} must not be a child of {env!r}")
    stable = sorted(v for v in parents if v not in mutable and v not in (target, env))
    m0 = sorted(m for m in mutable if target in parents[m])
    return {
        "mutable": mutable,
        "stable": stable,
        "mutable_children_of_target": m0,
        "full_set_optimal": not m0,
    }


def equivalence_classes(parents, target="Y", env="E", max_stable: int = 16):
    """``{representative tuple: [member subsets]}`` over all subsets of the stable set."""
    info = stable_sets(parents, target, env)
    S, M = info["stable"], info["mutable"]
    if len(S) > max_stable:
        raise ValueError(f"{len(S)} stable variables: 2^{len(S)} subsets exceed max_stable")
    # do(X_M): cut the arrows into M (and the environment node itself).
    cut = {
        v: ([] if v in M else [p for p in ps if p != env]) for v, ps in parents.items() if v != env
    }
    classes: dict[tuple, list[tuple]] = {}
    for r in range(len(S) + 1):
        for sub in combinations(S, r):
            rep = list(sub)
            changed = True
            while changed:
                changed = False
                for v in list(rep):
                    rest = [u for u in rep if u != v]
                    if d_separated(cut, [target], [v], rest + M):
                        rep, changed = rest, True
                        break
            classes.setdefault(tuple(rep), []).append(sub)
    return classes


class GroupedMLP(torch.nn.Module):
    """``G`` independent one-hidden-layer sigmoid MLPs on masked inputs, one batched model.

    ``forward(Z: [n, p]) -> [G, n]``; ``mask: [G, p]`` selects each group's inputs. Groups share
    nothing, so fitting them together equals fitting them one at a time (Adam is elementwise).
    """

    def __init__(self, mask: torch.Tensor, hidden: int = 12, seed: int = 0):
        super().__init__()
        G, p = mask.shape
        gens = [torch.Generator().manual_seed(seed + g) for g in range(G)]
        self.register_buffer("mask", mask.to(torch.float32))
        self.W1 = torch.nn.Parameter(
            torch.stack([torch.randn(p, hidden, generator=x) for x in gens]) / p**0.5
        )
        self.b1 = torch.nn.Parameter(torch.zeros(G, hidden))
        self.W2 = torch.nn.Parameter(
            torch.stack([torch.randn(hidden, generator=x) for x in gens]) / hidden**0.5
        )
        self.b2 = torch.nn.Parameter(torch.zeros(G))

    def forward(self, Z: torch.Tensor) -> torch.Tensor:
        if Z.ndim == 2:
            Z = Z.expand(self.mask.shape[0], *Z.shape)
        H = torch.sigmoid(torch.bmm(Z, self.W1 * self.mask[:, :, None]) + self.b1[:, None, :])
        return (H * self.W2[:, None, :]).sum(-1) + self.b2[:, None]

    def forward_group(self, Z: torch.Tensor, g: int) -> torch.Tensor:
        """Group ``g`` only, on ``Z: [..., n, p]`` -> ``[..., n]`` (no work for the other groups)."""
        H = torch.sigmoid(Z @ (self.W1[g] * self.mask[g][:, None]) + self.b1[g])
        return H @ self.W2[g] + self.b2[g]

    def fit(
        self,
        Z,
        y,
        iters: int = 2000,
        lr: float = 0.02,
        progress: bool = False,
        num_threads: int | None = 1,
    ):
        """``Z: [n, p]`` or ``[G, n, p]``, ``y: [n]`` or ``[G, n]``; full-batch Adam on the MSE."""
        opt = torch.optim.Adam(self.parameters(), lr=lr)
        y = y.expand(self.mask.shape[0], -1) if y.ndim == 1 else y
        with _threads(num_threads):
            for _ in tqdm(range(iters), disable=not progress, desc="grouped MLP"):
                opt.zero_grad(set_to_none=True)
                loss = (self(Z) - y).square().mean(-1).sum()  # sum: groups stay independent
                loss.backward()
                opt.step()
        return self


class CausalMinimax:
    """Minimax-optimal stable subset for predicting ``target`` under shifts of the mutable mechanisms.

    ``parents``: DAG over all variables including ``target`` and ``env``. ``fit(data)`` with
    ``data: {name: [n] array}`` (pooled training environments; ``env`` column optional) sets
    ``mutable_``, ``stable_``, ``classes_`` (representative -> member subsets), ``hstar_``
    (representative -> estimated worst-case MSE, standardised target), ``best_subset_``.
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
        adv_rows=300,
        seed=0,
        progress=True,
    ):
        self.parents = {k: list(v) for k, v in parents.items()}
        self.target, self.env = target, env
        self.hidden, self.fit_iters, self.adv_iters = hidden, fit_iters, adv_iters
        self.lr, self.penalty, self.seed, self.progress = lr, penalty, seed, progress
        self.adv_rows = adv_rows
        info = stable_sets(self.parents, target, env)
        self.mutable_, self.stable_ = info["mutable"], info["stable"]
        self.full_set_optimal_ = info["full_set_optimal"]
        self.order_ = [v for v in topological(self.parents) if v != env]
        self.col_ = {v: i for i, v in enumerate(self.order_)}
        desc = _descendants(self.parents, self.mutable_) - set(self.mutable_)
        if target in desc:
            raise ValueError(f"target {target!r} is a descendant of a mutable variable")
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

    def _propagate(self, Z, mutable_fn):
        """Regenerate ``X_M`` (via ``mutable_fn(v, Z)``) and their descendants in causal order."""
        for v in self.order_:
            j = self.col_[v]
            if v in self.mutable_:
                new = mutable_fn(v, Z)
            elif v in self.regen_:
                g = self.regen_.index(v)
                new = self.se_.forward_group(Z, g) + self.resid_[: Z.shape[-2], g]
            else:
                continue
            Z = torch.cat([Z[..., :j], new[..., None], Z[..., j + 1 :]], -1)
        return Z

    def fit(self, data) -> CausalMinimax:
        torch.manual_seed(self.seed)
        raw = np.column_stack([np.asarray(data[v], dtype=float) for v in self.order_])
        self.mean_, self.std_ = raw.mean(0), raw.std(0) + 1e-12
        Z = self._tensor(data)
        n, y = Z.shape[0], self.col_[self.target]
        # 1. structural equations of the regenerated descendants, residuals kept (abduction)
        if self.regen_:
            self.se_ = GroupedMLP(
                self._mask([self.parents[v] for v in self.regen_]), self.hidden, self.seed
            )
            tgt = Z[:, [self.col_[v] for v in self.regen_]].T
            self.se_.fit(Z, tgt, self.fit_iters, self.lr, self.progress).requires_grad_(False)
            with torch.no_grad():
                self.resid_ = (tgt - self.se_(Z)).T  # [n, |regen|]
        # 2. do(x_M): shuffle the mutable rows jointly, regenerate their descendants
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))
        M_cols = [self.col_[m] for m in self.mutable_]
        with torch.no_grad():
            Zint = self._propagate(Z, lambda v, Zc: Zc[perm, self.col_[v]])
        # 3. one predictor per equivalence class (the full stable set if it is known optimal)
        self.classes_ = equivalence_classes(self.parents, self.target, self.env)
        full = self._rep_of(tuple(self.stable_))
        reps = [full] if self.full_set_optimal_ else list(self.classes_)
        self.reps_ = reps
        self.f_ = GroupedMLP(
            self._mask([list(r) + self.mutable_ for r in reps]), self.hidden, self.seed + 1000
        )
        self.f_.fit(Zint, Zint[:, y], self.fit_iters, self.lr, self.progress).requires_grad_(False)
        # 4. adversarial worst-case risk, all classes at once
        with _threads(1):
            self.hstar_ = dict(zip(reps, self._worst_case(Z, y, M_cols).tolist()))
        self.best_subset_ = min(self.hstar_, key=self.hstar_.get)
        return self

    def _rep_of(self, subset):
        return next(r for r, members in self.classes_.items() if tuple(subset) in members)

    def _worst_case(self, Z, y, M_cols) -> torch.Tensor:
        G = len(self.reps_)
        lo, hi = Z[:, M_cols].min(0).values, Z[:, M_cols].max(0).values
        centre, half = (hi + lo) / 2, (hi - lo) / 2
        adv = {
            m: GroupedMLP(
                self._mask([self.parents[m]] * G),
                max(2, len(self.parents[m]) // 2),
                self.seed + 7 * k,
            )
            for k, m in enumerate(self.mutable_)
        }
        params = [p for a in adv.values() for p in a.parameters()]
        opt = torch.optim.Adam(params, lr=self.lr)
        # The sup is over mechanisms, not rows: a fixed row subsample keeps the loop cheap.
        Zg = Z[: self.adv_rows].expand(G, -1, -1)
        best = torch.zeros(G)

        def mech(v, Zc):
            k = self.mutable_.index(v)
            return centre[k] + half[k] * torch.tanh(adv[v](Zc))

        for _ in tqdm(range(self.adv_iters), disable=not self.progress, desc="worst case"):
            opt.zero_grad(set_to_none=True)
            Zadv = self._propagate(Zg, mech)
            mse = (Zadv[..., y] - self.f_(Zadv)).square().mean(-1)  # [G]
            norm = sum(p.reshape(G, -1).norm(dim=1) for a in adv.values() for p in a.parameters())
            (-(mse - self.penalty * norm).sum()).backward()
            opt.step()
            best = torch.maximum(best, mse.detach())
        return best

    @torch.no_grad()
    def risk(self, data, subset=None) -> float:
        """MSE (standardised target) of ``f_S'`` on ``data``; ``subset`` defaults to the chosen one."""
        rep = self.best_subset_ if subset is None else self._rep_of(tuple(sorted(subset)))
        Z = self._tensor(data)
        pred = self.f_(Z)[self.reps_.index(rep)]
        return float((pred - Z[:, self.col_[self.target]]).square().mean())


def read_gml(path) -> dict[str, list[str]]:
    """``parents`` dict from a (networkx-style) directed GML file."""
    labels, parents, edge, node = {}, {}, {}, {}
    for tok in open(path).read().replace("[", " [ ").replace("]", " ] ").split():
        node.setdefault("_toks", []).append(tok)
    toks = node["_toks"]
    i = 0
    while i < len(toks):
        if toks[i] == "node":
            j = toks.index("]", i)
            kv = dict(zip(toks[i + 2 : j : 2], toks[i + 3 : j : 2]))
            labels[kv["id"]] = kv["label"].strip('"')
            i = j
        elif toks[i] == "edge":
            j = toks.index("]", i)
            edge = dict(zip(toks[i + 2 : j : 2], toks[i + 3 : j : 2]))
            parents.setdefault(edge["target"], []).append(edge["source"])
            i = j
        i += 1
    return {lab: [labels[p] for p in parents.get(i, [])] for i, lab in labels.items()}


def _read_csv(path) -> dict[str, np.ndarray]:
    arr = np.genfromtxt(path, delimiter=",", names=True)
    return {name: np.asarray(arr[name], dtype=float) for name in arr.dtype.names}


def simulation_experiment(root, n_splits: int = 2, **kwargs) -> list[dict]:
    """The paper's synthetic benchmark (``which_invariance_sim``): per split, fit on the 10 pooled
    training environments, report the max test-environment MSE of the chosen subset and of the
    whole stable set (standardised Y, train statistics)."""
    from pathlib import Path

    root = Path(root)
    parents = read_gml(root / "gtaug.gml")
    splits = sorted(p.stem for p in (root / "simulation").glob("*.csv"))[:n_splits]
    rows = []
    for split in splits:
        mm = CausalMinimax(parents, **kwargs).fit(_read_csv(root / "simulation" / f"{split}.csv"))
        tests = [_read_csv(p) for p in sorted((root / "simulation" / split).glob("*.csv"))]
        full = tuple(mm.stable_)
        best_mse = max(mm.risk(t) for t in tests)
        full_mse = max(mm.risk(t, full) for t in tests)
        rows.append(
            {
                "split": split,
                "classes": len(mm.classes_),
                "chosen": ",".join(mm.best_subset_),
                "h*_chosen": round(mm.hstar_[mm.best_subset_], 4),
                "h*_full": round(mm.hstar_[mm._rep_of(full)], 4),
                "max_test_mse_chosen": round(best_mse, 4),
                "max_test_mse_full": round(full_mse, 4),
            }
        )
    return rows
