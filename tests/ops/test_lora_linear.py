"""stablecore::lora_linear: reference vs a float64 oracle with every gradient, gradcheck, opcheck,
errors, and (interpret tier) the fused Triton kernel against the oracle on CPU."""

from __future__ import annotations

import importlib
import os

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from stablecore.testing import assert_close, assert_error_within_factor, poison_, tolerance
from stablecore.testing.strategies import INTERPRET_DTYPES, float_dtypes

op_module = importlib.import_module("stablecore.ops.lora_linear")
lora_linear = op_module.lora_linear
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "") == "1"


def _inputs(lead, k, n, r, dtype, seed, bias=True, mask_p=None, scale=1.0):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        t = torch.randn(*shape, generator=gen, dtype=torch.float64) * scale
        return t.to(dtype).requires_grad_()

    x, w, a, b = rnd(*lead, k), rnd(n, k), rnd(r, k), rnd(n, r)
    bb = rnd(n) if bias else None
    mask = None
    if mask_p is not None:
        keep = torch.rand(*lead, k, generator=gen) >= mask_p
        mask = (keep.to(torch.float64) / (1 - mask_p)).to(dtype)
    return x, w, bb, a, b, mask


def _oracle(x, w, bias, a, b, s, mask):
    """Plain float64 matmuls, differentiable by autograd."""
    x, w, a, b = (t.double() for t in (x, w, a, b))
    xd = x if mask is None else x * mask.double()
    out = x @ w.t() + s * (xd @ a.t()) @ b.t()
    return out if bias is None else out + bias.double()


def _check(x, w, bias, a, b, s, mask, dtype):
    ins = [t for t in (x, w, bias, a, b) if t is not None]
    out = lora_linear(x, w, bias, a, b, s, mask)
    # float64 leaves of the same values: the oracle's gradients are not rounded back to dtype
    ins64 = [t.detach().double().requires_grad_() for t in ins]
    ref = _oracle(*_unflatten(ins64, bias is not None), s, mask)
    assert out.dtype == dtype and out.shape == ref.shape
    assert_close(out, ref, dtype=dtype)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(dtype)
    got = torch.autograd.grad(out, ins, g)
    want = torch.autograd.grad(ref, ins64, g.double())  # the same (rounded) upstream gradient
    names = [n for n, t in zip(("x", "w", "bias", "A", "B"), (x, w, bias, a, b)) if t is not None]
    if dtype in (torch.float16, torch.bfloat16):
        # The weight gradients reduce over M from half-precision factors (as PyTorch's own half
        # autograd does): their error is held to at most twice PyTorch's, not to the table.
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_() for t in ins]
            eager = _eager(*_unflatten(leaves, bias is not None), s, mask)
            torch_grads = torch.autograd.grad(eager, leaves, g)
    for i, (name, gt, wt) in enumerate(zip(names, got, want)):
        assert gt.dtype == dtype, name
        if name == "x" or dtype not in (torch.float16, torch.bfloat16):
            assert_close(gt, wt, dtype=dtype, msg=f"grad of {name}")
        else:
            # floor: one rtol of the largest magnitude (torch may round exactly on a draw)
            floor = tolerance(dtype).rtol * float(wt.abs().max())
            assert_error_within_factor(gt, torch_grads[i], wt, floor=floor, msg=f"grad of {name}")


def _unflatten(leaves, has_bias):
    x, w, *rest = leaves
    bias = rest.pop(0) if has_bias else None
    return (x, w, bias, *rest)


def _eager(x, w, bias, a, b, s, mask):
    """What peft computes: plain autograd in the input dtype."""
    xd = x if mask is None else x * mask
    return torch.nn.functional.linear(x, w, bias) + s * ((xd @ a.t()) @ b.t())


