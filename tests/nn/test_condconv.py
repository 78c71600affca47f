"""stablecore.nn.condconv: grouped weight-space mixing against the per-expert loop reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from stablecore.nn.condconv import CLMECondConv2d, MECondConv2d, condconv2d, condconv2d_reference
from stablecore.testing import assert_close, seed_all


def _leaf(shape, gen, dtype):
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()


@given(
    batch=st.integers(1, 3),
    experts=st.integers(1, 4),
    groups=st.sampled_from([1, 2]),
    kernel=st.sampled_from([1, 3]),
    stride=st.integers(1, 2),
    padding=st.integers(0, 1),
    hw=st.tuples(st.integers(3, 7), st.integers(3, 7)),
    bias=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**20),
)
def test_grouped_matches_loop_reference_with_gradients(
    batch, experts, groups, kernel, stride, padding, hw, bias, dtype, seed
):
    gen = torch.Generator().manual_seed(seed)
    c, o = 2 * groups, 3 * groups
    x = _leaf((batch, c, *hw), gen, dtype)
    w = _leaf((experts, o, c // groups, kernel, kernel), gen, dtype)
    b = _leaf((experts, o), gen, dtype) if bias else None
    alpha = _leaf((batch, experts), gen, dtype)
    ins = [t for t in (x, w, b, alpha) if t is not None]
    args = (stride, padding, 1, groups)
    out = condconv2d(x, w, b, alpha, *args)
    ref = condconv2d_reference(
        *(t.double() if t is not None else None for t in (x, w, b, alpha)), *args
    )
    assert out.dtype == dtype
    assert_close(out, ref, dtype=dtype)
    g = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    got = torch.autograd.grad(out, ins, g.to(dtype))
    want = torch.autograd.grad(ref, ins, g)
    for a, e in zip(got, want):
        assert_close(a, e, dtype=dtype)


def test_reference_is_a_mixed_kernel_conv_per_sample():
    # independent of both implementations: build each sample's kernel by hand
    seed_all(0)
    x, w, b = torch.randn(2, 3, 6, 6), torch.randn(4, 5, 3, 3, 3), torch.randn(4, 5)
    alpha = torch.rand(2, 4)
    out = condconv2d(x, w, b, alpha, 1, 1)
    for i in range(2):
        k = (alpha[i, :, None, None, None, None] * w).sum(0)
        assert_close(out[i : i + 1], F.conv2d(x[i : i + 1], k, alpha[i] @ b, 1, 1))


def test_module_routing_temb_gradients_and_impls_agree():
    seed_all(1)
    layer = MECondConv2d(4, 6, 3, num_experts=3, padding=1, routing="pool+temb", temb_dim=5)
    x, temb = torch.randn(3, 4, 5, 5, requires_grad=True), torch.randn(3, 5, requires_grad=True)
    out = layer(x, temb)
    alpha = torch.sigmoid(layer.router(torch.cat([x.mean((2, 3)), temb], 1)))
    assert_close(layer.routing(x, temb), alpha)
    layer.impl = "loop"
    ref = layer(x, temb)
    assert_close(out, ref)
    params = [x, temb, layer.weight, layer.bias, layer.router.weight, layer.router.bias]
    got = torch.autograd.grad(out.square().sum(), params)
    want = torch.autograd.grad(ref.square().sum(), params)
    for a, e in zip(got, want):
        assert a.abs().sum() > 0
        assert_close(a, e)
    clone = MECondConv2d(4, 6, 3, num_experts=3, padding=1, routing="pool+temb", temb_dim=5)
    clone.load_state_dict(layer.state_dict())
    assert_close(clone(x, temb), ref)


def test_clme_inherits_pruned_convs_and_starts_as_their_mean():
    seed_all(2)
    convs = [torch.nn.Conv2d(3, 4, 3, padding=1) for _ in range(3)]
    convs.append(torch.nn.Conv2d(3, 4, 3, padding=1, bias=False))
    layer = CLMECondConv2d(convs)
    x = torch.randn(2, 3, 6, 6)
    assert_close(layer.weight[1], convs[1].weight)
    assert_close(layer(x), sum(c(x) for c in convs) / 4)
    assert_close(layer.routing(x), torch.full((2, 4), 0.25))


def test_bad_input_raises_clear_errors():
    layer = MECondConv2d(4, 6, 3, num_experts=3)
    x = torch.randn(2, 4, 5, 5)
    with pytest.raises(ValueError, match=r"routing weights have shape \(2, 2\).*E=3"):
        layer(x, routing_weights=torch.rand(2, 2))
    with pytest.raises(ValueError, match="channels"):
        layer(torch.randn(2, 3, 5, 5))
    with pytest.raises(ValueError, match="temb"):
        MECondConv2d(4, 6, 3, num_experts=3, routing="pool+temb", temb_dim=2)(x)
    with pytest.raises(ValueError, match="temb_dim"):
        MECondConv2d(4, 6, 3, num_experts=3, routing="pool+temb")
    with pytest.raises(ValueError, match="routing"):
        MECondConv2d(4, 6, 3, num_experts=3, routing="softmax")
    with pytest.raises(ValueError, match="geometry"):
        CLMECondConv2d([torch.nn.Conv2d(3, 4, 3), torch.nn.Conv2d(3, 4, 1)])
    with pytest.raises(TypeError, match="dtype"):
        layer(x.double())
