"""Graph side of causal minimax: d-separation, stable sets, equivalence classes of stable subsets.

Two ways to group the ``2^|S|`` stable subsets into classes whose members share the predictor
``f_S'(x) = E[Y | x_S', do(x_M)]`` (hence the worst-case risk ``h*``):

* :func:`search_classes` -- the paper's recursion (official code ``eqcls_search/eqcls_search.py``).
  Work on the *stable graph* (the DAG over ``Y`` and ``S`` after ``do(x_M)``: arrows into ``M``
  cut and ``M``, ``E`` conditioned on, which for d-separation among ``Y u S`` equals deleting
  them). A state is a pair (selected ``A``, latent ``L``); in the MAG over the remaining nodes
  ``R`` with ``A`` conditioned on (selection) and ``L`` marginalised, let ``N`` be ``Y``'s
  neighbours. ``N`` empty: ``Y`` is m-separated from all of ``R`` given ``A`` and anything, so
  ``{A u T : T subset R}`` is one class. Otherwise recurse on every split of ``N`` into
  selected / latent. Leaves are exactly the classes (each inner state has >= 2 children), so the
  cost is ``O(#classes * |S|)`` adjacency tests of ``O(V + E)`` each: polynomial in the size of
  the answer, against ``2^|S|`` subset evaluations for enumeration. (When ``Y`` has ``k``
  mutually separated leaf children there *are* ``2^k`` classes; no method avoids that.)
* :func:`enumerate_classes` -- brute force over all subsets (greedy d-separation reduction),
  kept as the reference the search is tested against.

MAG adjacency without building the MAG (R ``ggm::DAG.to.MAG`` in the official code): ``a``, ``b``
observed are adjacent iff some inducing path exists relative to ``<L, A>``, iff they are
d-connected given ``Z u A`` for every ``Z`` of observed nodes (Richardson & Spirtes 2002, Thm 4.2),
iff d-connected given ``(an({a, b} u A) n O) \\ {a, b} u A`` (an ancestral separating set exists
whenever any does). The last step is checked against the "every Z" definition in the tests.
"""

from __future__ import annotations

from itertools import combinations
from typing import NamedTuple

Parents = dict[str, list[str]]


def children(parents: Parents, node: str) -> list[str]:
    return [c for c, ps in parents.items() if node in ps]


def descendants(parents: Parents, nodes) -> set[str]:
    """Strict descendants of ``nodes`` (a node is not its own descendant here)."""
    out, stack = set(), list(nodes)
    while stack:
        for c in children(parents, stack.pop()):
            if c not in out:
                out.add(c)
                stack.append(c)
    return out


def ancestors(parents: Parents, nodes) -> set[str]:
    """``nodes`` and all their ancestors."""
    out, stack = set(), list(nodes)
    while stack:
        v = stack.pop()
        if v not in out:
            out.add(v)
            stack.extend(parents.get(v, []))
    return out


def topological(parents: Parents) -> list[str]:
    """Parents before children; ``ValueError`` on a cycle."""
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


def d_separated(parents: Parents, xs, ys, zs) -> bool:
    """``xs _||_ ys | zs`` in the DAG ``parents`` (moralised ancestral graph criterion)."""
    xs, ys, zs = set(xs), set(ys), set(zs)
    anc = ancestors(parents, xs | ys | zs)
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


def stable_sets(parents: Parents, target: str = "Y", env: str = "E") -> dict:
    """``mutable`` (children of ``env``), ``stable`` (other X), ``mutable_children_of_target``
    and ``full_set_optimal`` (no mutable child of Y: the whole stable set is minimax optimal)."""
    if target not in parents or env not in parents:
        raise ValueError(f"graph must contain the target {target!r} and environment {env!r}")
    mutable = sorted(children(parents, env))
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


def stable_graph(parents: Parents, target: str = "Y", env: str = "E") -> Parents:
    """The DAG over ``target`` and the stable set after ``do(x_M)`` (``M``, ``env`` removed)."""
    info = stable_sets(parents, target, env)
    keep = set(info["stable"]) | {target}
    return {v: [p for p in parents[v] if p in keep] for v in parents if v in keep}


def mag_adjacent(g: Parents, a: str, b: str, observed, selected, stats=None) -> bool:
    """``a`` and ``b`` adjacent in the MAG of ``g`` over ``observed`` (incl. ``a``, ``b``) with
    ``selected`` conditioned on and every other node marginalised (see the module docstring)."""
    if stats is not None:
        stats["dsep"] = stats.get("dsep", 0) + 1
    sel = set(selected)
    z = (ancestors(g, {a, b} | sel) & set(observed)) - {a, b}
    return not d_separated(g, [a], [b], z | sel)


