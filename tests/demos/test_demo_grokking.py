"""The grokking demo runs end to end in quick mode and returns a well-formed result."""

from __future__ import annotations

import torch

from stablecore.demos import DemoContext, DemoResult, available, load


def test_demo_grokking_quick(tmp_path):
    assert "grokking" in available()
    demo = load("grokking")
    result = demo.run(DemoContext(out_dir=tmp_path, device=torch.device("cpu"), quick=True, seed=0))
    assert isinstance(result, DemoResult) and result.title == demo.TITLE
    assert [r["run"] for r in result.rows] == [
        "AdamW",
        "⊥AdamW",
        "AdamW + StableMax",
        "AdamW, fp16 softmax",
    ]
    assert len({tuple(r) for r in result.rows}) == 1  # identical keys in every row
    for row in result.rows:
        assert 0.0 <= row["train acc"] <= 1.0 and 0.0 <= row["test acc"] <= 1.0
        assert row["epochs"] == 12
    (png,) = result.plots
    assert png.parent == tmp_path and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Quick" in result.notes
