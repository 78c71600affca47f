"""Fused multi-tensor Stable-SPAM kernels against the eager reference.

Interpret tier (``TRITON_INTERPRET=1 pytest -m interpret``): fp32 params on CPU, every state
precision, 1 and many steps, hypothesis shapes including tiny and odd sizes.
GPU tier (``-m gpu``): the same on CUDA with fp32 and bf16 params, 100 steps, stochastic rounding.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stablecore import _backends
from stablecore.optim.stable_spam import StableSPAM
from stablecore.testing import assert_close, seed_all
from stablecore.testing.strategies import shapes as shape_strategy

INTERPRET = _backends.environment().triton_interpret
interpret_only = pytest.mark.skipif(not INTERPRET, reason="needs TRITON_INTERPRET=1")
needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available() or INTERPRET, reason="needs CUDA (and no TRITON_INTERPRET)"
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _pair(shapes, bits, device, dtype=torch.float32, seed=0, backend="triton", **kw):
    seed_all(seed)
    w = [torch.randn(s, device=device).to(dtype) for s in shapes]
    a = [torch.nn.Parameter(x.clone()) for x in w]
    b = [torch.nn.Parameter(x.clone()) for x in w]
    oa = StableSPAM(a, state_bits=bits, backend="eager", **kw)
    ob = StableSPAM(b, state_bits=bits, backend=backend, **kw)
    return a, b, oa, ob


def _grads(shapes, k, device, dtype):
    gen = torch.Generator().manual_seed(1000 + k)
    out = []
    for s in shapes:
        g = torch.randn(s, generator=gen)
        if k % 3 == 1:  # a spike: pass B must re-read exactly the chunk that holds it
            g.view(-1)[(7 * k) % g.numel()] = 250.0
        out.append(g.to(device=device, dtype=dtype))
    return out


def _compare(a, b, oa, ob, dtype):
    for x, y in zip(a, b, strict=True):
        assert_close(y, x, dtype=dtype)
        sa, sb = oa.state[x], ob.state[y]
        assert set(sa) == set(sb)
        for key, va in sa.items():
            vb = sb[key]
            if va.dtype == torch.uint8:  # codes: identical up to rare one-ulp input flips
                assert float((va != vb).float().mean()) <= 5e-3, key
            elif key == "scalars":  # v_norm ~ n^2: compare relative to the entry's size
                torch.testing.assert_close(vb, va, rtol=1e-5, atol=1e-6)
            else:
                assert_close(vb, va, dtype=va.dtype if va.dtype == torch.bfloat16 else dtype)


def _run_both(shapes, bits, device, dtype, steps, **kw):
    a, b, oa, ob = _pair(shapes, bits, device, dtype, **kw)
    for k in range(steps):
        gs = _grads(shapes, k, device, dtype)
        for x, y, g in zip(a, b, gs, strict=True):
            x.grad, y.grad = g.clone(), g.clone()
        oa.step()
        ob.step()
    _compare(a, b, oa, ob, dtype)
    return a, b, oa, ob


# 4100 > 4096: quantized with a partial last block; 2049: two chunks; (3, 5) and 1: tiny
SHAPES = [(4100,), (37, 3), (2049,), (1,)]


@pytest.mark.interpret
@interpret_only
@pytest.mark.parametrize("bits", [32, 16, 8, 4])
@pytest.mark.parametrize("steps", [1, 6])
def test_fused_equals_reference_interpret(bits, steps):
    _run_both(
        SHAPES, bits, "cpu", torch.float32, steps, update_proj_gap=4, weight_decay=0.1, total_T=5
    )


@pytest.mark.interpret
@interpret_only
def test_fused_many_steps_interpret():
    _run_both([(4097,), (5,)], 4, "cpu", torch.float32, 20, update_proj_gap=8)


@pytest.mark.interpret
@interpret_only
@settings(max_examples=4, deadline=None)
@given(shape=shape_strategy(1, 3, 1, 40), bits=st.sampled_from([32, 8, 4]), maximize=st.booleans())
def test_fused_hypothesis_shapes_interpret(shape, bits, maximize):
    _run_both([shape, (4096 + 3,)], bits, "cpu", torch.float32, 2, maximize=maximize)


@pytest.mark.interpret
@interpret_only
def test_fused_nonfinite_skip_interpret():
    a, b, oa, ob = _pair([(4100,), (9,)], 4, "cpu")
    for y in b:
        y.grad = torch.randn_like(y)
    ob.step()
    before = b[0].detach().clone()
    state_before = {k: v.clone() for k, v in ob.state[b[0]].items()}
    g = torch.randn(4100)
    g[4099] = float("nan")
    b[0].grad, b[1].grad = g, torch.randn(9)
    ob.step()
    assert torch.equal(b[0], before)
    for k, v in state_before.items():
        assert torch.equal(ob.state[b[0]][k], v), k
    assert ob.nonfinite_steps == 1


@pytest.mark.parametrize("bits", [32, 16, 8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_fast_path_equals_reference(bits, dtype):
    """The numba CPU path (offloaded states), fp32 and bf16 params, 8 steps with resets."""
    pytest.importorskip("numba")
    _run_both(SHAPES, bits, "cpu", dtype, 8, backend="cpu", update_proj_gap=4, weight_decay=0.1)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("bits", [32, 16, 8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_equals_reference_gpu(bits, dtype):
    shapes = [(4100,), (37, 3), (2049,), (1,), (512, 300)]
    _run_both(shapes, bits, "cuda", dtype, 100, update_proj_gap=40, weight_decay=0.1)


@pytest.mark.parametrize(
    "backend", ["eager", pytest.param("triton", marks=[pytest.mark.interpret, interpret_only])]
)
def test_bf16_stochastic_rounding_is_unbiased(backend):
    """1 - 1e-3 lies between the bf16 neighbours 0.99609 and 1: SR hits both, mean unbiased."""
    seed_all(4)
    p = torch.nn.Parameter(torch.full((1 << 14,), 1.0, dtype=torch.bfloat16))
    opt = StableSPAM([p], lr=1e-3, backend=backend, stochastic_rounding=True)
    p.grad = torch.ones_like(p)
    opt.step()
    values = p.detach().float()
    assert abs(float(values.mean()) - (1 - 1e-3)) < 6e-5  # 4 sigma of 2^14 Bernoulli draws
    assert values.unique().numel() == 2


@pytest.mark.gpu
@needs_cuda
def test_bf16_stochastic_rounding_is_unbiased_gpu():
    seed_all(3)
    p = torch.nn.Parameter(torch.full((1 << 16,), 1.0, device="cuda", dtype=torch.bfloat16))
    opt = StableSPAM([p], lr=1e-4, backend="triton", stochastic_rounding=True)
    p.grad = torch.ones_like(p)
    opt.step()  # exact fp32 result: 1 - 1e-4, between two bf16 neighbours
    mean = float(p.float().mean())
    assert abs(mean - (1 - 1e-4)) < 2e-5
    assert len(set(p.float().unique().tolist())) == 2


@pytest.mark.gpu
@needs_cuda
def test_no_host_sync_gpu():
    p = torch.nn.Parameter(torch.randn(8192, device="cuda"))
    opt = StableSPAM([p], lr=torch.tensor(1e-3, device="cuda"), state_bits=4)
    p.grad = torch.randn_like(p)
    opt.step()  # first step allocates state
    torch.cuda.set_sync_debug_mode("error")
    try:
        p.grad = torch.randn_like(p)
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
