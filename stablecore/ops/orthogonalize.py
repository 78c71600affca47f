"""⊥Grad (OrthoGrad) as custom ops: remove from each gradient its component along its weights.

Prieto et al., "Grokking at the Edge of Numerical Stability" (2025), §⊥Grad, as the authors' code
does it: PER TENSOR (flattened),

    g_perp = g - (w.g / w.w) w,        g <- g_perp * |g| / |g_perp|   (renorm, optional).

Two deliberate, documented edge cases (the repo divides by ``+1e-30`` instead):

* ``w == 0`` (a zero-initialised bias): ``g`` is returned unchanged, bit for bit.
* ``g`` parallel to ``w`` (``|g_perp| <= 1e-5 |g|``): ``g_perp = 0``. Renormalising would blow
  float rounding noise up to the full gradient norm.

Ops:

* ``stablecore::orthogonalize_(weights, grads, renorm)`` mutates ``grads`` in place.
* ``stablecore::orthogonalize_stats(weights, grads) -> [T, 3]`` float64 ``(w.g, w.w, g.g)`` per
  tensor; :func:`stablecore.optim.nlm_alignment` uses it.

The reference is a multi-tensor ``torch._foreach`` computation (in ``promote_types(dtype,
float32)``); the Triton backend (``stablecore.kernels.orthogonalize``) does one launch per pass
for all tensors of a dtype pair. Neither syncs the host.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch
from torch import Tensor

from stablecore.ops import _dispatch

__all__ = ["orthogonalize_", "orthogonalize_stats"]

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: ``g`` counts as parallel to ``w`` when ``|g_perp| <= PARALLEL_RTOL |g|``; the same constant as
#: ``stablecore.kernels.orthogonalize.PARALLEL_RTOL`` (not imported: that module needs Triton).
PARALLEL_RTOL = 1e-5


def _validate(weights: Sequence[Tensor], grads: Sequence[Tensor]) -> None:
    if len(weights) != len(grads):
        raise ValueError(f"got {len(weights)} weights but {len(grads)} gradients")
    for i, (w, g) in enumerate(zip(weights, grads)):
        _dispatch.check_floating(f"weights[{i}]", w)
        _dispatch.check_floating(f"grads[{i}]", g)
        if w.shape != g.shape:
            raise ValueError(
                f"weights[{i}] has shape {tuple(w.shape)} but grads[{i}] has {tuple(g.shape)}"
            )
        if g.is_sparse or w.is_sparse:
            raise TypeError(f"tensor {i} is sparse; ⊥Grad needs dense weights and gradients")
        _dispatch.check_same_device(**{f"weights[{i}]": w, f"grads[{i}]": g})
    _dispatch.check_same_device(**{f"grads[{i}]": g for i, g in enumerate(grads)})


# ----------------------------------------------------------------------------- 1. reference
def _groups(weights: Sequence[Tensor], grads: Sequence[Tensor]) -> dict[tuple, list[int]]:
    """Indices of the tensor pairs grouped by (weight dtype, grad dtype)."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, (w, g) in enumerate(zip(weights, grads)):
        groups[(w.dtype, g.dtype)].append(i)
    return groups


def _reference_stats_group(ws: list[Tensor], gs: list[Tensor]) -> Tensor:
    acc = torch.promote_types(torch.promote_types(ws[0].dtype, gs[0].dtype), torch.float32)
    wf = [w.reshape(-1).to(acc) for w in ws]
    gf = [g.reshape(-1).to(acc) for g in gs]
    dots = torch.stack([torch.dot(w, g) for w, g in zip(wf, gf)])
    ww = torch.stack(torch._foreach_norm(wf)) ** 2
    gg = torch.stack(torch._foreach_norm(gf)) ** 2
    return torch.stack([dots, ww, gg], dim=1).to(torch.float64)


def _reference_stats(weights: Sequence[Tensor], grads: Sequence[Tensor]) -> Tensor:
    out = torch.empty(len(grads), 3, dtype=torch.float64, device=grads[0].device)
    for idx in _groups(weights, grads).values():
        out[idx] = _reference_stats_group([weights[i] for i in idx], [grads[i] for i in idx])
    return out


def _reference_group_(ws: list[Tensor], gs: list[Tensor], renorm: bool) -> None:
    acc = torch.promote_types(torch.promote_types(ws[0].dtype, gs[0].dtype), torch.float32)
    wf = [w.reshape(-1).to(acc) for w in ws]
    gf = [g.reshape(-1).to(acc) for g in gs]
    dots = torch.stack([torch.dot(w, g) for w, g in zip(wf, gf)])
    ww = torch.stack(torch._foreach_norm(wf)) ** 2
    has_w = ww > 0
    coef = torch.where(has_w, dots / torch.where(has_w, ww, 1), 0)
    g_perp = torch._foreach_sub(gf, torch._foreach_mul(wf, list(coef.unbind())))
    # |g_perp| measured on g_perp itself, as the authors' code does (no cancellation formula).
    perp_norm = torch.stack(torch._foreach_norm(g_perp))
    g_norm = torch.stack(torch._foreach_norm(gf))
    nonzero = perp_norm > 0
    scale = torch.where(nonzero, g_norm / torch.where(nonzero, perp_norm, 1), 1)
    if not renorm:
        scale = torch.ones_like(scale)
    scale = torch.where((perp_norm <= PARALLEL_RTOL * g_norm) & (g_norm > 0), 0, scale)
    scale = torch.where(has_w, scale, 1)
    torch._foreach_mul_(g_perp, list(scale.unbind()))
    torch._foreach_copy_(gs, [p.view(g.shape) for p, g in zip(g_perp, gs)])