# ----------------------------------------------------------------------------- reference tier
@given(
    lead=st.lists(st.integers(1, 5), min_size=1, max_size=2).map(tuple),
    k=st.integers(1, 12),
    n=st.integers(1, 12),
    r=st.integers(1, 4),
    bias=st.booleans(),
    mask_p=st.sampled_from([None, 0.3]),
    dtype=float_dtypes((torch.float32, torch.float64)),
    seed=st.integers(0, 2**20),
)
def test_reference_matches_oracle_with_gradients(lead, k, n, r, bias, mask_p, dtype, seed):
    x, w, bb, a, b, mask = _inputs(lead, k, n, r, dtype, seed, bias, mask_p)
    _check(x, w, bb, a, b, 0.7, mask, dtype)


def test_gradcheck_float64():
    x, w, bb, a, b, mask = _inputs((3, 2), 5, 4, 2, torch.float64, 0, True, 0.4)
    fn = lambda *t: lora_linear(*t[:3], t[3], t[4], 1.3, mask)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, bb, a, b))


def test_frozen_base_forms_no_weight_gradient():
    x, w, bb, a, b, _ = _inputs((4,), 6, 5, 2, torch.float32, 1)
    w.requires_grad_(False)
    bb.requires_grad_(False)
    lora_linear(x, w, bb, a, b, 2.0).square().sum().backward()
    assert w.grad is None and bb.grad is None
    assert a.grad is not None and b.grad is not None and x.grad is not None
    # the backward op returns empty placeholders for what is not needed
    out, u = op_module._lora_linear_op(x.detach(), w, bb, a.detach(), b.detach(), None, 2.0)
    grads = torch.ops.stablecore.lora_linear_backward(
        torch.randn_like(out), x.detach(), w, a.detach(), b.detach(), u, None, 2.0,
        [False, False, False, True, True],
    )  # fmt: skip
    assert [g.numel() for g in grads[:3]] == [0, 0, 0] and grads[3].shape == a.shape


def test_opcheck():
    x, w, bb, a, b, mask = _inputs((3,), 5, 4, 2, torch.float32, 2, True, 0.5)
    x, w, bb, a, b = (t.detach() for t in (x, w, bb, a, b))
    torch.library.opcheck(op_module._lora_linear_op, (x, w, bb, a, b, mask, 0.5))
    torch.library.opcheck(op_module._lora_linear_op, (x, w, None, a, b, None, 2.0))
    _, u = op_module._lora_linear_op(x, w, bb, a, b, mask, 0.5)
    torch.library.opcheck(
        op_module._lora_linear_backward_op,
        (torch.randn(3, 4), x, w, a, b, u, mask, 0.5, [True, True, True, True, True]),
    )


def test_compile_fullgraph_traces_the_fake():
    x, w, bb, a, b, _ = _inputs((2, 3), 6, 5, 2, torch.float32, 3)
    x, w, bb, a, b = (t.detach() for t in (x, w, bb, a, b))
    fn = torch.compile(
        lambda t: lora_linear(t, w, bb, a, b, 0.5) * 2, backend="aot_eager", fullgraph=True
    )
    assert_close(fn(x), lora_linear(x, w, bb, a, b, 0.5) * 2)


def test_bad_input_raises_clear_errors():
    x, w, bb, a, b, _ = _inputs((3,), 6, 5, 2, torch.float32, 4)
    with pytest.raises(ValueError, match=r"\(3, 7\).*6 input features"):
        lora_linear(torch.randn(3, 7), w, bb, a, b, 1.0)
    with pytest.raises(ValueError, match=r"lora_A \(2, 4\)"):
        lora_linear(x, w, bb, torch.randn(2, 4), b, 1.0)
    with pytest.raises(ValueError, match=r"bias has shape \(4,\)"):
        lora_linear(x, w, torch.randn(4), a, b, 1.0)
    with pytest.raises(ValueError, match="dropout_mask has shape"):
        lora_linear(x, w, bb, a, b, 1.0, torch.ones(3, 5))
    with pytest.raises(TypeError, match="share one dtype"):
        lora_linear(x.double(), w, bb, a, b, 1.0)
    with pytest.raises(TypeError, match="floating-point"):
        lora_linear(x, w, bb, a.to(torch.int32), b, 1.0)
    with pytest.raises(ValueError, match="one device"):
        lora_linear(x, w, bb, a, b, 1.0, torch.ones(3, 6, device="meta"))


