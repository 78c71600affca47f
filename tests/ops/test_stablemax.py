"""stablemax / log_stablemax: reference vs an independent oracle, autograd, opcheck, errors,
the Triton kernels under the interpreter (CPU) and on GPU."""

from __future__ import annotations

import importlib
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from stablecore.ops import log_stablemax, reference_mode, stablemax
from stablecore.testing import assert_close, poison_, strategies, tolerance

stablemax_module = importlib.import_module("stablecore.ops.stablemax")


# ----------------------------------------------------------------------------- oracle
def oracle(x: torch.Tensor, dim: int, log: bool) -> torch.Tensor:
    """Float64 plain loops with math.log1p: shares no code with the op."""
    xm = x.detach().double().movedim(dim, -1).cpu().numpy()
    flat = xm.reshape(-1, xm.shape[-1])
    out = np.empty_like(flat)
    for r, row in enumerate(flat):
        s = [v + 1.0 if v >= 0 else 1.0 / (1.0 - v) for v in row]
        log_total = math.log(math.fsum(s))
        for c, v in enumerate(row):
            g = math.log1p(v) if v >= 0 else -math.log1p(-v)
            out[r, c] = g - log_total if log else s[c] / math.fsum(s)
    return torch.from_numpy(out.reshape(xm.shape)).movedim(-1, dim)


FUNCS = {"stablemax": (stablemax, False), "log_stablemax": (log_stablemax, True)}


# ----------------------------------------------------------------------------- reference tier
@pytest.mark.parametrize("name", FUNCS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@given(shape=strategies.shapes(1, 3, 1, 7), data=st.data())
def test_reference_matches_oracle(name, dtype, shape, data):
    fn, log = FUNCS[name]
    dim = data.draw(st.integers(-len(shape), len(shape) - 1))
    x = data.draw(strategies.tensors(shape, torch.float64)).to(dtype)
    out = fn(x, dim=dim)
    assert out.dtype == dtype and out.shape == x.shape
    assert_close(out, oracle(x, dim, log), dtype=dtype)


@pytest.mark.parametrize("name", FUNCS)
def test_huge_logits_do_not_overflow(name):
    fn, log = FUNCS[name]
    x = torch.tensor([[1e30, -1e30, 3.0e38, 0.5], [1e4, -1e4, 2e4, -3.0]], dtype=torch.float32)
    out = fn(x)
    assert torch.isfinite(out).all(), out
    assert_close(out, oracle(x, -1, log))


def test_stablemax_sums_to_one_and_log_is_consistent():
    x = torch.randn(5, 37, dtype=torch.float64) * 100
    assert_close(stablemax(x).sum(-1), torch.ones(5, dtype=torch.float64))
    assert_close(log_stablemax(x).exp(), stablemax(x))


def test_equals_log_softmax_of_g():
    # The identity from the notes: log_stablemax(x) = log_softmax(sign(x) log1p|x|).
    x = torch.randn(4, 50, dtype=torch.float64) * 30
    g = torch.sign(x) * torch.log1p(x.abs())
    assert_close(log_stablemax(x), torch.log_softmax(g, -1))


def test_nan_propagates_to_its_row_only():
    x = torch.randn(3, 6)
    x[1, 2] = float("nan")
    for fn in (stablemax, log_stablemax):
        out = fn(x)
        assert torch.isnan(out[1]).all() and torch.isfinite(out[[0, 2]]).all()


@pytest.mark.parametrize("name", FUNCS)
@pytest.mark.parametrize("dim", [0, 1, -1])
def test_gradcheck_float64(name, dim):
    fn, _ = FUNCS[name]
    x = (torch.randn(4, 6, dtype=torch.float64) * 3).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: fn(t, dim=dim), (x,))
    assert torch.autograd.gradgradcheck(lambda t: fn(t, dim=dim), (x,))


