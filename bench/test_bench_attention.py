"""Benchmarks: two-stream cross-attention (NASA), GRI-style attention, UNet with each processor.

Full size (CUDA, SD1.5 shapes, fp16): cross-attention q [2, 8, 4096, 40] over 2 x 77 tokens
(ours vs two SDPA calls plus an axpy, and vs ONE SDPA, the 1.1x target); the same with
SpeedUpNet's normalisation of the second stream (vs two SDPA calls plus the eager norm ops);
GRI at L = 4096 (64 x 64 latent, window 8, pool 4) vs the eager window+global reference and full
SDPA self-attention; a UNet forward with each processor vs the default processor (eager, and under
``torch.compile(mode="reduce-overhead")`` on CUDA since eager UNets are launch-bound).
``STABLECORE_BENCH_SMOKE=1`` shrinks everything to a CPU smoke run (CI).

    pytest bench/test_bench_attention.py --benchmark-json=bench/results/attention.json
    STABLECORE_BENCH_SMOKE=1 pytest bench/test_bench_attention.py -q --benchmark-disable
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from stablecore.ops import reference_mode
from stablecore.ops.gri_attention import gri_attention
from stablecore.ops.multi_cross_attention import multi_cross_attention

SMOKE = os.environ.get("STABLECORE_BENCH_SMOKE", "") == "1"
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA and not SMOKE else "cpu"
DTYPE = torch.float16 if DEVICE == "cuda" else torch.float32

pytestmark = pytest.mark.skipif(
    not SMOKE and not CUDA, reason="full-size benchmarks need CUDA (or STABLECORE_BENCH_SMOKE=1)"
)

# (batch, heads, latent side, head_dim)
CROSS = (1, 2, 8, 40) if SMOKE else (2, 8, 64, 40)
GRI = (1, 2, 8, 16) if SMOKE else (2, 8, 64, 40)
WINDOW, POOL = (4, 2) if SMOKE else (8, 4)


def _measure(benchmark, step, peer: str) -> None:
    def run():
        out = step()
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        return out

    run()  # warm-up: compile, allocator
    info = {"peer": peer, "device": DEVICE, "smoke": SMOKE}
    if DEVICE == "cuda":
        import triton.testing

        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        info["peak_extra_gb"] = (torch.cuda.max_memory_allocated() - base) / 1e9
        info["do_bench_ms"] = triton.testing.do_bench(step, warmup=25, rep=100)
        info["name"] = torch.cuda.get_device_name()
    benchmark.extra_info.update(info)
    benchmark(run)


def _randn(*shape):
    return torch.randn(*shape, device=DEVICE, dtype=DTYPE)


# ----------------------------------------------------------------------------- two-stream
@pytest.mark.parametrize("impl", ["stablecore", "two_sdpa_axpy", "one_sdpa"])
@torch.inference_mode()
def test_two_stream_cross_attention(benchmark, impl):
    torch.manual_seed(0)
    b, h, side, d = CROSS
    q = _randn(b, h, side * side, d)
    pos_k, pos_v, neg_k, neg_v = (_randn(b, h, 77, d) for _ in range(4))
    steps = {
        "stablecore": lambda: multi_cross_attention(q, [pos_k, neg_k], [pos_v, neg_v], [1, -0.1]),
        "two_sdpa_axpy": lambda: F.scaled_dot_product_attention(q, pos_k, pos_v).add_(
            F.scaled_dot_product_attention(q, neg_k, neg_v), alpha=-0.1
        ),
        "one_sdpa": lambda: F.scaled_dot_product_attention(q, pos_k, pos_v),  # the 1.1x target
    }
    _measure(benchmark, steps[impl], impl)


# ----------------------------------------------------------------------------- SpeedUpNet
@pytest.mark.parametrize("impl", ["stablecore", "two_sdpa_norm", "one_sdpa"])
@pytest.mark.parametrize("mode", ["batch", "sample"])
@torch.inference_mode()
def test_normalised_two_stream_cross_attention(benchmark, impl, mode):
    """SpeedUpNet's branch: Z+ - (gamma * ||Z+|| / ||Z-|| * Z- + beta), one op call (single pass
    over q, then a norm epilogue) vs the eager peer (two SDPA calls, two norms, the rescale and
    the per-channel scale/shift as separate kernels, as the released processor runs it)."""
    torch.manual_seed(0)
    b, h, side, d = CROSS
    q = _randn(b, h, side * side, d)
    pos_k, pos_v, neg_k, neg_v = (_randn(b, h, 77, d) for _ in range(4))
    gamma, beta = _randn(h * d), _randn(h * d)
    gamma_hd, beta_hd = gamma.view(1, h, 1, d), beta.view(1, h, 1, d)
    dims = None if mode == "batch" else (1, 2, 3)

    def eager(q=q, pos_k=pos_k, pos_v=pos_v, neg_k=neg_k, neg_v=neg_v):
        z_pos = F.scaled_dot_product_attention(q, pos_k, pos_v)
        z_neg = F.scaled_dot_product_attention(q, neg_k, neg_v)
        n_pos = torch.linalg.vector_norm(z_pos.float(), dim=dims, keepdim=True)
        n_neg = torch.linalg.vector_norm(z_neg.float(), dim=dims, keepdim=True)
        z_neg = (z_neg * (n_pos / n_neg)).to(q.dtype)
        return z_pos - (gamma_hd.to(q.dtype) * z_neg + beta_hd.to(q.dtype))

    steps = {
        "stablecore": lambda: multi_cross_attention(
            q,
            [pos_k, neg_k],
            [pos_v, neg_v],
            [1.0, -1.0],
            norm_streams=[1],
            norm_scales=[gamma],
            norm_shifts=[beta],
            norm_mode=mode,
        ),  # fmt: skip
        "two_sdpa_norm": eager,
        "one_sdpa": lambda: F.scaled_dot_product_attention(q, pos_k, pos_v),
    }
    if impl == "stablecore":  # same result as the peer computed in float64
        from stablecore.testing import assert_close

        exact = eager(*(t.double() for t in (q, pos_k, pos_v, neg_k, neg_v)))
        assert_close(steps["stablecore"](), exact, dtype=DTYPE)
    _measure(benchmark, steps[impl], f"{impl} ({mode} norm)")


# ----------------------------------------------------------------------------- GRI
@pytest.mark.parametrize("impl", ["stablecore", "eager_reference", "full_sdpa"])
@torch.inference_mode()
def test_gri_attention(benchmark, impl):
    torch.manual_seed(0)
    b, h, side, d = GRI
    q, k, v = (_randn(b, h, side * side, d) for _ in range(3))

    def eager():
        with reference_mode():
            return gri_attention(q, k, v, (side, side), WINDOW, POOL)

    steps = {
        "stablecore": lambda: gri_attention(q, k, v, (side, side), WINDOW, POOL),
        "eager_reference": eager,
        "full_sdpa": lambda: F.scaled_dot_product_attention(q, k, v),
    }
    benchmark.extra_info["keys_per_query"] = WINDOW * WINDOW + (side // POOL) ** 2
    _measure(benchmark, steps[impl], impl)


# ----------------------------------------------------------------------------- UNet
def _unet():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    if SMOKE:
        cfg = dict(
            block_out_channels=(4, 8),
            norm_num_groups=4,
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=8,
            attention_head_dim=2,
            sample_size=16,
        )
    else:  # SD1.5 shapes, random weights
        cfg = dict(
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            cross_attention_dim=768,
            attention_head_dim=8,
            sample_size=64,
        )
    with torch.device(DEVICE):
        unet = diffusers.UNet2DConditionModel(**cfg)
    return unet.to(DTYPE).eval(), cfg


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("processor", ["default", "nasa", "user_embedding", "speedup", "gri"])
@torch.inference_mode()
def test_unet_forward(benchmark, processor, compiled):
    if compiled and DEVICE != "cuda":
        pytest.skip("torch.compile timing only on CUDA")
    from stablecore.integrations.diffusers import (
        apply_gri,
        apply_nasa,
        apply_speedup,
        apply_user_embedding,
    )

    unet, cfg = _unet()
    side, ctx = cfg["sample_size"], cfg["cross_attention_dim"]
    x, t = _randn(1, 4, side, side), torch.tensor([10], device=DEVICE)
    pos, neg = _randn(1, 77, ctx), _randn(1, 77, ctx)
    kwargs = {}
    if processor == "nasa":
        apply_nasa(unet)
        kwargs = {"neg_encoder_hidden_states": neg}
    elif processor == "user_embedding":
        apply_user_embedding(unet, user_dim=ctx)
        kwargs = {"user_embeds": _randn(1, 29, ctx)}
    elif processor == "speedup":
        apply_speedup(unet)
        kwargs = {"neg_encoder_hidden_states": neg}
    elif processor == "gri":
        apply_gri(unet, WINDOW, POOL, min_tokens=WINDOW * WINDOW * 4)
    model = torch.compile(unet, mode="reduce-overhead") if compiled else unet
    step = lambda: model(x, t, encoder_hidden_states=pos, cross_attention_kwargs=kwargs).sample  # noqa: E731
    _measure(benchmark, step, f"{processor} ({'compiled' if compiled else 'eager'})")
