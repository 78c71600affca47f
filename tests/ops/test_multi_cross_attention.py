"""multi_cross_attention: reference vs SDPA per stream, autograd, opcheck, errors, Triton
kernels under the interpreter and on GPU."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from stablecore.ops import reference_mode
from stablecore.ops.multi_cross_attention import multi_cross_attention
from stablecore.testing import assert_close, strategies

mca_module = importlib.import_module("stablecore.ops.multi_cross_attention")


def _streams(batch, heads, head_dim, lengths, dtype=torch.float64, gen=None, masked=False):
    keys = [torch.randn(batch, heads, n, head_dim, dtype=dtype, generator=gen) for n in lengths]
    values = [torch.randn(batch, heads, n, head_dim, dtype=dtype, generator=gen) for n in lengths]
    masks = [(torch.rand(batch, n, generator=gen) > 0.4) if masked else None for n in lengths]
    return keys, values, masks


def oracle(q, keys, values, weights, masks):
    """One SDPA per stream in float64; a stream with no unmasked key contributes zero."""
    out = torch.zeros_like(q, dtype=torch.float64)
    for k, v, w, m in zip(keys, values, weights, masks):
        attn_mask = None if m is None else m[:, None, None, :]
        o = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=attn_mask)
        if m is not None:
            o = torch.where(m.any(-1)[:, None, None, None], o, torch.zeros_like(o))
        out += w * o
    return out


def test_reference_matches_sdpa_per_stream():
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(2, 3, 9, 40, dtype=torch.float64, generator=gen)
    keys, values, masks = _streams(2, 3, 40, [7, 4], gen=gen, masked=True)
    masks[1][0] = False  # stream 1 fully masked for batch element 0
    weights = [1.0, -0.1]
    out = multi_cross_attention(q, keys, values, weights, masks)
    assert_close(out, oracle(q, keys, values, weights, masks))
    masked_only = multi_cross_attention(
        q[:1], [keys[1][:1]], [values[1][:1]], [1.0], [masks[1][:1]]
    )
    assert torch.equal(masked_only, torch.zeros_like(masked_only))


def test_nasa_special_case_equals_two_sdpa_calls():
    q = torch.randn(1, 2, 16, 64, dtype=torch.float64)
    pos, neg = (
        torch.randn(1, 2, 77, 64, dtype=torch.float64),
        torch.randn(1, 2, 77, 64, dtype=torch.float64),
    )
    out = multi_cross_attention(q, [pos, neg], [pos, neg], [1.0, -0.1])
    expected = F.scaled_dot_product_attention(q, pos, pos) - 0.1 * F.scaled_dot_product_attention(
        q, neg, neg
    )
    assert_close(out, expected)


def test_gradcheck_float64():
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(1, 2, 5, 8, dtype=torch.float64, generator=gen).requires_grad_()
    keys, values, masks = _streams(1, 2, 8, [3, 4], gen=gen)
    masks[1] = torch.tensor([[True, False, True, True]])
    for t in (*keys, *values):
        t.requires_grad_()
    fn = lambda q, k0, k1, v0, v1: multi_cross_attention(q, [k0, k1], [v0, v1], [0.7, 1.3], masks)
    assert torch.autograd.gradcheck(fn, (q, *keys, *values))


def test_opcheck():
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 2, 6, 16, generator=gen)
    keys, values, masks = _streams(2, 2, 16, [5, 3], dtype=torch.float32, gen=gen, masked=True)
    args = (q, keys, values, [1.0, 0.5], masks, 0.25)
    torch.library.opcheck(mca_module._mca_op, args)
    _, lse = mca_module._mca_op(*args)
    torch.library.opcheck(
        mca_module._mca_backward_op,
        (torch.randn_like(q), q, keys, values, [1.0, 0.5], masks, lse, 0.25),
    )


def test_bad_input_errors():
    q = torch.randn(1, 2, 4, 8)
    k = torch.randn(1, 2, 3, 8)
    with pytest.raises(ValueError, match="head_dim"):
        multi_cross_attention(q, [torch.randn(1, 2, 3, 16)], [torch.randn(1, 2, 3, 16)], [1.0])
    with pytest.raises(ValueError, match="one device.*meta"):
        multi_cross_attention(q, [k.to("meta")], [k.to("meta")], [1.0])
    with pytest.raises(ValueError, match="key-padding mask"):
        multi_cross_attention(q, [k], [k], [1.0], [torch.ones(1, 4, dtype=torch.bool)])
    with pytest.raises(ValueError, match="streams disagree"):
        multi_cross_attention(q, [k, k], [k], [1.0, 1.0])
    with pytest.raises(TypeError, match="differ from q"):
        multi_cross_attention(q, [k.double()], [k.double()], [1.0])
    with pytest.raises(TypeError, match="sequence of tensors"):
        multi_cross_attention(q, k, k, [1.0])
    with pytest.raises(ValueError, match=r"\[batch, heads, queries, head_dim\]"):
        multi_cross_attention(q[0], [k], [k], [1.0])


# ----------------------------------------------------------------------------- interpret tier
def _kernel_vs_reference(q, keys, values, weights, masks):
    leaves = [t.clone().requires_grad_() for t in (q, *keys, *values)]
    n = len(keys)
    out = multi_cross_attention(leaves[0], leaves[1 : 1 + n], leaves[1 + n :], weights, masks)
    grad = torch.randn_like(out)
    out.backward(grad)
    ref_leaves = [t.detach().double().requires_grad_() for t in (q, *keys, *values)]
    with reference_mode():
        ref = multi_cross_attention(
            ref_leaves[0], ref_leaves[1 : 1 + n], ref_leaves[1 + n :], weights, masks
        )
    ref.backward(grad.double())
    assert not out.isnan().any()
    assert_close(out, ref, dtype=q.dtype)
    for mine, theirs in zip(leaves, ref_leaves):
        assert_close(mine.grad, theirs.grad, dtype=q.dtype)


@pytest.mark.interpret
@settings(max_examples=8)
@given(
    batch=st.integers(1, 2),
    heads=st.integers(1, 2),
    q_len=st.integers(1, 70),
    head_dim=st.sampled_from([16, 40, 80]),
    lengths=st.lists(st.integers(1, 40), min_size=1, max_size=3),
    masked=st.booleans(),
    dtype=strategies.float_dtypes(),
    seed=st.integers(0, 2**16),
)
def test_triton_matches_reference(batch, heads, q_len, head_dim, lengths, masked, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, q_len, head_dim, generator=gen).to(dtype)
    keys, values, masks = _streams(batch, heads, head_dim, lengths, torch.float32, gen, masked)
    keys, values = [k.to(dtype) for k in keys], [v.to(dtype) for v in values]
    weights = torch.randn(len(lengths), generator=gen).tolist()
    _kernel_vs_reference(q, keys, values, weights, masks)


@pytest.mark.interpret
def test_triton_fully_masked_stream_is_zero_not_nan():
    q = torch.randn(2, 1, 33, 40)
    keys = [torch.randn(2, 1, 5, 40), torch.randn(2, 1, 3, 40)]
    masks = [None, torch.tensor([[False] * 3, [True, False, True]])]
    _kernel_vs_reference(q, keys, [k.clone() for k in keys], [1.0, 2.0], masks)
    only = multi_cross_attention(q[:1], [keys[1][:1]], [keys[1][:1]], [1.0], [masks[1][:1]])
    assert torch.equal(only, torch.zeros_like(only))


# ----------------------------------------------------------------------------- gpu tier
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("head_dim", [40, 64, 80, 128, 160])
def test_gpu_sd_shapes(dtype, head_dim):
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(2, 8, 1024, head_dim, device="cuda", generator=gen).to(dtype)
    keys = [
        torch.randn(2, 8, 77, head_dim, device="cuda", generator=gen).to(dtype) for _ in range(2)
    ]
    values = [torch.randn_like(k) for k in keys]
    masks = [None, torch.rand(2, 77, device="cuda", generator=gen) > 0.3]
    _kernel_vs_reference(q, keys, values, [1.0, -0.1], masks)
