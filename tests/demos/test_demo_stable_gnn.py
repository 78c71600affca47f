from __future__ import annotations

import pytest
import torch

pytest.importorskip("torch_geometric")

from stablecore.demos import DemoContext, load  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    # Small sparse work on a shared 2-core box: OpenMP barriers cost more than they save.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_stable_gnn_demo_quick(tmp_path):
    demo = load("stable_gnn")
    try:
        demo.load_cora(tmp_path)
    except FileNotFoundError as err:
        pytest.skip(str(err))
    result = demo.run(DemoContext(out_dir=tmp_path, device=torch.device("cpu"), quick=True))
    assert result.title == demo.TITLE
    assert len(result.rows) == 1
    row = result.rows[0]
    assert row["attack"] == "dice" and row["rate"] == 0.1 and row["graph"] == "cora"
    assert row["undirected_edges_attacked"] != 5278  # the attack really changed the graph
    # Even 30 classifier epochs beat chance (1/7) by far on Cora; STABLE ran end to end.
    assert 0.4 < row["gcn_acc"] <= 1.0 and 0.2 < row["stable_acc"] <= 1.0
    assert row["directed_edges_refined"] > 0
    assert all(p.exists() and p.stat().st_size > 0 for p in result.plots)
    assert "Cora" in result.notes


def test_stable_hparams_follow_the_readme_table():
    demo = load("stable_gnn")
    assert demo.stable_hparams(0.0) == (-0.5, 1, 0.0, 0.1)
    assert demo.stable_hparams(0.25) == demo.stable_hparams(0.2) == (0.6, 7, 0.03, 0.25)


def test_cora_lcc_loader_matches_the_literature_setting():
    demo = load("stable_gnn")
    try:
        data = demo.load_cora_lcc()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    # Pro-GNN / DeepRobust "nettack" Cora: LCC of 2485 nodes and 5069 undirected edges.
    assert data.num_nodes == 2485 and data.edge_index.shape[1] == 2 * 5069
    assert data.x.shape == (2485, 1433) and set(data.x.unique().tolist()) == {0.0, 1.0}
    masks = torch.stack([data.train_mask, data.val_mask, data.test_mask])
    assert torch.equal(masks.sum(0), torch.ones(2485, dtype=torch.long))  # a partition
    assert abs(int(data.train_mask.sum()) - 248) <= 7 and abs(int(data.val_mask.sum()) - 248) <= 7
    for c in range(7):  # stratified: every class in the training set
        assert (data.y[data.train_mask] == c).sum() > 0
    again = demo.load_cora_lcc()
    assert torch.equal(again.train_mask, data.train_mask)  # seeded split


def test_evaluate_shares_the_clean_fit_across_attacks(tmp_path, monkeypatch):
    demo = load("stable_gnn")
    calls = []

    def fake_fit(data, rate, seed, *args):
        calls.append((rate, seed))
        return 0.5 + rate, 0.6 + rate, 100

    monkeypatch.setattr(demo, "_fit_pair", fake_fit)
    try:
        data = demo.load_cora(tmp_path)
    except FileNotFoundError as err:
        pytest.skip(str(err))
    rows = demo.evaluate(data, ("dice", "random"), [0.0, 0.1], [0])
    assert calls == [(0.0, 0), (0.1, 0), (0.1, 0)]  # rate 0 fitted once, reused
    assert [(r["attack"], r["rate"]) for r in rows] == [
        ("dice", 0.0),
        ("dice", 0.1),
        ("random", 0.0),
        ("random", 0.1),
    ]
    assert rows[0]["stable_acc"] == rows[2]["stable_acc"] == 0.6
    assert rows[1]["undirected_edges_attacked"] != 5278 != rows[3]["undirected_edges_attacked"]
    with pytest.raises(ValueError, match="attack must be"):
        demo.evaluate(data, "nettack", [0.1], [0])