# ----------------------------------------------------------------------------- interpret tier
@pytest.mark.interpret
@pytest.mark.skipif(not TRITON_INTERPRET, reason="needs TRITON_INTERPRET=1")
@given(
    m=st.sampled_from([1, 16, 17, 33]),
    k=st.sampled_from([1, 5, 16, 33]),
    n=st.sampled_from([1, 7, 16, 33, 65]),
    r=st.sampled_from([1, 3, 17]),
    bias=st.booleans(),
    mask_p=st.sampled_from([None, 0.25]),
    dtype=float_dtypes(INTERPRET_DTYPES),
    seed=st.integers(0, 2**20),
)
def test_triton_matches_oracle_with_gradients(m, k, n, r, bias, mask_p, dtype, seed):
    scale = 0.5 if dtype == torch.float16 else 1.0
    x, w, bb, a, b, mask = _inputs((m,), k, n, r, dtype, seed, bias, mask_p, scale)
    _check(x, w, bb, a, b, 0.8, mask, dtype)


@pytest.mark.interpret
@pytest.mark.skipif(not TRITON_INTERPRET, reason="needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("transposed", [False, True])
def test_kernel_writes_every_element_and_reads_strides(transposed):
    from stablecore.kernels.lora import lora_gemm

    gen = torch.Generator().manual_seed(5)
    # 70 x 130 outputs: 2 x 3 tiles of 64 (the intermediate is written by column tile 0 only)
    x = torch.randn(70, 40, generator=gen)
    if transposed:
        x = torch.randn(40, 70, generator=gen).t()  # a non-contiguous x
    w, a, b = (torch.randn(s, generator=gen) for s in ((130, 40), (5, 40), (130, 5)))
    out, mid = poison_(torch.empty(70, 130)), poison_(torch.empty(70, 5))
    lora_gemm(x, w.t(), a.t(), b.t(), 1.5, out, mid)
    assert not out.isnan().any() and not mid.isnan().any()
    assert_close(out, _oracle(x, w, None, a, b, 1.5, None))
    assert_close(mid, x.double() @ a.double().t())


@pytest.mark.interpret
@pytest.mark.skipif(not TRITON_INTERPRET, reason="needs TRITON_INTERPRET=1")
def test_unsupported_inputs_fall_back_to_the_reference():
    x, w, bb, a, b, _ = _inputs((3,), 140, 150, 129, torch.float32, 6)
    _check(x, w, bb, a, b, 0.1, None, torch.float32)  # rank 129 > MAX_RANK
    assert op_module._unsupported(x, w, bb, a) is not None
    x, w, bb, a, b, _ = _inputs((3,), 8, 6, 2, torch.float64, 6)
    assert op_module._unsupported(x, w, bb, a) is not None
    _check(x, w, bb, a, b, 0.1, None, torch.float64)


# ----------------------------------------------------------------------------- gpu tier
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    ("m", "k", "n", "r"),
    [(1, 64, 64, 8), (4096, 320, 1280, 16), (1000, 1280, 320, 64), (77, 768, 768, 4)],
)
def test_gpu_matches_oracle(dtype, m, k, n, r):
    x, w, bb, a, b, mask = _inputs((m,), k, n, r, torch.float32, 0, True, 0.1, 0.2)
    to = lambda t: t.detach().to("cuda", dtype).requires_grad_()  # noqa: E731
    _check(to(x), to(w), to(bb), to(a), to(b), 2.0, mask.to("cuda", dtype), dtype)
