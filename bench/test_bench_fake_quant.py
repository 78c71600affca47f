"""fake_quant (group-wise 4-bit quantize-dequantize) against the paper's eager PyTorch code.

Peers, in the same process: the paper's eager quantizers (``topk`` + scatter + separate
elementwise passes; ``dummy_quant.py`` for INT4 activations, ``act_weight_quantization.py`` for
INT4 weights, ``act_weight_fp4.py`` for "FP4"), eager and under ``torch.compile`` on CUDA.
GPU size: an activation of a LLaMA-1B-like layer, [8192 tokens, 2048] bf16, groups of 256, and
its [5504, 2048] MLP weight. Floor: read x once, write the output once (2 element-size moves).
``STABLECORE_BENCH_SMOKE=1`` (or no GPU) shrinks everything to a CPU-sized case.
"""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, SMOKE

from stablecore.ops.fake_quant import fake_quant

SHAPES = [(64, 256)] if SMOKE or DEVICE.type != "cuda" else [(8192, 2048), (5504, 2048)]
DTYPE = torch.float32 if DEVICE.type == "cpu" else torch.bfloat16
CASES = {"int4_sym": 2, "int4_asym": 0, "fp4_paper": 2}


def paper_int4_act(x: torch.Tensor, topk: int = 2) -> torch.Tensor:
    """The paper's INT4 activation quantize + dequantize, eager, in the input dtype."""
    g = x.reshape(-1, 256).clone()
    idx = g.abs().topk(topk, dim=-1).indices
    keep = torch.gather(g, 1, idx)
    g.scatter_(1, idx, 0)
    scale = g.abs().amax(-1, keepdim=True).clamp_min(1e-6)
    q = (g * (7 / scale)).round().clamp(-8, 7)
    return (q * scale / 7).scatter_(1, idx, keep).view(x.shape)


def paper_int4_weight(w: torch.Tensor) -> torch.Tensor:
    """The paper's asymmetric INT4 weight quantize + dequantize, eager."""
    g = w.reshape(-1, 256)
    hi, lo = g.amax(1, keepdim=True), g.amin(1, keepdim=True)
    scales = (hi - lo).clamp(min=1e-5) / 15
    zeros = (-torch.round(lo / scales)).clamp(0, 15)
    q = torch.clamp(torch.round(g / scales) + zeros, 0, 15)
    return ((q - zeros) * scales).view(w.shape)


def paper_fp4(x: torch.Tensor, topk: int = 2) -> torch.Tensor:
    """The paper's "FP4" (e=1, m=2, b=1) quantize + dequantize, eager, as written there."""
    g = x.reshape(-1, 256).clone()
    idx = g.abs().topk(topk, dim=-1).indices
    keep = torch.gather(g, 1, idx)
    g.scatter_(1, idx, 0)
    alpha = g.abs().amax(-1).clamp(min=1e-6)
    b_hat = 2 - torch.log2(alpha) + torch.log2(torch.tensor(1.75, device=x.device)) - 1
    log_v = torch.floor(torch.log2(g.abs() + 1e-8) + b_hat[:, None])
    v = torch.pow(2, torch.clamp(log_v - 2, min=-1))
    step = (alpha * 0.5)[:, None] * v
    q = step * torch.round(g / step + 1e-12)
    return q.scatter_(1, idx, keep).to(x.dtype).view(x.shape)


PAPER = {"int4_sym": paper_int4_act, "int4_asym": paper_int4_weight, "fp4_paper": paper_fp4}


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("fmt", list(CASES))
@pytest.mark.parametrize("impl", ["stablecore", "paper eager", "torch.compile paper"])
def test_fake_quant(measure, shape, fmt, impl):
    k = CASES[fmt]
    if impl == "stablecore":
        fn = lambda t: fake_quant(t, fmt, 256, k)
    elif impl == "paper eager":
        fn = PAPER[fmt]
    else:
        if DEVICE.type != "cuda":
            pytest.skip("torch.compile peer is timed on CUDA only (CPU compile takes minutes)")
        fn = torch.compile(PAPER[fmt])
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(shape, device=DEVICE, generator=gen).to(DTYPE)
    fn(x)  # warm-up and compile outside the timing
    measure(
        lambda: fn(x),
        case=f"fake_quant {fmt} {shape} {DTYPE}",
        impl=impl,
        floor_bytes=2 * x.numel() * x.element_size(),
    )
