"""stablemax_cross_entropy: reference tier (always), interpret tier (Triton on CPU), gpu tier.

Oracle: torch's own float64 ``F.cross_entropy`` of g(x) = sign(x) log1p|x| (StableMax CE is
exactly softmax CE of g(x)), differentiated by autograd.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from stablecore.ops import reference_mode
from stablecore.ops.stablemax_cross_entropy import stablemax_cross_entropy
from stablecore.testing import (
    assert_close,
    assert_error_within_factor,
    seed_all,
    tolerance,
)
from stablecore.testing.strategies import INTERPRET_DTYPES, float_dtypes, row_lengths

TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "") == "1"


def g64(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return torch.sign(x) * torch.log1p(x.abs())


def oracle(x, t, ignore_index=-100, reduction="mean", ls=0.0, grad_out=None):
    """float64 loss and d(loss . grad_out)/dx of StableMax CE on the values of ``x``."""
    xd = x.detach().double().requires_grad_()
    loss = F.cross_entropy(
        g64(xd), t, ignore_index=ignore_index, reduction=reduction, label_smoothing=ls
    )
    go = torch.ones_like(loss) if grad_out is None else grad_out.double()
    (grad,) = torch.autograd.grad(loss, xd, go)
    return loss.detach(), grad


def make_case(seed, n, v, dtype, scale, ignore_frac, ignore_index=-100):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, v, generator=gen, dtype=torch.float64) * scale).to(dtype)
    t = torch.randint(0, v, (n,), generator=gen)
    t[torch.rand(n, generator=gen) < ignore_frac] = ignore_index
    return x, t


def run_ours(x, t, reduction="mean", ls=0.0, grad_out=None, inplace=False, ignore_index=-100):
    leaf = x.clone().requires_grad_()
    logits = leaf * 1  # a non-leaf, so inplace_grad may overwrite it
    loss = stablemax_cross_entropy(
        logits,
        t,
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=ls,
        inplace_grad=inplace,
    )
    go = torch.ones_like(loss) if grad_out is None else grad_out.to(loss.dtype)
    (grad,) = torch.autograd.grad(loss, leaf, go)
    return loss.detach(), grad


def check_case(x, t, reduction, ls, seed, inplace=False, dtype_for_tol=None):
    gen = torch.Generator().manual_seed(seed + 1)
    go = (
        torch.rand(t.shape, generator=gen, dtype=torch.float64) + 0.5
        if reduction == "none"
        else None
    )
    loss, grad = run_ours(x, t, reduction, ls, go, inplace)
    ref_loss, ref_grad = oracle(x, t, reduction=reduction, ls=ls, grad_out=go)
    dtype = dtype_for_tol or x.dtype
    assert loss.dtype == x.dtype and grad.dtype == x.dtype
    assert_close(loss, ref_loss, dtype=dtype, msg="loss")
    assert_close(grad, ref_grad, dtype=dtype, msg="grad")


# ----------------------------------------------------------------------------- reference tier
@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(1, 6),
    v=st.integers(1, 300),
    dtype=st.sampled_from([torch.float64, torch.float32, torch.float16, torch.bfloat16]),
    scale=st.sampled_from([0.1, 1.0, 10.0, 300.0]),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    ls=st.sampled_from([0.0, 0.1]),
    ignore_frac=st.sampled_from([0.0, 0.3]),
)
def test_reference_matches_float64_oracle(seed, n, v, dtype, scale, reduction, ls, ignore_frac):
    if dtype == torch.float16:
        scale = min(scale, 10.0)  # fp16 overflows g(x)'s peers only past 65504, keep headroom
    x, t = make_case(seed, n, v, dtype, scale, ignore_frac)
    if reduction == "mean" and bool((t == -100).all()):
        t[0] = 0
    check_case(x, t, reduction, ls, seed)


def exact_rows(x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 loss and correct-class gradient from Q = sum_{k != y} s_k, free of the
    cancellation that even float64 ``F.cross_entropy`` suffers once 1 - p_y < 1e-12."""
    xd = x.double()
    s = torch.where(xd >= 0, xd + 1, 1 / (1 - xd))
    s_y = s.gather(1, t[:, None])[:, 0]
    q_sum = s.scatter(1, t[:, None], 0.0).sum(1)
    x_y = xd.gather(1, t[:, None])[:, 0]
    return torch.log1p(q_sum / s_y), -(q_sum / (q_sum + s_y)) / (1 + x_y.abs())


