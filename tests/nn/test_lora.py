"""stablecore.nn.lora: fused LoRA linear / conv2d against plain PyTorch, with every gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from stablecore.nn.lora import LoRAConv2d, LoRALinear, MultiLoRALinear, lora_conv2d, lora_linear
from stablecore.nn.lora_functional import lora_linear_multi
from stablecore.testing import assert_close, seed_all
from stablecore.testing.strategies import float_dtypes, shapes


def _leaves(*shapes_, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(s, generator=gen, dtype=torch.float64)).to(dtype).requires_grad_()
        for s in shapes_
    ]


def _grads(out, inputs, seed):
    gen = torch.Generator().manual_seed(seed + 1)
    g = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.dtype)
    return torch.autograd.grad(out, inputs, g)


def _ref_linear(x, w, b, a, bb, s, xd=None):
    x, w, a, bb = (t.double() for t in (x, w, a, bb))
    xd = x if xd is None else xd.double()
    out = x @ w.t() + s * (xd @ a.t()) @ bb.t()
    return out + b.double() if b is not None else out


@given(
    lead=shapes(min_dims=1, max_dims=2, max_side=6),
    k=st.integers(2, 12),
    n=st.integers(2, 12),
    rank=st.integers(1, 2),
    bias=st.booleans(),
    dtype=float_dtypes((torch.float32, torch.float64)),
    seed=st.integers(0, 2**20),
)
def test_lora_linear_matches_reference_with_gradients(lead, k, n, rank, bias, dtype, seed):
    x, w, b, a, bb = _leaves((*lead, k), (n, k), (n,), (rank, k), (n, rank), dtype=dtype, seed=seed)
    b = b if bias else None
    ins = [t for t in (x, w, b, a, bb) if t is not None]
    out = lora_linear(x, w, b, a, bb, 0.75)
    ref = _ref_linear(x, w, b, a, bb, 0.75)
    assert out.dtype == dtype and out.shape == (*lead, n)
    assert_close(out, ref, dtype=dtype)
    for got, want in zip(_grads(out, ins, seed), _grads(ref, ins, seed)):
        assert_close(got, want, dtype=dtype)


def test_lora_linear_dropout_uses_one_mask_for_forward_and_backward():
    x, w, b, a, bb = _leaves((6, 10), (7, 10), (7,), (3, 10), (7, 3), dtype=torch.float64, seed=3)
    torch.manual_seed(5)
    out = lora_linear(x, w, b, a, bb, 2.0, dropout=0.4, training=True)
    torch.manual_seed(5)  # the same RNG draw gives the reference the same mask
    xd = torch.native_dropout(x, 0.4, True)[0]
    ref = _ref_linear(x, w, b, a, bb, 2.0, xd=xd)
    assert_close(out, ref)
    assert not torch.allclose(out, _ref_linear(x, w, b, a, bb, 2.0))  # dropout did act
    ins = (x, w, b, a, bb)
    for got, want in zip(_grads(out, ins, 1), _grads(ref, ins, 1)):
        assert_close(got, want)
    # eval mode: no dropout
    assert_close(lora_linear(x, w, b, a, bb, 2.0, 0.4, False), _ref_linear(x, w, b, a, bb, 2.0))


@given(
    kernel=st.sampled_from([1, 3]),
    stride=st.integers(1, 2),
    padding=st.integers(0, 1),
    dilation=st.integers(1, 2),
    hw=st.tuples(st.integers(5, 8), st.integers(5, 8)),
    rank=st.integers(1, 3),
    bias=st.booleans(),
    seed=st.integers(0, 2**20),
)
def test_lora_conv2d_matches_reference_with_gradients(
    kernel, stride, padding, dilation, hw, rank, bias, seed
):
    c, n, dtype = 3, 4, torch.float32
    x, w, b, a, bb = _leaves(
        (2, c, *hw), (n, c, kernel, kernel), (n,), (rank, c, kernel, kernel), (n, rank, 1, 1),
        dtype=dtype, seed=seed,
    )  # fmt: skip
    b = b if bias else None
    ins = [t for t in (x, w, b, a, bb) if t is not None]
    out = lora_conv2d(x, w, b, a, bb, 1.5, stride, padding, dilation)
    xd, wd, ad, bd = (t.double() for t in (x, w, a, bb))
    geo = (stride, padding, dilation)
    ref = F.conv2d(xd, wd, None if b is None else b.double(), *geo)
    ref = ref + 1.5 * F.conv2d(F.conv2d(xd, ad, None, *geo), bd)
    assert_close(out, ref, dtype=dtype)
    for got, want in zip(_grads(out, ins, seed), _grads(ref, ins, seed)):
        assert_close(got, want, dtype=dtype)


def test_frozen_base_gets_no_gradient_and_trainable_base_does():
    seed_all(0)
    layer = LoRALinear(8, 6, rank=2, alpha=4, dropout=0.0)
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(5, 8, requires_grad=True)
    layer(x).square().sum().backward()
    assert layer.weight.grad is None and layer.bias.grad is None
    assert layer.lora_A.grad is not None and layer.lora_B.grad is not None and x.grad is not None
    layer.set_base_trainable(True)
    layer(x).square().sum().backward()
    ref_w = layer.weight.detach().clone().requires_grad_()
    a, b = layer.lora_A.detach(), layer.lora_B.detach()
    F.linear(x, ref_w, layer.bias.detach()).add(2.0 * x @ a.t() @ b.t()).square().sum().backward()
    assert_close(layer.weight.grad, ref_w.grad)


def test_modules_share_parameters_and_state_dict_round_trips():
    seed_all(1)
    base = torch.nn.Linear(10, 7)
    layer = LoRALinear.from_linear(base, rank=3, alpha=6)
    assert layer.weight is base.weight and layer.bias is base.bias
    x = torch.randn(4, 10)
    assert_close(layer(x), base(x))  # B = 0 at init: a no-op adapter
    torch.nn.init.normal_(layer.lora_B)
    other = LoRALinear(10, 7, rank=3, alpha=6)
    other.load_state_dict(layer.state_dict())
    assert_close(other(x), layer(x))
    assert_close(layer(x), base(x) + x @ layer.delta_weight().t())

    conv = torch.nn.Conv2d(3, 5, 3, padding=1)
    lc = LoRAConv2d.from_conv(conv, rank=2)
    torch.nn.init.normal_(lc.lora_B)
    xi = torch.randn(2, 3, 6, 6)
    assert_close(lc(xi), conv(xi) + F.conv2d(xi, lc.delta_weight(), padding=1))
    lc2 = LoRAConv2d(3, 5, 3, rank=2, padding=1)
    lc2.load_state_dict(lc.state_dict())
    assert_close(lc2(xi), lc(xi))


def test_bad_input_raises_clear_errors():
    with pytest.raises(ValueError, match="rank 9 is larger"):
        LoRALinear(8, 16, rank=9)
    with pytest.raises(ValueError, match="rank"):
        LoRAConv2d(2, 3, 1, rank=3)
    with pytest.raises(ValueError, match="dropout"):
        LoRALinear(8, 8, rank=2, dropout=1.0)
    layer = LoRALinear(8, 6, rank=2)
    with pytest.raises(ValueError, match=r"\(3, 5\).*8 input features"):
        layer(torch.randn(3, 5))
    with pytest.raises(TypeError, match="dtype"):
        layer(torch.randn(3, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="groups=1"):
        LoRAConv2d.from_conv(torch.nn.Conv2d(4, 4, 3, groups=2), rank=1)


# ----------------------------------------------------------------------------- many adapters
@given(
    batch=st.integers(1, 5),
    tokens=st.sampled_from([(), (3,), (2, 2)]),
    n_adapters=st.integers(1, 3),
    bias=st.booleans(),
    seed=st.integers(0, 2**20),
)
def test_many_adapters_match_one_layer_per_sample_with_gradients(
    batch, tokens, n_adapters, bias, seed
):
    dtype, k, n, r = torch.float64, 6, 5, 2
    x, w, b, a, bb = _leaves(
        (batch, *tokens, k), (n, k), (n,), (n_adapters, r, k), (n_adapters, n, r),
        dtype=dtype, seed=seed,
    )  # fmt: skip
    b = b if bias else None
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(-1, n_adapters, (batch,), generator=gen)
    scaling = torch.rand(n_adapters, generator=gen, dtype=dtype) + 0.5
    out = lora_linear_multi(x, w, b, a, bb, scaling, ids)
    refs = []
    for i, e in enumerate(ids.tolist()):
        if e < 0:
            refs.append(F.linear(x[i].double(), w.double(), None if b is None else b.double()))
        else:
            refs.append(_ref_linear(x[i], w, b, a[e], bb[e], float(scaling[e])))
    ref = torch.stack(refs)
    assert_close(out, ref)
    ins = [t for t in (x, w, b, a, bb) if t is not None]
    g = torch.randn(out.shape, generator=gen, dtype=dtype)
    grads = [torch.autograd.grad(o, ins, g, materialize_grads=True) for o in (out, ref)]
    for got, want in zip(*grads):  # unused adapters get zero gradients
        assert_close(got, want)


def test_multi_lora_module_stacks_trained_adapters():
    seed_all(2)
    base = torch.nn.Linear(8, 6)
    layers = [LoRALinear.from_linear(base, rank=2, alpha=a) for a in (2.0, 6.0)]
    for layer in layers:
        torch.nn.init.normal_(layer.lora_B)
    multi = MultiLoRALinear.from_lora_layers(layers)
    assert multi.weight is base.weight and not multi.weight.requires_grad
    x = torch.randn(4, 3, 8)
    out = multi(x, torch.tensor([0, 1, -1, 1]))
    assert_close(out[0], layers[0](x[0]))
    assert_close(out[1], layers[1](x[1]))
    assert_close(out[2], base(x[2]))
    assert_close(out[3], layers[1](x[3]))
    out.square().sum().backward()
    assert multi.lora_A.grad is not None and multi.weight.grad is None
    other = MultiLoRALinear(8, 6, rank=2, num_adapters=2)
    other.load_state_dict(multi.state_dict())
    assert_close(other(x, torch.tensor([1, 0, 0, -1])), multi(x, torch.tensor([1, 0, 0, -1])))
    multi.train()
    multi.dropout = 0.5
    torch.manual_seed(0)
    assert not torch.allclose(multi(x, torch.tensor([0, 1, 0, 1])), out.detach())


def test_many_adapters_bad_input():
    seed_all(3)
    multi = MultiLoRALinear(8, 6, rank=2, num_adapters=3)
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match=r"adapter_ids must lie in \[-1, 3\)"):
        multi(x, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"adapter_ids has shape \(3,\)"):
        multi(x, torch.tensor([0, 1, 2]))
    with pytest.raises(TypeError, match="integer"):
        multi(x, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"expected \[B, ..., 8\]"):
        multi(torch.randn(2, 7), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="num_adapters"):
        MultiLoRALinear(8, 6, rank=2, num_adapters=0)
    with pytest.raises(ValueError, match="share the base"):
        MultiLoRALinear.from_lora_layers([LoRALinear(8, 6, 2), LoRALinear(8, 6, 2)])
