"""STABLE (Li et al., KDD 2022): unsupervised structure refinement of a poisoned graph.

Pipeline of :class:`STABLE` (a PyG ``BaseTransform``), following the official ``likuanppd/STABLE``:

1. **Jaccard pre-pruning**: drop edges whose binarised raw features have Jaccard ``< jt``
   (:func:`jaccard_prune`); the dropped edges are remembered.
2. **Contrastive embeddings** (:class:`STABLEContrastive`, DGI/GraphCL style): two views = the
   pre-pruned graph plus a random ``recover_percent`` of the dropped edges put back; a
   1-layer GCN encoder (``D^-1/2 (A + beta I) D^-1/2``, 512-d, PReLU), summaries
   ``sigmoid(mean(h_view))``, a bilinear discriminator scoring the pre-pruned graph's
   embeddings (positive) against those of row-shuffled features (negative) with both summaries;
   BCE-with-logits, Adam, early stopping on the loss. ``Z = encoder(x, pre-pruned graph)``.
3. **Refinement of the perturbed graph** (:func:`refine_edges`): drop edges with
   ``cos(z_u, z_v) <= cos``; add, for every node, its ``k`` most similar nodes among nodes of
   degree > 1 (blocked top-k, no ``N x N`` matrix). As in the official code ``k`` counts the node
   itself (dropped afterwards), so usually ``k - 1`` neighbours are added, and the additions are
   directed (``j -> i``, i aggregates from j) unless ``symmetrize_added=True``.

The refined ``Data`` carries ``Z`` as ``x`` (STABLE trains its classifier on ``Z``) and as
``stable_embedding``; classify it with :class:`AdvancedGCN`.

Example::

    >>> transform = STABLE(jaccard_threshold=0.03, cos_threshold=0.1, k=5, progress=False)
    >>> refined = transform(data)          # data: x [N, D], edge_index [2, E]
    >>> model = AdvancedGCN(refined.num_features, num_classes, alpha=0.3)
"""

from __future__ import annotations

import copy
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch_geometric.transforms import BaseTransform
from tqdm.auto import tqdm

from stablecore.methods.graph_attacks import pairs_to_edge_index, undirected_pairs
from stablecore.methods.graph_similarity import (
    check_edge_index,
    edge_cosine_similarity,
    edge_jaccard_similarity,
    topk_cosine_neighbors,
)

__all__ = ["STABLE", "STABLEContrastive", "jaccard_prune", "normalized_adjacency", "refine_edges"]


