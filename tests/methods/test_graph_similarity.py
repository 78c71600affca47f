from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stablecore.methods import graph_similarity as gs
from stablecore.testing import assert_close, seed_all


def _random_graph(n: int, e: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(n, (2, e), generator=g)


def _sparse_binary(n: int, d: int, p: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(n, d, generator=g) < p).float() * torch.rand(n, d, generator=g).add(0.5)
    x[0] = 0.0  # an all-zero row: Jaccard with it must be 0, not NaN
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_edge_cosine_matches_float64_loop(dtype):
    seed_all(0)
    x = (torch.randn(30, 13, dtype=torch.float64) * 3).to(dtype)
    ei = _random_graph(30, 80, seed=1)
    out = gs.edge_cosine_similarity(x, ei)
    x64 = x.double()
    expected = torch.stack(
        [torch.nn.functional.cosine_similarity(x64[u], x64[v], dim=0) for u, v in ei.T.tolist()]
    )
    assert out.dtype == torch.promote_types(dtype, torch.float32)
    assert_close(out, expected, dtype=dtype)


def test_edge_cosine_chunked_equals_unchunked(monkeypatch):
    x = torch.randn(50, 9, dtype=torch.float64)
    ei = _random_graph(50, 301, seed=2)
    whole = gs.edge_cosine_similarity(x, ei)
    monkeypatch.setattr(gs, "_GATHER_BUDGET", 9 * 7)  # 7 edges per chunk, ragged last chunk
    assert_close(gs.edge_cosine_similarity(x, ei), whole)


@settings(max_examples=15, deadline=None)
@given(
    n=st.integers(2, 25),
    d=st.integers(1, 40),
    p=st.sampled_from([0.05, 0.3, 0.9]),
    seed=st.integers(0, 2**16),
)
def test_edge_jaccard_matches_set_oracle(n, d, p, seed):
    x = _sparse_binary(n, d, p, seed)
    ei = _random_graph(n, 3 * n, seed + 1)
    out = gs.edge_jaccard_similarity(x, ei)
    sets = [set(torch.nonzero(row).flatten().tolist()) for row in x]
    expected = []
    for u, v in ei.T.tolist():
        union = len(sets[u] | sets[v])
        expected.append(len(sets[u] & sets[v]) / union if union else 0.0)
    assert out.dtype == torch.float32
    assert_close(out, torch.tensor(expected, dtype=torch.float64), dtype=torch.float32)


def test_jaccard_accepts_packed_and_sparse_and_chunks(monkeypatch):
    x = _sparse_binary(40, 37, 0.3, seed=3)
    ei = _random_graph(40, 150, seed=4)
    ref = gs.edge_jaccard_similarity(x, ei)
    assert ref.max() > 0  # the data must exercise non-trivial overlaps
    assert torch.equal(gs.edge_jaccard_similarity(gs.pack_binary_features(x), ei), ref)
    assert torch.equal(gs.edge_jaccard_similarity(x.to_sparse(), ei), ref)
    monkeypatch.setattr(gs, "_GATHER_BUDGET", 5 * 11)
    assert torch.equal(gs.edge_jaccard_similarity(x, ei), ref)


def test_pack_binary_features_round_trip():
    x = _sparse_binary(7, 19, 0.5, seed=5)
    packed = gs.pack_binary_features(x)
    assert packed.shape == (7, 3) and packed.dtype == torch.uint8
    bits = (packed.unsqueeze(-1) >> torch.arange(7, -1, -1, dtype=torch.uint8)) & 1
    assert torch.equal(bits.view(7, -1)[:, :19].bool(), x != 0)


def _dense_topk(x, k, mask=None, exclude_self=True):
    z = torch.nn.functional.normalize(x.double(), dim=1)
    sim = z @ z.T
    if mask is not None:
        sim[:, ~mask] = float("-inf")
    if exclude_self:
        sim.fill_diagonal_(float("-inf"))
    return sim.topk(k, dim=1)


@pytest.mark.parametrize(
    ("n", "k", "row_block", "col_block"),
    [(37, 4, 5, 7), (37, 4, 1024, 8192), (64, 1, 8, 8), (20, 6, 3, 100)],
)
@pytest.mark.parametrize("exclude_self", [True, False])
def test_topk_blocked_matches_dense(n, k, row_block, col_block, exclude_self):
    seed_all(n + k)
    x = torch.randn(n, 11)
    mask = torch.rand(n) < 0.7
    for m in (None, mask):
        vals, idx = gs.topk_cosine_neighbors(
            x,
            k,
            candidate_mask=m,
            exclude_self=exclude_self,
            row_block=row_block,
            col_block=col_block,
        )
        ref_v, ref_i = _dense_topk(x, k, m, exclude_self)
        assert_close(vals, ref_v, dtype=torch.float32)
        assert torch.equal(idx, ref_i)


def test_topk_with_too_few_candidates_leaves_empty_slots():
    x = torch.randn(10, 4)
    mask = torch.zeros(10, dtype=torch.bool)
    mask[[2, 5]] = True
    vals, idx = gs.topk_cosine_neighbors(x, 3, candidate_mask=mask, row_block=3, col_block=4)
    assert torch.equal(idx[2], torch.tensor([5, -1, -1]))  # itself excluded: one candidate left
    assert set(idx[0, :2].tolist()) == {2, 5} and idx[0, 2] == -1
    assert torch.isinf(vals[idx == -1]).all() and torch.isfinite(vals[idx >= 0]).all()


def test_bad_inputs_raise_clear_errors():
    x = torch.randn(5, 3)
    with pytest.raises(ValueError, match=r"\[0, 5\).*\[0, 7\]"):
        gs.edge_cosine_similarity(x, torch.tensor([[0, 1], [7, 2]]))
    with pytest.raises(ValueError, match="range"):
        gs.edge_jaccard_similarity(x, torch.tensor([[-1, 1], [2, 2]]))
    with pytest.raises(ValueError, match=r"\[2, E\].*\(3, 2\)"):
        gs.edge_cosine_similarity(x, torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="float32"):
        gs.edge_cosine_similarity(x, torch.zeros(2, 2))
    with pytest.raises(ValueError, match=r"\[N, D\].*\(5,\)"):
        gs.edge_jaccard_similarity(torch.ones(5), torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="k must be"):
        gs.topk_cosine_neighbors(x, -1)
    with pytest.raises(ValueError, match="candidate_mask"):
        gs.topk_cosine_neighbors(x, 2, candidate_mask=torch.ones(4, dtype=torch.bool))
