"""Fused linear + cross-entropy (StableMax and softmax) against an unfused float64 oracle."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from stablecore.ops import reference_mode
from stablecore.ops.linear_cross_entropy import (
    linear_cross_entropy,
    stablemax_linear_cross_entropy,
)
from stablecore.testing import assert_close, assert_error_within_factor, seed_all, tolerance

TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "") == "1"
needs_interpret = pytest.mark.skipif(not TRITON_INTERPRET, reason="needs TRITON_INTERPRET=1")


def g64(z):
    return torch.sign(z) * torch.log1p(z.abs())


def make_case(seed, n, h, v, dtype, bias, ignore_frac=0.25):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen, dtype=torch.float64).to(dtype)
    weight = (torch.randn(v, h, generator=gen, dtype=torch.float64) / h**0.5 * 3).to(dtype)
    b = torch.randn(v, generator=gen, dtype=torch.float64).to(dtype) if bias else None
    t = torch.randint(0, v, (n,), generator=gen)
    t[torch.rand(n, generator=gen) < ignore_frac] = -100
    if bool((t == -100).all()):
        t[0] = 0
    return hidden, weight, b, t


def oracle(hidden, weight, bias, t, kind, reduction, ls, grad_out):
    leaves = [x.detach().double().requires_grad_() for x in (hidden, weight)]
    if bias is not None:
        leaves.append(bias.detach().double().requires_grad_())
    z = F.linear(leaves[0], leaves[1], leaves[2] if bias is not None else None)
    z = g64(z) if kind == "stablemax" else z
    loss = F.cross_entropy(z, t, reduction=reduction, label_smoothing=ls)
    grads = torch.autograd.grad(loss, leaves, grad_out)
    return loss.detach(), grads


def ours(hidden, weight, bias, t, kind, reduction, ls, grad_out, chunk_size):
    leaves = [x.detach().clone().requires_grad_() for x in (hidden, weight)]
    if bias is not None:
        leaves.append(bias.detach().clone().requires_grad_())
    loss = linear_cross_entropy(
        leaves[0],
        leaves[1],
        t,
        leaves[2] if bias is not None else None,
        reduction=reduction,
        label_smoothing=ls,
        kind=kind,
        chunk_size=chunk_size,
    )
    grads = torch.autograd.grad(loss, leaves, grad_out.to(loss.dtype))
    return loss.detach(), grads


def check(seed, n, h, v, dtype, bias, kind, reduction, ls, chunk_size):
    hidden, weight, b, t = make_case(seed, n, h, v, dtype, bias)
    gen = torch.Generator().manual_seed(seed + 7)
    shape = (n,) if reduction == "none" else ()
    grad_out = torch.rand(shape, generator=gen, dtype=torch.float64) + 0.5
    loss, grads = ours(hidden, weight, b, t, kind, reduction, ls, grad_out, chunk_size)
    ref_loss, ref_grads = oracle(hidden, weight, b, t, kind, reduction, ls, grad_out)
    assert loss.dtype == torch.promote_types(dtype, torch.float32)
    assert_close(loss, ref_loss, dtype=dtype, msg="loss")
    for name, got, ref, leaf in zip(
        ("hidden", "weight", "bias"), grads, ref_grads, (hidden, weight, b)
    ):
        assert got.dtype == leaf.dtype and got.shape == leaf.shape
        assert_close(got, ref, dtype=dtype, msg=f"grad {name}")


@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(1, 13),
    h=st.integers(1, 12),
    v=st.integers(1, 70),
    dtype=st.sampled_from([torch.float64, torch.float32]),
    bias=st.booleans(),
    kind=st.sampled_from(["stablemax", "softmax"]),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    ls=st.sampled_from([0.0, 0.1]),
    chunk_size=st.sampled_from([0, 1, 4, 5]),
)
def test_matches_unfused_float64_oracle(
    seed, n, h, v, dtype, bias, kind, reduction, ls, chunk_size
):
    check(seed, n, h, v, dtype, bias, kind, reduction, ls, chunk_size)


def test_stablemax_alias_and_nd_input():
    hidden, weight, b, t = make_case(1, 6, 5, 11, torch.float64, True)
    a = stablemax_linear_cross_entropy(
        hidden.reshape(2, 3, 5), weight, t.reshape(2, 3), b, reduction="none"
    )
    ref, _ = oracle(hidden, weight, b, t, "stablemax", "none", 0.0, torch.ones(6))
    assert a.shape == (2, 3)
    assert_close(a.reshape(-1), ref)


def test_gradcheck_float64():
    hidden, weight, b, t = make_case(2, 5, 3, 7, torch.float64, True)
    args = [x.clone().requires_grad_() for x in (hidden, weight, b)]
    for kind in ("stablemax", "softmax"):
        for reduction in ("mean", "none"):
            fn = lambda hh, ww, bb, k=kind, r=reduction: linear_cross_entropy(
                hh, ww, t, bb, reduction=r, kind=k, chunk_size=2, label_smoothing=0.1
            )
            assert torch.autograd.gradcheck(fn, args)
    with reference_mode():
        fn = lambda hh, ww, bb: stablemax_linear_cross_entropy(hh, ww, t, bb)
        assert torch.autograd.gradgradcheck(fn, args)


def test_opcheck():
    hidden, weight, b, t = make_case(9, 6, 4, 9, torch.float32, True)
    h, w, bb = (x.clone().requires_grad_() for x in (hidden, weight, b))
    op = torch.ops.stablecore.linear_cross_entropy.default
    torch.library.opcheck(op, (h, w, t, bb, -100, "mean", 0.1, "stablemax", 2, None, None, True))
    torch.library.opcheck(op, (h, w, t, None, -100, "none", 0.0, "softmax", 4, None, None, False))
    back = torch.ops.stablecore.linear_cross_entropy_backward.default
    args = (torch.rand(6), hidden, weight, t, b, -100, 0.0, "stablemax", 2, None, None)
    torch.library.opcheck(back, args)


def test_bf16_autocast_matches_torch_autocast():
    seed_all(3)
    hidden = torch.randn(16, 32)
    weight = torch.randn(50, 32, requires_grad=True)
    t = torch.randint(0, 50, (16,))
    h1 = hidden.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(h1, weight, t, chunk_size=5)
    loss.backward()
    assert loss.dtype == torch.float32 and weight.grad.dtype == torch.float32
    assert h1.grad.dtype == torch.float32
    gw = weight.grad.clone()
    weight.grad = None
    h2 = hidden.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = F.linear(h2, weight)
    ref = F.cross_entropy(z.float(), t)
    ref.backward()
    assert_close(loss, ref, dtype=torch.bfloat16)
    assert_close(gw, weight.grad, dtype=torch.bfloat16)
    assert_close(h1.grad, h2.grad, dtype=torch.bfloat16)


def test_bf16_weight_with_bf16_accumulator():
    hidden, weight, b, t = make_case(8, 24, 16, 40, torch.bfloat16, True)
    go = torch.ones((), dtype=torch.float64)
    leaves = [x.clone().requires_grad_() for x in (hidden, weight, b)]
    loss = stablemax_linear_cross_entropy(
        *leaves[:2], t, leaves[2], chunk_size=5, accum_dtype=torch.bfloat16
    )
    loss.backward()
    ref_loss, ref_grads = oracle(hidden, weight, b, t, "stablemax", "mean", 0.0, go)
    assert loss.dtype == torch.float32 and leaves[1].grad.dtype == torch.bfloat16
    assert_close(loss, ref_loss, dtype=torch.bfloat16)
    for leaf, ref in zip(leaves, ref_grads):
        assert_close(leaf.grad, ref, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="accum_dtype"):
        stablemax_linear_cross_entropy(hidden, weight, t, accum_dtype=torch.int32)


def test_large_vocab_error_within_twice_torch():
    seed_all(4)
    hidden, weight, _, t = make_case(5, 6, 16, 20_000, torch.float32, False, 0.0)
    for kind in ("stablemax", "softmax"):
        go = torch.ones(6, dtype=torch.float64)
        loss, grads = ours(hidden, weight, None, t, kind, "none", 0.0, go, 4)
        ref_loss, ref_grads = oracle(hidden, weight, None, t, kind, "none", 0.0, go)
        hh, ww = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        z = F.linear(hh, ww)
        z = g64(z) if kind == "stablemax" else z
        torch_loss = F.cross_entropy(z, t, reduction="none")
        torch_grads = torch.autograd.grad(torch_loss.sum(), (hh, ww))
        assert_error_within_factor(loss, torch_loss, ref_loss, msg=kind)
        for got, theirs, ref in zip(grads, torch_grads, ref_grads):
            assert_error_within_factor(got, theirs, ref, msg=kind)


def test_all_ignored_and_frozen_weight():
    hidden, weight, _, t = make_case(6, 4, 3, 9, torch.float32, False)
    t[:] = -100
    h = hidden.clone().requires_grad_()
    loss = stablemax_linear_cross_entropy(h, weight, t)  # weight does not require grad
    loss.backward()
    assert bool(loss.isnan()) and bool((h.grad == 0).all())


def test_bad_inputs_raise():
    h, w = torch.randn(4, 3), torch.randn(7, 3)
    t = torch.tensor([0, 1, 2, 3])
    with pytest.raises(ValueError, match=r"\(4, 2\)"):
        linear_cross_entropy(torch.randn(4, 2), w, t)
    with pytest.raises(ValueError, match="bias"):
        linear_cross_entropy(h, w, t, torch.randn(6))
    with pytest.raises(ValueError, match="kind"):
        linear_cross_entropy(h, w, t, kind="sparsemax")
    with pytest.raises(ValueError, match="out of range"):
        linear_cross_entropy(h, w, torch.tensor([0, 1, 2, 7]))
    with pytest.raises(TypeError, match="floating"):
        linear_cross_entropy(h.long(), w, t)


# ----------------------------------------------------------------------------- interpret tier
@pytest.mark.interpret
@needs_interpret
@settings(max_examples=12, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(1, 9),
    v=st.sampled_from([1, 31, 32, 33, 95, 97]),
    bias=st.booleans(),
    kind=st.sampled_from(["stablemax", "softmax"]),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    ls=st.sampled_from([0.0, 0.1]),
)
def test_triton_matches_oracle(seed, n, v, bias, kind, reduction, ls):
    from stablecore.kernels import stablemax_cross_entropy as kernels

    with pytest.MonkeyPatch.context() as mp:  # rows over 32 columns take the streaming path
        mp.setattr(kernels, "MAX_SINGLE_BLOCK", 32)
        mp.setattr(kernels, "STREAM_BLOCK", 16)
        check(seed, n, 6, v, torch.float32, bias, kind, reduction, ls, 4)


@pytest.mark.interpret
@needs_interpret
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_softmax_kernel_collapse_and_extremes(stream, dtype, monkeypatch):
    """The softmax kernel keeps 1 - p_y where float32 softmax collapses, handles -inf rows."""
    from stablecore.kernels import stablemax_cross_entropy as kernels

    from stablecore.ops.stablemax_cross_entropy import triton_rows

    if stream:
        monkeypatch.setattr(kernels, "MAX_SINGLE_BLOCK", 16)
        monkeypatch.setattr(kernels, "STREAM_BLOCK", 16)
    v = 113
    x = torch.zeros(4, v)
    x[0, 0] = 30.0  # fp32 softmax collapses here (loss and grad_y exactly 0)
    x[1] = torch.linspace(-20, 20, v)
    x[2, 50:] = float("-inf")
    x[2, 3] = 5.0
    x[3] = torch.randn(v) * 4
    x = x.to(dtype)
    t = torch.tensor([0, 7, 3, 100])
    scale = torch.ones(1)
    grad = torch.full_like(x, float("nan"))
    rows, _ = triton_rows("softmax", x, t, -100, 0.0, True, scale, grad)
    xd = x.double().requires_grad_()
    ref = F.cross_entropy(xd, t, reduction="none")
    (ref_grad,) = torch.autograd.grad(ref.sum(), xd)
    q = torch.exp(torch.logsumexp(xd[0, 1:], 0) - xd[0, 0])  # exact 1 - p_y for row 0
    assert_close(rows[1:], ref[1:], dtype=dtype)
    assert_close(grad[1:], ref_grad[1:], dtype=dtype)
    tol = tolerance(torch.float32)
    torch.testing.assert_close(rows[0].double(), torch.log1p(q), rtol=tol.rtol, atol=0)
    if dtype == torch.float32:
        torch.testing.assert_close(grad[0, 0].double(), -q / (1 + q), rtol=tol.rtol, atol=0)


# ----------------------------------------------------------------------------- gpu tier
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["stablemax", "softmax"])
def test_gpu_bf16_autocast_large_vocab(kind):
    seed_all(0)
    hidden = torch.randn(512, 256, device="cuda", requires_grad=True)
    weight = (torch.randn(32000, 256, device="cuda") / 16).requires_grad_()
    t = torch.randint(0, 32000, (512,), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = linear_cross_entropy(hidden, weight, t, kind=kind, chunk_size=128)
    loss.backward()
    ref_loss, (ref_gh, ref_gw) = oracle(
        hidden.to(torch.bfloat16),
        weight.to(torch.bfloat16),
        None,
        t,
        kind,
        "mean",
        0.0,
        torch.ones((), device="cuda", dtype=torch.float64),
    )
    assert_close(loss, ref_loss, dtype=torch.bfloat16)
    assert_close(hidden.grad, ref_gh, dtype=torch.bfloat16)
    assert_close(weight.grad, ref_gw, dtype=torch.bfloat16)