def jaccard_prune(
    x: torch.Tensor, edge_index: torch.Tensor, threshold: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split the undirected pairs of ``edge_index`` by raw-feature Jaccard similarity.

    Returns ``(kept [2, M1], removed [2, M2])`` undirected pairs (``u < v``); an edge is removed
    when its Jaccard similarity is ``< threshold``.
    """
    pairs = undirected_pairs(edge_index, x.shape[0])
    keep = edge_jaccard_similarity(x, pairs) >= threshold
    return pairs[:, keep], pairs[:, ~keep]


def normalized_adjacency(pairs: torch.Tensor, num_nodes: int, beta: float = 2.0) -> torch.Tensor:
    """Sparse CSR ``D^-1/2 (A + beta I) D^-1/2`` of undirected ``pairs [2, M]``: ``[N, N]``."""
    ei = pairs_to_edge_index(pairs, num_nodes)
    loops = torch.arange(num_nodes, device=pairs.device)
    ei = torch.cat([ei, torch.stack([loops, loops])], dim=1)
    w = torch.cat([torch.ones(ei.shape[1] - num_nodes), torch.full((num_nodes,), float(beta))])
    w = w.to(pairs.device)
    deg = torch.zeros(num_nodes, device=pairs.device).index_add_(0, ei[0], w)
    inv = deg.pow(-0.5)
    w = inv[ei[0]] * w * inv[ei[1]]
    adj = torch.sparse_coo_tensor(ei, w, (num_nodes, num_nodes), check_invariants=False)
    # CSR SpMM (forward and backward) is ~1.5x faster than COO on CPU.
    return _to_csr(adj.coalesce())


def _clock() -> tuple[float, float]:
    # Wall and process CPU time: on a shared CPU box the wall clock mostly measures neighbours.
    return time.perf_counter(), time.process_time()


def _to_csr(t: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        return t.to_sparse_csr()


class _ConstSpMM(torch.autograd.Function):
    """``a @ h`` for a constant sparse ``a`` whose transpose ``a_t`` is known.

    PyTorch's sparse-CSR autograd transposes (re-sorts) ``a`` on every backward; STABLE's
    adjacencies are symmetric and its features constant, so the transpose is built once (or is
    ``a`` itself) and the backward is one plain SpMM.
    """

    @staticmethod
    def forward(ctx, a: torch.Tensor, a_t: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        ctx.a_t = a_t
        return a @ h

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return None, None, ctx.a_t @ grad


class _BiasPReLU(torch.autograd.Function):
    """``prelu(h + bias)`` with one shared slope, backward built from fast elementwise kernels.

    ``nn.PReLU``'s generic backward kernel (and ``torch.where``, unvectorised on some CPUs) cost
    several times the SpMM they follow on Cora; ``threshold_backward`` (ReLU's backward), one
    fused multiply-add and a BLAS dot give the same gradients.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, bias: torch.Tensor, slope: torch.Tensor) -> torch.Tensor:
        u = h + bias
        ctx.save_for_backward(u, slope)
        return F.prelu(u, slope)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        u, slope = ctx.saved_tensors
        grad = grad.contiguous()
        # d prelu / du = 1 (u > 0) or slope: grad * slope + (1 - slope) * relu'(u) * grad.
        g_u = torch.ops.aten.threshold_backward(grad, u, 0.0).mul_(1.0 - slope)
        g_u.add_(grad * slope)
        g_slope = torch.dot(grad.reshape(-1), u.clamp(max=0).reshape(-1)).reshape(slope.shape)
        g_bias = grad.new_ones(u.shape[0]) @ g_u
        return g_u, g_bias, g_slope


class STABLEContrastive(nn.Module):
    """The module STABLE trains: 1-layer GCN encoder + bilinear discriminator (DGI).

    ``encode(x [N, in], adj [N, N] sparse) -> [N, hidden]``; ``loss(x, adj, view1, view2, perm)``
    is the summed two-view DGI logit BCE. ``x`` may be dense or sparse CSR (Cora's bag of words
    is 1 % dense, so ``x @ W`` as SpMM is ~100x cheaper than a dense GEMM). The adjacencies are
    those of :func:`normalized_adjacency` (symmetric, which the backward relies on).
    """

    def __init__(self, in_channels: int, hidden: int = 512) -> None:
        super().__init__()
        self.in_channels, self.hidden = in_channels, hidden
        self.weight = nn.Parameter(torch.empty(in_channels, hidden))
        self.bias = nn.Parameter(torch.zeros(hidden))
        self.act = nn.PReLU()
        self.disc = nn.Bilinear(hidden, hidden, 1)
        nn.init.xavier_uniform_(self.weight)
        nn.init.xavier_uniform_(self.disc.weight)
        nn.init.zeros_(self.disc.bias)

    def _project(self, x: torch.Tensor, x_t: torch.Tensor | None = None) -> torch.Tensor:
        if x.shape[-1] != self.in_channels:
            raise ValueError(f"x must have shape [N, {self.in_channels}], got {tuple(x.shape)}")
        if x_t is not None and x.layout != torch.strided:
            return _ConstSpMM.apply(x, x_t, self.weight)
        return x @ self.weight

    def _propagate(self, adj: torch.Tensor, xw: torch.Tensor, copies: int = 1) -> torch.Tensor:
        # ``copies`` > 1: xw holds that many [N, H] blocks side by side, each gets the bias.
        h = _ConstSpMM.apply(adj, adj, xw) if adj.layout != torch.strided else adj @ xw
        bias = self.bias if copies == 1 else self.bias.repeat(copies)
        return _BiasPReLU.apply(h, bias, self.act.weight)

    def encode(self, x: torch.Tensor, adj: torch.Tensor) -> torch.Tensor:
        return self._propagate(adj, self._project(x))

    def _score(self, h: torch.Tensor, summary: torch.Tensor) -> torch.Tensor:
        # h_i^T W s with one summary for all rows = h @ (W s): O(N H) instead of nn.Bilinear's
        # O(N H^2) (the bilinear was ~90 % of an epoch on Cora).
        return h @ (self.disc.weight[0] @ summary.reshape(-1)) + self.disc.bias

    def loss(
        self,
        x: torch.Tensor,
        adj: torch.Tensor,
        view1: torch.Tensor,
        view2: torch.Tensor,
        perm: torch.Tensor,
        *,
        x_t: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Two-view DGI loss; ``x_t``: optional precomputed ``x.T`` (sparse CSR ``[in, N]``)
        that makes the backward of a sparse ``x @ W`` one SpMM instead of a transpose + SpMM."""
        # x @ W is shared by all four passes; shuffling the rows of x = shuffling rows of x @ W.
        xw = self._project(x, x_t)
        n = xw.shape[0]
        # Positives and negatives share the adjacency: one SpMM over [xw | xw[perm]] reads the
        # sparse structure once (and a 2H-wide SpMM runs at a better rate than two H-wide ones).
        h_both = self._propagate(adj, torch.cat([xw, xw[perm]], dim=1), copies=2)
        h_pos, h_neg = h_both[:, : self.hidden], h_both[:, self.hidden :]
        logits_pos = h_pos.new_zeros(n)
        logits_neg = h_pos.new_zeros(n)
        for view in (view1, view2):
            summary = torch.sigmoid(self._propagate(view, xw).mean(dim=0, keepdim=True))
            logits_pos = logits_pos + self._score(h_pos, summary)
            logits_neg = logits_neg + self._score(h_neg, summary)
        logits = torch.cat([logits_pos, logits_neg])
        labels = torch.cat([torch.ones_like(logits_pos), torch.zeros_like(logits_neg)])
        return F.binary_cross_entropy_with_logits(logits, labels)


def refine_edges(
    edge_index: torch.Tensor,
    z: torch.Tensor,
    *,
    cos_threshold: float = 0.1,
    k: int = 5,
    degree_threshold: int = 1,
    symmetrize_added: bool = False,
    row_block: int = 1024,
    col_block: int = 8192,
    progress: bool = False,
) -> torch.Tensor:
    """STABLE step 3 on the perturbed graph: cosine pruning, then top-k neighbour addition.

    Args:
        edge_index: ``[2, E]`` perturbed undirected graph.
        z: ``[N, H]`` node embeddings.
        cos_threshold: edges with ``cos(z_u, z_v) <= cos_threshold`` are dropped.
        k: top-k size *including the node itself* (official semantics; self is dropped).
        degree_threshold: only nodes with pruned-graph degree ``> degree_threshold`` are added.

    Returns:
        ``[2, E']`` int64 coalesced edge_index (pruned graph symmetric; additions ``j -> i``).
    """
    n = z.shape[0]
    pairs = undirected_pairs(edge_index, n)
    pairs = pairs[:, edge_cosine_similarity(z, pairs) > cos_threshold]
    ei = pairs_to_edge_index(pairs, n)
    if k > 0:
        deg = torch.bincount(ei[0], minlength=n)
        _, nbr = topk_cosine_neighbors(
            z,
            k,
            candidate_mask=deg > degree_threshold,
            exclude_self=False,
            row_block=row_block,
            col_block=col_block,
            progress=progress,
        )
        tgt = torch.arange(n, device=z.device).unsqueeze(1).expand_as(nbr)
        ok = (nbr >= 0) & (nbr != tgt)
        added = torch.stack([nbr[ok], tgt[ok]])
        if symmetrize_added:
            added = torch.cat([added, added.flip(0)], dim=1)
        keys = torch.unique(torch.cat([ei[0] * n + ei[1], added[0] * n + added[1]]))
        ei = torch.stack([keys // n, keys % n])
    return ei


class STABLE(BaseTransform):
    """STABLE structure refinement as a transform: ``refined = STABLE(...)(data)``.

    Args:
        jaccard_threshold: pre-pruning threshold ``jt`` (0 disables; README Cora: 0.03).
        cos_threshold: cosine pruning threshold (README Cora 0.1 - 0.25).
        k: top-k size including self (README Cora 1 - 7).
        hidden: embedding size (512).
        beta: self-loop weight of the encoder's adjacency (2).
        recover_percent: share of Jaccard-pruned edges put back in each view (0.2).
        lr, max_epochs, patience: contrastive training (1e-3, 10000, 20).
        replace_features: put ``Z`` into ``data.x`` (STABLE's classifier input).
        symmetrize_added: also add ``i -> j`` for every added ``j -> i``.
        normalize_features: L1 row-normalise ``x`` before the encoder (DGI preprocessing;
            Jaccard pruning always uses the raw non-zero pattern).
        seed: seeds the views, negatives and initialisation (global RNG untouched).
        device: where to train (default: ``data.x``'s device).
        progress: tqdm bar over epochs.

    After a call, ``self.model`` holds the trained :class:`STABLEContrastive` and
    ``self.stats`` the edge counts of each stage, the epochs run and each stage's wall-clock
    and process-CPU seconds (``seconds_jaccard`` / ``cpu_seconds_jaccard``, ``..._contrastive``,
    ``..._refine``; for profiling).
    """

    def __init__(
        self,
        jaccard_threshold: float = 0.03,
        cos_threshold: float = 0.1,
        k: int = 5,
        *,
        hidden: int = 512,
        beta: float = 2.0,
        recover_percent: float = 0.2,
        lr: float = 1e-3,
        max_epochs: int = 10000,
        patience: int = 20,
        replace_features: bool = True,
        symmetrize_added: bool = False,
        normalize_features: bool = True,
        seed: int = 0,
        device: torch.device | str | None = None,
        progress: bool = True,
        row_block: int = 1024,
        col_block: int = 8192,
    ) -> None:
        if not 0.0 <= recover_percent <= 1.0:
            raise ValueError(f"recover_percent must lie in [0, 1], got {recover_percent}")
        if k < 0 or hidden < 1 or max_epochs < 0 or patience < 1:
            raise ValueError(
                f"need k >= 0, hidden >= 1, max_epochs >= 0, patience >= 1; got "
                f"k={k}, hidden={hidden}, max_epochs={max_epochs}, patience={patience}"
            )
        self.jaccard_threshold, self.cos_threshold, self.k = jaccard_threshold, cos_threshold, k
        self.hidden, self.beta, self.recover_percent = hidden, beta, recover_percent
        self.lr, self.max_epochs, self.patience = lr, max_epochs, patience
        self.replace_features, self.symmetrize_added = replace_features, symmetrize_added
        self.normalize_features = normalize_features
        self.seed, self.device, self.progress = seed, device, progress
        self.row_block, self.col_block = row_block, col_block
        self.model: STABLEContrastive | None = None
        self.stats: dict[str, float] = {}

    def _lap(self, stage: str, start: tuple[float, float]) -> None:
        wall, cpu = _clock()
        self.stats[f"seconds_{stage}"] = wall - start[0]
        self.stats[f"cpu_seconds_{stage}"] = cpu - start[1]

    def _view(self, kept, removed, gen) -> torch.Tensor:
        n_back = int(round(self.recover_percent * removed.shape[1]))
        pick = torch.randperm(removed.shape[1], generator=gen)[:n_back].to(removed.device)
        return torch.cat([kept, removed[:, pick]], dim=1)

    def fit_embeddings(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        """Steps 1-2: Jaccard pre-pruning and contrastive training; returns ``Z [N, hidden]``."""
        n = x.shape[0]
        device = torch.device(self.device) if self.device is not None else x.device
        x = x.to(device)
        start = _clock()
        kept, removed = jaccard_prune(x, edge_index.to(device), self.jaccard_threshold)
        self.stats.update(jaccard_kept=kept.shape[1], jaccard_removed=removed.shape[1])
        self._lap("jaccard", start)
        start = _clock()
        gen = torch.Generator().manual_seed(self.seed)
        adj = normalized_adjacency(kept, n, self.beta)
        view1 = normalized_adjacency(self._view(kept, removed, gen), n, self.beta)
        view2 = normalized_adjacency(self._view(kept, removed, gen), n, self.beta)
        dense = x.to_dense() if x.layout != torch.strided else x
        dense = dense.to(torch.float32)
        if self.normalize_features:
            # Row-normalised features as in DGI/GraphCL preprocessing: on raw bag-of-words
            # (row sums ~18 on Cora) the DGI loss jumps from 0.69 to 3.2 in the first Adam step
            # and early stopping fires at epoch ~20 with useless embeddings.
            dense = dense / dense.abs().sum(dim=1, keepdim=True).clamp_min(1e-12)
        feats = _to_csr(dense) if (dense != 0).float().mean() < 0.1 else dense
        # The transpose of constant sparse features, built once for every epoch's backward.
        feats_t = _to_csr(dense.T.contiguous()) if feats.layout != torch.strided else None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            model = STABLEContrastive(x.shape[1], self.hidden).to(device)
        opt = torch.optim.Adam(model.parameters(), lr=self.lr)
        best, best_state, wait = float("inf"), copy.deepcopy(model.state_dict()), 0
        bar = tqdm(range(self.max_epochs), disable=not self.progress, desc="STABLE contrastive")
        epochs_run = 0
        for _ in bar:
            epochs_run += 1
            perm = torch.randperm(n, generator=gen).to(device)
            model.train()
            opt.zero_grad()
            loss = model.loss(feats, adj, view1, view2, perm, x_t=feats_t)
            loss.backward()
            opt.step()
            value = float(loss.detach())
            bar.set_postfix(loss=f"{value:.4f}", refresh=False)
            if value < best:
                best, best_state, wait = value, copy.deepcopy(model.state_dict()), 0
            else:
                wait += 1
                if wait >= self.patience:
                    break
        self.stats["epochs"] = epochs_run
        model.load_state_dict(best_state)
        model.eval()
        self.model = model
        with torch.no_grad():
            z = model.encode(feats, adj)
        self._lap("contrastive", start)
        return z

    def forward(self, data):
        x = getattr(data, "x", None)
        if not isinstance(x, torch.Tensor) or x.dim() != 2:
            raise ValueError(f"data.x must be a [N, D] tensor, got {getattr(x, 'shape', x)}")
        check_edge_index(data.edge_index, x.shape[0], "data.edge_index")
        z = self.fit_embeddings(x, data.edge_index)
        start = _clock()
        ei = refine_edges(
            data.edge_index.to(z.device),
            z,
            cos_threshold=self.cos_threshold,
            k=self.k,
            symmetrize_added=self.symmetrize_added,
            row_block=self.row_block,
            col_block=self.col_block,
            progress=self.progress,
        )
        self.stats["refined_edges"] = ei.shape[1]
        self._lap("refine", start)
        data.edge_index = ei.to(data.edge_index.device)
        for key in ("edge_attr", "edge_weight"):  # per-edge attributes no longer line up
            if key in data:
                del data[key]
        z = z.to(x.device)
        data.stable_embedding = z
        if self.replace_features:
            data.x = z
        return data

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(jaccard_threshold={self.jaccard_threshold}, "
            f"cos_threshold={self.cos_threshold}, k={self.k}, hidden={self.hidden})"
        )
