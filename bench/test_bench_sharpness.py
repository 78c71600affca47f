"""Hessian trace and top eigenvalue: stablecore vs PyHessian, same model, data and HVP count.

Trace: both use exactly ``PROBES`` Rademacher probes (PyHessian's early stop is disabled with
``tol=-inf``); ``trace/stablecore`` computes the quadratic forms ``v^T H v`` only (as PyHessian's
trace does), ``trace/stablecore_hv`` the full ``H v`` (Frobenius norm and per-layer traces too).
Eigenvalue: both use ``PROBES`` Hessian-vector products (PyHessian: power iteration; stablecore:
Lanczos, and block Lanczos with 4 vectors per batched HVP); ``..._equal_accuracy`` is Lanczos
with the fewest HVPs that get at least as close to lambda_max as PyHessian's ``PROBES``. Every
timed call builds everything from scratch (PyHessian's constructor and our operator included).

``test_interleaved_vs_pyhessian`` is the fair comparison on a shared machine: the two run in
turns in one process, ``REPEATS`` rounds, and it records medians of CPU (thread) time and wall
time, the speedups, and every estimate with its standard error (trace) or its gap to a
converged lambda_max (eigenvalue) in ``extra_info``, and prints the table. On CPU both run on one
thread. The per-case tests give pytest-benchmark's usual per-implementation statistics.

    OMP_NUM_THREADS=1 STABLECORE_BENCH_SMOKE=1 pytest bench/test_bench_sharpness.py -q -s

CPU (or smoke): an MLP 32-64-64-10 (6,922 parameters), 256 samples, 32 probes. CUDA: 256-1024-
1024-100 (1.4M parameters), 2,048 samples, 64 probes (``test_interleaved_vs_pyhessian_gpu``).
"""

from __future__ import annotations

import math
import os
import statistics
import time

import numpy as np
import pytest
import torch
from torch import nn

from stablecore.methods.sharpness import HessianOperator, hessian_trace, top_eigenvalues

SMOKE = os.environ.get("STABLECORE_BENCH_SMOKE", "0") == "1"
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA and not SMOKE else "cpu"
# (inputs, hidden, classes, samples, probes)
SMALL = (32, 64, 10, 256, 32)
FULL = (256, 1024, 100, 2048, 64)
SIZE = FULL if DEVICE == "cuda" else SMALL
REPEATS = 3 if SMOKE else 9
BLOCK = 4
EQUAL = "lambda_max/stablecore_equal_accuracy"


def _problem(size, device):
    torch.manual_seed(0)
    d, h, c, n, _ = size
    model = nn.Sequential(
        nn.Linear(d, h), nn.Tanh(), nn.Linear(h, h), nn.Tanh(), nn.Linear(h, c)
    ).to(device)
    x = torch.randn(n, d, device=device)
    y = torch.randint(0, c, (n,), device=device)
    return model, nn.CrossEntropyLoss(), x, y


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _peak(device) -> int | None:
    if device != "cuda":
        return None
    peak = torch.cuda.max_memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    return peak


def _lanczos(model, loss, data, hvps: int, block: int = 1):
    """A runner: lambda_max by (block) Lanczos with exactly ``hvps`` HVPs."""

    def run():
        res = top_eigenvalues(model, loss, data, k=1, max_iters=hvps, tol=0.0, block_size=block)
        assert res.num_matvecs == hvps
        return float(res.eigenvalues[0]), float(res.residuals[0])

    return run


def _hvps_to_match(model, loss, data, target: float, cap: int) -> int:
    """The fewest Lanczos HVPs whose estimate reaches ``target`` from below (untimed)."""
    for m in range(2, cap + 1):
        if (
            float(top_eigenvalues(model, loss, data, k=1, max_iters=m, tol=0.0).eigenvalues[0])
            >= target
        ):
            return m
    return cap