@pytest.mark.parametrize("name", FUNCS)
def test_gradcheck_transposed_input(name):
    fn, _ = FUNCS[name]
    x = (torch.randn(6, 4, dtype=torch.float64) * 3).t().requires_grad_()
    assert not x.is_contiguous()
    assert torch.autograd.gradcheck(lambda t: fn(t, dim=0), (x,))


@pytest.mark.parametrize("name", ["stablemax", "log_stablemax"])
def test_opcheck_forward(name):
    op = getattr(stablemax_module, f"_{name}_op")
    for x, dim in ((torch.randn(3, 5), -1), (torch.randn(4, 3, 2, dtype=torch.float64), 1)):
        torch.library.opcheck(op, (x, dim))


def test_opcheck_backward():
    x = torch.randn(3, 5)
    _, log_norm = stablemax_module._log_stablemax_op(x, -1)
    for log in (True, False):
        torch.library.opcheck(
            stablemax_module._stablemax_backward, (torch.randn(3, 5), x, log_norm, -1, log)
        )


def test_compile_fullgraph_traces_the_fake():
    fn = torch.compile(lambda t: log_stablemax(t, dim=0) * 2, backend="aot_eager", fullgraph=True)
    x = torch.randn(5, 3)
    assert_close(fn(x), log_stablemax(x, dim=0) * 2)


def test_reference_mode_supports_forward_over_reverse():
    # torch.func needs plain torch ops: reference_mode routes around the custom op.
    x = torch.randn(7, dtype=torch.float64)
    v = torch.randn(7, dtype=torch.float64)
    loss = lambda t: -log_stablemax(t)[2]
    with reference_mode():
        _, hvp = torch.func.jvp(torch.func.grad(loss), (x,), (v,))
    hessian = torch.autograd.functional.hessian(loss, x)
    assert_close(hvp, hessian @ v)


@pytest.mark.parametrize(
    "shape, dim", [((0,), -1), ((3, 0), -1), ((0, 5), -1), ((0, 5), 0), ((), 0), ((), -1)]
)
def test_empty_and_scalar_like_softmax(shape, dim):
    x = torch.randn(shape)
    for fn in (stablemax, log_stablemax):
        out = fn(x, dim=dim)
        ref = torch.softmax(x, dim) if fn is stablemax else torch.log_softmax(x, dim)
        assert out.shape == ref.shape
        torch.testing.assert_close(out, ref)


def test_bad_input_errors():
    with pytest.raises(TypeError, match="floating-point.*torch.int64"):
        stablemax(torch.arange(6).reshape(2, 3))
    with pytest.raises(TypeError, match="torch.Tensor"):
        stablemax([1.0, 2.0])
    with pytest.raises(ValueError, match=r"dim 2 is out of range.*\(2, 3\)"):
        log_stablemax(torch.randn(2, 3), dim=2)
    with pytest.raises(ValueError, match="one device.*meta"):
        stablemax_module._stablemax_backward(
            torch.randn(2, 3, device="meta"), torch.randn(2, 3), torch.randn(2), -1, True
        )


def test_output_layout_is_dim_last_contiguous():
    x = torch.randn(4, 5, 6)
    out = stablemax(x, dim=1)
    assert out.movedim(1, -1).is_contiguous()


# ----------------------------------------------------------------------------- interpret tier
def _triton_vs_reference(x: torch.Tensor, dim: int, log: bool):
    fn = log_stablemax if log else stablemax
    xt = x.clone().requires_grad_()
    out = fn(xt, dim=dim)
    grad = torch.randn_like(out)
    out.backward(grad)
    x64 = x.detach().double().requires_grad_()
    with reference_mode():
        ref = fn(x64, dim=dim)
    ref.backward(grad.double())
    assert_close(out, ref, dtype=x.dtype)
    assert_close(xt.grad, x64.grad, dtype=x.dtype)


