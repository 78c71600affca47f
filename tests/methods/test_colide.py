"""CoLiDE (stablecore.methods.colide): score pieces, reference equivalence, batching, recovery."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stablecore.methods.colide import CoLiDE, _score, _sigma_closed_form, colide_fit, h_ldet
from stablecore.methods.dag_utils import (
    count_accuracy,
    is_dag,
    simulate_dag,
    simulate_linear_sem,
    simulate_parameter,
)
from stablecore.testing import assert_close, seed_all

# Few steps with a big learning rate and small s: forces domain restarts and lr halvings.
EVENTFUL = dict(
    T=3, s=[1.0, 0.5, 0.3], warm_iter=100, max_iter=100, checkpoint=50, lr=0.3, progress=False
)


def _data(seeds, d=6, edges=10, n=100, equal=True):
    out = []
    for seed in seeds:
        rng = np.random.default_rng(seed)
        B = simulate_dag(d, edges, "ER", rng=rng)
        W = simulate_parameter(B, rng=rng)
        scale = 1.0 if equal else np.sqrt(rng.uniform(0.5, 10, d))
        out.append((B, simulate_linear_sem(W, n, noise_scale=scale, rng=rng)))
    return out


def test_h_ldet_gradient_and_values():
    seed_all(0)
    W = (0.3 * torch.randn(2, 4, 4, dtype=torch.float64)).requires_grad_()
    h, grad = h_ldet(W, 1.0)
    (auto,) = torch.autograd.grad(h.sum(), W)
    assert_close(grad, auto)
    assert torch.autograd.gradcheck(lambda w: h_ldet(w, 1.0)[0], (W,))
    dag = torch.triu(torch.randn(5, 5, dtype=torch.float64), 1) * 0.5
    assert abs(float(h_ldet(dag, 1.0)[0])) < 1e-12
    cyc = torch.tensor([[0.0, 0.6], [0.7, 0.0]], dtype=torch.float64)
    assert float(h_ldet(cyc, 1.0)[0]) > 0.1
    with pytest.raises(ValueError, match="square"):
        h_ldet(torch.zeros(3, 4))


@pytest.mark.parametrize("variant", ["ev", "nv"])
def test_closed_form_sigma_is_stationary(variant):
    seed_all(1)
    q = torch.rand(2, 5, dtype=torch.float64) + 0.2
    sig = _sigma_closed_form(q, variant, 0.0).requires_grad_()
    (g,) = torch.autograd.grad(_score(q, sig, variant).sum(), sig)
    assert_close(g, torch.zeros_like(g))
    # and it is the minimiser: moving sigma increases the score
    assert (_score(q, sig.detach() * 1.1, variant) > _score(q, sig.detach(), variant)).all()


def test_input_validation():
    X = np.random.default_rng(0).normal(size=(50, 4))
    bad = X.copy()
    bad[3, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        colide_fit(bad, progress=False)
    with pytest.raises(ValueError, match="2 samples"):
        colide_fit(X[:1], progress=False)
    with pytest.raises(ValueError, match="shape"):
        colide_fit(X[0], progress=False)
    with pytest.raises(ValueError, match="variant"):
        colide_fit(X, variant="xx", progress=False)
    with pytest.raises(ValueError, match="lambda1"):
        colide_fit(np.stack([X, X, X]), [0.1, 0.2], progress=False)


def test_dagma_mode_matches_dagma_step_for_step():
    dagma_linear = pytest.importorskip("dagma.linear")
    ((_, X),) = _data([0], d=8, edges=12, n=200)
    # early stopping off (checkpoint > iterations): CoLiDE's d*sigma/2 would shift its test
    kw = dict(T=3, s=[1.0, 0.9, 0.8], warm_iter=300, max_iter=400, checkpoint=10**6)
    ref = dagma_linear.DagmaLinear("l2").fit(X.copy(), lambda1=0.02, w_threshold=0.0, **kw)
    res = colide_fit(X, 0.02, variant="dagma", domain_tol=1e-16, progress=False, **kw)
    assert_close(res.W[0], torch.from_numpy(ref))


@pytest.mark.parametrize("variant", ["ev", "nv"])
def test_batched_equals_unbatched_with_restarts(variant):
    data = _data([0, 1, 2], equal=variant == "ev")
    X = np.stack([x for _, x in data])
    lams = [0.02, 0.05, 0.1]
    batched = colide_fit(X, lams, variant=variant, **EVENTFUL)
    assert (batched.s[:, -1] > 0.3 + 1e-9).any()  # a restart happened in this batch
    for i in range(3):
        one = colide_fit(X[i], lams[i], variant=variant, **EVENTFUL)
        # Batched reductions differ from single ones at roundoff (~1e-17 after 5 steps); lr=0.3
        # with restarts amplifies that to ~1e-9, hence the float32 row of the table here.
        assert_close(batched.W[i], one.W[0], dtype=torch.float32)
        assert_close(batched.sigma[i], one.sigma[0], dtype=torch.float32)
        assert int(batched.steps[i]) == int(one.steps[0])
    calm = dict(EVENTFUL, lr=3e-3)  # no events: batched == unbatched to float64 tolerance
    b_calm = colide_fit(X, lams, variant=variant, **calm)
    for i in range(3):
        assert_close(b_calm.W[i], colide_fit(X[i], lams[i], variant=variant, **calm).W[0])
    # the sync-free masked step (the CUDA path) gives the same trajectories
    masked = colide_fit(X, lams, variant=variant, sync_free=True, **EVENTFUL)
    assert_close(masked.W, batched.W, dtype=torch.float32)  # other op order, same roundoff story


def test_lambda_grid_on_one_dataset():
    ((_, X),) = _data([5])
    res = colide_fit(X, [0.01, 1.0], **dict(EVENTFUL, lr=1e-2))
    assert res.W.shape == (2, 6, 6)
    assert res.W[1].abs().sum() < res.W[0].abs().sum()  # more l1 -> sparser


@pytest.mark.parametrize("variant", ["ev", "nv"])
def test_recovers_small_dag(variant):
    # d=10, 12 edges, n=1000; two graphs fitted in one batched call (short schedule for CI).
    data = _data([11, 12], d=10, edges=12, n=1000, equal=variant == "ev")
    X = np.stack([x for _, x in data])
    est = CoLiDE(
        variant=variant,
        lambda1=0.05,
        T=3,
        s=[1.0, 0.9, 0.8],
        warm_iter=2000,
        max_iter=4000,
        lr=1e-3,
        checkpoint=500,
        progress=False,
    ).fit(X)
    assert est.adjacency_.shape == (2, 10, 10)
    for (B, _), adj in zip(data, est.adjacency_):
        assert is_dag(adj)
        acc = count_accuracy(B, adj != 0)
        assert acc["shd"] <= 3, acc
        assert acc["tpr"] >= 0.8, acc
    # noise std estimates: EV ~ 1; NV within the simulated range sqrt(U(0.5, 10))
    sig = np.asarray(est.sigma_)
    if variant == "ev":
        assert np.all(np.abs(sig - 1.0) < 0.15)
    else:
        assert np.all((sig > 0.5) & (sig < 3.5))


def test_estimator_state_dict_roundtrip():
    ((_, X),) = _data([3])
    est = CoLiDE(variant="nv", lambda1=0.05, **EVENTFUL).fit(X)
    clone = CoLiDE().load_state_dict(est.state_dict())
    assert clone.get_params() == est.get_params()
    np.testing.assert_array_equal(clone.adjacency_, est.adjacency_)
    np.testing.assert_array_equal(clone.sigma_, est.sigma_)
    assert est.W_.shape == (6, 6) and est.sigma_.shape == (6,)


def test_newton_schulz_inverse_matches_exact():
    # The CUDA default (warm-started Newton-Schulz, masked sync-free step), checked on CPU.
    ((_, X),) = _data([7])
    calm = dict(EVENTFUL, lr=3e-3)
    exact = colide_fit(X, 0.05, variant="nv", **calm)
    ns = colide_fit(X, 0.05, variant="nv", inverse="newton_schulz", sync_free=True, **calm)
    assert_close(ns.W, exact.W, dtype=torch.float32)
    assert_close(ns.sigma, exact.sigma, dtype=torch.float32)


@pytest.mark.parametrize("variant", ["ev", "nv", "dagma"])
def test_cpu_fast_path_matches_masked_step_and_numpy_adam(monkeypatch, variant):
    # The CPU fast path (numpy views, fused torch Adam) against the masked torch step (the CUDA
    # logic) and against its own numpy-Adam fallback, on calm trajectories (no domain events).
    from stablecore.methods._colide import cpu_step

    data = _data([0, 1], equal=variant != "nv")
    X = np.stack([x for _, x in data])
    calm = dict(EVENTFUL, lr=3e-3)
    fast = colide_fit(X, [0.02, 0.1], variant=variant, **calm)
    masked = colide_fit(X, [0.02, 0.1], variant=variant, sync_free=True, **calm)
    assert_close(fast.W, masked.W)
    assert_close(fast.sigma, masked.sigma)
    assert torch.equal(fast.steps, masked.steps)
    monkeypatch.setattr(cpu_step, "_fused_adam_available", lambda: False)
    plain = colide_fit(X, [0.02, 0.1], variant=variant, **calm)
    assert_close(fast.W, plain.W)


def test_blas_threads_context_restores_count():
    from stablecore.methods._colide.cpu_step import _openblas_setters, blas_threads

    setters = _openblas_setters()
    if setters is None:
        pytest.skip("numpy is not linked to a bundled OpenBLAS")
    get, _ = setters
    before = int(get())
    with blas_threads(1):
        assert int(get()) == 1
    assert int(get()) == before
