"""Causal minimax stable-subset search (stablecore.methods.minimax)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from stablecore.methods.minimax import (
    CausalMinimax,
    GroupedMLP,
    d_separated,
    equivalence_classes,
    read_gml,
    stable_sets,
)
from stablecore.testing import assert_close, seed_all

SIM = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "which_invariance_sim"
needs_sim = pytest.mark.skipif(not (SIM / "gtaug.gml").exists(), reason="shared data absent")


def test_d_separation_hand_cases():
    chain = {"a": [], "b": ["a"], "c": ["b"]}
    assert not d_separated(chain, ["a"], ["c"], [])
    assert d_separated(chain, ["a"], ["c"], ["b"])
    collider = {"a": [], "c": [], "b": ["a", "c"], "d": ["b"]}
    assert d_separated(collider, ["a"], ["c"], [])
    assert not d_separated(collider, ["a"], ["c"], ["b"])
    assert not d_separated(collider, ["a"], ["c"], ["d"])  # conditioning on a collider's child


@needs_sim
def test_shipped_graph_sets_and_classes():
    parents = read_gml(SIM / "gtaug.gml")
    assert len(parents) == 12 and sum(map(len, parents.values())) == 18
    info = stable_sets(parents)
    assert info["mutable"] == ["X10", "X9"]
    assert info["mutable_children_of_target"] == ["X9"] and not info["full_set_optimal"]
    classes = equivalence_classes(parents)
    assert sum(map(len, classes.values())) == 256
    assert len(classes) == 45  # the official cache (cache/eqsubsets.json) also has 45 classes
    for rep, members in classes.items():
        assert all(set(rep) <= set(m) for m in members)


def test_stable_sets_validation():
    with pytest.raises(ValueError, match="target"):
        stable_sets({"X": []})
    with pytest.raises(ValueError, match="child"):
        stable_sets({"Y": ["E"], "E": []})


def test_grouped_mlp_equals_sequential():
    seed_all(0)
    Z = torch.randn(64, 5)
    mask = torch.tensor([[1, 1, 0, 0, 0], [0, 1, 1, 1, 0], [1, 0, 0, 0, 1]], dtype=torch.float32)
    y = torch.randn(3, 64)
    joint = GroupedMLP(mask, hidden=4, seed=3).fit(Z, y, iters=60)
    for g in range(3):
        one = GroupedMLP(mask[g : g + 1], hidden=4, seed=3 + g).fit(Z, y[g : g + 1], iters=60)
        assert_close(joint(Z)[g], one(Z)[0])
    # masked inputs have no influence
    Z2 = Z.clone()
    Z2[:, 4] += 5.0
    assert_close(joint(Z2)[0], joint(Z)[0])


def _toy(n=300, seed=0, y_to_m=True):
    """X1 -> Y -> M (mutable, scaled by env) -> X2 <- Y; X1 stable parent of Y."""
    rng = np.random.default_rng(seed)
    e = rng.integers(1, 5, n).astype(float)
    x1 = rng.normal(size=n)
    y = 0.8 * x1 + 0.5 * rng.normal(size=n)
    m = (e - 2.5) * (y if y_to_m else x1) + 0.3 * rng.normal(size=n)
    x2 = np.tanh(m) + y + 0.3 * rng.normal(size=n)
    parents = {
        "E": [],
        "X1": [],
        "Y": ["X1"],
        "M": ["Y" if y_to_m else "X1", "E"],
        "X2": ["M", "Y"],
    }
    return parents, {"E": e, "X1": x1, "Y": y, "M": m, "X2": x2}


def test_minimax_end_to_end_small():
    parents, data = _toy()
    mm = CausalMinimax(parents, fit_iters=150, adv_iters=40, progress=False).fit(data)
    assert mm.mutable_ == ["M"] and mm.stable_ == ["X1", "X2"]
    assert set(mm.hstar_) == set(mm.classes_) and len(mm.classes_) == 4
    assert all(np.isfinite(v) and v > 0 for v in mm.hstar_.values())
    assert mm.best_subset_ == min(mm.hstar_, key=mm.hstar_.get)
    r = mm.risk(data)
    assert np.isfinite(r) and r < 1.5  # standardised target: near 1 = predicting the mean
    with pytest.raises(ValueError, match="lacks"):
        mm.risk({k: v for k, v in data.items() if k != "X2"})


def test_minimax_full_set_shortcut():
    parents, data = _toy(y_to_m=False)  # Y has no mutable child: the whole stable set is optimal
    mm = CausalMinimax(parents, fit_iters=100, adv_iters=20, progress=False).fit(data)
    assert mm.full_set_optimal_ and mm.reps_ == [mm.best_subset_]
