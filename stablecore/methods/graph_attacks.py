"""Random and DICE edge perturbations on an undirected ``edge_index`` (pure PyTorch).

Non-targeted structure attacks used to evaluate robust GNNs (STABLE, Pro-GNN, GCN-Jaccard):

* **random** (DeepRobust ``Random``): insert (``"add"``), delete (``"remove"``) or flip
  (``"flip"``) ``n`` uniformly random node pairs;
* **DICE** ("delete internally, connect externally", Zügner & Günnemann 2019): each of the
  ``n`` perturbations is a deletion of an intra-class edge or an insertion of an inter-class
  non-edge, chosen by a fair coin (as DeepRobust's ``DICE``).

The budget is ``n = int(rate * M)`` with ``M`` undirected edges, as in the robust-GNN
literature. Graphs are handled as sets of undirected pairs ``u < v`` (self-loops dropped,
duplicates merged); the result holds both directions, sorted. Non-edges are drawn by
vectorised rejection sampling (pair keys ``u * N + v`` tested with ``torch.isin``), never by
enumerating the ``N^2`` pairs.

Example::

    >>> ei = torch.tensor([[0, 1, 2, 3], [1, 2, 3, 0]])
    >>> g = torch.Generator().manual_seed(0)
    >>> random_perturbation(ei, 6, n_perturbations=2, generator=g).shape
    torch.Size([2, 12])
"""

from __future__ import annotations

import torch

from stablecore.methods.graph_similarity import check_edge_index

__all__ = [
    "dice_perturbation",
    "pairs_to_edge_index",
    "random_perturbation",
    "undirected_pairs",
]


