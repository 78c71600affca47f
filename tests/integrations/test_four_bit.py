"""apply_4bit_training on a tiny LlamaForCausalLM built from a config: only the attention and MLP
projections become QuantLinear (embeddings, lm_head, norms stay), the model trains, and a
checkpoint round-trips between plain and 4-bit models."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from stablecore.integrations.transformers.four_bit import (  # noqa: E402
    LLAMA_4BIT_TARGETS,
    apply_4bit_training,
)

from stablecore.nn.quant_linear import QuantLinear  # noqa: E402
from stablecore.testing import seed_all  # noqa: E402


def _tiny_llama():
    seed_all(0)
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
        tie_word_embeddings=False,
    )
    return transformers.LlamaForCausalLM(cfg)


@pytest.mark.parametrize("fmt", ["int4", "fp4", "e2m1"])
def test_only_attention_and_mlp_linears_are_quantized(fmt):
    model = apply_4bit_training(_tiny_llama(), fmt=fmt, group_size=64)
    quantized = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert len(quantized) == 2 * len(LLAMA_4BIT_TARGETS)
    assert all(n.rsplit(".", 1)[-1] in LLAMA_4BIT_TARGETS for n in quantized)
    assert type(model.lm_head) is torch.nn.Linear
    assert all(m.fmt == fmt for n, m in model.named_modules() if n in quantized)


def test_quantized_model_differs_trains_and_round_trips():
    plain = _tiny_llama()
    model = _tiny_llama()
    model.load_state_dict(plain.state_dict())
    apply_4bit_training(model, group_size=64)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, plain(ids).logits)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None for p in model.parameters())
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    reloaded = apply_4bit_training(_tiny_llama(), group_size=64)
    reloaded.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)
    plain.load_state_dict(model.state_dict())  # keys are those of the plain model


def test_rejects_non_llama_models():
    with pytest.raises(ValueError, match="LLaMA-family"):
        apply_4bit_training(torch.nn.Sequential(torch.nn.Linear(4, 4)))
    with pytest.raises(TypeError, match="nn.Module"):
        apply_4bit_training("llama")