@pytest.mark.interpret
@pytest.mark.parametrize("log", [False, True])
@given(
    n_cols=strategies.row_lengths(block=4096, max_blocks=3),
    rows=st.integers(1, 3),
    dtype=strategies.float_dtypes(),
    data=st.data(),
)
def test_triton_matches_reference(log, n_cols, rows, dtype, data):
    scale = 3.0 if dtype == torch.float16 else data.draw(st.sampled_from([1.0, 50.0, 1e4]))
    x = data.draw(strategies.tensors((rows, n_cols), torch.float32, scale=scale)).to(dtype)
    _triton_vs_reference(x, -1, log)


@pytest.mark.interpret
@pytest.mark.parametrize("log", [False, True])
@given(shape=strategies.shapes(2, 3, 1, 6), data=st.data())
def test_triton_any_dim_and_strides(log, shape, data):
    dim = data.draw(st.integers(-len(shape), len(shape) - 1))
    x = data.draw(strategies.tensors(shape))
    if data.draw(st.booleans()):
        x = x.transpose(0, -1)  # non-contiguous input
    _triton_vs_reference(x, dim, log)


@pytest.mark.interpret
@pytest.mark.parametrize("n_cols", [5, 4097, 9000])
@pytest.mark.parametrize("log", [False, True])
def test_kernels_write_every_element(n_cols, log):
    # Call the launchers on NaN-poisoned buffers: a forgotten element stays NaN.
    from stablecore.kernels import stablemax as kernels

    x = torch.randn(3, n_cols) * 4
    out, log_norm = poison_(torch.empty_like(x)), poison_(torch.empty(3))
    kernels.stablemax_fwd(x, out, log_norm, log)
    assert not out.isnan().any() and not log_norm.isnan().any()
    assert_close(out, oracle(x, -1, log))
    grad_x = poison_(torch.empty_like(x))
    kernels.stablemax_bwd(torch.randn_like(x), x, log_norm, grad_x, log)
    assert not grad_x.isnan().any()


@pytest.mark.interpret
def test_float64_falls_back_to_reference(caplog):
    x = torch.randn(2, 9, dtype=torch.float64)
    with caplog.at_level("WARNING", logger="stablecore"):
        out = stablemax(x)
    assert_close(out, oracle(x, -1, False))


@pytest.mark.interpret
def test_collapse_regime_in_kernel():
    # One leading logit far above 112 others: StableMax keeps p_y < 1 where softmax is 1.
    x = torch.zeros(2, 113)
    x[:, 0] = torch.tensor([1e4, 1e6])
    out = stablemax(x)
    assert (out[:, 0] < 1).all()
    assert_close(out, oracle(x, -1, False))


# ----------------------------------------------------------------------------- gpu tier
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n_cols", [1, 1000, 8192, 8193, 128256])
@pytest.mark.parametrize("log", [False, True])
def test_gpu_matches_reference(dtype, n_cols, log):
    x = (torch.randn(64, n_cols, device="cuda") * 10).to(dtype)
    _triton_vs_reference(x, -1, log)


@pytest.mark.gpu
def test_gpu_error_within_twice_torch_on_long_rows():
    # Long reductions: our bf16 error at most twice PyTorch's own bf16 log_softmax error on g(x).
    from stablecore.testing import assert_error_within_factor

    x = (torch.randn(16, 128256, device="cuda") * 10).to(torch.bfloat16)
    g = lambda t: torch.sign(t) * torch.log1p(t.abs())
    oracle64 = torch.log_softmax(g(x.double()), -1)
    torch_bf16 = torch.log_softmax(g(x.float()).to(torch.bfloat16), -1)
    assert_error_within_factor(log_stablemax(x), torch_bf16, oracle64)


@pytest.mark.gpu
def test_gpu_opcheck_and_compile():
    x = torch.randn(8, 300, device="cuda")
    torch.library.opcheck(stablemax_module._log_stablemax_op, (x, -1))
    fn = torch.compile(lambda t: log_stablemax(t).sum(), fullgraph=True)
    assert_close(fn(x), log_stablemax(x).sum())


def test_tolerance_table_has_every_dtype():
    for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
        assert tolerance(dtype).rtol > 0
