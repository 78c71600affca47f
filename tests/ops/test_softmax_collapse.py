"""softmax_collapse_stats: the paper's thresholds (notes A.3, A.8-3) and bookkeeping."""

from __future__ import annotations

import pytest
import torch

from stablecore.ops.softmax_collapse import softmax_collapse_stats
from stablecore.testing import seed_all


def leading_logit(gap: float, rows: int = 4, v: int = 113, dtype=torch.float32):
    seed_all(0)
    x = torch.randn(rows, v, dtype=torch.float64) * 0.01  # never all zeros; tiny jitter
    x[:, 0] += gap
    return x.to(dtype), torch.zeros(rows, dtype=torch.long)


def test_softmax_collapses_at_gap_30_not_15_in_fp32():
    x, t = leading_logit(15.0)
    s = softmax_collapse_stats(x, t)
    assert s["collapse_fraction"] == 0.0 and s["zero_loss_fraction"] == 0.0
    assert s["sum_is_one_fraction"] == 0.0
    x, t = leading_logit(30.0)
    s = softmax_collapse_stats(x, t)
    assert s["collapse_fraction"] == 1.0 and s["zero_loss_fraction"] == 1.0
    assert s["sum_is_one_fraction"] == 1.0 and s["rows"] == 4


def test_float64_does_not_collapse_at_gap_30_and_dtype_override():
    x, t = leading_logit(30.0, dtype=torch.float64)
    assert softmax_collapse_stats(x, t)["collapse_fraction"] == 0.0
    # The same logits judged in float32 (what an fp32 loss would see) do collapse.
    assert softmax_collapse_stats(x, t, dtype=torch.float32)["collapse_fraction"] == 1.0


@pytest.mark.parametrize(("m", "expected"), [(1e3, 0.0), (1e5, 1.0)])
def test_stablemax_collapse_threshold_fp32(m, expected):
    x = torch.full((3, 113), -m)
    x[:, 0] = m
    s = softmax_collapse_stats(x, torch.zeros(3, dtype=torch.long), kind="stablemax")
    assert s["collapse_fraction"] == expected and s["zero_loss_fraction"] == expected
    # Softmax at the same logits has long collapsed.
    assert softmax_collapse_stats(x, torch.zeros(3, dtype=torch.long))["collapse_fraction"] == 1.0


def test_fractions_count_only_rows_and_targets():
    x, _ = leading_logit(30.0, rows=4)
    x[2, 0] -= 30.0  # this row no longer collapses
    t = torch.tensor([0, 0, 0, -100])
    s = softmax_collapse_stats(x, t)
    assert s["rows"] == 3
    assert s["collapse_fraction"] == pytest.approx(2 / 3)
    # A collapsed row whose target is NOT the leading class has a nonzero gradient: not counted
    # as collapsed by the gradient metric, but the repo's sum==1 metric still fires.
    s = softmax_collapse_stats(x[:1], torch.tensor([5]))
    assert s["collapse_fraction"] == 0.0 and s["sum_is_one_fraction"] == 1.0


def test_nd_input_all_ignored_and_errors():
    x, _ = leading_logit(30.0, rows=6)
    s = softmax_collapse_stats(x.reshape(2, 3, 113), torch.zeros(2, 3, dtype=torch.long))
    assert s["rows"] == 6 and s["collapse_fraction"] == 1.0
    s = softmax_collapse_stats(x, torch.full((6,), -100))
    assert s["rows"] == 0 and s["collapse_fraction"] != s["collapse_fraction"]  # NaN
    with pytest.raises(ValueError, match="kind"):
        softmax_collapse_stats(x, torch.zeros(6, dtype=torch.long), kind="sparsemax")
    with pytest.raises(ValueError, match="out of range"):
        softmax_collapse_stats(x, torch.full((6,), 113))