class EqClass(NamedTuple):
    """Subsets ``rep u T`` for every ``T subset free``; ``rep`` is the smallest member."""

    rep: tuple
    free: tuple

    def __len__(self) -> int:
        return 2 ** len(self.free)

    def __iter__(self):
        for r in range(len(self.free) + 1):
            for t in combinations(self.free, r):
                yield tuple(sorted(self.rep + t))

    def __contains__(self, subset) -> bool:
        s = set(subset)
        return set(self.rep) <= s and s - set(self.rep) <= set(self.free)


def search_classes(parents: Parents, target="Y", env="E", stats=None) -> dict[tuple, EqClass]:
    """Equivalence classes of stable subsets by the MAG recursion: ``{rep: EqClass}``.

    ``stats`` (a dict, optional) receives ``states`` (recursion states = MAG neighbourhoods
    computed) and ``dsep`` (adjacency tests). Example::

        classes = search_classes(read_gml("gtaug.gml"))   # shipped graph: 45 classes
    """
    g = stable_graph(parents, target, env)
    nodes = [v for v in topological(g) if v != target]
    stats = {} if stats is None else stats
    out: dict[tuple, EqClass] = {}

    def recurse(sel: tuple, lat: frozenset):
        stats["states"] = stats.get("states", 0) + 1
        rest = [v for v in nodes if v not in sel and v not in lat]
        obs = set(rest) | {target}
        nbrs = [v for v in rest if mag_adjacent(g, target, v, obs, sel, stats)]
        if not nbrs:
            rep = tuple(sorted(sel))
            out[rep] = EqClass(rep, tuple(sorted(rest)))
            return
        for r in range(len(nbrs) + 1):
            for chosen in combinations(nbrs, r):
                recurse(sel + chosen, lat | (set(nbrs) - set(chosen)))

    recurse((), frozenset())
    return out


def enumerate_classes(parents: Parents, target="Y", env="E", max_stable: int = 16, stats=None):
    """Brute force: every subset reduced greedily (drop ``v`` while ``Y _||_ v | rest`` in the
    stable graph); ``{representative: [member subsets]}``. ``2^|S|`` subsets."""
    g = stable_graph(parents, target, env)
    S = sorted(v for v in g if v != target)
    if len(S) > max_stable:
        raise ValueError(f"{len(S)} stable variables: 2^{len(S)} subsets exceed max_stable")
    stats = {} if stats is None else stats
    classes: dict[tuple, list[tuple]] = {}
    for r in range(len(S) + 1):
        for sub in combinations(S, r):
            rep, changed = list(sub), True
            while changed:
                changed = False
                for v in list(rep):
                    rest = [u for u in rep if u != v]
                    stats["dsep"] = stats.get("dsep", 0) + 1
                    if d_separated(g, [target], [v], rest):
                        rep, changed = rest, True
                        break
            classes.setdefault(tuple(rep), []).append(sub)
    return classes


def equivalence_classes(parents, target="Y", env="E", method: str = "search", **kwargs):
    """``{representative: members}`` (``members`` iterable of sorted tuples, with ``len``).

    ``method="search"`` (default): :func:`search_classes`, polynomial in the number of classes;
    ``"enumerate"``: :func:`enumerate_classes`, ``2^|S|``."""
    if method == "search":
        return search_classes(parents, target, env, **kwargs)
    if method == "enumerate":
        return enumerate_classes(parents, target, env, **kwargs)
    raise ValueError(f"method must be 'search' or 'enumerate', got {method!r}")


def read_gml(path) -> Parents:
    """``parents`` dict from a (networkx-style) directed GML file."""
    toks = open(path).read().replace("[", " [ ").replace("]", " ] ").split()
    labels, parents, i = {}, {}, 0
    while i < len(toks):
        if toks[i] in ("node", "edge"):
            j = toks.index("]", i)
            kv = dict(zip(toks[i + 2 : j : 2], toks[i + 3 : j : 2]))
            if toks[i] == "node":
                labels[kv["id"]] = kv["label"].strip('"')
            else:
                parents.setdefault(kv["target"], []).append(kv["source"])
            i = j
        i += 1
    return {lab: [labels[p] for p in parents.get(i, [])] for i, lab in labels.items()}
