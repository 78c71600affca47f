"""Softmax Collapse statistics: how many rows have stopped learning in the working precision.

Prieto et al. ("Grokking at the Edge of Numerical Stability", 2025) call it Softmax Collapse (SC)
when floating-point absorption makes the row sum of ``exp(z - max z)`` exactly 1: then
p_y == 1, so the loss and the correct-class gradient p_y - 1 are *exactly* zero and the sample
stops contributing. Their repository logs two fractions per step (``logger.py``):

* ``softmax_collapse``: rows whose sum(exp(z - max z)) == 1 in the softmax dtype;
* ``zero_terms``: rows whose loss == 0.

:func:`softmax_collapse_stats` measures, per non-ignored row, what a *standard* (unfused)
implementation computes in the working precision ``dtype`` (default: the logits' dtype):

* ``collapse_fraction``: p_y == 1, i.e. the correct-class gradient p_y - 1 is exactly 0
  (softmax: ``torch.softmax``; StableMax: ``s(x_y) / sum_j s(x_j)``, both in ``dtype``);
* ``zero_loss_fraction``: -log p_y == 0 (``log_softmax`` of z, or of g(x) = sign(x) log1p|x|
  for StableMax, in ``dtype``);
* ``sum_is_one_fraction`` (softmax only; NaN for StableMax): the repository's exact metric,
  sum(exp(z - max z)) == 1, which looks at the arg-max class instead of the target.

These say when a standard loss would have collapsed; stablecore's fused kernels compute 1 - p_y
without cancellation and keep a (tiny) gradient further. In float32 with V = 113 and one
leading logit, softmax collapses at a gap of about 17-21 (summation order matters, so tests use
gaps 15 and 30); StableMax at a logit magnitude of about 1.6e4.

Diagnostics only: plain PyTorch (no kernel), no gradient, one host sync to return floats.
"""

from __future__ import annotations

import importlib

import torch
from torch import Tensor

from stablecore.ops import _dispatch

# The module, not the function of the same name that stablecore.ops exports.
_ce = importlib.import_module("stablecore.ops.stablemax_cross_entropy")

__all__ = ["softmax_collapse_stats"]


@torch.no_grad()
def softmax_collapse_stats(
    logits: Tensor,
    target: Tensor,
    kind: str = "softmax",
    ignore_index: int = -100,
    dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """Fractions of rows that a standard loss in ``dtype`` would have collapsed.

    Args:
        logits: ``[N, V]`` (or ``[..., V]``) floating tensor.
        target: ``[N]`` (or ``[...]``) integer classes; rows equal to ``ignore_index`` are skipped.
        kind: ``"softmax"`` or ``"stablemax"``.
        dtype: working precision to evaluate in (default ``logits.dtype``).

    Returns:
        ``{"collapse_fraction", "zero_loss_fraction", "sum_is_one_fraction", "rows"}``: floats
        in [0, 1] (NaN when no row counts) and the number of counted rows.

    Example::

        >>> z = torch.tensor([[30.0] + [0.0] * 112]); y = torch.tensor([0])
        >>> softmax_collapse_stats(z, y)["collapse_fraction"]
        1.0
    """
    if kind not in ("softmax", "stablemax"):
        raise ValueError(f"kind must be 'softmax' or 'stablemax', got {kind!r}")
    x2d, t1d = _ce.flatten(logits, target)
    _ce.validate(x2d, t1d, "mean", 0.0)
    _ce.check_target_range(t1d, x2d.shape[1], ignore_index)
    work = dtype or x2d.dtype
    if not work.is_floating_point:
        raise TypeError(f"dtype must be floating point, got {work}")
    keep = t1d != ignore_index
    x = x2d[keep].to(work)
    y = t1d[keep].long()[:, None]
    rows = x.shape[0]
    if rows == 0:
        nan = float("nan")
        return {
            "collapse_fraction": nan,
            "zero_loss_fraction": nan,
            "sum_is_one_fraction": nan,
            "rows": 0,
        }
    if kind == "softmax":
        p_y = torch.softmax(x, -1).gather(1, y)
        log_p_y = torch.log_softmax(x, -1).gather(1, y)
        sum_is_one = (x - x.amax(-1, keepdim=True)).exp().sum(-1) == 1
        sum_frac = float(sum_is_one.to(torch.float64).mean())
    else:
        s = _ce._s(x)
        p_y = s.gather(1, y) / s.sum(-1, keepdim=True)
        log_p_y = torch.log_softmax(_ce._g(x), -1).gather(1, y)
        sum_frac = float("nan")
    return {
        "collapse_fraction": float((p_y - 1 == 0).to(torch.float64).mean()),
        "zero_loss_fraction": float((-log_p_y == 0).to(torch.float64).mean()),
        "sum_is_one_fraction": sum_frac,
        "rows": rows,
    }


_dispatch.describe_op("softmax_collapse_stats", note="diagnostic; plain PyTorch")
