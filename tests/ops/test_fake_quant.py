"""stablecore::fake_quant: reference vs a brute-force nearest-level oracle, the paper's own
formulas, the level-count goldens of the notes (§3.2), the STE gradient, and (interpret tier)
the Triton kernel against the reference bit for bit."""

from __future__ import annotations

import importlib
import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stablecore.ops.fake_quant import FORMATS, fake_quant
from stablecore.testing import assert_close, seed_all
from stablecore.testing.strategies import INTERPRET_DTYPES, tensors

fq_module = importlib.import_module("stablecore.ops.fake_quant")
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "") == "1"
f32 = np.float32


# ----------------------------------------------------------------------------- oracle
def _nearest(u: float, levels: list[float], codes: list[int]) -> int:
    """Index of the level nearest to u; a tie goes to the even code."""
    best = None
    for i, (lev, code) in enumerate(zip(levels, codes)):
        d = abs(float(u) - lev)
        key = (d, code % 2)
        if best is None or key < best[0]:
            best = (key, i)
    return best[1]


def oracle(x: torch.Tensor, fmt: str, group_size: int, k: int) -> torch.Tensor:
    """Brute force, one group and one element at a time, scalar float32 arithmetic (numpy)."""
    flat = x.reshape(-1).to(torch.float32).tolist()
    out = []
    for start in range(0, len(flat), group_size):
        g = [f32(v) for v in flat[start : start + group_size]]
        order = sorted(range(len(g)), key=lambda i: (-abs(float(g[i])), i))
        keep = set(order[:k])
        rest = [g[i] for i in range(len(g)) if i not in keep]
        res = []
        if fmt == "int4_asym":
            hi = max(rest) if rest else f32(0)
            lo = min(rest) if rest else f32(0)
            scale = f32(max(f32(hi - lo), f32(1e-5))) / f32(15)
            zero = min(max(-round(float(lo / scale)), 0), 15)  # Python round: half to even
            js = list(range(-zero, 16 - zero))
            for v in g:
                j = js[_nearest(v / scale, [float(j) for j in js], js)]
                res.append(f32(j) * scale)
        elif fmt in ("int4_sym", "fp4_paper"):
            absmax = max((abs(v) for v in rest), default=f32(0))
            if fmt == "int4_sym":
                step, js = f32(max(absmax, f32(1e-6))) / f32(7), list(range(-7, 8))
            else:
                step, js = f32(max(absmax, f32(1e-6))) * f32(0.25), list(range(-4, 5))
            for v in g:
                res.append(f32(js[_nearest(v / step, [float(j) for j in js], js)]) * step)
        else:
            absmax = max((abs(v) for v in rest), default=f32(0))
            scale = f32(max(absmax, f32(1e-30))) / f32(6)
            levels = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
            for v in g:
                mag = f32(levels[_nearest(abs(v) / scale, levels, list(range(8)))])
                res.append((-mag if v < 0 else mag) * scale)
        out.extend(float(g[i]) if i in keep else float(res[i]) for i in range(len(g)))
    return torch.tensor(out, dtype=torch.float32).to(x.dtype).view(x.shape)


# ----------------------------------------------------------------------------- reference tier
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(
    "shape,group_size,k", [((3, 256), 256, 2), ((7, 13), 8, 1), ((50,), 16, 0), ((5,), 4, 3)]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_reference_equals_oracle(fmt, shape, group_size, k, dtype):
    seed_all(1)
    x = (torch.randn(shape) * 3).to(dtype)
    assert torch.equal(fake_quant(x, fmt, group_size, k), oracle(x, fmt, group_size, k))


@settings(max_examples=12, deadline=None)
@given(
    data=st.data(),
    fmt=st.sampled_from(FORMATS),
    group_size=st.sampled_from([1, 2, 3, 8, 64, 100]),
)
def test_reference_equals_oracle_drawn(data, fmt, group_size):
    n = data.draw(st.integers(1, 300))
    k = data.draw(st.integers(0, group_size - 1))
    x = data.draw(tensors((n,), dtype=torch.float32))
    assert torch.equal(fake_quant(x, fmt, group_size, k), oracle(x, fmt, group_size, k))


def test_ties_round_half_to_even():
    # absmax 7 -> step 1 for int4_sym: x/step lands exactly on .5 ties.
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5, 3.5, 7.0, 0.0])
    assert fake_quant(x, "int4_sym", 8, 0).tolist() == [0, 2, 2, 0, -2, 4, 7, 0]
    # e2m1 with absmax 6 -> scale 1: ties between neighbours go to the even mantissa.
    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0])
    assert fake_quant(x, "e2m1", 8, 0).tolist() == [0, 1, 1, 2, 2, 4, 4, 6]