@pytest.mark.parametrize("m", [1e4, 1e6, 1e30])
def test_huge_logits_relative_accuracy(m):
    # Target at +M and the rest at -M (the collapse pattern), a target at -M, a linspace row.
    v = 113
    x = torch.full((3, v), -m, dtype=torch.float32)
    x[0, 0] = m
    x[1, 5] = m
    x[2] = torch.linspace(-m, m, v)
    t = torch.tensor([0, 7, 3])
    loss, grad = run_ours(x, t, reduction="none")
    ref_loss, ref_grad_y = exact_rows(x, t)
    tol = tolerance(torch.float32)
    tiny = torch.finfo(torch.float32).tiny
    if m < 1e20:  # at 1e30 the true loss of row 0 (1e-58) is below float32's range
        assert bool(loss[0] > 0), "the fused loss must not collapse to 0 where fp32 softmax does"
    rows = torch.arange(3)
    for ours, ref in ((loss, ref_loss), (grad[rows, t], ref_grad_y)):
        big = ref.abs() > 1e3 * tiny
        torch.testing.assert_close(ours.double()[big], ref[big], rtol=tol.rtol, atol=0)
        assert bool((ours.double()[~big].abs() <= 1e3 * tiny).all())
    _, ref_grad = oracle(x, t, reduction="none")
    assert_close(grad, ref_grad, dtype=torch.float32)


def test_one_minus_p_y_has_no_cancellation():
    # Paper A.8-2: at M = 3000 naive fp32 p_y - 1 is off by ~2 %; ours within ~1e-6 relative.
    v, m = 113, 3000.0
    x = torch.full((1, v), -m)
    x[0, 0] = m
    t = torch.tensor([0])
    _, grad = run_ours(x, t)
    _, ref_grad = oracle(x, t)
    s = torch.where(x >= 0, x + 1, 1 / (1 - x))
    naive = (s[0, 0] / s.sum() - 1) / (1 + m)
    naive_err = abs(float(naive) - float(ref_grad[0, 0])) / abs(float(ref_grad[0, 0]))
    ours_err = abs(float(grad[0, 0]) - float(ref_grad[0, 0])) / abs(float(ref_grad[0, 0]))
    assert naive_err > 1e-3, "the naive form should visibly cancel here (test sanity)"
    assert ours_err <= tolerance(torch.float32).rtol


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_vocab_error_within_twice_torch(dtype):
    seed_all(0)
    x = (torch.randn(4, 50_000, dtype=torch.float64) * 8).to(dtype)
    t = torch.randint(0, 50_000, (4,))
    loss, grad = run_ours(x, t, reduction="none")
    ref_loss, ref_grad = oracle(x, t, reduction="none")
    xt = x.clone().requires_grad_()
    torch_loss = F.cross_entropy(g64(xt).to(dtype), t, reduction="none")
    (torch_grad,) = torch.autograd.grad(torch_loss.sum(), xt)
    assert_error_within_factor(loss, torch_loss, ref_loss, msg="loss")
    assert_error_within_factor(grad, torch_grad, ref_grad, msg="grad")


def test_all_ignored_batch_matches_torch():
    x, _ = make_case(1, 3, 11, torch.float32, 1.0, 0.0)
    t = torch.full((3,), -100)
    for reduction in ("mean", "sum"):
        loss, grad = run_ours(x, t, reduction)
        ref = F.cross_entropy(x, t, reduction=reduction)
        assert torch.equal(loss.isnan(), ref.isnan()), (reduction, loss, ref)
        assert reduction != "mean" or bool(loss.isnan())
        assert bool((grad == 0).all()) and not bool(grad.isnan().any())


def test_custom_ignore_index_and_nd_input():
    x, t = make_case(2, 12, 9, torch.float64, 3.0, 0.0)
    t[::3] = 4  # class 4 is a valid class elsewhere: only the ignore rule can zero these rows
    loss, grad = run_ours(x.reshape(3, 4, 9), t.reshape(3, 4), reduction="none", ignore_index=4)
    ref_loss, ref_grad = oracle(x, t, ignore_index=4, reduction="none")
    assert loss.shape == (3, 4)
    assert_close(loss.reshape(-1), ref_loss)
    assert_close(grad.reshape(12, 9), ref_grad)
    assert bool((grad.reshape(12, 9)[::3] == 0).all())


