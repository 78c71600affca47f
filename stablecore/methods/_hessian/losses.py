"""Batches, scalar losses and analytic logit Hessians for :mod:`stablecore.methods._hessian.operator`."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import grad, jvp

LogitHVP = Callable[[Tensor, Tensor, Tensor], Tensor]


# ----------------------------------------------------------------------------- batches and losses
def is_single_batch(data: Any) -> bool:
    """A tensor, a mapping, or an ``(inputs, targets)`` pair whose targets are a tensor."""
    if isinstance(data, Tensor | Mapping):
        return True
    return (
        isinstance(data, tuple | list)
        and len(data) == 2
        and isinstance(data[0], Tensor | Mapping)
        and isinstance(data[1], Tensor)
    )


def batch_size(batch: Any) -> int:
    """Leading size of the first tensor found in ``batch`` (the weight of its mean loss)."""
    if isinstance(batch, Tensor):
        return int(batch.shape[0]) if batch.dim() > 0 else 1
    items = batch.values() if isinstance(batch, Mapping) else batch
    for item in items:
        if isinstance(item, Tensor | Mapping | tuple | list):
            return batch_size(item)
    return 1


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple | list):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _args_kwargs(inputs: Any) -> tuple[tuple, dict]:
    if isinstance(inputs, Mapping):
        return (), dict(inputs)
    if isinstance(inputs, tuple | list):
        return tuple(inputs), {}
    return (inputs,), {}


def _scalar_loss(loss_fn: Callable | None, out: Any, targets: Any) -> Tensor:
    if loss_fn is not None:
        loss = loss_fn(out, targets)
    elif isinstance(out, Tensor):
        loss = out
    else:  # transformers-style ModelOutput / dict with a ``loss`` entry
        loss = out["loss"] if isinstance(out, Mapping) else getattr(out, "loss", None)
    if not isinstance(loss, Tensor):
        raise ValueError(f"the loss must be a tensor; got {type(loss).__name__}")
    if loss.numel() != 1:
        raise ValueError(
            f"the loss must be a scalar (one element); got shape {tuple(loss.shape)}. "
            "Reduce it (mean or sum) before measuring sharpness."
        )
    if not loss.is_floating_point():
        raise ValueError(f"the loss must be floating point; got dtype {loss.dtype}")
    return loss.reshape(())


def forward_mode_safe(loss_fn: Callable | None) -> Callable | None:
    """``loss_fn`` with ``nn.MSELoss``/``F.mse_loss`` replaced by the same formula written out:
    in torch 2.13 forward-mode AD through ``mse_loss``'s backward fails ("ZeroTensors are
    immutable"), which breaks forward-over-reverse HVPs. Other losses are returned as they are."""
    reduction = None
    if type(loss_fn) is nn.MSELoss:
        reduction = loss_fn.reduction
    elif loss_fn is F.mse_loss:
        reduction = "mean"
    if reduction not in ("mean", "sum"):
        return loss_fn

    def mse(out: Tensor, target: Tensor) -> Tensor:
        sq = (out - target) ** 2
        return sq.mean() if reduction == "mean" else sq.sum()

    return mse


def _split(batch: Any, loss_fn: Callable | None) -> tuple[Any, Any]:
    if loss_fn is None:
        return batch, None
    if not (isinstance(batch, tuple | list) and len(batch) == 2):
        raise ValueError(
            f"with a loss_fn every batch must be an (inputs, targets) pair; got {type(batch).__name__}"
        )
    return batch[0], batch[1]


# ----------------------------------------------------------------------------- logit Hessians
def _class_last(t: Tensor) -> Tensor:
    # torch's cross-entropy layout: [C], [N, C] or [N, C, d1, ...] (classes on dim 1)
    return t.movedim(1, -1) if t.dim() > 2 else t


def _reduce_rows(hu: Tensor, targets: Tensor, reduction: str, ignore_index: int) -> Tensor:
    if targets.is_floating_point():  # class probabilities: every row counts
        denom = hu.shape[0]
    else:
        valid = targets.reshape(-1) != ignore_index
        hu = hu * valid.unsqueeze(-1).to(hu.dtype)
        denom = valid.sum().clamp_min(1)
    return hu / denom if reduction == "mean" else hu


