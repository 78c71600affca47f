"""QuantLinear / quantize_linear_layers: forward = linear on fake-quantized weight and input,
the paper's gradients (grad_x = g @ W_q, grad_W = g^T @ x_q), state_dict round trips, targets."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from stablecore.nn.quant_linear import FOUR_BIT_FORMATS, QuantLinear, quantize_linear_layers
from stablecore.ops.fake_quant import fake_quant
from stablecore.testing import assert_close, seed_all


@pytest.mark.parametrize("fmt", list(FOUR_BIT_FORMATS))
def test_forward_and_gradients_match_the_paper(fmt):
    seed_all(0)
    layer = QuantLinear(64, 48, fmt=fmt, group_size=32, keep_outliers=2)
    x = torch.randn(3, 5, 64, requires_grad=True)
    y = layer(x)
    g = torch.randn_like(y)
    y.backward(g)

    w_fmt, w_outliers, a_fmt = FOUR_BIT_FORMATS[fmt]
    w_q = fake_quant(layer.weight.detach(), w_fmt, 32, 2 if w_outliers else 0)
    x_q = fake_quant(x.detach(), a_fmt, 32, 2)
    assert_close(y, x_q @ w_q.t() + layer.bias.detach())
    assert_close(x.grad, g @ w_q)  # STE through the activation quantizer
    assert_close(layer.weight.grad, g.reshape(-1, 48).t() @ x_q.reshape(-1, 64))
    assert_close(layer.bias.grad, g.reshape(-1, 48).sum(0))


def test_quantization_changes_the_output_and_weights_have_16_levels():
    seed_all(1)
    lin = nn.Linear(256, 8)
    q = QuantLinear.from_linear(lin, "int4")
    x = torch.randn(4, 256)
    assert not torch.allclose(q(x), lin(x))  # it does quantize
    assert all(len(torch.unique(r)) <= 16 for r in q.quantized_weight())
    assert q.weight is lin.weight and q.bias is lin.bias  # parameters are shared


@pytest.mark.parametrize("fmt", list(FOUR_BIT_FORMATS))
def test_state_dict_round_trip(fmt):
    seed_all(2)
    a = QuantLinear(32, 16, fmt=fmt, group_size=16, keep_outliers=1)
    b = QuantLinear(32, 16, fmt=fmt, group_size=16, keep_outliers=1)
    assert set(a.state_dict()) == set(nn.Linear(32, 16).state_dict())
    b.load_state_dict(a.state_dict())
    x = torch.randn(7, 32)
    assert torch.equal(a(x), b(x))
    plain = nn.Linear(32, 16)
    plain.load_state_dict(a.state_dict())  # a plain model loads a quantized checkpoint
    assert torch.equal(plain.weight, a.weight)


def test_quantize_linear_layers_targets():
    seed_all(3)
    model = nn.Sequential(
        nn.Linear(64, 64), nn.ReLU(), nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 4))
    )
    params_before = list(model.parameters())
    quantize_linear_layers(model, "fp4", group_size=32, targets={"2.1"})  # full dotted name
    assert isinstance(model[2][1], QuantLinear)
    assert type(model[0]) is nn.Linear and type(model[2][0]) is nn.Linear
    assert list(model.parameters()) == params_before  # optimizer built earlier still works
    assert model[2][1].fmt == "fp4" and model[2][1].group_size == 32
    quantize_linear_layers(model, "e2m1", targets=lambda name, m: m.out_features == 4)
    assert model[2][1].fmt == "e2m1"  # reconfigured in place
    quantize_linear_layers(model, "int4", targets={"0"})  # last name component: "0", "2.0"
    assert isinstance(model[0], QuantLinear) and isinstance(model[2][0], QuantLinear)
    quantize_linear_layers(model)  # None: every linear
    assert all(isinstance(m, QuantLinear) for m in (model[0], model[2][0], model[2][1]))
    model(torch.randn(2, 64)).sum().backward()


def test_bad_arguments():
    with pytest.raises(ValueError, match="fmt"):
        QuantLinear(8, 8, fmt="int8")
    with pytest.raises(ValueError, match="keep_outliers"):
        QuantLinear(8, 8, group_size=2, keep_outliers=2)
    with pytest.raises(ValueError, match="matched"):
        quantize_linear_layers(nn.Sequential(nn.Linear(4, 4)), targets={"q_proj"})
    with pytest.raises(TypeError, match="nn.Linear"):
        QuantLinear.from_linear(nn.Conv1d(2, 2, 1))
