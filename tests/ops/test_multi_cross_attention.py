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
    fn = lambda q, k0, k1, v0, v1, w: multi_cross_attention(q, [k0, k1], [v0, v1], w, masks)  # noqa: E731
    w = torch.tensor([0.7, 1.3], dtype=torch.float64, requires_grad=True)  # learned weights
    assert torch.autograd.gradcheck(fn, (q, *keys, *values, w))
    assert_close(fn(q, *keys, *values, w), fn(q, *keys, *values, [0.7, 1.3]))


def test_opcheck():
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 2, 6, 16, generator=gen)
    keys, values, masks = _streams(2, 2, 16, [5, 3], dtype=torch.float32, gen=gen, masked=True)
    gamma, beta = torch.rand(32, generator=gen) + 0.5, torch.randn(2, 16, generator=gen)
    weights = torch.tensor([1.0, 0.5])
    for norm, wt in (
        (([], [], [], False, 1e-12), None),
        (([1], [gamma], [beta], True, 1e-12), weights),
    ):
        args = (q, keys, values, [1.0, 0.5], masks, 0.25, *norm, wt)
        torch.library.opcheck(mca_module._mca_op, args)
        _, lse, z_norm, sumsq = mca_module._mca_op(*args)
        grad = torch.randn_like(q)
        torch.library.opcheck(
            mca_module._mca_backward_op,
            (grad, q, keys, values, [1.0, 0.5], masks, lse, 0.25, *norm, z_norm, sumsq, wt),
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


# ----------------------------------------------------------------------------- SpeedUpNet norm
def sun_oracle(q, keys, values, weights, masks, normed, gammas, betas, mode):
    """SpeedUpNet's formula on the merged [B, L, H*D] tensors, as the released processor writes
    it: Z~ = gamma * ||Z_0|| * Z / ||Z|| + beta (torch.norm over the whole tensor, or per sample),
    the shift left out where the stream has no key (its Z is zero there)."""
    b, h, l, d = q.shape
    merge = lambda z: z.transpose(1, 2).reshape(b, l, h * d)  # noqa: E731
    zs = [merge(oracle(q, [k], [v], [1.0], [m])) for k, v, m in zip(keys, values, masks)]
    fro = (lambda z: z.norm()) if mode == "batch" else (lambda z: z.norm(dim=(1, 2), keepdim=True))
    out = torch.zeros_like(zs[0])
    for i, (z, w) in enumerate(zip(zs, weights)):
        if i in normed:
            j = normed.index(i)
            keys_left = torch.ones(b) if masks[i] is None else masks[i].any(-1).double()
            z = gammas[j].double().reshape(-1) * z * fro(zs[0]) / fro(z).clamp_min(1e-12)
            z = z + betas[j].double().reshape(-1) * keys_left[:, None, None]
        out = out + w * z
    return out.reshape(b, l, h, d).transpose(1, 2)


def _norm_case(gen, batch=2, heads=2, head_dim=8, q_len=5, lengths=(4, 3, 6), masked=True):
    q = torch.randn(batch, heads, q_len, head_dim, dtype=torch.float64, generator=gen)
    keys, values, masks = _streams(batch, heads, head_dim, lengths, gen=gen, masked=masked)
    n = heads * head_dim
    gammas = [torch.rand(n, dtype=torch.float64, generator=gen) + 0.5 for _ in lengths[1:]]
    betas = [torch.randn(heads, head_dim, dtype=torch.float64, generator=gen) for _ in lengths[1:]]
    return q, keys, values, masks, gammas, betas


@pytest.mark.parametrize("mode", ["batch", "sample"])
def test_norm_matches_speedupnet_formula(mode):
    gen = torch.Generator().manual_seed(4)
    q, keys, values, masks, gammas, betas = _norm_case(gen, batch=3, head_dim=40)
    masks[1][0] = False  # the negative stream has no key for sample 0: it contributes zero there
    weights, normed = [1.0, -1.0, 1.0], [1, 2]
    kw = dict(norm_streams=normed, norm_scales=gammas, norm_shifts=betas, norm_mode=mode)
    out = multi_cross_attention(q, keys, values, weights, masks, **kw)
    expected = sun_oracle(q, keys, values, weights, masks, normed, gammas, betas, mode)
    assert_close(out, expected)
    with reference_mode():
        assert_close(multi_cross_attention(q, keys, values, weights, masks, **kw), expected)
    # Unit scale, zero shift, one stream: the normalised stream has stream 0's norm.
    solo = multi_cross_attention(
        q, keys[:2], values[:2], [0.0, 1.0], norm_streams=1, norm_mode=mode
    )
    plain = multi_cross_attention(q, keys[:1], values[:1], [1.0])
    dims = (0, 1, 2, 3) if mode == "batch" else (1, 2, 3)
    vnorm = torch.linalg.vector_norm
    assert_close(vnorm(solo, dim=dims), vnorm(plain, dim=dims))


def test_norm_fully_masked_stream_gives_zero_not_nan():
    gen = torch.Generator().manual_seed(5)
    q, keys, values, masks, gammas, betas = _norm_case(gen, lengths=(4, 3))
    masks[1] = torch.zeros_like(masks[1])
    kw = dict(norm_streams=[1], norm_scales=gammas, norm_shifts=betas)
    out = multi_cross_attention(q, keys, values, [1.0, -1.0], masks, **kw)
    assert torch.equal(out, multi_cross_attention(q, keys[:1], values[:1], [1.0], masks[:1]))
    masks[0] = torch.zeros_like(masks[0])  # stream 0 empty too: ||Z_0|| = 0, still finite
    leaves = [t.clone().requires_grad_() for t in (q, keys[1], gammas[0], betas[0])]
    out = multi_cross_attention(
        leaves[0], [keys[0], leaves[1]], values, [1.0, -1.0], masks,
        norm_streams=[1], norm_scales=[leaves[2]], norm_shifts=[leaves[3]],
    )  # fmt: skip
    out.sum().backward()
    assert torch.equal(out, torch.zeros_like(out))
    assert all(torch.isfinite(t.grad).all() for t in leaves)


@pytest.mark.parametrize("mode", ["batch", "sample"])
def test_norm_gradcheck_float64(mode):
    gen = torch.Generator().manual_seed(6)
    q, keys, values, masks, gammas, betas = _norm_case(gen)
    masks[2][1] = False
    leaves = [t.requires_grad_() for t in (q, *keys, *values, *gammas, *betas)]

    weights = torch.tensor([0.7, -1.0, 1.3], dtype=torch.float64, requires_grad=True)

    def fn(q, k0, k1, k2, v0, v1, v2, g1, g2, b1, b2, w):
        return multi_cross_attention(
            q, [k0, k1, k2], [v0, v1, v2], w, masks, norm_streams=[1, 2],
            norm_scales=[g1, g2], norm_shifts=[b1, b2], norm_mode=mode,
        )  # fmt: skip

    assert torch.autograd.gradcheck(fn, (*leaves, weights), fast_mode=True)


def test_norm_op_backward_matches_reference_autograd():
    """The explicit backward (custom op) against autograd through the plain reference."""
    gen = torch.Generator().manual_seed(7)
    q, keys, values, masks, gammas, betas = _norm_case(gen, batch=3, head_dim=16, q_len=9)
    grad = torch.randn_like(q)
    grads = []
    for ref in (False, True):
        leaves = [t.clone().requires_grad_() for t in (q, *keys, *values, *gammas, *betas)]
        with reference_mode(ref):
            out = multi_cross_attention(
                leaves[0], leaves[1:4], leaves[4:7], [1.0, -1.0, 0.5], masks,
                norm_streams=[2, 1], norm_scales=leaves[7:9], norm_shifts=leaves[9:],
            )  # fmt: skip
        out.backward(grad)
        grads.append([t.grad for t in leaves])
    for mine, theirs in zip(*grads):
        assert_close(mine, theirs)


def test_norm_bad_input_errors():
    q, k = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 3, 8)
    two = ([k, k], [k, k], [1.0, -1.0])
    with pytest.raises(ValueError, match=r"per channel.*\[16\].*\(15,\)"):
        multi_cross_attention(q, *two, norm_streams=[1], norm_scales=[torch.ones(15)])
    with pytest.raises(ValueError, match=r"norm_shifts for stream 1.*\(8, 2\)"):
        multi_cross_attention(q, *two, norm_streams=[1], norm_shifts=[torch.ones(8, 2)])
    with pytest.raises(ValueError, match="stream 0 is the reference"):
        multi_cross_attention(q, *two, norm_streams=[0])
    with pytest.raises(ValueError, match="not a stream in 1..1"):
        multi_cross_attention(q, *two, norm_streams=[2])
    with pytest.raises(ValueError, match="duplicates"):
        multi_cross_attention(q, *two, norm_streams=[1, 1])
    with pytest.raises(ValueError, match="as many norm_scales"):
        multi_cross_attention(q, *two, norm_streams=[1], norm_scales=[None, None])
    with pytest.raises(ValueError, match="one device.*meta"):
        multi_cross_attention(
            q, *two, norm_streams=[1], norm_scales=[torch.ones(16, device="meta")]
        )
    with pytest.raises(TypeError, match="floating-point"):
        multi_cross_attention(
            q, *two, norm_streams=[1], norm_scales=[torch.ones(16, dtype=torch.int64)]
        )
    with pytest.raises(ValueError, match="norm_mode"):
        multi_cross_attention(q, *two, norm_streams=[1], norm_mode="layer")
    with pytest.raises(ValueError, match="norm_eps"):
        multi_cross_attention(q, *two, norm_streams=[1], norm_eps=0.0)
    with pytest.raises(TypeError, match="ints"):
        multi_cross_attention(q, *two, norm_streams=[1.0])
    with pytest.raises(ValueError, match=r"one weight per stream, \[2\], got \(3,\)"):
        multi_cross_attention(q, *two[:2], torch.ones(3))
    with pytest.raises(ValueError, match="one device.*meta"):
        multi_cross_attention(q, *two[:2], torch.ones(2, device="meta"))