def test_gradcheck_custom_op_path():
    x, t = make_case(3, 5, 7, torch.float64, 2.0, 0.0)
    t[1] = -100
    for reduction, ls in (("mean", 0.0), ("none", 0.2), ("sum", 0.1)):
        xx = x.clone().requires_grad_()
        fn = lambda z, r=reduction, s=ls: stablemax_cross_entropy(
            z, t, reduction=r, label_smoothing=s
        )
        assert torch.autograd.gradcheck(fn, (xx,))


def test_gradcheck_reference_mode():
    x, t = make_case(4, 4, 6, torch.float64, 2.0, 0.25)
    xx = x.clone().requires_grad_()
    with reference_mode():
        fn = lambda z: stablemax_cross_entropy(z, t, reduction="none", label_smoothing=0.1)
        assert torch.autograd.gradcheck(fn, (xx,))
        assert torch.autograd.gradgradcheck(fn, (xx,))


def test_opcheck():
    x, t = make_case(5, 4, 10, torch.float32, 2.0, 0.25)
    op = torch.ops.stablecore.stablemax_cross_entropy.default
    cases = (
        (x.clone().requires_grad_(), t, -100, "mean", 0.1, True),
        (x.clone().requires_grad_(), t, -100, "none", 0.0, True),
        (x, t, -100, "sum", 0.0, False),
    )
    for args in cases:
        torch.library.opcheck(op, args)
    inplace = torch.ops.stablecore.stablemax_cross_entropy_inplace_.default
    torch.library.opcheck(inplace, (x.clone(), t, -100, "mean", 0.1))
    scale = torch.ops.stablecore.cross_entropy_scale_grad.default
    torch.library.opcheck(scale, (x.clone(), torch.rand(4)))


def test_retain_graph_and_upstream_scale():
    x, t = make_case(6, 4, 13, torch.float32, 3.0, 0.0)
    leaf = x.clone().requires_grad_()
    loss = stablemax_cross_entropy(leaf * 1, t)
    (g1,) = torch.autograd.grad(loss, leaf, retain_graph=True)
    (g3,) = torch.autograd.grad(loss * 3, leaf, retain_graph=True)
    (g1b,) = torch.autograd.grad(loss, leaf)
    assert_close(g3, 3 * g1)
    assert torch.equal(g1, g1b)


def test_inplace_grad_overwrites_logits():
    x, t = make_case(7, 5, 17, torch.float32, 3.0, 0.2)
    leaf = x.clone().requires_grad_()
    logits = leaf * 1
    loss = stablemax_cross_entropy(logits, t, inplace_grad=True)
    _, ref_grad = oracle(x, t)
    assert_close(logits.detach(), ref_grad, msg="logits now hold the mean-scaled gradient")
    loss.backward()
    assert_close(leaf.grad, ref_grad)
    with pytest.raises(ValueError, match="unit column stride"):
        stablemax_cross_entropy(
            (leaf * 1).t(), torch.zeros(17, dtype=torch.long), inplace_grad=True
        )


def test_no_grad_forward_and_force_reference_equivalence():
    x, t = make_case(8, 6, 21, torch.float32, 5.0, 0.2)
    with torch.no_grad():
        fused = stablemax_cross_entropy(x, t, reduction="none")
    with reference_mode():
        plain = stablemax_cross_entropy(x, t, reduction="none")
    ref_loss, _ = oracle(x, t, reduction="none")
    assert_close(fused, ref_loss)
    assert_close(plain, ref_loss)