def softmax_ce_logit_hvp(
    logits: Tensor, targets: Tensor, u: Tensor, *, reduction: str = "mean", ignore_index: int = -100
) -> Tensor:
    """``(diag p - p p^T) u`` per row: the logit Hessian of softmax cross-entropy times ``u``.

    Args: logits and ``u``: ``[N, C]`` or ``[N, C, d...]`` (torch's layout); targets: class indices
    ``[N, d...]`` or probabilities of the logits' shape. The Hessian does not depend on the targets
    (label smoothing included) except through ``ignore_index`` and the mean's denominator.
    Returns a tensor of ``u``'s shape and dtype. Example::

        >>> z = torch.randn(4, 3); softmax_ce_logit_hvp(z, torch.tensor([0, 1, 2, 0]), z).shape
        torch.Size([4, 3])
    """
    z, uu = _class_last(logits), _class_last(u)
    shape, c = uu.shape, uu.shape[-1]
    acc = torch.promote_types(logits.dtype, torch.float32)
    p = torch.softmax(z.reshape(-1, c).to(acc), dim=-1)
    uf = uu.reshape(-1, c).to(acc)
    hu = p * uf - p * (p * uf).sum(-1, keepdim=True)
    hu = _reduce_rows(hu, targets, reduction, ignore_index).reshape(shape)
    return (hu.movedim(-1, 1) if u.dim() > 2 else hu).to(u.dtype)


def stablemax_ce_logit_hvp(
    logits: Tensor, targets: Tensor, u: Tensor, *, reduction: str = "mean", ignore_index: int = -100
) -> Tensor:
    """Gauss-Newton logit Hessian of StableMax cross-entropy times ``u``: ``D (diag p - pp^T) D u``.

    StableMax is ``softmax(g(x))`` with ``g(x) = sign(x) log1p|x|`` and ``D = diag(1/(1+|x|))``.
    The exact Hessian adds ``diag((p - e_y) g'')``, which is indefinite and jumps at 0 (StableMax
    is only C^1), so a Gauss-Newton matrix keeps the first term only. Shapes as
    :func:`softmax_ce_logit_hvp`.
    """
    z, uu = _class_last(logits), _class_last(u)
    shape, c = uu.shape, uu.shape[-1]
    acc = torch.promote_types(logits.dtype, torch.float32)
    x = z.reshape(-1, c).to(acc)
    p = torch.softmax(torch.sign(x) * torch.log1p(x.abs()), dim=-1)
    d = 1.0 / (1.0 + x.abs())
    du = d * uu.reshape(-1, c).to(acc)
    hu = d * (p * du - p * (p * du).sum(-1, keepdim=True))
    hu = _reduce_rows(hu, targets, reduction, ignore_index).reshape(shape)
    return (hu.movedim(-1, 1) if u.dim() > 2 else hu).to(u.dtype)


def _resolve_logit_hvp(loss_fn: Callable | None, loss_hessian: str | LogitHVP) -> LogitHVP:
    if callable(loss_hessian):
        return loss_hessian
    reduction, ignore = "mean", -100
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        reduction, ignore = loss_fn.reduction, loss_fn.ignore_index
        if reduction not in ("mean", "sum") or loss_fn.weight is not None:
            loss_hessian = "exact" if loss_hessian == "auto" else loss_hessian
    is_ce = isinstance(loss_fn, nn.CrossEntropyLoss) or loss_fn is F.cross_entropy
    if loss_hessian == "auto":
        loss_hessian = "softmax_ce" if is_ce else "exact"
    if loss_hessian == "softmax_ce":
        return lambda z, t, u: softmax_ce_logit_hvp(
            z, t, u, reduction=reduction, ignore_index=ignore
        )
    if loss_hessian == "stablemax_ce":
        return lambda z, t, u: stablemax_ce_logit_hvp(
            z, t, u, reduction=reduction, ignore_index=ignore
        )
    if loss_hessian == "exact":  # Hessian of the loss in the outputs, by forward-over-reverse
        safe = forward_mode_safe(loss_fn)
        return lambda z, t, u: jvp(grad(lambda o: _scalar_loss(safe, o, t)), (z,), (u,))[1]
    raise ValueError(
        f"loss_hessian must be 'auto', 'softmax_ce', 'stablemax_ce', 'exact' or a callable; "
        f"got {loss_hessian!r}"
    )