def _runners(pyhessian, model, loss, x, y, probes, device):
    """name -> zero-argument callable returning the estimate (and its spread)."""
    data = (x, y)

    def ours_trace(quadratic_only: bool):
        def run():
            est = hessian_trace(
                model,
                loss,
                data,
                num_probes=probes,
                probe_batch=probes,
                quadratic_only=quadratic_only,
            )
            return est.trace, est.stderr

        return run

    out = {
        # v^T H v only, as PyHessian's trace computes: forward-only quadratic forms
        "trace/stablecore": ours_trace(True),
        # full H v per probe: also ||H||_F^2 and per-layer traces from the same probes
        "trace/stablecore_hv": ours_trace(False),
        "lambda_max/stablecore": _lanczos(model, loss, data, probes),
        f"lambda_max/stablecore_block{BLOCK}": _lanczos(model, loss, data, probes, BLOCK),
    }
    if pyhessian is None:
        return out

    def their_trace():
        torch.manual_seed(1)
        h = pyhessian.hessian(model, loss, data=data, cuda=device == "cuda")
        s = np.asarray(h.trace(maxIter=probes, tol=float("-inf")))
        model.zero_grad(set_to_none=True)  # PyHessian leaves a create_graph .grad cycle
        return float(s.mean()), float(s.std(ddof=1) / math.sqrt(len(s)))

    def their_eig():
        torch.manual_seed(1)
        h = pyhessian.hessian(model, loss, data=data, cuda=device == "cuda")
        vals, _ = h.eigenvalues(maxIter=probes, tol=float("-inf"), top_n=1)
        model.zero_grad(set_to_none=True)
        return float(vals[0]), None

    out["trace/pyhessian"] = their_trace
    out["lambda_max/pyhessian"] = their_eig
    return out


def _timed(fn, device):
    cpu, wall = time.thread_time(), time.perf_counter()
    value = fn()
    _sync(device)
    return value, time.thread_time() - cpu, time.perf_counter() - wall


def _compare(size, device, repeats) -> dict:
    """Interleaved rounds of every runner; medians, speedups and estimates."""
    pyhessian = pytest.importorskip("pyhessian")
    model, loss, x, y = _problem(size, device)
    probes = size[-1]
    runners = _runners(pyhessian, model, loss, x, y, probes, device)
    threads = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(1)  # a fair single-thread comparison on a shared machine
    try:
        values = {k: fn() for k, fn in runners.items()}  # warm-up (imports, allocator)
        # equal accuracy: as close to lambda_max as PyHessian's power iteration after `probes`
        equal = _hvps_to_match(model, loss, (x, y), values["lambda_max/pyhessian"][0], probes)
        runners[EQUAL] = _lanczos(model, loss, (x, y), equal)
        cpu = {k: [] for k in runners}
        wall = {k: [] for k in runners}
        for _ in range(repeats):
            for k, fn in runners.items():
                values[k], c, w = _timed(fn, device)
                cpu[k].append(c)
                wall[k].append(w)
        op = HessianOperator(model, loss, (x, y))
        ref = top_eigenvalues(op, k=1, tol=1e-7, max_iters=min(op.dim, 400))
        exact_trace = _exact_trace(op) if op.dim <= 20_000 else None
    finally:
        torch.set_num_threads(threads)
    clock = cpu if device == "cpu" else wall  # CPU time is robust to other tenants
    med = {k: statistics.median(v) for k, v in clock.items()}
    lam = float(ref.eigenvalues[0])
    rows = {}
    hvps = {k: probes for k in runners} | {EQUAL: equal}
    for k in runners:
        quantity, impl = k.split("/")
        value, spread = values[k]
        peer = med[f"{quantity}/pyhessian"]
        theirs = clock[f"{quantity}/pyhessian"]
        rows[k] = {
            "case": quantity,
            "impl": impl,
            "median_s": med[k],
            "min_s": min(clock[k]),
            "median_wall_s": statistics.median(wall[k]),
            "speedup_vs_pyhessian": peer / med[k],
            # the same ratio per round (each pair ran back to back, under the same load)
            "speedup_paired_median": statistics.median(t / o for t, o in zip(theirs, clock[k])),
            "speedup_best_of": min(theirs) / min(clock[k]),
            "hvps": hvps[k],
            "estimate": value,
            "stderr" if quantity == "trace" else "residual": spread,
        }
        if quantity == "lambda_max":
            rows[k]["rel_gap_to_converged"] = (value - lam) / abs(lam)
    return {
        "rows": rows,
        "lambda_max_converged": lam,
        "trace_exact": exact_trace,
        "params": op.dim,
        "probes": probes,
        "device": device,
        "clock": "thread CPU time" if device == "cpu" else "wall (synchronised)",
        "repeats": repeats,
        "backend": op.backend_used,
    }