# ----------------------------------------------------------------------------- interpret tier
def _kernel_vs_reference(q, keys, values, weights, masks, norm=None):
    """Kernel (forward, gradients) against the float64 reference. ``norm``: (streams, scales,
    shifts, mode); the scales and shifts get gradients too, and so do tensor weights."""
    streams, scales, shifts, mode = norm or ([], [], [], "batch")
    n, n_norm = len(keys), len(streams)
    tensor_weights = isinstance(weights, torch.Tensor)
    end = 1 + 2 * n + 2 * n_norm

    def run(leaves):
        return multi_cross_attention(
            leaves[0], leaves[1 : 1 + n], leaves[1 + n : 1 + 2 * n],
            leaves[end] if tensor_weights else weights, masks,
            norm_streams=streams, norm_scales=leaves[1 + 2 * n : 1 + 2 * n + n_norm],
            norm_shifts=leaves[1 + 2 * n + n_norm : end], norm_mode=mode,
        )  # fmt: skip

    inputs = (q, *keys, *values, *scales, *shifts, *([weights] if tensor_weights else []))
    leaves = [t.clone().requires_grad_() for t in inputs]
    out = run(leaves)
    grad = torch.randn_like(out)
    out.backward(grad)
    ref_leaves = [t.detach().double().requires_grad_() for t in inputs]
    with reference_mode():
        ref = run(ref_leaves)
    ref.backward(grad.double())
    assert not out.isnan().any()
    assert_close(out, ref, dtype=q.dtype)
    for mine, theirs in zip(leaves, ref_leaves):
        # Scale/shift/weight gradients sum over B*L fp16-rounded rows: relative tolerance.
        scale = max(1.0, float(theirs.grad.abs().max())) if mine.dim() <= 2 else 1.0
        assert_close(mine.grad / scale, theirs.grad / scale, dtype=q.dtype)


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
    weights = torch.randn(len(lengths), generator=gen)  # a tensor: weight gradients too
    _kernel_vs_reference(q, keys, values, weights if masked else weights.tolist(), masks)


