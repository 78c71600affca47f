"""STABLE's "advanced GCN": ``D^alpha (A + I) D^alpha``, row-normalised, as a PyG conv.

With ``d = `` row sums of ``A + I`` (the number of neighbours a node aggregates from, itself
included), row-normalising ``D^alpha (A+I) D^alpha`` cancels the target's own factor:

    w_ij = d_j^alpha / sum_{k in N(i) + {i}} d_k^alpha        (edge j -> i)

``alpha > 0`` trusts high-degree neighbours more (adversarial insertions tend to hit low-degree
nodes). At exactly ``alpha = -0.5`` STABLE's code uses the vanilla symmetric GCN weights
``d_i^-1/2 d_j^-1/2`` instead (not row-normalised), so :class:`AdvancedGCNConv` with
``alpha=-0.5`` is PyG's ``GCNConv``; this discontinuity is the official behaviour.

Example::

    >>> conv = AdvancedGCNConv(16, 4, alpha=0.3)
    >>> out = conv(torch.randn(10, 16), torch.tensor([[0, 1], [1, 0]]))  # [10, 4]
"""

from __future__ import annotations

import copy
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch_geometric.nn import MessagePassing
from torch_geometric.nn.inits import zeros
from torch_geometric.utils import add_remaining_self_loops, remove_self_loops, scatter

from stablecore.methods.graph_similarity import check_edge_index

__all__ = ["AdvancedGCN", "AdvancedGCNConv", "advanced_gcn_norm", "train_node_classifier"]


def advanced_gcn_norm(
    edge_index: torch.Tensor,
    num_nodes: int,
    alpha: float = -0.5,
    edge_weight: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Edge weights of STABLE's normalised adjacency (self-loops added, weight 1).

    Args:
        edge_index: ``[2, E]`` (row 0 = source ``j``, row 1 = target ``i``; PyG's flow).
        num_nodes: ``N``.
        alpha: degree exponent; ``-0.5`` gives vanilla GCN normalisation.
        edge_weight: optional ``[E]`` weights of ``A`` (default 1).

    Returns:
        ``(edge_index [2, E'], weight [E'])`` including one self-loop per node.
    """
    check_edge_index(edge_index, num_nodes)
    edge_index = edge_index.long()
    if edge_weight is None:
        edge_weight = torch.ones(edge_index.shape[1], dtype=dtype, device=edge_index.device)
    elif edge_weight.shape != (edge_index.shape[1],):
        raise ValueError(
            f"edge_weight must have shape [{edge_index.shape[1]}], got {tuple(edge_weight.shape)}"
        )
    edge_index, edge_weight = remove_self_loops(edge_index, edge_weight)
    edge_index, edge_weight = add_remaining_self_loops(edge_index, edge_weight, 1.0, num_nodes)
    src, dst = edge_index
    deg = scatter(edge_weight, dst, 0, dim_size=num_nodes, reduce="sum")
    if alpha == -0.5:
        inv = deg.pow(-0.5)
        return edge_index, inv[src] * edge_weight * inv[dst]
    w = edge_weight * deg.pow(alpha)[src]
    return edge_index, w / scatter(w, dst, 0, dim_size=num_nodes, reduce="sum")[dst]


class AdvancedGCNConv(MessagePassing):
    """``x' = Â x W + b`` with STABLE's degree-weighted adjacency ``Â``.

    Args:
        in_channels, out_channels: feature sizes (``x: [N, in]`` -> ``[N, out]``).
        alpha: degree exponent (``-0.5``: vanilla GCN; README uses up to ``0.6`` on Cora).
        cached: reuse the normalisation of the first call (transductive training).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        alpha: float = -0.5,
        cached: bool = False,
        bias: bool = True,
    ) -> None:
        super().__init__(aggr="add")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.alpha, self.cached = float(alpha), cached
        self.lin = nn.Linear(in_channels, out_channels, bias=False)
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self._cache: tuple[torch.Tensor, torch.Tensor] | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Glorot like PyG's GCNConv, so alpha=-0.5 reproduces it from the same seed.
        nn.init.xavier_uniform_(self.lin.weight)
        if self.bias is not None:
            zeros(self.bias)
        self._cache = None

    def forward(
        self, x: torch.Tensor, edge_index: torch.Tensor, edge_weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must have shape [N, {self.in_channels}], got {tuple(x.shape)}")
        if self._cache is not None and self.cached:
            ei, w = self._cache
        else:
            ei, w = advanced_gcn_norm(edge_index, x.shape[0], self.alpha, edge_weight, x.dtype)
            if self.cached:
                self._cache = (ei, w)
        # A sparse x (bag-of-words features) goes through SpMM instead of a dense GEMM.
        h = self.lin(x) if x.layout == torch.strided else x @ self.lin.weight.T
        out = self.propagate(ei, x=h, edge_weight=w)
        return out + self.bias if self.bias is not None else out

    def message(self, x_j: torch.Tensor, edge_weight: torch.Tensor) -> torch.Tensor:
        return edge_weight.unsqueeze(-1) * x_j

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.in_channels}, {self.out_channels}, alpha={self.alpha})"


