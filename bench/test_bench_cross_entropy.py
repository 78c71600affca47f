"""Benchmarks: fused StableMax cross-entropy and fused linear + cross-entropy vs their peers.

Full size (CUDA): CE forward+backward on bf16 logits [8192, V], V in {32000, 128256}; linear CE
with hidden [8192, 2048] bf16 and weight [128256, 2048]. ``STABLECORE_BENCH_SMOKE=1`` shrinks
every case to a CPU-sized smoke run (CI). Peers run in the same process; missing packages skip
their case (``pytest.importorskip``). Each case records in ``benchmark.extra_info``: the peer,
the peak extra memory (CUDA), the floor (bytes / 3.0 TB/s or FLOPs / 746 TFLOP/s, the H100
ceilings measured in ``shared/ANCHORS.md``) and, on CUDA, the ``triton.testing.do_bench``
median in ms.

    pytest bench/test_bench_cross_entropy.py --benchmark-json=bench/results/ce.json
    STABLECORE_BENCH_SMOKE=1 pytest bench/test_bench_cross_entropy.py -q --benchmark-disable
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from stablecore.ops.linear_cross_entropy import (
    linear_cross_entropy,
    stablemax_linear_cross_entropy,
)
from stablecore.ops.stablemax_cross_entropy import stablemax_cross_entropy

SMOKE = os.environ.get("STABLECORE_BENCH_SMOKE", "") == "1"
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA and not SMOKE else "cpu"
BANDWIDTH = 3.0e12  # bytes/s, H100 device-to-device copy measured in ANCHORS.md
MATMUL = 746e12  # FLOP/s, H100 bf16 matmul measured in ANCHORS.md

CE_ROWS = 64 if SMOKE else 8192
CE_VOCABS = (320, 1283) if SMOKE else (32000, 128256)
LIN_N, LIN_H, LIN_V = (64, 32, 1283) if SMOKE else (8192, 2048, 128256)

pytestmark = pytest.mark.skipif(
    not SMOKE and not CUDA, reason="full-size benchmarks need CUDA (or STABLECORE_BENCH_SMOKE=1)"
)


def _g(x):
    return torch.sign(x) * torch.log1p(x.abs())


def eager_stablemax_ce(logits, target):
    """What users write today (the grokking repo's formula, in float32 instead of float64)."""
    return F.cross_entropy(_g(logits.float()), target)


def _measure(benchmark, step, peer: str, floor_ms: float | None, inputs_bytes: int) -> None:
    """Time ``step`` (one forward+backward), record peak extra memory and floor."""

    def run():
        step()
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    run()  # warm-up: compile, autotune, allocator
    info = {"peer": peer, "device": DEVICE, "smoke": SMOKE, "floor_ms": floor_ms}
    if DEVICE == "cuda":
        import triton.testing

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        info["peak_extra_gb"] = (torch.cuda.max_memory_allocated() - base) / 1e9
        info["inputs_gb"] = inputs_bytes / 1e9
        info["do_bench_ms"] = triton.testing.do_bench(step, warmup=25, rep=100)
        info["name"] = torch.cuda.get_device_name()
    benchmark.extra_info.update(info)
    benchmark(run)


# ----------------------------------------------------------------------------- cross-entropy
def _ce_inputs(v):
    torch.manual_seed(0)
    x = (torch.randn(CE_ROWS, v, device=DEVICE) * 4).to(torch.bfloat16)
    t = torch.randint(0, v, (CE_ROWS,), device=DEVICE)
    return x, t


def _ce_peer(name):
    if name == "stablecore_stablemax":
        return lambda x, t: stablemax_cross_entropy(x, t)
    if name == "stablecore_stablemax_inplace":
        return lambda x, t: stablemax_cross_entropy(x, t, inplace_grad=True)
    if name == "torch_cross_entropy":
        return F.cross_entropy
    if name == "eager_stablemax_reference":
        return eager_stablemax_ce
    if name == "torch_compile_stablemax_reference":
        return torch.compile(eager_stablemax_ce)
    if name == "liger_cross_entropy":
        liger = pytest.importorskip("liger_kernel.transformers")
        if DEVICE != "cuda":
            pytest.skip("Liger needs CUDA")
        return liger.LigerCrossEntropyLoss()
    raise ValueError(name)


@pytest.mark.parametrize("v", CE_VOCABS)
@pytest.mark.parametrize(
    "impl",
    [
        "stablecore_stablemax",
        "stablecore_stablemax_inplace",
        "torch_cross_entropy",
        "eager_stablemax_reference",
        "torch_compile_stablemax_reference",
        "liger_cross_entropy",
    ],
)
def test_bench_cross_entropy_fwd_bwd(benchmark, impl, v):
    if impl == "torch_compile_stablemax_reference" and DEVICE == "cpu":
        pytest.skip("torch.compile on CPU needs a C++ toolchain and minutes; GPU-only peer")
    fn = _ce_peer(impl)
    x0, t = _ce_inputs(v)

    x0.requires_grad_()

    def step():
        # In-place peers overwrite x0 with the gradient; the timing does not depend on values.
        fn(x0, t).backward()
        x0.grad = None

    floor_ms = 3 * x0.numel() * x0.element_size() / BANDWIDTH * 1e3
    _measure(benchmark, step, impl, floor_ms, x0.numel() * x0.element_size())


# ----------------------------------------------------------------------------- linear + CE
def _lin_inputs():
    torch.manual_seed(0)
    h = (torch.randn(LIN_N, LIN_H, device=DEVICE)).to(torch.bfloat16).requires_grad_()
    w = (torch.randn(LIN_V, LIN_H, device=DEVICE) / LIN_H**0.5).to(torch.bfloat16)
    t = torch.randint(0, LIN_V, (LIN_N,), device=DEVICE)
    return h, w.requires_grad_(), t


def _lin_peer(name):
    if name == "stablecore_stablemax_linear":
        return stablemax_linear_cross_entropy
    if name == "stablecore_stablemax_linear_bf16_accumulator":
        return lambda h, w, t: stablemax_linear_cross_entropy(h, w, t, accum_dtype=torch.bfloat16)
    if name == "stablecore_softmax_linear":
        return linear_cross_entropy
    if name == "torch_matmul_cross_entropy":
        return lambda h, w, t: F.cross_entropy((h @ w.t()).float(), t)
    if name == "torch_matmul_eager_stablemax":
        return lambda h, w, t: eager_stablemax_ce(h @ w.t(), t)
    if name == "torch_linear_cross_entropy":
        if not hasattr(F, "linear_cross_entropy"):
            pytest.skip("torch has no F.linear_cross_entropy")
        from torch.nn.modules.linear_cross_entropy_options import LinearCrossEntropyOptions

        opts = LinearCrossEntropyOptions()
        return lambda h, w, t: F.linear_cross_entropy(h, w, t, options=opts)
    if name == "liger_fused_linear_cross_entropy":
        liger = pytest.importorskip("liger_kernel.transformers")
        if DEVICE != "cuda":
            pytest.skip("Liger needs CUDA")
        loss = liger.LigerFusedLinearCrossEntropyLoss()
        return lambda h, w, t: loss(w, h, t)
    if name == "cut_cross_entropy":
        cce = pytest.importorskip("cut_cross_entropy")
        if DEVICE != "cuda":
            pytest.skip("cut-cross-entropy needs CUDA")
        return lambda h, w, t: cce.linear_cross_entropy(h, w, t)
    raise ValueError(name)


@pytest.mark.parametrize(
    "impl",
    [
        "stablecore_stablemax_linear",
        "stablecore_stablemax_linear_bf16_accumulator",
        "stablecore_softmax_linear",
        "torch_matmul_cross_entropy",
        "torch_matmul_eager_stablemax",
        "torch_linear_cross_entropy",
        "liger_fused_linear_cross_entropy",
        "cut_cross_entropy",
    ],
)
def test_bench_linear_cross_entropy_fwd_bwd(benchmark, impl):
    fn = _lin_peer(impl)
    h, w, t = _lin_inputs()

    def step():
        fn(h, w, t).backward()
        h.grad = w.grad = None

    floor_ms = 6 * LIN_N * LIN_H * LIN_V / MATMUL * 1e3
    inputs = h.numel() * h.element_size() + w.numel() * w.element_size()
    _measure(benchmark, step, impl, floor_ms, inputs)
