"""Forward-only quadratic forms v^T H v, Rademacher probes and the one-vector Lanczos (float64)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from stablecore.methods._hessian.lanczos import lanczos
from stablecore.methods.sharpness import HessianOperator, hessian_trace, rademacher
from stablecore.testing import assert_close, seed_all

F64 = torch.float64
_ACTS = {"tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "relu": nn.ReLU, "silu": nn.SiLU, "gelu": nn.GELU}


def _case(act: str, loss_kind: str, hidden: int, n: int, seed: int, out_act: bool = False):
    seed_all(seed)
    a = _ACTS[act]
    layers = [nn.Linear(3, hidden), a(), nn.Sequential(nn.Linear(hidden, 4), a()), nn.Linear(4, 3)]
    if out_act:  # a network that ends in an activation: the loss sees act(z_L)
        layers.append(a())
    model = nn.Sequential(*layers).to(F64)
    x = torch.randn(n, 3, dtype=F64)
    if loss_kind.startswith("mse"):
        loss = nn.MSELoss(reduction="sum" if loss_kind == "mse_sum" else "mean")
        return model, loss, x, torch.randn(n, 3, dtype=F64)
    y = torch.randint(0, 3, (n,))
    y[0] = -100  # an ignored row drops out of the loss and of the mean
    return model, nn.CrossEntropyLoss(reduction="sum" if loss_kind == "ce_sum" else "mean"), x, y


@settings(max_examples=12, deadline=None, derandomize=True)
@given(
    act=st.sampled_from(sorted(_ACTS)),
    loss_kind=st.sampled_from(["mse", "mse_sum", "ce", "ce_sum"]),
    hidden=st.integers(1, 6),
    n=st.integers(2, 9),
    subset=st.sampled_from(
        [None, ("2.0.weight", "3.bias"), ("0.bias",), ("0.weight", "3.weight"), ("2.0.bias",)]
    ),
    out_act=st.booleans(),
    probes=st.integers(1, 11),
    seed=st.integers(0, 1000),
)
def test_quadratic_forms_match_the_dense_hessian(
    act, loss_kind, hidden, n, subset, out_act, probes, seed
):
    model, loss, x, y = _case(act, loss_kind, hidden, n, seed, out_act)
    op = HessianOperator(model, loss, (x, y), params=subset)
    ref = HessianOperator(model, loss, (x, y), params=subset, backend="double_backward")
    H = ref.dense()
    V = torch.randn(probes, op.dim, dtype=F64, generator=torch.Generator().manual_seed(seed))
    q = op.quadratic_forms(V)
    assert op.backend_used == "structured"
    assert q.shape == (probes,) and q.dtype == F64
    assert_close(q, torch.einsum("pd,de,pe->p", V, H, V))
    assert op.num_quadratic_forms == probes


def test_quadratic_forms_weight_batches_and_fall_back():
    model, loss, x, y = _case("tanh", "mse", 4, 9, 3)
    V = torch.randn(5, sum(p.numel() for p in model.parameters()), dtype=F64)
    whole = HessianOperator(model, loss, (x, y))
    split = HessianOperator(model, loss, [(x[:4], y[:4]), (x[4:], y[4:])])  # weighted by size
    assert_close(split.quadratic_forms(V), (V * split.matvec(V)).sum(-1))
    assert split.backend_used == "structured"
    # the mean over batches of sizes 4 and 5 is the full-batch mean for an MSE "mean" loss
    assert_close(split.quadratic_forms(V), whole.quadratic_forms(V))
    custom = HessianOperator(model, lambda o, t: ((o - t) ** 2).mean(), (x, y))
    assert_close(custom.quadratic_forms(V), whole.quadratic_forms(V))
    assert custom.backend_used != "structured"  # an arbitrary callable: v . Hv by autograd
    with pytest.raises(ValueError, match=r"\[P, D\]"):
        whole.quadratic_forms(V[0])
    with pytest.raises(ValueError, match="D="):
        whole.quadratic_forms(V[:, 1:])


def test_quadratic_only_trace_is_the_same_estimate():
    model, loss, x, y = _case("gelu", "ce", 5, 8, 11)
    full = hessian_trace(model, loss, (x, y), num_probes=40, probe_batch=16, seed=4)
    quad = hessian_trace(
        model, loss, (x, y), num_probes=40, probe_batch=16, seed=4, quadratic_only=True
    )
    # the same probes, so the same v^T H v up to rounding, and the same statistics
    assert_close(quad.samples, full.samples)
    assert math.isclose(quad.trace, full.trace, rel_tol=1e-9)
    assert math.isclose(quad.stderr, full.stderr, rel_tol=1e-9)
    assert math.isnan(quad.frobenius_sq) and quad.groups == {}
    assert quad.backend == "structured"
    exact = float(torch.trace(HessianOperator(model, loss, (x, y)).dense()))
    assert abs(quad.trace - exact) <= 3 * quad.stderr
    adaptive = hessian_trace(model, loss, (x, y), rtol=0.05, quadratic_only=True)
    assert adaptive.stderr <= 0.05 * abs(adaptive.trace) or adaptive.num_probes == 1024


@pytest.mark.parametrize("dim", [1, 7, 8, 9, 1001])
def test_rademacher_signs(dim):
    gen = torch.Generator().manual_seed(0)
    R = rademacher(600, dim, gen, F64)
    assert R.shape == (600, dim) and R.dtype == F64 and R.is_contiguous()
    assert set(R.unique().tolist()) <= {-1.0, 1.0}
    # fair and uncorrelated across the 8 entries that share a random byte (600*dim samples)
    flat = R.reshape(-1)
    bound = 5 / math.sqrt(flat.numel())
    assert abs(float(flat.mean())) < bound
    if flat.numel() > 8:
        lag = flat[:-1] * flat[1:]
        assert abs(float(lag.mean())) < 5 / math.sqrt(lag.numel())
    again = rademacher(600, dim, torch.Generator().manual_seed(0), F64)
    assert torch.equal(R, again)


def test_one_vector_lanczos_restarts_on_an_invariant_subspace():
    # 3 distinct eigenvalues: the Krylov space of any start vector has dimension 3, so the
    # recurrence breaks down and restarts; after D steps T has every eigenvalue, multiplicities too
    diag = torch.tensor([1.0, 1.0, 1.0, 2.0, 2.0, 5.0], dtype=F64)
    v0 = torch.randn(1, 6, dtype=F64, generator=torch.Generator().manual_seed(1))
    state = lanczos(lambda q: q * diag, v0, 6, generator=torch.Generator().manual_seed(2))
    theta, _ = state.ritz()
    assert_close(theta[0], diag.sort().values)
    Q = state.basis[:, 0]
    assert_close(Q @ Q.T, torch.eye(6, dtype=F64))
    assert state.beta[0, 2] == 0  # the coupling at the breakdown is exactly zero


def test_one_vector_lanczos_equals_the_batched_recurrence():
    gen = torch.Generator().manual_seed(3)
    A = torch.randn(40, 40, dtype=F64, generator=gen)
    A = A + A.T
    v0 = torch.randn(1, 40, dtype=F64, generator=gen)
    one = lanczos(lambda q: q @ A, v0, 15)
    # two copies of the start vector go through the batched (P > 1) code path
    two = lanczos(lambda q: q @ A, v0.repeat(2, 1), 15)
    assert_close(one.alpha[0], two.alpha[0])
    assert_close(one.beta[0], two.beta[0])
    assert_close(one.basis[:, 0], two.basis[:, 0])
