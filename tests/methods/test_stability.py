"""linear_stability, SharpnessMonitor and the SGD-vs-GD reproduction (Wu & Su 2023) in miniature."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from stablecore.demos.sharpness import (
    half_mse,
    orthogonal_problem,
    sgd_distance_ratio,
    train_and_measure,
)
from stablecore.methods.sharpness import hessian_trace, top_eigenvalues
from stablecore.methods.stability import SharpnessMonitor, linear_stability
from stablecore.testing import assert_close, seed_all

N, C = 16, 4.0  # the construction: Tr(H) = c, lambda_max = c/n, ||H||_F^2 = c^2/n


@pytest.fixture(scope="module")
def construction():
    return orthogonal_problem(N, C, seed=0)


def test_estimators_recover_the_closed_form(construction):
    model, A, y = construction
    rep = linear_stability(model, half_mse, (A, y), lr=0.1, batch_size=1, num_probes=400)
    assert abs(rep.trace - C) <= 3 * rep.trace_stderr
    assert_close(torch.tensor(rep.lambda_max), torch.tensor(C / N), dtype=torch.float32)
    est = hessian_trace(model, half_mse, (A, y), num_probes=400, probe_batch=200)
    assert abs(est.frobenius_sq - C**2 / N) <= 3 * est.frobenius_sq_stderr


@pytest.mark.parametrize("batch", [1, 4, 16])
def test_sgd_threshold_2B_over_trace(construction, batch):
    model, A, y = construction
    theta = model.weight.detach()[0]
    threshold = 2 * batch / C
    for factor, stable in ((0.9, True), (1.1, False)):
        lr = factor * threshold
        rep = linear_stability(model, half_mse, (A, y), lr=lr, batch_size=batch, num_probes=400)
        assert rep.sgd_stable is stable, rep
        assert abs(rep.trace_margin_sigmas) > 3  # the verdict is not a coin flip
        ratio = sgd_distance_ratio(A, y, theta, lr, batch, epochs=20)
        assert (ratio < 0.5) if stable else (ratio > 2.0), (factor, batch, ratio)


def test_gd_threshold_2_over_lambda_max(construction):
    model, A, y = construction
    theta = model.weight.detach()[0]
    threshold = 2 / (C / N)
    for factor, stable in ((0.9, True), (1.1, False)):
        lr = factor * threshold
        rep = linear_stability(model, half_mse, (A, y), lr=lr, batch_size=N, num_probes=400)
        assert rep.gd_stable is stable
        assert_close(
            torch.tensor(rep.gd_threshold_lr), torch.tensor(threshold), dtype=torch.float32
        )
        ratio = sgd_distance_ratio(A, y, theta, lr, N, epochs=20)  # B = n: full-batch GD
        assert (ratio < 0.5) if stable else (ratio > 2.0), (factor, ratio)
    # SGD at batch 1 with GD's lr diverges: GD stability is the weaker condition
    rep = linear_stability(
        model, half_mse, (A, y), lr=0.9 * threshold, batch_size=1, num_probes=400
    )
    assert rep.gd_stable and not rep.sgd_stable


@pytest.mark.parametrize(
    "kind, sgd_lrs, gd_lrs",
    [("diagonal", (0.02, 0.035), (0.05, 0.1)), ("relu", (0.02, 0.04), (0.08,))],
)
def test_sgd_minima_satisfy_trace_bound_gd_only_lambda_max(kind, sgd_lrs, gd_lrs):
    sgd = [train_and_measure(kind, "SGD", lr) for lr in sgd_lrs]
    gd = [train_and_measure(kind, "GD", lr) for lr in gd_lrs]
    for m in sgd + gd:
        assert math.isfinite(m.trace), f"{m.optimizer} lr={m.lr} did not reach a minimum: {m.loss}"
        assert m.lambda_max <= 2 / m.lr, m  # both are GD-stable
    for m in sgd:  # SGD: Tr(H) <= 2/lr (within 3 standard errors of the estimate)
        assert m.trace - 3 * m.trace_stderr <= 2 / m.lr, m
    for m in gd:  # GD's minima are sharper than SGD allows: Tr(H) > 2/lr
        assert m.trace - 3 * m.trace_stderr > 2 / m.lr, m
    assert sgd[-1].trace < sgd[0].trace  # a larger SGD lr finds a flatter minimum


def test_report_fields_and_errors(construction):
    model, A, y = construction
    rep = linear_stability(model, half_mse, (A, y), lr=0.3, batch_size=2, num_probes=64)
    d = rep.as_dict()
    assert_close(torch.tensor(d["gd_margin"]), torch.tensor(2 / 0.3 - rep.lambda_max))
    assert_close(torch.tensor(d["sgd_margin"]), torch.tensor(4 / 0.3 - rep.trace))
    assert "SGD needs lr <=" in str(rep)
    with pytest.raises(ValueError, match="lr"):
        linear_stability(model, half_mse, (A, y), lr=0.0)
    with pytest.raises(ValueError, match="batch_size"):
        linear_stability(model, half_mse, (A, y), lr=0.1, batch_size=0)


def test_sharpness_monitor_records_and_round_trips():
    seed_all(3)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    x, y = torch.randn(16, 3, dtype=torch.float64), torch.randn(16, 1, dtype=torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    logged = []
    mon = SharpnessMonitor(
        model,
        half_mse,
        (x, y),
        every=2,
        optimizer=opt,
        batch_size=4,
        num_probes=8,
        log_fn=logged.append,
    )
    for _ in range(5):
        opt.zero_grad()
        half_mse(model(x), y).backward()
        opt.step()
        mon.step()
    assert [r["step"] for r in mon.history] == [0, 2, 4] and logged == mon.history
    last = mon.history[-1]
    lam = float(top_eigenvalues(model, half_mse, (x, y), k=1).eigenvalues[0])
    assert_close(torch.tensor(last["lambda_max"]), torch.tensor(lam), dtype=torch.float32)
    assert_close(torch.tensor(last["gd_margin"]), torch.tensor(2 / 0.05 - lam), dtype=torch.float32)
    assert_close(torch.tensor(last["sgd_margin"]), torch.tensor(8 / 0.05 - last["trace"]))
    clone = SharpnessMonitor(model, half_mse, (x, y), every=2)
    clone.load_state_dict(mon.state_dict())
    assert clone.history == mon.history and clone.num_steps == 5
    with pytest.raises(ValueError, match="every"):
        SharpnessMonitor(model, half_mse, (x, y), every=0)