def _report(benchmark, result) -> None:
    benchmark.extra_info.update({k: v for k, v in result.items() if k != "rows"}, peer="pyhessian")
    for k, row in result["rows"].items():
        benchmark.extra_info[k] = row
    exact = result["trace_exact"]
    print(
        f"\nsharpness vs PyHessian: {result['params']} params, {result['probes']} HVPs, "
        f"{result['device']}, median {result['clock']} of {result['repeats']} interleaved rounds;"
        f" exact trace {'n/a' if exact is None else f'{exact:.5g}'},"
        f" lambda_max {result['lambda_max_converged']:.6g}"
    )
    for k, r in result["rows"].items():
        spread = r.get("stderr")
        spread = "" if spread is None else f" +- {spread:.4g}"
        if r.get("residual") is not None:
            spread = f" (residual {r['residual']:.2g})"
        gap = r.get("rel_gap_to_converged")
        gap = "" if gap is None else f"  gap {gap:+.2%}"
        print(
            f"  {k:38s} {r['hvps']:3d} HVPs {r['median_s'] * 1e3:7.1f} ms"
            f" (wall {r['median_wall_s'] * 1e3:6.1f})"
            f"  x{r['speedup_vs_pyhessian']:.2f} (paired x{r['speedup_paired_median']:.2f},"
            f" best-of x{r['speedup_best_of']:.2f})  {r['estimate']:.5g}{spread}{gap}"
        )


def _exact_trace(op: HessianOperator) -> float:
    """sum_i e_i^T H e_i over every unit vector (untimed; small models only)."""
    eye = torch.eye(op.dim, dtype=op.dtype, device=op.device)
    return float(sum(op.quadratic_forms(eye[i : i + 512]).sum() for i in range(0, op.dim, 512)))


def _check(result) -> None:
    rows = result["rows"]
    ours, theirs = rows["trace/stablecore"], rows["trace/pyhessian"]
    exact = result["trace_exact"]
    if exact is not None:  # each estimate within 4 of its standard errors of the true trace
        for row in (ours, theirs):
            assert abs(row["estimate"] - exact) <= 4 * row["stderr"], (row, exact)
    # two independent estimates of one trace: within 4 combined standard errors
    assert abs(ours["estimate"] - theirs["estimate"]) <= 4 * math.hypot(
        ours["stderr"], theirs["stderr"]
    ), (ours, theirs)
    # Lanczos at equal HVPs is at least as close to lambda_max as power iteration (from below)
    lam = result["lambda_max_converged"]
    assert (
        rows["lambda_max/stablecore"]["estimate"]
        >= rows["lambda_max/pyhessian"]["estimate"] - 1e-3 * lam
    )


def test_interleaved_vs_pyhessian(benchmark):
    result = benchmark.pedantic(
        lambda: _compare(SIZE, DEVICE, REPEATS), rounds=1, iterations=1, warmup_rounds=0
    )
    _report(benchmark, result)
    _check(result)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_interleaved_vs_pyhessian_gpu(benchmark):
    result = benchmark.pedantic(
        lambda: _compare(FULL, "cuda", 5), rounds=1, iterations=1, warmup_rounds=0
    )
    _report(benchmark, result)
    _check(result)


# ----------------------------------------------------------------------------- per implementation
@pytest.fixture(scope="module")
def problem():
    return _problem(SIZE, DEVICE)


@pytest.mark.parametrize(
    "name",
    [
        "trace/stablecore",
        "trace/stablecore_hv",
        "trace/pyhessian",
        "lambda_max/stablecore",
        f"lambda_max/stablecore_block{BLOCK}",
        "lambda_max/pyhessian",
    ],
)
def test_case(benchmark, problem, name):
    model, loss, x, y = problem
    pyhessian = pytest.importorskip("pyhessian") if name.endswith("pyhessian") else None
    fn = _runners(pyhessian, model, loss, x, y, SIZE[-1], DEVICE)[name]
    fn()  # warm-up

    def run():
        out = fn()
        _sync(DEVICE)
        return out

    value, spread = benchmark.pedantic(run, rounds=REPEATS, iterations=1)
    quantity, impl = name.split("/")
    benchmark.group = quantity
    benchmark.extra_info.update(
        case=quantity,
        impl=impl,
        peer="pyhessian",
        estimate=value,
        spread=spread,
        probes=SIZE[-1],
        device=DEVICE,
        params=sum(p.numel() for p in model.parameters()),
        peak_mem_bytes=_peak(DEVICE),
        floor_s=None,
    )
    if benchmark.stats is not None:
        benchmark.extra_info["median_s"] = benchmark.stats.stats.median
    assert math.isfinite(value)