def undirected_pairs(edge_index: torch.Tensor, num_nodes: int) -> torch.Tensor:
    """Unique undirected pairs ``[2, M]`` (``u < v``, sorted by key) of ``edge_index [2, E]``."""
    check_edge_index(edge_index, num_nodes)
    ei = edge_index.long()
    u = torch.minimum(ei[0], ei[1])
    v = torch.maximum(ei[0], ei[1])
    keep = u != v
    keys = torch.unique(u[keep] * num_nodes + v[keep])
    return torch.stack([keys // num_nodes, keys % num_nodes]) if num_nodes else keys.view(2, 0)


def pairs_to_edge_index(pairs: torch.Tensor, num_nodes: int) -> torch.Tensor:
    """Both directions of undirected ``pairs [2, M]``, sorted by (row, col): ``[2, 2M]``."""
    ei = torch.cat([pairs, pairs.flip(0)], dim=1)
    order = torch.argsort(ei[0] * num_nodes + ei[1])
    return ei[:, order]


def _budget(m: int, n_perturbations: int | None, rate: float | None) -> int:
    if (n_perturbations is None) == (rate is None):
        raise ValueError("give exactly one of n_perturbations and rate")
    if rate is not None:
        if not 0.0 <= rate:
            raise ValueError(f"rate must be >= 0, got {rate}")
        return int(rate * m)
    if n_perturbations < 0:
        raise ValueError(f"n_perturbations must be >= 0, got {n_perturbations}")
    return int(n_perturbations)


def _sample_non_edges(
    existing_keys: torch.Tensor,
    num_nodes: int,
    count: int,
    generator: torch.Generator | None,
    labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """``count`` distinct uniform non-edge pairs (different labels if given): ``[2, count]``."""
    device = existing_keys.device
    max_pairs = num_nodes * (num_nodes - 1) // 2
    if count > max_pairs - existing_keys.numel():
        raise ValueError(
            f"cannot insert {count} edges: only {max_pairs - existing_keys.numel()} non-edges "
            f"among {num_nodes} nodes"
        )
    found = torch.empty(0, dtype=torch.long, device=device)
    for _ in range(1000):  # rejection rounds; each draws a whole batch at once
        need = count - found.numel()
        if need <= 0:
            break
        draw = 2 * need + 64
        a = torch.randint(num_nodes, (draw,), generator=generator).to(device)
        b = torch.randint(num_nodes, (draw,), generator=generator).to(device)
        u, v = torch.minimum(a, b), torch.maximum(a, b)
        ok = u != v
        if labels is not None:
            ok &= labels[u] != labels[v]
        keys = (u * num_nodes + v)[ok]
        keys = keys[~torch.isin(keys, existing_keys) & ~torch.isin(keys, found)]
        keys = torch.unique(keys)
        # unique() sorts; a random subset keeps the accepted pairs uniform over non-edges.
        keys = keys[torch.randperm(keys.numel(), generator=generator).to(device)[:need]]
        found = torch.cat([found, keys])
    else:
        raise ValueError(f"could not find {count} admissible non-edges (too dense a graph?)")
    return torch.stack([found // num_nodes, found % num_nodes])


def _choose(pairs: torch.Tensor, count: int, generator: torch.Generator | None) -> torch.Tensor:
    """Boolean mask over the columns of ``pairs`` selecting ``count`` uniformly at random."""
    m = pairs.shape[1]
    if count > m:
        raise ValueError(f"cannot remove {count} edges: only {m} candidates")
    mask = torch.zeros(m, dtype=torch.bool, device=pairs.device)
    mask[torch.randperm(m, generator=generator).to(pairs.device)[:count]] = True
    return mask


def random_perturbation(
    edge_index: torch.Tensor,
    num_nodes: int,
    *,
    n_perturbations: int | None = None,
    rate: float | None = None,
    mode: str = "add",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Randomly insert, delete or flip undirected edges.

    Args:
        edge_index: ``[2, E]`` int64/int32 undirected graph (either or both directions).
        num_nodes: ``N``; entries of ``edge_index`` must lie in ``[0, N)``.
        n_perturbations / rate: budget, either a count or a fraction of the ``M`` undirected
            edges (exactly one of them).
        mode: ``"add"`` (DeepRobust's default), ``"remove"`` or ``"flip"`` (each perturbation
            is a deletion or an insertion with probability 1/2).
        generator: CPU ``torch.Generator`` for reproducibility.

    Returns:
        ``[2, 2M']`` int64 symmetric edge_index of the perturbed graph, on the input's device.
    """
    if mode not in ("add", "remove", "flip"):
        raise ValueError(f"mode must be 'add', 'remove' or 'flip', got {mode!r}")
    pairs = undirected_pairs(edge_index, num_nodes)
    n = _budget(pairs.shape[1], n_perturbations, rate)
    if mode == "add":
        n_remove = 0
    elif mode == "remove":
        n_remove = n
    else:
        n_remove = int(torch.randint(2, (n,), generator=generator).sum())
    drop = _choose(pairs, n_remove, generator)
    keys = pairs[0] * num_nodes + pairs[1]
    added = _sample_non_edges(keys, num_nodes, n - n_remove, generator)
    return pairs_to_edge_index(torch.cat([pairs[:, ~drop], added], dim=1), num_nodes)


def dice_perturbation(
    edge_index: torch.Tensor,
    labels: torch.Tensor,
    *,
    n_perturbations: int | None = None,
    rate: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DICE: delete intra-class edges and insert inter-class edges, ``n`` changes in total.

    Args:
        edge_index: ``[2, E]`` int64/int32 undirected graph.
        labels: ``[N]`` integer node labels (defines ``N``).
        n_perturbations / rate: budget (exactly one), ``rate`` relative to the ``M`` undirected
            edges.
        generator: CPU ``torch.Generator``.

    Returns:
        ``[2, 2M']`` int64 symmetric edge_index; deletions are capped at the number of
        intra-class edges (the rest become insertions).
    """
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1:
        raise ValueError(f"labels must be a 1-D tensor [N], got {getattr(labels, 'shape', None)}")
    if labels.is_floating_point():
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    num_nodes = labels.numel()
    pairs = undirected_pairs(edge_index, num_nodes)
    labels = labels.to(pairs.device)
    n = _budget(pairs.shape[1], n_perturbations, rate)
    # One fair coin per perturbation chooses deletion or insertion (DeepRobust's DICE).
    n_remove = int(torch.randint(2, (n,), generator=generator).sum())
    intra = labels[pairs[0]] == labels[pairs[1]]
    n_remove = min(n_remove, int(intra.sum()))
    drop = torch.zeros_like(intra)
    drop[intra.nonzero().squeeze(1)] = _choose(pairs[:, intra], n_remove, generator)
    keys = pairs[0] * num_nodes + pairs[1]
    added = _sample_non_edges(keys, num_nodes, n - n_remove, generator, labels=labels)
    return pairs_to_edge_index(torch.cat([pairs[:, ~drop], added], dim=1), num_nodes)
