"""Optimizer step time and state memory on the LLaMA-1B-like parameter list of ANCHORS.md.

Full size (GPU): vocab 32000, hidden 2048, intermediate 5504, 16 layers, untied embedding and
head: 0.941 B parameters in 147 tensors, fp32 params and grads. ``STABLECORE_BENCH_SMOKE=1`` (or
no CUDA) runs a small CPU list of the same structure (166 K parameters, 21 tensors) where
StableSPAM runs with each CPU backend: "auto" (= the torch._foreach path at this size), "eager"
(the per-tensor reference) and "cpu" (numba). Peers run in the same process: torch AdamW
(foreach, fused), bitsandbytes AdamW8bit, torchao AdamW4bit, pytorch-optimizer StableSPAM (each
skipped when its package is missing).

    pytest bench/test_bench_optimizers.py --benchmark-json bench/results/optimizers.json
"""

from __future__ import annotations

import os

import pytest
import torch

from stablecore.optim._cpu_offload import numba_available
from stablecore.optim.spam import SPAM
from stablecore.optim.stable_spam import StableSPAM

SMOKE = os.environ.get("STABLECORE_BENCH_SMOKE", "") == "1" or not torch.cuda.is_available()
DEVICE = "cpu" if SMOKE else "cuda"
# H100 device-to-device copy bandwidth of ANCHORS.md (bytes read + written per second)
BANDWIDTH = 3.0e12


def llama_param_shapes(vocab: int, hidden: int, inter: int, layers: int) -> list[tuple]:
    shapes: list[tuple] = [(vocab, hidden)]
    for _ in range(layers):
        shapes += [(hidden, hidden)] * 4 + [(inter, hidden)] * 2 + [(hidden, inter)]
        shapes += [(hidden,), (hidden,)]
    return shapes + [(hidden,), (vocab, hidden)]


SHAPES = llama_param_shapes(512, 64, 176, 2) if SMOKE else llama_param_shapes(32000, 2048, 5504, 16)


def _params():
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    ps = []
    for s in SHAPES:
        p = torch.nn.Parameter(torch.randn(s, device=DEVICE, generator=gen) * 0.02)
        p.grad = torch.randn(s, device=DEVICE, generator=gen) * 1e-3
        ps.append(p)
    return ps


def _state_bytes(opt) -> int:
    total = 0
    for st in opt.state.values():
        for v in st.values() if isinstance(st, dict) else ():
            if not isinstance(v, torch.Tensor):
                continue
            inner = [getattr(v, a) for a in ("codes", "scale", "qmap") if hasattr(v, a)]
            if inner:  # torchao's quantized state subclasses
                total += sum(t.numel() * t.element_size() for t in inner)
            else:
                total += v.numel() * v.element_size()
    return total


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _bench(benchmark, name: str, make_opt, floor_bytes_per_param: float | None = None):
    params = _params()
    opt = make_opt(params)
    for _ in range(2):  # state allocation and compilation are not part of a step
        opt.step()
    _sync()
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def step():
        opt.step()
        _sync()

    benchmark.pedantic(step, rounds=5 if SMOKE else 20, iterations=1, warmup_rounds=1)
    n = sum(p.numel() for p in params)
    benchmark.extra_info.update(
        peer=name,
        device=DEVICE,
        params=n,
        tensors=len(params),
        state_bytes_per_param=round(_state_bytes(opt) / n, 4),
        peak_memory_gb=(torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else None),
    )
    if floor_bytes_per_param is not None and DEVICE == "cuda":
        benchmark.extra_info["floor_ms"] = round(n * floor_bytes_per_param / BANDWIDTH * 1e3, 3)


# floors (fp32 p and g): grad read 4 B (x1 with chunk reuse), param r+w 8 B, states r+w
_STATE_RW = {32: 16.0, 16: 8.0, 8: 4.0 + 0.0625, 4: 2.0 + 0.125}


# CPU: every CPU backend in the same process ("auto" is "foreach" there); GPU: the fused kernels
_SS_BACKENDS = ["auto", "eager", "cpu"] if DEVICE == "cpu" else ["auto"]


@pytest.mark.parametrize("backend", _SS_BACKENDS)
@pytest.mark.parametrize("bits", [32, 16, 8, 4])
def test_stablecore_stable_spam(benchmark, bits, backend):
    if backend == "cpu" and not numba_available():
        pytest.skip("numba is not installed")
    if backend == "eager" and bits in (16, 8):
        pytest.skip("eager reference: 32 and 4 bits are enough to show its cost")
    _bench(
        benchmark,
        f"stablecore StableSPAM {bits}-bit state ({backend})",
        lambda ps: StableSPAM(ps, lr=1e-4, state_bits=bits, backend=backend),
        4 + 8 + _STATE_RW[bits],
    )


@pytest.mark.parametrize("backend", ["auto", "eager"])
@pytest.mark.parametrize("bits", [32, 4])
def test_stablecore_spam(benchmark, bits, backend):
    _bench(
        benchmark,
        f"stablecore SPAM {bits}-bit state ({backend})",
        lambda ps: SPAM(ps, lr=1e-4, state_bits=bits, backend=backend),
    )


@pytest.mark.parametrize("impl", ["foreach", "fused"])
def test_torch_adamw(benchmark, impl):
    _bench(
        benchmark,
        f"torch AdamW {impl}",
        lambda ps: torch.optim.AdamW(ps, lr=1e-4, **{impl: True}),
        4 + 8 + 16,
    )


def test_bnb_adamw8bit(benchmark):
    bnb = pytest.importorskip("bitsandbytes")
    _bench(benchmark, "bitsandbytes AdamW8bit", lambda ps: bnb.optim.AdamW8bit(ps, lr=1e-4))


def test_torchao_adamw4bit(benchmark):
    ao = pytest.importorskip("torchao.optim")
    if SMOKE:
        pytest.skip("torchao AdamW4bit compiles each shape (~18 s on CPU); GPU run only")
    _bench(benchmark, "torchao AdamW4bit", lambda ps: ao.AdamW4bit(ps, lr=1e-4))


def test_pytorch_optimizer_stable_spam(benchmark):
    po = pytest.importorskip("pytorch_optimizer")
    _bench(benchmark, "pytorch-optimizer StableSPAM", lambda ps: po.StableSPAM(ps, lr=1e-4))
