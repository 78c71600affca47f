"""torch_geometric adapters: STABLE structure refinement and the advanced (alpha-degree) GCN.

Importing this package imports ``torch_geometric`` (``pip install stablecore[graph]``).
"""

from __future__ import annotations

from .advanced_gcn import AdvancedGCN, AdvancedGCNConv, advanced_gcn_norm, train_node_classifier
from .stable import STABLE, STABLEContrastive, jaccard_prune, normalized_adjacency, refine_edges

__all__ = [
    "STABLE",
    "AdvancedGCN",
    "AdvancedGCNConv",
    "STABLEContrastive",
    "advanced_gcn_norm",
    "jaccard_prune",
    "normalized_adjacency",
    "refine_edges",
    "train_node_classifier",
]
