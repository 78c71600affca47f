"""Test helpers shared by every tier: one tolerance table, comparison helpers, poisoned buffers.

Every test in ``tests/`` takes its tolerances from :data:`TOLERANCES` (never a literal ``atol``):
when a kernel's accuracy changes, the table is the one place that says what is acceptable.
Hypothesis strategies live in :mod:`stablecore.testing.strategies` (hypothesis is a dev extra).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "TOLERANCES",
    "Tolerance",
    "assert_close",
    "assert_error_within_factor",
    "max_abs_error",
    "nan_poisoned",
    "poison_",
    "seed_all",
    "tolerance",
]


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float


# Element-wise tolerances for a kernel that loads this dtype and computes in float32 (or float64
# for float64 inputs), compared against a float64 oracle. fp16/bf16 are bounded by the rounding of
# the *stored* output (half an ulp: 2^-11 and 2^-8 relative), plus a little for the inputs.
TOLERANCES: dict[torch.dtype, Tolerance] = {
    torch.float64: Tolerance(atol=1e-10, rtol=1e-7),
    torch.float32: Tolerance(atol=1e-5, rtol=2e-5),
    torch.float16: Tolerance(atol=1e-3, rtol=2e-3),
    torch.bfloat16: Tolerance(atol=8e-3, rtol=1.6e-2),
}


def tolerance(dtype: torch.dtype) -> Tolerance:
    """The table entry for ``dtype`` (raises ``KeyError`` for a dtype with no entry)."""
    try:
        return TOLERANCES[dtype]
    except KeyError:
        raise KeyError(f"no tolerance for dtype {dtype}; add one to stablecore.testing") from None


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, *, dtype: torch.dtype | None = None, msg: str = ""
) -> None:
    """``torch.testing.assert_close`` in float64 with the table's tolerance for ``dtype``.

    ``dtype`` defaults to ``actual.dtype``; NaNs must sit at the same places in both tensors.
    """
    tol = tolerance(dtype or actual.dtype)
    torch.testing.assert_close(
        actual.detach().to(torch.float64).cpu(),
        expected.detach().to(torch.float64).cpu(),
        atol=tol.atol,
        rtol=tol.rtol,
        equal_nan=True,
        msg=(lambda m: f"{m}\n{msg}") if msg else None,
    )


def max_abs_error(actual: torch.Tensor, oracle: torch.Tensor) -> float:
    """Largest absolute difference, measured in float64 (NaN where either holds a NaN)."""
    diff = (actual.detach().double().cpu() - oracle.detach().double().cpu()).abs()
    return float(diff.max()) if diff.numel() else 0.0


def assert_error_within_factor(
    actual: torch.Tensor,
    torch_same_precision: torch.Tensor,
    oracle: torch.Tensor,
    *,
    factor: float = 2.0,
    floor: float | None = None,
    msg: str = "",
) -> None:
    """Long reductions: our error against a float64 oracle is at most ``factor`` x PyTorch's own.

    ``torch_same_precision`` is what PyTorch itself computes in the same dtype. ``floor`` (default:
    the table's ``atol`` for ``actual.dtype``) stops the test from failing when PyTorch happens to
    be exact on a given draw.
    """
    ours = max_abs_error(actual, oracle)
    theirs = max_abs_error(torch_same_precision, oracle)
    limit = factor * theirs + (tolerance(actual.dtype).atol if floor is None else floor)
    if not ours <= limit:  # written so that NaN fails
        raise AssertionError(
            f"error {ours:.3e} exceeds {factor} x torch's {theirs:.3e} (+ floor) = {limit:.3e} "
            f"for dtype {actual.dtype}, shape {tuple(actual.shape)}. {msg}"
        )


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill a floating tensor with NaN in place, so that an element a kernel forgot stays NaN."""
    if t.is_floating_point():
        t.fill_(float("nan"))
    else:
        t.fill_(torch.iinfo(t.dtype).min)
    return t


def nan_poisoned(*shape: int, dtype: torch.dtype = torch.float32, device="cpu") -> torch.Tensor:
    """A new tensor full of NaN (``empty`` may hand back stale memory that looks plausible)."""
    return poison_(torch.empty(*shape, dtype=dtype, device=device))


def seed_all(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))  # noqa: NPY002  (code under test may use the global RNG)
    torch.manual_seed(seed)
