"""gri_attention: reference vs a dense-mask SDPA oracle, autograd, opcheck, errors, Triton
kernels under the interpreter and on GPU."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from stablecore.ops import _dispatch, reference_mode
from stablecore.ops.gri_attention import gri_attention
from stablecore.testing import assert_close, strategies

gri_module = importlib.import_module("stablecore.ops.gri_attention")


def oracle(q, k, v, grid, window, pool):
    """Independent restatement: global tokens by a manual per-cell mean, then full SDPA over
    [all tokens, globals] with a dense mask allowing same-window keys and every global."""
    gh, gw = grid
    r, c = torch.arange(gh).repeat_interleave(gw), torch.arange(gw).repeat(gh)
    cells = (r // pool) * ((gw + pool - 1) // pool) + c // pool
    n_cells = int(cells.max()) + 1
    member = (cells[None, :] == torch.arange(n_cells)[:, None]).to(q.dtype)  # [G, N]
    member = member / member.sum(1, keepdim=True)
    kg, vg = member @ k, member @ v
    win = (r // window) * 100_000 + c // window
    allow = torch.cat([win[:, None] == win[None, :], torch.ones(gh * gw, n_cells).bool()], 1)
    return F.scaled_dot_product_attention(q, torch.cat([k, kg], 2), torch.cat([v, vg], 2), allow)


def _qkv(batch, heads, tokens, head_dim, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, tokens, head_dim, generator=gen).to(dtype) for _ in range(3)]


@pytest.mark.parametrize("grid,window,pool", [((5, 7), 3, 2), ((8, 8), 4, 4), ((4, 6), 8, 1)])
def test_reference_matches_dense_oracle(grid, window, pool):
    q, k, v = _qkv(2, 3, grid[0] * grid[1], 8)
    out = gri_attention(q, k, v, grid, window, pool)
    assert_close(out, oracle(q, k, v, grid, window, pool))
    with reference_mode():
        assert_close(gri_attention(q, k, v, grid, window, pool), out)


def test_whole_grid_window_attends_everything():
    # window covering the grid: every token is a local key, so only the globals are extra
    q, k, v = _qkv(1, 1, 12, 8, seed=1)
    out = gri_attention(q, k, v, (3, 4), window_size=4, pool_size=4)
    assert_close(out, oracle(q, k, v, (3, 4), 4, 4))
    assert (out - F.scaled_dot_product_attention(q, k, v)).abs().max() > 1e-6


def test_gradcheck_float64():
    q, k, v = (t.requires_grad_() for t in _qkv(1, 1, 12, 4, seed=2))
    fn = lambda q, k, v: gri_attention(q, k, v, (3, 4), window_size=2, pool_size=3)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_opcheck():
    q, k, v = _qkv(1, 2, 20, 16, torch.float32, seed=3)
    kg, vg = _qkv(1, 2, 4, 16, torch.float32, seed=4)[:2]
    args = (q, k, v, kg, vg, 4, 5, 3, 0.25)
    torch.library.opcheck(gri_module._gri_op, args)
    out, lse = gri_module._gri_op(*args)
    torch.library.opcheck(
        gri_module._gri_backward_op, (torch.randn_like(q), q, k, v, kg, vg, out, lse, 4, 5, 3, 0.25)
    )


def test_bad_input_errors():
    q, k, v = _qkv(1, 2, 12, 8, torch.float32)
    with pytest.raises(ValueError, match="grid 3 x 5"):
        gri_attention(q, k, v, (3, 5))
    with pytest.raises(ValueError, match="must have q's shape"):
        gri_attention(q, k[..., :4], v, (3, 4))
    with pytest.raises(TypeError, match="dtypes differ"):
        gri_attention(q, k.double(), v, (3, 4))
    with pytest.raises(ValueError, match="one device.*meta"):
        gri_attention(q, k.to("meta"), v, (3, 4))
    with pytest.raises(ValueError, match="window"):
        gri_attention(q, k, v, (3, 4), window_size=0)
    with pytest.raises(ValueError, match="pool_size"):
        gri_attention(q, k, v, (3, 4), pool_size=0)
    with pytest.raises(TypeError, match="grid_size"):
        gri_attention(q, k, v, 12)
    with pytest.raises(TypeError, match="floating-point"):
        gri_attention(q.long(), k, v, (3, 4))


# ----------------------------------------------------------------------------- interpret tier
def _kernel_vs_reference(q, k, v, grid, window, pool):
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = gri_attention(*leaves, grid, window, pool)
    grad = torch.randn_like(out)
    out.backward(grad)
    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    with reference_mode():
        ref = gri_attention(*ref_leaves, grid, window, pool)
    ref.backward(grad.double())
    assert not out.isnan().any()
    assert_close(out, ref, dtype=q.dtype)
    for mine, theirs in zip(leaves, ref_leaves):
        assert_close(mine.grad, theirs.grad, dtype=q.dtype)


@pytest.mark.interpret
@settings(max_examples=6)
@given(
    batch=st.integers(1, 2),
    heads=st.integers(1, 2),
    grid_h=st.integers(1, 9),
    grid_w=st.integers(1, 9),
    head_dim=st.sampled_from([16, 40]),
    window=st.integers(1, 5),
    pool=st.integers(1, 4),
    dtype=strategies.float_dtypes(),
    seed=st.integers(0, 2**16),
)
def test_triton_matches_reference(
    batch, heads, grid_h, grid_w, head_dim, window, pool, dtype, seed
):
    assert _dispatch.REGISTERED[("gri_attention", "cpu")][0] == "triton"
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (
        torch.randn(batch, heads, grid_h * grid_w, head_dim, generator=gen).to(dtype)
        for _ in range(3)
    )
    _kernel_vs_reference(q, k, v, (grid_h, grid_w), window, pool)


# ----------------------------------------------------------------------------- gpu tier
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("head_dim", [40, 64, 80, 160])
def test_gpu_sd_shapes(dtype, head_dim):
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (
        torch.randn(1, 4, 32 * 32, head_dim, device="cuda", generator=gen).to(dtype)
        for _ in range(3)
    )
    _kernel_vs_reference(q, k, v, (32, 32), 8, 4)
