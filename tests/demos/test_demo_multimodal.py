"""The 3MAT demo in quick mode, plus its synthetic data generator."""

from __future__ import annotations

import torch

from stablecore.demos import DemoContext
from stablecore.demos import multimodal as demo


def test_synthetic_data_and_masks():
    g = torch.Generator().manual_seed(0)
    x, y = demo.make_synthetic(50, g)
    assert x["clinical"].shape == (50, 6) and x["lab"].shape == (50, 12)
    assert x["image"].shape == (50, 1, 16, 16) and y.shape == (50,)
    m = demo.mcar_mask(2000, 0.5, g)
    assert bool(m.any(1).all())
    assert abs(m.float().mean().item() - (0.5 + 0.5**3 / 3)) < 0.03
    for k in (0, 1, 2):
        assert bool((demo.drop_exactly(40, k, g).sum(1) == 3 - k).all())


def test_multimodal_demo_quick(tmp_path):
    res = demo.run(DemoContext(out_dir=tmp_path, device=torch.device("cpu"), quick=True))
    assert len(res.rows) == 9 and len({tuple(r) for r in res.rows}) == 1
    acc = {(r["model"].split(" ")[0], r["modalities_missing"]): r["accuracy"] for r in res.rows}
    for k in (0, 1, 2):
        assert 0.0 <= acc[("3MAT", k)] <= 1.0
    # Even the tiny run beats chance (0.25) with all modalities and keeps working with two gone.
    assert acc[("3MAT", 0)] > 0.33 and acc[("3MAT", 2)] > 0.28
    n_cc = {r["train_samples"] for r in res.rows if r["model"].startswith("complete")}
    assert n_cc and max(n_cc) < 600 // 4  # the baseline really dropped incomplete samples
    assert all(p.exists() and p.stat().st_size > 0 for p in res.plots)