def _dropout_any_layout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    # Dropout zeroes entries and rescales the rest, so on a sparse CSR tensor it only needs to
    # touch the stored values (Cora: 49k instead of 3.9M draws, the bulk of a GCN epoch on CPU).
    if x.layout == torch.sparse_csr:
        vals = F.dropout(x.values(), p, training)
        with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta"
            warnings.simplefilter("ignore", UserWarning)
            return torch.sparse_csr_tensor(
                x.crow_indices(), x.col_indices(), vals, x.shape, check_invariants=False
            )
    return F.dropout(x, p, training)


class AdvancedGCN(nn.Module):
    """Two-layer GCN on :class:`AdvancedGCNConv` (STABLE's classifier: hidden 16, dropout 0.5).

    ``forward(x [N, in], edge_index [2, E]) -> logits [N, num_classes]``; ``x`` may be dense or
    sparse CSR (same result in distribution, far cheaper for bag-of-words features).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        hidden: int = 16,
        alpha: float = -0.5,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        # Not cached: the normalisation is one scatter over E edges, and a model that is later
        # applied to another graph must not silently reuse the first graph's weights.
        self.conv1 = AdvancedGCNConv(in_channels, hidden, alpha=alpha)
        self.conv2 = AdvancedGCNConv(hidden, num_classes, alpha=alpha)
        self.dropout = dropout

    def reset_parameters(self) -> None:
        self.conv1.reset_parameters()
        self.conv2.reset_parameters()

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        x = _dropout_any_layout(x, self.dropout, self.training)
        x = F.relu(self.conv1(x, edge_index))
        x = F.dropout(x, self.dropout, self.training)
        return self.conv2(x, edge_index)


def train_node_classifier(
    model: nn.Module,
    data,
    *,
    epochs: int = 200,
    lr: float = 0.01,
    weight_decay: float = 5e-4,
) -> dict[str, float]:
    """Full-batch training with best-validation model selection (STABLE's protocol).

    ``data`` needs ``x``, ``edge_index``, ``y`` and boolean ``train_mask``/``val_mask``/
    ``test_mask``. Returns ``{"val_acc", "test_acc", "epoch"}`` of the best-val epoch; the
    model is left holding those weights.
    """
    for name in ("train_mask", "val_mask", "test_mask"):
        mask = getattr(data, name, None)
        if mask is None or mask.dtype != torch.bool or mask.shape != (data.num_nodes,):
            raise ValueError(f"data.{name} must be a bool tensor [{data.num_nodes}]")
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    best = {"val_acc": -1.0, "test_acc": 0.0, "epoch": -1}
    best_state = None
    for epoch in range(epochs):
        model.train()
        opt.zero_grad()
        out = model(data.x, data.edge_index)
        F.cross_entropy(out[data.train_mask], data.y[data.train_mask]).backward()
        opt.step()
        model.eval()
        with torch.no_grad():
            pred = model(data.x, data.edge_index).argmax(1)
        val = float((pred[data.val_mask] == data.y[data.val_mask]).float().mean())
        if val > best["val_acc"]:
            test = float((pred[data.test_mask] == data.y[data.test_mask]).float().mean())
            best = {"val_acc": val, "test_acc": test, "epoch": epoch}
            best_state = copy.deepcopy(model.state_dict())
    if best_state is not None:
        model.load_state_dict(best_state)
    return best