@pytest.mark.interpret
def test_triton_fully_masked_stream_is_zero_not_nan():
    q = torch.randn(2, 1, 33, 40)
    keys = [torch.randn(2, 1, 5, 40), torch.randn(2, 1, 3, 40)]
    masks = [None, torch.tensor([[False] * 3, [True, False, True]])]
    _kernel_vs_reference(q, keys, [k.clone() for k in keys], [1.0, 2.0], masks)
    only = multi_cross_attention(q[:1], [keys[1][:1]], [keys[1][:1]], [1.0], [masks[1][:1]])
    assert torch.equal(only, torch.zeros_like(only))


@pytest.mark.interpret
@settings(max_examples=6)
@given(
    batch=st.integers(1, 3),
    heads=st.integers(1, 2),
    q_len=st.integers(1, 70),
    head_dim=st.sampled_from([16, 40, 80]),
    lengths=st.lists(st.integers(1, 24), min_size=2, max_size=3),
    masked=st.booleans(),
    mode=st.sampled_from(["batch", "sample"]),
    tensor_weights=st.booleans(),
    dtype=strategies.float_dtypes(),
    seed=st.integers(0, 2**16),
)
def test_triton_norm_matches_reference(
    batch, heads, q_len, head_dim, lengths, masked, mode, tensor_weights, dtype, seed
):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, q_len, head_dim, generator=gen).to(dtype)
    keys, values, masks = _streams(batch, heads, head_dim, lengths, torch.float32, gen, masked)
    keys, values = [k.to(dtype) for k in keys], [v.to(dtype) for v in values]
    if masked:
        masks[-1][0] = False  # a normalised stream with no key for sample 0
    streams = list(range(1, len(lengths)))[::-1]  # slots out of stream order
    scales = [torch.rand(heads * head_dim, generator=gen) + 0.5 for _ in streams]
    shifts = [torch.randn(heads, head_dim, generator=gen) for _ in streams]
    weights = [1.0] + torch.randn(len(lengths) - 1, generator=gen).tolist()
    if tensor_weights:  # a learned weight per stream (float32 even for fp16 q)
        weights = torch.tensor(weights)
    _kernel_vs_reference(q, keys, values, weights, masks, (streams, scales, shifts, mode))


