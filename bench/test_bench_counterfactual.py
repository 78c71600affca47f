"""T-Rex stability R-hat (value + gradient) and T-Rex:I: batched against per-sample evaluation.

The model is the paper's MLP (d=39 as HELOC, 2 x 128 ReLU, 2 logits). Peers, same process:

* per-draw loop: one model call per point and per Gaussian draw (the pattern of public T-Rex:I
  ports, e.g. a RobustX fork's ``TRexI``); timed per counterfactual (B=1);
* per-point loop: one call per point with its K draws batched (:func:`stability` on one row);
* per-sample T-Rex:I: :func:`trex_i` called once per factual.

GPU size: K=1000 draws, B=100 points (notes: 608.6 ms per-draw loop vs 3.0 ms batched per CF on an
H100). Floor: FLOPs of the MLP forward + backward (3 x 2 x rows x MACs per row) over the matmul
rate measured in this run.
"""

from __future__ import annotations

import functools
import time

import pytest
import torch
from conftest import DEVICE, SMOKE

from stablecore.methods.counterfactual import make_mlp, stability, stability_loop, trex_i

D, HIDDEN = 39, (128, 128)
K = 32 if SMOKE else 1000
B = 4 if SMOKE else 100
B_TREX = 4 if SMOKE else (100 if DEVICE.type == "cuda" else 16)


@functools.cache
def matmul_rate() -> float:
    """FLOP/s of a float32 GEMM of the MLP's hidden shape, measured in this process."""
    a = torch.randn(4096 if not SMOKE else 512, HIDDEN[0], device=DEVICE)
    w = torch.randn(HIDDEN[0], HIDDEN[1], device=DEVICE)
    a @ w
    reps = 20
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ w
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
    return 2 * a.shape[0] * HIDDEN[0] * HIDDEN[1] * reps / (time.perf_counter() - t0)


def _flop(rows: int) -> float:
    macs = D * HIDDEN[0] + HIDDEN[0] * HIDDEN[1] + HIDDEN[1] * 2
    return 3 * 2 * rows * macs  # forward + backward (input and weight grads)


def _setup(b: int):
    torch.manual_seed(0)
    net = make_mlp(D, HIDDEN).to(DEVICE).eval()
    for p in net.parameters():  # R-hat only needs d/dx; weights stay frozen as in T-Rex
        p.requires_grad_(False)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    # Points the model puts in class 1 (the CF class), so T-Rex:I has work to do on every row.
    pool = torch.rand(8 * b + 64, D, device=DEVICE, generator=gen)
    x = pool[net(pool).argmax(1) == 1][:b]
    assert x.shape[0] == b, "too few class-1 points in the pool"
    noise = torch.randn(b, K, D, device=DEVICE, generator=gen)
    return net, x, noise


def _value_and_grad(fn):
    def step():
        xr = step.x.clone().requires_grad_(True)
        r = fn(xr)
        torch.autograd.grad(r.sum(), xr)

    return step


def _record(benchmark, rows: int, **info):
    benchmark.extra_info.update(info)
    benchmark.extra_info["flop"] = _flop(rows)
    benchmark.extra_info["floor_s"] = _flop(rows) / matmul_rate()


@pytest.mark.parametrize("impl", ["stablecore batched", "per-draw loop"])
def test_rhat_grad_per_counterfactual(measure, benchmark, impl):
    net, x, noise = _setup(1)
    if impl == "stablecore batched":
        step = _value_and_grad(lambda z: stability(net, z, 1, noise=noise, sigma=0.05))
    else:
        step = _value_and_grad(lambda z: stability_loop(net, z, 1, noise=noise, sigma=0.05))
    step.x = x
    step()
    measure(step, case=f"R-hat + grad, one CF, K={K}, MLP {D}-128-128-2", impl=impl)
    _record(benchmark, K + 1, peer="per-draw loop (RobustX-fork TRexI pattern)", points=1, k=K)


@pytest.mark.parametrize("impl", ["stablecore batched", "per-point loop"])
def test_rhat_grad_batch(measure, benchmark, impl):
    net, x, noise = _setup(B)
    if impl == "stablecore batched":
        fn = lambda z: stability(net, z, 1, noise=noise, sigma=0.05)
    else:
        fn = lambda z: torch.cat(
            [stability(net, z[i : i + 1], 1, noise=noise[i : i + 1], sigma=0.05) for i in range(B)]
        )
    step = _value_and_grad(fn)
    step.x = x
    step()
    measure(step, case=f"R-hat + grad, B={B}, K={K}, MLP {D}-128-128-2", impl=impl)
    _record(benchmark, B * (K + 1), peer="per-point loop", points=B, k=K)


@pytest.mark.parametrize("impl", ["stablecore batched", "per-sample trex_i calls"])
def test_trex_i_search(measure, benchmark, impl):
    net, x, _ = _setup(B_TREX)
    # tau=1 is unreachable, so every point runs all 20 steps: equal work for both.
    kw = dict(tau=1.0, k=K, sigma=0.05, max_steps=20, step_size=0.01, lower=-1e9, upper=1e9)

    def batched():
        trex_i(net, x, 1, generator=torch.Generator(device=DEVICE).manual_seed(0), **kw)

    def per_sample():
        g = torch.Generator(device=DEVICE).manual_seed(0)
        for i in range(B_TREX):
            trex_i(net, x[i : i + 1], 1, generator=g, **kw)

    fn = batched if impl == "stablecore batched" else per_sample
    fn()
    measure(fn, case=f"T-Rex:I 20 steps, B={B_TREX}, K={K}", impl=impl)
    _record(benchmark, 21 * B_TREX * (K + 1), peer="per-sample trex_i calls", points=B_TREX, k=K)
