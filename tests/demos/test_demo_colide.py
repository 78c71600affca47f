"""Quick run of the colide demo: a table with identical keys, a plot file, a notes paragraph."""

from __future__ import annotations

import numpy as np
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


def test_demo_colide_cli_two_seeds_and_summary(tmp_path, capsys):
    from stablecore.demos.colide import main, summarize

    assert main(["--quick", "--seeds", "0", "1", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "Means over seeds" in printed and (tmp_path / "colide_rows.json").exists()
    rows = [
        {"data": "a", "method": "m", "nshd": 0.2, "shd": 2, "seconds": 1.0},
        {"data": "a", "method": "m", "nshd": 0.4, "shd": 4, "seconds": 3.0},
        {"data": "b", "method": "m", "nshd": 0.1, "shd": 1, "seconds": 2.0},
    ]
    means = summarize(rows)
    assert [(r["data"], r["seeds"]) for r in means] == [("a", 2), ("b", 1)]
    assert means[0]["nshd_mean"] == 0.3 and means[0]["shd_mean"] == 3.0
    assert means[0]["nshd_std"] == 0.1 and means[0]["seconds_mean"] == 2.0


def test_demo_colide_full_mode_wiring(tmp_path, monkeypatch):
    # ctx.full (``stablecore demo --full``) asks for d = 20, 50, 100, two seeds, the paper schedule
    # and DAGMA; the fits themselves are replaced by a recorder (they take CPU minutes).
    import stablecore.demos.colide as demo

    seen = {}

    def fake_compare(ds, seeds, schedule, with_dagma, progress):
        seen.update(ds=ds, seeds=seeds, schedule=schedule)
        return [
            demo._row(d, eq, "CoLiDE-EV", sd, np.eye(3, k=1), np.eye(3, k=1), 0.0)
            for d in ds
            for eq in (True, False)
            for sd in seeds
        ]

    monkeypatch.setattr(demo, "compare", fake_compare)
    monkeypatch.setattr(demo, "sachs_rows", lambda *a, **k: [])
    ctx = DemoContext(out_dir=tmp_path, device=torch.device("cpu"), full=True)
    res = run(ctx)
    assert seen["ds"] == (20, 50, 100) and seen["seeds"] == (0, 1)
    assert seen["schedule"]["max_iter"] == 70000 and seen["schedule"]["T"] == 4
    assert len(res.rows) == 12 and "Means over seeds" in res.notes
