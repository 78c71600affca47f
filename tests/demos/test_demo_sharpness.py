"""`stablecore demo sharpness` in quick mode: table, PNGs and the reproduction's verdicts."""

from __future__ import annotations

import torch

from stablecore.demos import DemoContext, load


def test_demo_sharpness_quick(tmp_path):
    demo = load("sharpness")
    res = demo.run(DemoContext(out_dir=tmp_path, device=torch.device("cpu"), quick=True, seed=0))
    assert res.title == demo.TITLE
    assert res.rows and all(set(r) == set(res.rows[0]) for r in res.rows)
    for path in res.plots:
        assert path.exists() and path.stat().st_size > 1000 and path.parent == tmp_path
    assert any(p.name == "sharpness_vs_inverse_lr.png" for p in res.plots)
    sgd = [r for r in res.rows if r["optimizer"] == "SGD" and r["Tr<=2/lr"] is not False]
    assert any(r["Tr<=2/lr"] is True for r in sgd)  # at least one SGD run reached a minimum
    assert all(r["Tr<=2/lr"] in (True, "not converged", "diverged") for r in sgd)
    gd = [r for r in res.rows if r["optimizer"] == "GD"]
    assert all(r["lmax<=2/lr"] is True for r in gd)
    assert any(r["Tr<=2/lr"] is False for r in gd)  # GD's minima break the SGD bound
    assert "distance" in res.notes