def test_bad_inputs_raise():
    x = torch.randn(3, 5)
    t = torch.tensor([0, 1, 2])
    with pytest.raises(TypeError, match="floating"):
        stablemax_cross_entropy(torch.ones(3, 5, dtype=torch.long), t)
    with pytest.raises(TypeError, match="integer"):
        stablemax_cross_entropy(x, t.float())
    with pytest.raises(ValueError, match=r"\(3, 5\)"):
        stablemax_cross_entropy(x, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="reduction"):
        stablemax_cross_entropy(x, t, reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing"):
        stablemax_cross_entropy(x, t, label_smoothing=1.5)
    with pytest.raises(ValueError, match="out of range"):
        stablemax_cross_entropy(x, torch.tensor([0, 5, 1]))
    with pytest.raises(ValueError, match="no classes"):
        stablemax_cross_entropy(torch.randn(3, 0), t)


# ----------------------------------------------------------------------------- interpret tier
def small_blocks(mp: pytest.MonkeyPatch, single: int = 64, stream: int = 32) -> None:
    """Shrink the kernels' blocks so that small rows take the streaming path too."""
    from stablecore.kernels import stablemax_cross_entropy as kernels

    mp.setattr(kernels, "MAX_SINGLE_BLOCK", single)
    mp.setattr(kernels, "STREAM_BLOCK", stream)


@pytest.mark.interpret
@pytest.mark.skipif(not TRITON_INTERPRET, reason="needs TRITON_INTERPRET=1")
@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(1, 5),
    v=row_lengths(block=32, max_blocks=4),
    dtype=float_dtypes(INTERPRET_DTYPES),
    scale=st.sampled_from([0.1, 1.0, 10.0, 300.0]),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    ls=st.sampled_from([0.0, 0.1]),
    inplace=st.booleans(),
)
def test_triton_matches_float64_oracle(seed, n, v, dtype, scale, reduction, ls, inplace):
    if dtype == torch.float16:
        scale = min(scale, 10.0)
    x, t = make_case(seed, n, v, dtype, scale, 0.3)
    if reduction == "mean" and bool((t == -100).all()):
        t[0] = v - 1
    with pytest.MonkeyPatch.context() as mp:
        small_blocks(mp)
        check_case(x, t, reduction, ls, seed, inplace=inplace)


@pytest.mark.interpret
@pytest.mark.skipif(not TRITON_INTERPRET, reason="needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("stream", [False, True])
def test_triton_huge_logits_and_all_ignored(stream, monkeypatch):
    if stream:
        small_blocks(monkeypatch, single=32, stream=32)
    test_huge_logits_relative_accuracy(1e4)
    test_huge_logits_relative_accuracy(1e30)
    test_one_minus_p_y_has_no_cancellation()
    test_all_ignored_batch_matches_torch()


@pytest.mark.interpret
@pytest.mark.skipif(not TRITON_INTERPRET, reason="needs TRITON_INTERPRET=1")
def test_triton_large_vocab_within_twice_torch():
    test_large_vocab_error_within_twice_torch(torch.float32)  # 50_000 columns: streamed


@pytest.mark.interpret
@pytest.mark.skipif(not TRITON_INTERPRET, reason="needs TRITON_INTERPRET=1")
def test_triton_out_of_range_target_gives_nan():
    from stablecore.kernels import stablemax_cross_entropy as kernels

    x = torch.randn(2, 10)
    loss = torch.empty(2)
    grad = torch.empty(2, 10)
    kernels.stablemax_ce_fwd(x, torch.tensor([3, 10]), loss, grad, torch.ones(1), -100, 0.0, True)
    assert bool(loss[1].isnan()) and bool(grad[1].isnan().all())
    assert bool(loss[0].isfinite())


# ----------------------------------------------------------------------------- gpu tier
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("v", [32000, 128256])
def test_gpu_bf16_large_vocab_within_twice_torch(v):
    seed_all(0)
    x = (torch.randn(64, v, device="cuda") * 4).to(torch.bfloat16)
    t = torch.randint(0, v, (64,), device="cuda")
    loss, grad = run_ours(x, t, reduction="none")
    ref_loss, ref_grad = oracle(x.cpu(), t.cpu(), reduction="none")
    xt = x.clone().requires_grad_()
    torch_loss = F.cross_entropy(g64(xt).to(torch.bfloat16), t, reduction="none")
    (torch_grad,) = torch.autograd.grad(torch_loss.sum(), xt)
    assert_error_within_factor(loss, torch_loss, ref_loss.cuda())
    assert_error_within_factor(grad, torch_grad, ref_grad.cuda())
    inplace_loss, inplace_grad = run_ours(x, t, reduction="none", inplace=True)
    assert torch.equal(inplace_loss, loss) and torch.equal(inplace_grad, grad)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_torch_compile_fullgraph():
    x = torch.randn(32, 1000, device="cuda", requires_grad=True)
    t = torch.randint(0, 1000, (32,), device="cuda")
    compiled = torch.compile(lambda z: stablemax_cross_entropy(z, t), fullgraph=True)
    loss = compiled(x)
    loss.backward()
    _, ref_grad = oracle(x.cpu(), t.cpu())
    assert_close(x.grad, ref_grad)
