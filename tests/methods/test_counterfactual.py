"""T-Rex robust counterfactuals: R-hat properties, T-Rex:I/NN invariants, baseline, metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stablecore.methods.counterfactual import (
    class_probability,
    closest_counterfactual,
    cost,
    fit_classifier,
    lof,
    lof_inlier,
    make_mlp,
    nearest_counterfactual,
    predict,
    stability,
    stability_loop,
    trex_i,
    trex_nn,
    validity,
)
from stablecore.testing import assert_close, seed_all, tolerance


def _net(d: int = 5, dtype=torch.float64, seed: int = 0) -> torch.nn.Module:
    seed_all(seed)
    return make_mlp(d, (16, 16)).to(dtype).eval()


def _blobs(n: int = 200, d: int = 5, seed: int = 0):
    """Two separable classes in [0, 1]^d; class 1 sits in the upper corner."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = (0.3 + 0.4 * y[:, None] + 0.12 * torch.randn(n, d, generator=g)).clamp(0, 1)
    return x.float(), y


@pytest.fixture(scope="module")
def trained():
    x, y = _blobs()
    net = fit_classifier(x, y, seed=0, hidden=(32, 32), epochs=30, batch_size=64, lr=3e-3)
    return net, x, y


@pytest.mark.parametrize("shared", [True, False])
def test_stability_batched_matches_per_draw_loop(shared):
    net = _net()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(4, 5, generator=g, dtype=torch.float64)
    noise = torch.randn(*(() if shared else (4,)), 7, 5, generator=g, dtype=torch.float64)
    got = stability(net, x, 1, noise=noise, sigma=0.3)
    ref = stability_loop(net, x, 1, noise=noise, sigma=0.3)
    assert_close(got, ref, dtype=torch.float64)
    # Chunked evaluation (2 points per model call) gives the same numbers.
    assert_close(stability(net, x, 1, noise=noise, sigma=0.3, max_rows=16), ref)


def test_stability_bounds_and_small_sigma_limit():
    net = _net()
    g = torch.Generator().manual_seed(2)
    x = torch.rand(6, 5, generator=g, dtype=torch.float64)
    noise = torch.randn(6, 50, 5, generator=g, dtype=torch.float64)
    r = stability(net, x, 0, noise=noise, sigma=0.5)
    m_i = class_probability(net, (x[:, None] + 0.5 * noise).reshape(-1, 5), 0).view(6, 50)
    assert bool((r <= m_i.mean(1) + tolerance(torch.float64).atol).all())
    assert bool((m_i.mean(1) <= 1).all()) and bool((r < m_i.mean(1)).any())
    # sigma -> 0: every draw is x itself, so R -> m(x) (error O(sigma)).
    r0 = stability(net, x, 0, noise=noise, sigma=1e-9)
    torch.testing.assert_close(r0, class_probability(net, x, 0), atol=1e-7, rtol=0)


def test_stability_order_invariance():
    net = _net()
    g = torch.Generator().manual_seed(3)
    x = torch.rand(5, 5, generator=g, dtype=torch.float64)
    noise = torch.randn(5, 9, 5, generator=g, dtype=torch.float64)
    r = stability(net, x, 1, noise=noise)
    perm_k = torch.randperm(9, generator=g)
    assert_close(stability(net, x, 1, noise=noise[:, perm_k]), r)
    perm_b = torch.randperm(5, generator=g)
    assert_close(stability(net, x[perm_b], 1, noise=noise[perm_b]), r[perm_b])


