"""The T-Rex demo in quick mode: German Credit + CTG, tiny retraining harness."""

from __future__ import annotations

import pytest
import torch

from stablecore.demos import DemoContext
from stablecore.demos import counterfactual as demo

pytestmark = pytest.mark.skipif(
    not (demo._data_root() / "german_credit" / "german_X_train.npy").exists(),
    reason="shared data folder not available",
)


def test_loaders_match_the_data_readme():
    x_tr, y_tr, x_te, y_te = demo.load_german()
    assert x_tr.shape == (670, 61) and x_te.shape == (330, 61)
    assert int(y_tr.sum()) == 199 and int(y_te.sum()) == 101
    x_tr, y_tr, x_te, y_te = demo.load_ctg()
    assert x_tr.shape[1] == 21 and x_tr.shape[0] + x_te.shape[0] == 2126
    assert int(y_tr.sum() + y_te.sum()) == 295 + 176  # NSP > 1
    assert float(x_tr.min()) >= 0 and float(x_tr.max()) <= 1


def test_counterfactual_demo_quick(tmp_path):
    torch.manual_seed(0)
    res = demo.run(DemoContext(out_dir=tmp_path, device=torch.device("cpu"), quick=True))
    assert len(res.rows) == 8 and len({tuple(r) for r in res.rows}) == 1
    by = {(r["dataset"], r["method"]): r for r in res.rows}
    for ds in ("German", "CTG"):
        closest = by[(ds, "closest CF (EAD-like)")]
        robust = by[(ds, "T-Rex:I (from closest)")]
        nearest = by[(ds, "nearest neighbour CF")]
        assert closest["validity"] == 1.0 and robust["validity"] == 1.0
        # The closest CF is the cheapest; T-Rex:I pays some cost for more robustness.
        assert closest["cost_l1"] < nearest["cost_l1"]
        assert robust["cost_l1"] >= closest["cost_l1"]
        assert robust["robust_validity"] >= closest["robust_validity"]
        assert all(0.0 <= r["robust_validity"] <= 1.0 for r in res.rows)
    # CTG is where the quick run already separates them clearly.
    assert by[("CTG", "T-Rex:I (from closest)")]["robust_validity"] > (
        by[("CTG", "closest CF (EAD-like)")]["robust_validity"] + 0.3
    )
    assert all(p.exists() and p.stat().st_size > 0 for p in res.plots)
