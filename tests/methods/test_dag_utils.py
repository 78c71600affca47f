"""DAG simulation and metrics (stablecore.methods.dag_utils) on hand-made cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stablecore.methods.dag_utils import (
    count_accuracy,
    is_dag,
    normalized_shd,
    simulate_dag,
    simulate_linear_sem,
    simulate_parameter,
    to_dag,
    topological_order,
)
from stablecore.testing import assert_close

# chain 0 -> 1 -> 2 plus 0 -> 3
B_TRUE = np.zeros((4, 4))
B_TRUE[0, 1] = B_TRUE[1, 2] = B_TRUE[0, 3] = 1


@pytest.mark.parametrize("graph_type", ["ER", "SF"])
def test_simulate_dag_is_acyclic_binary(graph_type):
    rng = np.random.default_rng(0)
    B = simulate_dag(30, 60, graph_type, rng=rng)
    assert B.shape == (30, 30) and is_dag(B)
    assert set(np.unique(B)) <= {0.0, 1.0}
    assert np.trace(B) == 0
    if graph_type == "ER":
        assert B.sum() == 60  # igraph's Erdos_Renyi(n, m): exactly m edges
    else:
        assert 40 <= B.sum() <= 60  # m = round(60 / 30) = 2 per new node, fewer for the first


def test_simulate_dag_reproducible_and_validates():
    a = simulate_dag(10, 15, rng=np.random.default_rng(3))
    b = simulate_dag(10, 15, rng=np.random.default_rng(3))
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="graph_type"):
        simulate_dag(5, 3, "BP")
    with pytest.raises(ValueError, match="edges"):
        simulate_dag(4, 7, "ER")


def test_simulate_parameter_ranges():
    rng = np.random.default_rng(1)
    B = simulate_dag(20, 50, rng=rng)
    W = simulate_parameter(B, rng=rng)
    on = np.abs(W[B != 0])
    assert np.all((on >= 0.5) & (on <= 2.0))
    assert np.all(W[B == 0] == 0)
    assert (W[B != 0] > 0).any() and (W[B != 0] < 0).any()


def test_population_covariance():
    rng = np.random.default_rng(2)
    B = simulate_dag(6, 8, rng=rng)
    W = simulate_parameter(B, rng=rng)
    scale = np.sqrt(rng.uniform(0.5, 10, 6))
    X = simulate_linear_sem(W, np.inf, noise_scale=scale)
    inv = np.linalg.inv(np.eye(6) - W)
    expected = inv.T @ np.diag(scale**2) @ inv
    assert_close(torch.from_numpy(X.T @ X / 6), torch.from_numpy(expected))


def test_sample_sem_matches_population_and_rejects_cycles():
    rng = np.random.default_rng(4)
    W = np.array([[0.0, 1.5], [0.0, 0.0]])
    X = simulate_linear_sem(W, 200_000, noise_scale=[1.0, 2.0], rng=rng)
    cov = np.cov(X.T)
    # var(x1) = 1.5^2 * 1 + 4 = 6.25; Monte-Carlo error ~ 6.25 * sqrt(2/2e5) = 0.02
    assert abs(cov[1, 1] - 6.25) < 0.15 and abs(cov[0, 1] - 1.5) < 0.05
    with pytest.raises(ValueError, match="DAG"):
        simulate_linear_sem(np.array([[0.0, 1.0], [1.0, 0.0]]), 10)
    with pytest.raises(ValueError, match="square"):
        simulate_linear_sem(np.zeros((2, 3)), 10)


def test_count_accuracy_perfect():
    acc = count_accuracy(B_TRUE, B_TRUE)
    assert acc == {"fdr": 0.0, "tpr": 1.0, "fpr": 0.0, "shd": 0, "nnz": 3}


def test_count_accuracy_reversed_missing_extra():
    est = B_TRUE.copy()
    est[1, 2], est[2, 1] = 0, 1  # reverse 1->2
    acc = count_accuracy(B_TRUE, est)
    assert acc["shd"] == 1 and acc["nnz"] == 3
    assert acc["tpr"] == pytest.approx(2 / 3) and acc["fdr"] == pytest.approx(1 / 3)
    assert acc["fpr"] == pytest.approx(1 / 3)  # 6 pairs - 3 true edges = 3 negatives
    est = B_TRUE.copy()
    est[0, 3] = 0  # missing edge
    est[2, 3] = 1  # extra edge
    acc = count_accuracy(B_TRUE, est)
    assert acc["shd"] == 2 and acc["tpr"] == pytest.approx(2 / 3)
    assert acc["fdr"] == pytest.approx(1 / 3)
    assert normalized_shd(B_TRUE, est) == pytest.approx(2 / 3)


def test_count_accuracy_cpdag_and_errors():
    est = B_TRUE.copy()
    est[0, 1] = -1  # undirected edge on a true edge: counted as found
    acc = count_accuracy(B_TRUE, est)
    assert acc["tpr"] == 1.0 and acc["shd"] == 0
    cyc = B_TRUE.copy()
    cyc[2, 0] = 1
    with pytest.raises(ValueError, match="DAG"):
        count_accuracy(B_TRUE, cyc)
    with pytest.raises(ValueError, match="0, 1"):
        count_accuracy(B_TRUE, 2 * B_TRUE)
    with pytest.raises(ValueError, match="shape"):
        count_accuracy(B_TRUE, np.zeros((3, 3)))


def test_is_dag_to_dag():
    assert not is_dag(np.eye(2))
    assert topological_order(B_TRUE)[0] == 0
    W = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 0.9], [0.5, 0.0, 0.2]])
    out = to_dag(W, threshold=0.3)
    assert is_dag(out)
    expected = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 0.9], [0.0, 0.0, 0.0]])
    np.testing.assert_array_equal(out, expected)  # 0.2 thresholded, weakest cycle edge 0.5 dropped
