from __future__ import annotations

import torch

from stablecore.demos import DemoContext
from stablecore.demos import stablemax as demo


def test_stablemax_demo_shows_collapse(tmp_path):
    result = demo.run(DemoContext(out_dir=tmp_path, device=torch.device("cpu"), quick=True))
    gaps = {(r["loss"], r["dtype"]): r["first gap with grad_y == 0"] for r in result.rows}
    softmax32 = float(gaps[("softmax cross-entropy", "float32")])
    stablemax32 = float(gaps[("stablemax cross-entropy", "float32")])
    assert 10 < softmax32 < 40  # the paper's float32 threshold is about 16-21
    assert stablemax32 > 1e6 * softmax32
    assert all(p.exists() and p.stat().st_size > 0 for p in result.plots)