def _reference_(weights: Sequence[Tensor], grads: Sequence[Tensor], renorm: bool) -> None:
    for idx in _groups(weights, grads).values():
        _reference_group_([weights[i] for i in idx], [grads[i] for i in idx], renorm)


# ----------------------------------------------------------------------------- 2-3. custom ops
@torch.library.custom_op("stablecore::orthogonalize_", mutates_args=("grads",))
def _orthogonalize_op(weights: list[Tensor], grads: list[Tensor], renorm: bool) -> None:
    _reference_(weights, grads, renorm)


@_orthogonalize_op.register_fake
def _(weights, grads, renorm):
    _validate(weights, grads)


@torch.library.custom_op("stablecore::orthogonalize_stats", mutates_args=())
def _stats_op(weights: list[Tensor], grads: list[Tensor]) -> Tensor:
    return _reference_stats(weights, grads)


@_stats_op.register_fake
def _(weights, grads):
    _validate(weights, grads)
    return grads[0].new_empty((len(grads), 3), dtype=torch.float64)


# ----------------------------------------------------------------------------- 5. Triton backend
def _unsupported(weights: Sequence[Tensor], grads: Sequence[Tensor], *args) -> str | None:
    for i, (w, g) in enumerate(zip(weights, grads)):
        if w.dtype not in _TRITON_DTYPES or g.dtype not in _TRITON_DTYPES:
            return f"dtype pair ({w.dtype}, {g.dtype}) of tensor {i} has no Triton kernel"
        if not (w.is_contiguous() and g.is_contiguous()):
            return f"tensor {i} (shape {tuple(g.shape)}) is not contiguous"
    return None


def _triton_orthogonalize_(weights: list[Tensor], grads: list[Tensor], renorm: bool) -> None:
    from stablecore.kernels import orthogonalize as kernels

    for idx in _groups(weights, grads).values():
        kernels.orthogonalize_([weights[i] for i in idx], [grads[i] for i in idx], renorm)


def _triton_stats(weights: list[Tensor], grads: list[Tensor]) -> Tensor:
    from stablecore.kernels import orthogonalize as kernels

    groups = _groups(weights, grads)
    if len(groups) == 1:
        return kernels.partial_stats(list(weights), list(grads))
    out = torch.empty(len(grads), 3, dtype=torch.float64, device=grads[0].device)
    for idx in groups.values():
        out[idx] = kernels.partial_stats([weights[i] for i in idx], [grads[i] for i in idx])
    return out


_dispatch.register_triton_kernel(
    _orthogonalize_op, _triton_orthogonalize_, _reference_, _unsupported
)
_dispatch.register_triton_kernel(_stats_op, _triton_stats, _reference_stats, _unsupported)
_dispatch.describe_op(
    "orthogonalize_", triton_dtypes=_TRITON_DTYPES, note="one launch per pass per dtype pair"
)
_dispatch.describe_op("orthogonalize_stats", triton_dtypes=_TRITON_DTYPES)


# ----------------------------------------------------------------------------- 6. public API
def orthogonalize_(weights: Sequence[Tensor], grads: Sequence[Tensor], renorm: bool = True) -> None:
    """In place, per tensor: ``g <- g - (w.g / w.w) w``, rescaled to ``|g|`` when ``renorm``.

    Args:
        weights: tensors ``w_i`` of any shapes (float16/bfloat16/float32/float64).
        grads: tensors ``g_i`` of the same shapes as ``weights``, all on one device; overwritten.
        renorm: rescale each ``g_perp`` to its original norm (the authors' code does).

    ``w_i == 0`` leaves ``g_i`` unchanged; ``g_i`` parallel to ``w_i`` becomes 0. Sums run in
    float32 or wider. Raises ValueError/TypeError naming the shape/dtype/device of a bad pair.

    Example::

        >>> w, g = torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])
        >>> orthogonalize_([w], [g]); g
        tensor([0.0000, 1.4142])
    """
    weights, grads = list(weights), list(grads)
    _validate(weights, grads)
    if not grads:
        return
    if _dispatch.plain_reference_requested():
        _reference_(weights, grads, renorm)
    else:
        _orthogonalize_op(weights, grads, bool(renorm))


def orthogonalize_stats(weights: Sequence[Tensor], grads: Sequence[Tensor]) -> Tensor:
    """Per-tensor sums ``[T, 3]`` float64: columns ``w.g``, ``w.w``, ``g.g`` (pass 1 of ⊥Grad).

    They are plain sums over elements: shards of the same tensors may all-reduce them. Example::

        >>> orthogonalize_stats([torch.ones(2)], [torch.full((2,), 3.0)])
        tensor([[ 6.,  2., 18.]], dtype=torch.float64)
    """
    weights, grads = list(weights), list(grads)
    _validate(weights, grads)
    if not grads:
        return torch.zeros(0, 3, dtype=torch.float64)
    if _dispatch.plain_reference_requested():
        return _reference_stats(weights, grads)
    return _stats_op(weights, grads)
