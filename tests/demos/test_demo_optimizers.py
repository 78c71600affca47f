"""The optimizers demo runs in quick mode and reports what it promises: three optimizers with
finite losses that went down, a loss-curve PNG, and state bytes per parameter at 32/8/4 bits."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("transformers")

from stablecore.demos import DemoContext, available  # noqa: E402


def test_quick_run(tmp_path):
    from stablecore.demos import optimizers

    assert "optimizers" in available()
    res = optimizers.run(DemoContext(out_dir=tmp_path, device=torch.device("cpu"), quick=True))
    assert [r["optimizer"] for r in res.rows] == ["Adam", "SPAM", "Stable-SPAM"]
    assert len({tuple(r) for r in res.rows}) == 1  # identical keys
    for r in res.rows:
        assert math.isfinite(r["val_loss"]) and r["final_train_loss"] < math.log(256)
    ss = res.rows[2]
    # 32-bit Adam-style states: 8 B/param; low-bit states shrink them.
    assert 7.9 < ss["state_B_per_param_32bit"] < 8.2
    assert ss["state_B_per_param_4bit"] < ss["state_B_per_param_8bit"] < 2.5
    assert res.plots and res.plots[0].stat().st_size > 1000
    assert "Stable-SPAM" in res.notes


def test_corpus_is_python_source():
    from stablecore.demos.optimizers import load_corpus

    data = load_corpus(50_000)
    assert data.dtype == torch.uint8 and data.numel() == 50_000
    assert b"def " in bytes(data.tolist())
