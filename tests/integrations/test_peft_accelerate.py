"""stablecore.integrations.peft: swapping peft LoRA layers keeps outputs, gradients and state."""

from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn

from stablecore.testing import assert_close, seed_all

peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402
from peft.tuners.lora import layer as lora_layer  # noqa: E402
from stablecore.integrations.peft import (  # noqa: E402
    StablecoreLoraConv2d,
    StablecoreLoraLinear,
    accelerate,
    restore,
)


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_in = nn.Conv2d(3, 6, 3, padding=1)
        self.proj = nn.Conv2d(6, 6, 1)
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        h = self.proj(torch.relu(self.conv_in(x)))
        return self.fc(h.permute(0, 2, 3, 1))


def _peft_model(dropout=0.0):
    seed_all(0)
    cfg = LoraConfig(
        r=2, lora_alpha=3, lora_dropout=dropout, init_lora_weights=False,
        target_modules=["conv_in", "proj", "fc"],
    )  # fmt: skip
    return get_peft_model(_Tiny(), cfg)


def _lora_grads(model, x):
    model.zero_grad()
    out = model(x)
    out.square().sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts calls of the fused functions, so a test can tell that the fast path ran."""
    # the package re-exports the function ``accelerate``, which shadows the submodule name
    mod = importlib.import_module("stablecore.integrations.peft.accelerate")

    calls = {"linear": 0, "conv": 0}
    for key, name in (("linear", "lora_linear"), ("conv", "lora_conv2d")):
        fn = getattr(mod, name)

        def counted(*a, _fn=fn, _key=key, **k):
            calls[_key] += 1
            return _fn(*a, **k)

        monkeypatch.setattr(mod, name, counted)
    return calls


def test_accelerate_matches_peft_outputs_and_gradients_then_restores(fused_calls):
    model = _peft_model()
    x = torch.randn(2, 3, 7, 7, requires_grad=True)
    ref_out, ref_grads = _lora_grads(model, x)
    keys = list(model.state_dict())
    assert accelerate(model) == 3
    assert isinstance(model.base_model.model.fc, StablecoreLoraLinear)
    assert isinstance(model.base_model.model.conv_in, StablecoreLoraConv2d)
    assert isinstance(model.base_model.model.fc, lora_layer.LoraLayer)  # peft still sees it
    assert list(model.state_dict()) == keys
    out, grads = _lora_grads(model, x)
    assert fused_calls == {"linear": 1, "conv": 2}
    assert_close(out, ref_out)
    assert grads.keys() == ref_grads.keys() and len(grads) == 6
    for name in grads:
        assert_close(grads[name], ref_grads[name], msg=name)
    # peft's own switches still act on the swapped layers
    with model.disable_adapter():
        base_out = model(x)
    restore(model)
    assert type(model.base_model.model.fc) is lora_layer.Linear
    with model.disable_adapter():
        assert_close(base_out, model(x))
    assert not torch.allclose(base_out, ref_out)


def test_dropout_train_mode_runs_and_eval_matches():
    model = _peft_model(dropout=0.3)
    x = torch.randn(2, 3, 5, 5)
    model.eval()
    ref = model(x)
    accelerate(model)
    assert_close(model(x), ref)
    model.train()
    out = model(x)
    assert out.shape == ref.shape and not torch.allclose(out, ref)


def test_accelerate_rejects_non_module():
    with pytest.raises(TypeError, match="nn.Module"):
        accelerate("not a model")


def test_diffusers_tiny_unet_add_adapter_identical_outputs(fused_calls):
    diffusers = pytest.importorskip("diffusers")
    seed_all(0)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(4, 8), layers_per_block=1, sample_size=16, in_channels=4,
        out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=8,
        norm_num_groups=2,
    )  # fmt: skip
    unet.add_adapter(
        LoraConfig(
            r=2,
            lora_alpha=2,
            init_lora_weights="gaussian",
            target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"],
        )  # fmt: skip
    )
    for name, p in unet.named_parameters():
        if "lora_B" in name:  # gaussian init leaves B = 0: make the adapter act
            nn.init.normal_(p, std=0.5)
    args = (torch.randn(2, 4, 16, 16), torch.tensor([10, 500]), torch.randn(2, 3, 8))
    with torch.no_grad():
        ref = unet(*args).sample
        n = accelerate(unet)
        out = unet(*args).sample
        unet.disable_adapters()
        base = unet(*args).sample
        unet.enable_adapters()
    assert n > 10
    assert fused_calls["linear"] > 0 and fused_calls["conv"] > 0
    assert_close(out, ref)
    assert not torch.allclose(base, ref)
    assert restore(unet) == n