def _paper_fp4(x: torch.Tensor, topk: int = 2) -> torch.Tensor:
    """The formula of the paper's act_weight_fp4.py (e=1, m=2, b=1), transcribed, float64."""
    x = x.clone().view(-1, 256)
    idx = x.abs().topk(topk, dim=-1).indices
    keep = torch.gather(x, 1, idx)
    x.scatter_(1, idx, 0.0)
    alpha = x.abs().amax(-1).clamp(min=1e-6)
    e, m, b = 1, 2, 1
    alpha_hat = alpha * 2.0**-b
    b_hat = 2**e - torch.log2(alpha) + torch.log2(torch.tensor(2 - 2.0**-m, dtype=x.dtype)) - 1
    log_v = torch.floor(torch.log2(x.abs() + 1e-8) + b_hat[:, None])
    v = torch.pow(2.0, torch.clamp(log_v - m, min=1 - m))
    q = alpha_hat[:, None] * v * torch.round(x / (alpha_hat[:, None] * v) + 1e-12)
    return q.scatter_(1, idx, keep).view(-1)


def _paper_int4_act(x: torch.Tensor, topk: int = 2) -> torch.Tensor:
    """fake_topk_quantize + dequantize of the paper's dummy_quant.py, transcribed, float64."""
    x = x.clone().view(-1, 256)
    idx = x.abs().topk(topk, dim=-1).indices
    keep = torch.gather(x, 1, idx)
    x.scatter_(1, idx, 0.0)
    scale = x.abs().amax(-1).clamp_min(1e-6)
    q = (x * (7 / scale[:, None])).round().clamp(-8, 7)
    return (q * scale[:, None] / 7).scatter_(1, idx, keep).view(-1)


def _paper_int4_weight(w: torch.Tensor) -> torch.Tensor:
    """_quantize_tensor + dequantize of the paper's act_weight_quantization.py, float64."""
    w = w.view(-1, 256)
    hi, lo = w.amax(1, keepdim=True), w.amin(1, keepdim=True)
    scales = (hi - lo).clamp(min=1e-5) / 15
    zeros = (-torch.round(lo / scales)).clamp(0, 15)
    q = torch.clamp(torch.round(w / scales) + zeros, 0, 15)
    return ((q - zeros) * scales).view(-1)


def test_matches_the_papers_code_in_float64():
    seed_all(2)
    x = torch.randn(8 * 256, dtype=torch.float64) * 2
    assert torch.equal(fake_quant(x, "fp4_paper", 256, 2), _paper_fp4(x))
    assert_close(fake_quant(x, "int4_sym", 256, 2), _paper_int4_act(x))
    assert torch.equal(fake_quant(x, "int4_asym", 256, 0), _paper_int4_weight(x))


def test_level_goldens():
    """§3.2: INT4 act 15 levels + 2 exact outliers; FP4 9 levels; INT4 weights 16 levels."""
    seed_all(3)
    x = torch.randn(16, 256)
    for fmt, levels in (("int4_sym", 15), ("fp4_paper", 9), ("e2m1", 15)):
        y = fake_quant(x, fmt, 256, 2)
        for xr, yr in zip(x, y):
            top2 = xr.abs().topk(2).indices
            assert torch.equal(yr[top2], xr[top2])  # outliers exact
            rest = torch.ones(256, dtype=torch.bool)
            rest[top2] = False
            absmax = xr[rest].abs().max()
            assert len(torch.unique(yr[rest])) <= levels
            assert yr[rest].abs().max() <= absmax * (1 + 1e-6)
            if fmt == "fp4_paper":
                grid = yr[rest] / absmax * 4
                assert_close(grid, grid.round())
                assert set(grid.round().tolist()) <= set(range(-4, 5))
    y = fake_quant(x, "int4_asym", 256, 0)
    for xr, yr in zip(x, y):
        assert len(torch.unique(yr)) <= 16
        assert (yr - xr).abs().max() <= (xr.max() - xr.min()) / 15  # within one step


def test_asym_all_positive_group_clips_like_the_paper():
    seed_all(8)
    x = torch.rand(256, dtype=torch.float64) + 1.0  # all positive: zero-point clamps to 0
    y = fake_quant(x, "int4_asym", 256, 0)
    assert torch.equal(y, _paper_int4_weight(x))
    assert y.max() < 1.1 < x.max()  # 15 steps of (max - min) / 15 above zero: clipped


