"""Hessian trace and top eigenvalue: stablecore vs PyHessian, same model, data and probe count.

PyHessian does one double-backward HVP per probe; stablecore vmaps forward-over-reverse HVPs
over ``probe_batch`` probes. Both trace runs use exactly ``PROBES`` Rademacher probes (PyHessian's
early stop is disabled with ``tol=-inf``); the eigenvalue runs use ``PROBES`` matvecs each
(PyHessian: power iteration; stablecore: Lanczos). ``extra_info`` records the estimates, their
standard errors and the device. Smoke size on CPU with ``STABLECORE_BENCH_SMOKE=1``.

    STABLECORE_BENCH_SMOKE=1 pytest bench/test_bench_sharpness.py -q
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from torch import nn

from stablecore.methods.sharpness import HessianOperator, hessian_trace, top_eigenvalues

SMOKE = os.environ.get("STABLECORE_BENCH_SMOKE", "0") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not SMOKE else "cpu"
# (inputs, hidden, classes, samples, probes)
SIZE = (32, 64, 10, 256, 32) if SMOKE else (256, 1024, 100, 2048, 64)


def _setup():
    torch.manual_seed(0)
    d, h, c, n, _ = SIZE
    model = nn.Sequential(
        nn.Linear(d, h), nn.Tanh(), nn.Linear(h, h), nn.Tanh(), nn.Linear(h, c)
    ).to(DEVICE)
    x = torch.randn(n, d, device=DEVICE)
    y = torch.randint(0, c, (n,), device=DEVICE)
    return model, nn.CrossEntropyLoss(), x, y


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _peak_and_reset() -> str:
    if DEVICE != "cuda":
        return "n/a (CPU)"
    peak = torch.cuda.max_memory_allocated() / 2**20
    torch.cuda.reset_peak_memory_stats()
    return f"{peak:.1f} MiB"


def _info(benchmark, peer: str, estimate: float, stderr: float | None, num_params: int) -> None:
    benchmark.extra_info.update(
        peer=peer,
        estimate=estimate,
        stderr=stderr,
        probes=SIZE[-1],
        device=DEVICE,
        params=num_params,
        peak_memory=_peak_and_reset(),
        smoke=SMOKE,
    )


@pytest.fixture(scope="module")
def setup():
    model, loss, x, y = _setup()
    # warm up torch.func (its first use imports torch._dynamo: seconds, once per process)
    op = HessianOperator(model, loss, (x, y))
    op.matvec(torch.randn(2, op.dim, device=DEVICE))
    return model, loss, x, y


def test_trace_stablecore(benchmark, setup):
    model, loss, x, y = setup
    probes = SIZE[-1]

    def run():
        est = hessian_trace(model, loss, (x, y), num_probes=probes, probe_batch=probes)
        _sync()
        return est

    est = benchmark.pedantic(run, rounds=1 if SMOKE else 3, iterations=1, warmup_rounds=0)
    _info(
        benchmark, "stablecore", est.trace, est.stderr, sum(p.numel() for p in model.parameters())
    )
    assert math.isfinite(est.trace) and est.num_probes == probes


def test_trace_pyhessian(benchmark, setup):
    pyhessian = pytest.importorskip("pyhessian")
    model, loss, x, y = setup
    probes = SIZE[-1]

    def run():
        torch.manual_seed(1)
        h = pyhessian.hessian(model, loss, data=(x, y), cuda=DEVICE == "cuda")
        samples = h.trace(maxIter=probes, tol=float("-inf"))
        _sync()
        model.zero_grad(set_to_none=True)
        return samples

    samples = np.asarray(benchmark.pedantic(run, rounds=1 if SMOKE else 3, iterations=1))
    theirs, se = float(samples.mean()), float(samples.std(ddof=1) / math.sqrt(len(samples)))
    _info(benchmark, "pyhessian", theirs, se, sum(p.numel() for p in model.parameters()))
    assert len(samples) == probes
    ours = hessian_trace(model, loss, (x, y), num_probes=probes, probe_batch=probes, seed=7)
    # same quantity: the two independent estimates agree within 4 combined standard errors
    assert abs(ours.trace - theirs) <= 4 * math.hypot(ours.stderr, se), (ours.trace, theirs)


def test_eigenvalue_stablecore(benchmark, setup):
    model, loss, x, y = setup
    steps = SIZE[-1]

    def run():
        res = top_eigenvalues(model, loss, (x, y), k=1, max_iters=steps, tol=0.0)
        _sync()
        return res

    res = benchmark.pedantic(run, rounds=1 if SMOKE else 3, iterations=1)
    _info(
        benchmark,
        "stablecore",
        float(res.eigenvalues[0]),
        float(res.residuals[0]),
        sum(p.numel() for p in model.parameters()),
    )
    assert res.num_matvecs == steps


def test_eigenvalue_pyhessian(benchmark, setup):
    pyhessian = pytest.importorskip("pyhessian")
    model, loss, x, y = setup
    steps = SIZE[-1]

    def run():
        torch.manual_seed(1)
        h = pyhessian.hessian(model, loss, data=(x, y), cuda=DEVICE == "cuda")
        vals, _ = h.eigenvalues(maxIter=steps, tol=float("-inf"), top_n=1)
        _sync()
        model.zero_grad(set_to_none=True)
        return vals[0]

    theirs = float(benchmark.pedantic(run, rounds=1 if SMOKE else 3, iterations=1))
    _info(benchmark, "pyhessian", theirs, None, sum(p.numel() for p in model.parameters()))
    ours = top_eigenvalues(model, loss, (x, y), k=1, max_iters=steps, tol=0.0)
    # power iteration approaches lambda_max from below, Lanczos is at least as close
    assert theirs <= float(ours.eigenvalues[0]) * (1 + 1e-3)