@pytest.mark.interpret
def test_triton_norm_fully_masked_streams_give_zero():
    q = torch.randn(2, 2, 33, 40)
    keys = [torch.randn(2, 2, 5, 40), torch.randn(2, 2, 3, 40)]
    masks = [None, torch.zeros(2, 3, dtype=torch.bool)]
    norm = ([1], [torch.rand(80) + 0.5], [torch.randn(80)], "batch")
    _kernel_vs_reference(q, keys, [k.clone() for k in keys], [1.0, -1.0], masks, norm)
    out = multi_cross_attention(q, keys, keys, [1.0, -1.0], masks, norm_streams=[1],
                                norm_scales=norm[1], norm_shifts=norm[2])  # fmt: skip
    assert torch.equal(out, multi_cross_attention(q, keys[:1], keys[:1], [1.0]))


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


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("head_dim", [40, 64, 80, 128, 160])
@pytest.mark.parametrize("mode", ["batch", "sample"])
def test_gpu_sd_shapes_normalised(dtype, head_dim, mode):
    gen = torch.Generator(device="cuda").manual_seed(1)
    q = torch.randn(2, 8, 1024, head_dim, device="cuda", generator=gen).to(dtype)
    keys = [
        torch.randn(2, 8, 77, head_dim, device="cuda", generator=gen).to(dtype) for _ in range(3)
    ]
    values = [torch.randn_like(k) for k in keys]
    masks = [None, torch.rand(2, 77, device="cuda", generator=gen) > 0.3, None]
    channels = 8 * head_dim
    scales = [torch.rand(channels, device="cuda", generator=gen) + 0.5 for _ in range(2)]
    shifts = [torch.randn(channels, device="cuda", generator=gen) for _ in range(2)]
    weights = torch.tensor([1.0, -1.0, 1.0], device="cuda")
    _kernel_vs_reference(q, keys, values, weights, masks, ([1, 2], scales, shifts, mode))
