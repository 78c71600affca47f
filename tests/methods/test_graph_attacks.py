from __future__ import annotations

import pytest
import torch

from stablecore.methods.graph_attacks import (
    dice_perturbation,
    pairs_to_edge_index,
    random_perturbation,
    undirected_pairs,
)


def _ring_with_chords(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ring = torch.stack([torch.arange(n), (torch.arange(n) + 1) % n])
    chords = torch.randint(n, (2, n), generator=g)
    ei = torch.cat([ring, chords], dim=1)
    return torch.cat([ei, ei.flip(0)], dim=1)  # both directions, with duplicates/self-loops


def _pair_set(ei: torch.Tensor) -> set[tuple[int, int]]:
    return {(min(u, v), max(u, v)) for u, v in ei.T.tolist() if u != v}


def _assert_symmetric_simple(ei: torch.Tensor, n: int) -> None:
    assert ei.dtype == torch.int64 and ei.shape[0] == 2
    assert (ei >= 0).all() and (ei < n).all()
    assert (ei[0] != ei[1]).all()
    directed = set(map(tuple, ei.T.tolist()))
    assert len(directed) == ei.shape[1]  # no duplicates
    assert all((v, u) in directed for u, v in directed)


def test_undirected_pairs_round_trip():
    ei = _ring_with_chords(20, 0)
    pairs = undirected_pairs(ei, 20)
    assert (pairs[0] < pairs[1]).all()
    assert set(map(tuple, pairs.T.tolist())) == _pair_set(ei)
    back = pairs_to_edge_index(pairs, 20)
    _assert_symmetric_simple(back, 20)
    assert _pair_set(back) == _pair_set(ei)


@pytest.mark.parametrize("mode", ["add", "remove", "flip"])
def test_random_perturbation_changes_exactly_budget(mode):
    n = 40
    ei = _ring_with_chords(n, 1)
    before = _pair_set(ei)
    out = random_perturbation(
        ei, n, rate=0.25, mode=mode, generator=torch.Generator().manual_seed(3)
    )
    _assert_symmetric_simple(out, n)
    after = _pair_set(out)
    budget = int(0.25 * len(before))
    assert budget > 0
    assert len(before ^ after) == budget
    if mode == "add":
        assert before <= after
    if mode == "remove":
        assert after <= before


def test_random_perturbation_is_seeded_and_uniform_enough():
    n = 30
    ei = _ring_with_chords(n, 2)
    g = lambda s: torch.Generator().manual_seed(s)
    a = random_perturbation(ei, n, n_perturbations=10, generator=g(5))
    b = random_perturbation(ei, n, n_perturbations=10, generator=g(5))
    c = random_perturbation(ei, n, n_perturbations=10, generator=g(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    # Inserted pairs must not all come from low node ids (unique() sorts keys: a bias trap).
    added = torch.tensor(sorted(_pair_set(c) - _pair_set(ei)))
    assert added.float().mean() > n / 4


def test_dice_deletes_internally_and_connects_externally():
    n = 60
    g = torch.Generator().manual_seed(4)
    labels = torch.randint(3, (n,), generator=g)
    ei = _ring_with_chords(n, 4)
    before = _pair_set(ei)
    out = dice_perturbation(ei, labels, rate=0.5, generator=torch.Generator().manual_seed(9))
    _assert_symmetric_simple(out, n)
    after = _pair_set(out)
    removed, inserted = before - after, after - before
    assert removed and inserted  # a fair coin per change: both kinds occur at this budget
    assert len(removed) + len(inserted) == int(0.5 * len(before))
    assert all(labels[u] == labels[v] for u, v in removed)
    assert all(labels[u] != labels[v] for u, v in inserted)


def test_zero_budget_returns_the_clean_graph():
    ei = _ring_with_chords(15, 5)
    out = random_perturbation(ei, 15, rate=0.0)
    assert _pair_set(out) == _pair_set(ei)


def test_bad_inputs_raise():
    ei = _ring_with_chords(10, 6)
    with pytest.raises(ValueError, match=r"\[0, 7\).*\[0, 9\]"):
        random_perturbation(ei, 10 - 3, rate=0.1)
    with pytest.raises(ValueError, match=r"\[2, E\]"):
        random_perturbation(ei.T, 10, rate=0.1)
    with pytest.raises(ValueError, match="exactly one"):
        random_perturbation(ei, 10, rate=0.1, n_perturbations=3)
    with pytest.raises(ValueError, match="mode"):
        random_perturbation(ei, 10, rate=0.1, mode="swap")
    with pytest.raises(ValueError, match="non-edges"):
        random_perturbation(ei, 10, n_perturbations=100)
    with pytest.raises(ValueError, match="labels"):
        dice_perturbation(ei, torch.zeros(10, 2, dtype=torch.long), rate=0.1)
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        dice_perturbation(ei, torch.zeros(5, dtype=torch.long), rate=0.1)
