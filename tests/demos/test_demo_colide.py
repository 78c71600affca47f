"""Quick run of the colide demo: a table with identical keys, a plot file, a notes paragraph."""

from __future__ import annotations

import torch

from stablecore.demos import DemoContext, DemoResult
from stablecore.demos.colide import TITLE, run


def test_demo_colide_quick(tmp_path):
    res = run(DemoContext(out_dir=tmp_path, device=torch.device("cpu"), quick=True, seed=0))
    assert isinstance(res, DemoResult) and res.title == TITLE
    assert res.rows and all(r.keys() == res.rows[0].keys() for r in res.rows)
    assert res.plots and all(p.exists() and p.stat().st_size > 0 for p in res.plots)
    assert res.notes
    for r in res.rows:
        assert 0 <= r["nshd"] < 1.0 and r["method"].startswith("CoLiDE")