def test_stability_gradient_matches_finite_differences():
    """Common random numbers make R-hat a deterministic smooth function of x: gradcheck."""
    net = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    net = net.double()
    g = torch.Generator().manual_seed(4)
    x = torch.rand(3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    noise = torch.randn(3, 6, 5, generator=g, dtype=torch.float64)
    # |m(x) - m(x_i)| is not smooth where both are equal; random draws avoid that set.
    assert torch.autograd.gradcheck(lambda z: stability(net, z, 1, noise=noise, sigma=0.2), (x,))


def test_stability_sigmoid_and_prob_outputs_agree():
    lin = torch.nn.Linear(5, 1).double()
    g = torch.Generator().manual_seed(5)
    x = torch.rand(4, 5, generator=g, dtype=torch.float64)
    noise = torch.randn(11, 5, generator=g, dtype=torch.float64)
    a = stability(lin, x, 1, noise=noise)
    b = stability(lambda z: torch.sigmoid(lin(z)), x, 1, noise=noise, output="probs")
    two = lambda z: torch.cat([torch.zeros_like(lin(z)), lin(z)], 1)  # softmax == sigmoid
    assert_close(a, b)
    assert_close(stability(two, x, 1, noise=noise), a)


def test_trex_i_stays_in_ball_and_range_and_raises_stability(trained):
    net, x, y = trained
    fact = x[(y == 0) & (predict(net, x) == 0)][:12]
    base = closest_counterfactual(net, fact, 1, max_iter=60, search_steps=4)
    assert bool(base.valid.all())
    immutable = torch.zeros(5, dtype=torch.bool)
    immutable[0] = True
    g = torch.Generator().manual_seed(0)
    res = trex_i(
        net,
        base.x_cf,
        1,
        tau=0.9,
        k=64,
        sigma=0.05,
        step_size=0.05,
        max_steps=15,
        radius=0.3,
        immutable=immutable,
        generator=g,
    )
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        r0 = stability(net, base.x_cf, 1, k=64, sigma=0.05, generator=g)  # same draws
    assert bool(((res.x_cf - base.x_cf).norm(dim=1) <= 0.3 + 1e-6).all())
    assert bool(((res.x_cf >= 0) & (res.x_cf <= 1)).all())
    assert torch.equal(res.x_cf[:, 0], base.x_cf[:, 0])
    assert bool(res.valid.all()) and bool((predict(net, res.x_cf) == 1).all())
    assert float(res.stability.mean()) > float(r0.mean()) + 0.05
    assert int(res.steps.max()) <= 15 and int(res.steps.max()) > 0


def test_trex_i_stops_for_points_already_robust(trained):
    net, x, y = trained
    deep = x[(y == 1) & (predict(net, x) == 1)][:5]
    res = trex_i(net, deep, 1, tau=0.2, k=32, generator=torch.Generator().manual_seed(0))
    assert torch.equal(res.steps, torch.zeros(5, dtype=torch.long))
    assert torch.equal(res.x_cf, deep)


def test_trex_nn_returns_robust_point_when_one_exists(trained):
    net, x, y = trained
    fact = x[(y == 0) & (predict(net, x) == 0)][:10]
    g = torch.Generator().manual_seed(0)
    res = trex_nn(net, fact, x, 1, tau=0.8, k=128, generator=g)
    assert bool((res.stability > 0.8).all())
    assert bool((predict(net, res.x_cf) == 1).all())
    # Every returned row is a training point.
    assert bool((torch.cdist(res.x_cf, x).min(1).values == 0).all())
    plain = nearest_counterfactual(net, fact, x, 1)
    assert bool((cost(fact, plain.x_cf, 2) <= cost(fact, res.x_cf, 2) + 1e-6).all())
    # Impossible tau: falls back to the nearest point of the target class.
    fb = trex_nn(net, fact, x, 1, tau=1.0, k=16, generator=g)
    assert torch.equal(fb.x_cf, plain.x_cf)


def test_closest_counterfactual_is_closer_than_nearest_neighbour(trained):
    net, x, y = trained
    fact = x[(y == 0) & (predict(net, x) == 0)][:10]
    base = closest_counterfactual(net, fact, 1, max_iter=60, search_steps=4)
    nn_cf = nearest_counterfactual(net, fact, x, 1)
    assert bool(base.valid.all())
    assert float(cost(fact, base.x_cf, 1).mean()) < float(cost(fact, nn_cf.x_cf, 1).mean())
    # The closest CF sits near the boundary: its probability is far below the NN's.
    assert float(class_probability(net, base.x_cf, 1).detach().mean()) < 0.75


def _lof_oracle(ref: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    """LOF from its definition with explicit loops (Breunig et al. 2000, novelty mode)."""

    def knn(p, excl):
        d = [(np.linalg.norm(p - r), j) for j, r in enumerate(ref) if j != excl]
        return sorted(d)[:k]

    kd = np.array([knn(r, i)[-1][0] for i, r in enumerate(ref)])

    def lrd(p, excl):
        nb = knn(p, excl)
        return 1.0 / (np.mean([max(kd[j], dist) for dist, j in nb]) + 1e-10), nb

    lrd_ref = np.array([lrd(r, i)[0] for i, r in enumerate(ref)])
    out = []
    for p in q:
        lq, nb = lrd(p, -1)
        out.append(np.mean([lrd_ref[j] for _, j in nb]) / lq)
    return np.array(out)


@pytest.mark.parametrize("k", [1, 3])
def test_lof_matches_definition(k):
    g = torch.Generator().manual_seed(6)
    ref = torch.rand(30, 3, generator=g, dtype=torch.float64)
    q = torch.cat([torch.rand(5, 3, generator=g, dtype=torch.float64), ref[:2] + 3.0])
    got = lof(ref, q, k)
    assert_close(got, torch.from_numpy(_lof_oracle(ref.numpy(), q.numpy(), k)))
    assert lof_inlier(ref, q, k)[-2:].tolist() == [-1, -1]


def test_lof_matches_sklearn_when_installed():
    neighbors = pytest.importorskip("sklearn.neighbors")
    g = torch.Generator().manual_seed(7)
    ref = torch.rand(40, 4, generator=g, dtype=torch.float64)
    q = torch.rand(10, 4, generator=g, dtype=torch.float64) * 1.5
    sk = neighbors.LocalOutlierFactor(n_neighbors=2, novelty=True).fit(ref.numpy())
    assert_close(lof(ref, q, 2), torch.from_numpy(-sk.score_samples(q.numpy())))
    assert lof_inlier(ref, q, 2).tolist() == sk.predict(q.numpy()).tolist()


def test_validity_and_cost():
    x_cf = torch.tensor([[0.2, 0.9], [0.8, 0.1], [0.6, 0.6]])
    first = lambda z: torch.stack([0.5 - z[:, 0], z[:, 0] - 0.5], 1)  # class 1 iff z0 > 0.5
    second = lambda z: torch.stack([0.5 - z[:, 1], z[:, 1] - 0.5], 1)
    v = validity([first, second], x_cf, 1)
    assert_close(v, torch.tensor([2 / 3, 2 / 3], dtype=torch.float64))
    assert_close(validity(first, x_cf, 0), torch.tensor([1 / 3], dtype=torch.float64))
    x = torch.zeros(3, 2) + 0.1
    assert_close(cost(x, x_cf, 1), (x_cf - 0.1).abs().sum(1))
    assert_close(cost(x, x_cf, 2), (x_cf - 0.1).pow(2).sum(1).sqrt())


def test_fit_classifier_is_seeded_and_learns():
    x, y = _blobs(120)
    a = fit_classifier(x, y, seed=3, hidden=(8,), epochs=20, batch_size=32, lr=1e-2)
    b = fit_classifier(x, y, seed=3, hidden=(8,), epochs=20, batch_size=32, lr=1e-2)
    c = fit_classifier(x, y, seed=4, hidden=(8,), epochs=20, batch_size=32, lr=1e-2)
    assert torch.equal(a(x), b(x)) and not torch.equal(a(x), c(x))
    assert float((predict(a, x) == y).float().mean()) > 0.9


# ----------------------------------------------------------------------------- bad input


def test_non_differentiable_model_is_rejected():
    net = _net()
    x = torch.rand(3, 5, dtype=torch.float64)
    detached = lambda z: net(z).detach()
    with pytest.raises(TypeError, match="differentiabl"):
        trex_i(detached, x, 1, k=4)
    with pytest.raises(TypeError, match="differentiabl"):
        closest_counterfactual(detached, x, 1, max_iter=2, search_steps=1)
    as_numpy = lambda z: torch.from_numpy(net(z).detach().numpy())
    with pytest.raises(TypeError, match="differentiabl"):
        trex_i(as_numpy, x, 1, k=4)
    with pytest.raises(TypeError, match="torch.Tensor"):
        trex_i(lambda z: net(z).detach().numpy(), x, 1, k=4)
    with pytest.raises(TypeError, match="floating"):
        trex_i(lambda z: net(z).argmax(1), x, 1, k=4)


def test_bad_shapes_and_arguments():
    net = _net()
    x = torch.rand(3, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"\[B, d\]"):
        stability(net, x[0], 1, k=4)
    with pytest.raises(TypeError, match="floating"):
        stability(net, x.long(), 1, k=4)
    with pytest.raises(ValueError, match="noise"):
        stability(net, x, 1, noise=torch.randn(4, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="target"):
        stability(net, x, 2, k=4)
    with pytest.raises(ValueError, match="model output"):
        stability(lambda z: net(z)[:1], x, 1, k=4)
    with pytest.raises(ValueError, match="tau"):
        trex_i(net, x, 1, tau=1.5, k=4)
    with pytest.raises(ValueError, match="immutable"):
        trex_i(net, x, 1, k=4, immutable=torch.zeros(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="differ"):
        trex_nn(net, x, torch.rand(10, 4, dtype=torch.float64), 1, k=4)
    with pytest.raises(ValueError, match="n_neighbors"):
        lof(x, x, n_neighbors=3)
    with pytest.raises(ValueError, match="shapes"):
        cost(x, x[:2])
    with pytest.raises(ValueError, match="y must be int64"):
        fit_classifier(x, torch.zeros(3), seed=0, epochs=1)