def test_ste_gradient_and_opcheck():
    seed_all(4)
    x = torch.randn(6, 40, requires_grad=True)
    g = torch.randn(6, 40)
    for fmt in FORMATS:
        x.grad = None
        fake_quant(x, fmt, 16, 2).backward(g)
        assert torch.equal(x.grad, g)
    torch.library.opcheck(torch.ops.stablecore.fake_quant, (torch.randn(5, 7), "int4_sym", 4, 1))
    torch.library.opcheck(torch.ops.stablecore.fake_quant, (torch.randn(33), "e2m1", 8, 0))


def test_reference_mode_same_value_and_gradient():
    from stablecore.ops._dispatch import reference_mode

    seed_all(5)
    x = torch.randn(4, 64, requires_grad=True)
    y = fake_quant(x, "fp4_paper", 32, 2)
    with reference_mode():
        y_ref = fake_quant(x, "fp4_paper", 32, 2)
    assert torch.equal(y, y_ref)
    (gx,) = torch.autograd.grad(y_ref.sum(), x)
    assert torch.equal(gx, torch.ones_like(x))


def test_layout_dtype_and_empty():
    seed_all(6)
    x = torch.randn(8, 32).t()  # non-contiguous: groups follow the logical row-major order
    y = fake_quant(x, "int4_sym", 16, 2)
    assert y.is_contiguous() and torch.equal(y, fake_quant(x.contiguous(), "int4_sym", 16, 2))
    x64 = torch.randn(3, 10, dtype=torch.float64)
    assert fake_quant(x64, "e2m1", 5, 1).dtype == torch.float64
    assert fake_quant(torch.empty(0, 4), "int4_asym", 4, 0).shape == (0, 4)


def test_bad_input_raises():
    x = torch.randn(4, 8)
    with pytest.raises(TypeError, match="dtype torch.int64"):
        fake_quant(torch.ones(4, dtype=torch.long))
    with pytest.raises(ValueError, match="fmt"):
        fake_quant(x, "int3")
    with pytest.raises(ValueError, match="group_size"):
        fake_quant(x, "int4_sym", 0, 0)
    with pytest.raises(ValueError, match="keep_outliers"):
        fake_quant(x, "int4_sym", 4, 4)


# ----------------------------------------------------------------------------- interpret tier
@pytest.mark.interpret
@pytest.mark.skipif(not TRITON_INTERPRET, reason="needs TRITON_INTERPRET=1")
@settings(max_examples=25, deadline=None)
@given(
    data=st.data(),
    fmt=st.sampled_from(FORMATS),
    dtype=st.sampled_from(INTERPRET_DTYPES),
    group_size=st.sampled_from([1, 3, 8, 64, 255, 256, 257]),
)
def test_triton_equals_reference(data, fmt, dtype, group_size):
    n = data.draw(st.sampled_from([1, group_size, group_size + 1, 3 * group_size - 1, 1000]))
    k = data.draw(st.integers(0, min(group_size - 1, 4)))
    x = data.draw(tensors((n,), dtype=dtype))
    y = torch.ops.stablecore.fake_quant(x, fmt, group_size, k)
    assert torch.equal(y, fq_module._reference(x, fmt, group_size, k))


@pytest.mark.interpret
@pytest.mark.skipif(not TRITON_INTERPRET, reason="needs TRITON_INTERPRET=1")
def test_triton_ties_outliers_and_fallback():
    # Equal |x| everywhere: the tie rule for outliers must agree (lowest index first).
    x = torch.tensor([1.0, -1.0, 1.0, -1.0, 0.5, -0.5, 2.0, -2.0])
    for fmt in FORMATS:
        got = torch.ops.stablecore.fake_quant(x, fmt, 4, 2)
        assert torch.equal(got, fq_module._reference(x, fmt, 4, 2))
    x64 = torch.randn(40, dtype=torch.float64)  # float64: served by the reference
    assert torch.equal(fake_quant(x64, "e2m1", 8, 1), fq_module._reference(x64, "e2m1", 8, 1))


# ----------------------------------------------------------------------------- gpu tier
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fmt", FORMATS)
def test_cuda_equals_reference(fmt, dtype):
    seed_all(7)
    x = (torch.randn(4097, 300, device="cuda") * 5).to(dtype)
    y = fake_quant(x, fmt, 256, 2)
    assert torch.equal(y.cpu(), fq_module._reference(x.cpu(), fmt, 256, 2))
    xg = x.clone().requires_grad_()
    compiled = torch.compile(lambda t: fake_quant(t, fmt, 256, 2), fullgraph=True)
    out = compiled(xg)
    assert torch.equal(out, y)
    out.sum().backward()
    assert torch.equal(xg.grad, torch.ones_like(xg))
