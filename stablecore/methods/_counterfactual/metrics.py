"""Counterfactual metrics (cost, validity under retrained models, LOF) and the MLP harness."""

from __future__ import annotations

import torch
from torch import Tensor

from ._common import _check_points, predict


def cost(x: Tensor, x_cf: Tensor, p: int = 1) -> Tensor:
    """Per-point Lp distance ``||x_cf - x||_p``, ``x, x_cf: [B, d]`` -> ``[B]``."""
    _check_points(x)
    if x_cf.shape != x.shape:
        raise ValueError(f"x {tuple(x.shape)} and x_cf {tuple(x_cf.shape)} must have equal shapes")
    return (x_cf - x).norm(p=p, dim=1)


def validity(models, x_cf: Tensor, target: int = 1, *, output: str = "logits") -> Tensor:
    """Fraction of ``x_cf: [B, d]`` each model predicts as ``target``: ``[len(models)]`` float.

    With models retrained from other seeds, ``.mean()`` is the paper's robust validity.
    """
    _check_points(x_cf, "x_cf")
    if isinstance(models, (list, tuple, torch.nn.ModuleList)):
        models = list(models)
    elif callable(models):
        models = [models]
    else:
        raise TypeError(f"models must be a model or a list of models, got {type(models).__name__}")
    if len(models) == 0:
        raise ValueError("validity needs at least one model")
    return torch.stack([(predict(m, x_cf, output) == target).double().mean() for m in models])


def lof(reference: Tensor, query: Tensor, n_neighbors: int = 1) -> Tensor:
    """Local outlier factor of ``query: [Q, d]`` against ``reference: [M, d]`` -> ``[Q]``.

    Novelty-mode LOF (as scikit-learn's ``LocalOutlierFactor(novelty=True)``): the neighbours of
    a reference point exclude itself; reach-dist(q, o) = max(k-dist(o), d(q, o)); values near 1 are
    inliers. Duplicated reference points make densities huge, as in scikit-learn (same 1e-10 guard).
    """
    _check_points(reference, "reference")
    _check_points(query, "query")
    if query.shape[1] != reference.shape[1]:
        raise ValueError(
            f"query {tuple(query.shape)} and reference {tuple(reference.shape)} differ"
        )
    k = int(n_neighbors)
    if not 1 <= k < reference.shape[0]:
        raise ValueError(f"n_neighbors must be in [1, {reference.shape[0] - 1}], got {n_neighbors}")
    ref = reference.double()
    d_rr = torch.cdist(ref, ref)
    d_rr.fill_diagonal_(float("inf"))
    dist_r, nn_r = d_rr.topk(k, dim=1, largest=False)
    kdist = dist_r[:, -1]
    lrd_ref = 1.0 / (torch.maximum(dist_r, kdist[nn_r]).mean(1) + 1e-10)
    dist_q, nn_q = torch.cdist(query.double(), ref).topk(k, dim=1, largest=False)
    lrd_q = 1.0 / (torch.maximum(dist_q, kdist[nn_q]).mean(1) + 1e-10)
    return (lrd_ref[nn_q].mean(1) / lrd_q).to(query.dtype)


def lof_inlier(reference: Tensor, query: Tensor, n_neighbors: int = 1) -> Tensor:
    """+1 (inlier) / -1 (outlier) per query, scikit-learn's ``predict`` rule (LOF <= 1.5)."""
    score = lof(reference, query, n_neighbors)
    return torch.where(score <= 1.5, 1, -1)


def make_mlp(
    d_in: int, hidden: tuple[int, ...] = (128, 128), n_classes: int = 2
) -> torch.nn.Module:
    """The paper's classifier: ReLU MLP ``d_in -> hidden... -> n_classes`` logits."""
    layers: list[torch.nn.Module] = []
    for h in hidden:
        layers += [torch.nn.Linear(d_in, h), torch.nn.ReLU()]
        d_in = h
    return torch.nn.Sequential(*layers, torch.nn.Linear(d_in, n_classes))


def fit_classifier(
    x: Tensor,
    y: Tensor,
    *,
    seed: int,
    hidden: tuple[int, ...] = (128, 128),
    epochs: int = 50,
    batch_size: int = 256,
    lr: float = 1e-3,
) -> torch.nn.Module:
    """Train :func:`make_mlp` on ``x: [N, d]``, ``y: [N]`` int64 (Adam, cross-entropy) and
    return it in eval mode; ``seed`` sets both the init and the batch order (a "retrained model")."""
    _check_points(x)
    if y.shape != (x.shape[0],) or y.dtype != torch.long:
        raise ValueError(f"y must be int64 of shape [{x.shape[0]}], got {y.dtype} {tuple(y.shape)}")
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = make_mlp(x.shape[1], hidden, max(2, int(y.max()) + 1)).to(x.device, x.dtype)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    for _ in range(epochs):
        perm = torch.randperm(x.shape[0], generator=gen).to(x.device)
        for s in range(0, x.shape[0], batch_size):
            idx = perm[s : s + batch_size]
            loss = torch.nn.functional.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return net.eval()
