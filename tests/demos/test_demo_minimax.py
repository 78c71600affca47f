"""Quick run of the minimax demo: a table with identical keys, a plot file, a notes paragraph."""

from __future__ import annotations

import math

import torch

from stablecore.demos import DemoContext, DemoResult
from stablecore.demos.minimax import TITLE, run


def test_demo_minimax_quick(tmp_path):
    res = run(DemoContext(out_dir=tmp_path, device=torch.device("cpu"), quick=True, seed=0))
    assert isinstance(res, DemoResult) and res.title == TITLE
    assert res.rows and all(r.keys() == res.rows[0].keys() for r in res.rows)
    assert res.plots and all(p.exists() and p.stat().st_size > 0 for p in res.plots)
    assert res.notes
    for r in res.rows:
        assert math.isfinite(r["max_test_mse_chosen"]) and r["max_test_mse_chosen"] > 0
        assert r["classes"] == 4  # toy graph: stable {X1, X2}, none removable
        assert math.isfinite(r["max_test_mse_all"]) and 1 <= r["chosen_rank"] <= r["classes"]
