"""Shared benchmark harness: sizes, synchronised timing, peak memory, bandwidth floor.

Every case records in ``benchmark.extra_info``:
``case`` (what is computed, same for ours and the peers), ``impl`` (``"stablecore"`` or the
peer's name), ``floor_s`` (bytes over the bandwidth measured in this run, or FLOPs over the
measured matmul rate; ``None`` if not meaningful), ``peak_mem_bytes`` (CUDA only), and
``median_s`` (``triton.testing.do_bench`` median on CUDA; pytest-benchmark's median otherwise).
``stablecore bench --report`` turns the JSON into ratios ours/peer and ours/floor.
"""

from __future__ import annotations

import functools
import os
import time

import pytest
import torch

SMOKE = os.environ.get("STABLECORE_BENCH_SMOKE", "0") == "1"
DEVICE = torch.device("cuda" if torch.cuda.is_available() and not SMOKE else "cpu")


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@functools.cache
def copy_bandwidth() -> float:
    """Bytes/s of a device-to-device copy (read + write), measured in this process."""
    n = (256 << 20) if DEVICE.type == "cuda" else (16 << 20)
    src = torch.empty(n, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    dst.copy_(src)
    _sync()
    reps = 20 if DEVICE.type == "cuda" else 5
    start = time.perf_counter()
    for _ in range(reps):
        dst.copy_(src)
    _sync()
    return 2 * n * reps / (time.perf_counter() - start)


@pytest.fixture
def measure(benchmark):
    """``measure(fn, case=..., impl=..., floor_bytes=None)``: time ``fn`` on DEVICE, synchronised."""

    def run(fn, *, case: str, impl: str, floor_bytes: float | None = None):
        benchmark.group = case
        benchmark.extra_info.update(
            case=case,
            impl=impl,
            device=str(DEVICE),
            floor_s=None if floor_bytes is None else floor_bytes / copy_bandwidth(),
        )
        if DEVICE.type == "cuda":
            import triton.testing

            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            benchmark.extra_info["median_s"] = (
                triton.testing.do_bench(fn, return_mode="median") / 1e3
            )
            benchmark.extra_info["peak_mem_bytes"] = torch.cuda.max_memory_allocated() - base

        def synced():
            fn()
            _sync()

        result = benchmark(synced)
        if DEVICE.type != "cuda" and benchmark.stats is not None:
            benchmark.extra_info["median_s"] = benchmark.stats.stats.median
        return result

    return run
