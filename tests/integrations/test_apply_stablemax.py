"""apply_stablemax / SoftmaxCollapseCallback on a tiny LlamaForCausalLM built from a config."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from stablecore.integrations.transformers.stablemax import (  # noqa: E402
    SoftmaxCollapseCallback,
    apply_stablemax,
    remove_stablemax,
)

from stablecore.testing import assert_close, seed_all  # noqa: E402

VOCAB = 61


def tiny_llama(dtype=torch.float64):
    seed_all(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
    )
    return transformers.LlamaForCausalLM(config).to(dtype)


def batch():
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, 7), generator=gen)
    labels = ids.clone()
    labels[0, :2] = -100
    return ids, labels


def stablemax_oracle(model, ids, labels, num_items=None):
    """Unpatched forward, then float64 StableMax CE on the shifted logits (independent path)."""
    model.zero_grad()
    logits = model(input_ids=ids).logits.double()
    z = torch.sign(logits) * torch.log1p(logits.abs())
    shift = F.pad(labels, (0, 1), value=-100)[:, 1:]
    red = "mean" if num_items is None else "sum"
    loss = F.cross_entropy(z.reshape(-1, VOCAB), shift.reshape(-1), reduction=red)
    loss = loss if num_items is None else loss / num_items
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    return loss.detach(), grads


@pytest.mark.parametrize("fused", [True, False])
def test_training_loss_and_grads_match_oracle(fused):
    model = tiny_llama()
    ids, labels = batch()
    ref_loss, ref_grads = stablemax_oracle(model, ids, labels)
    apply_stablemax(model, fused_linear=fused)
    model.train()
    out = model(input_ids=ids, labels=labels)
    assert (out.logits is None) == fused  # the fused path never forms the logits
    out.loss.backward()
    assert_close(out.loss, ref_loss)
    for name, p in model.named_parameters():
        assert_close(p.grad, ref_grads[name], msg=name)


def test_num_items_in_batch_eval_and_remove():
    model = tiny_llama()
    ids, labels = batch()
    ref_loss, _ = stablemax_oracle(model, ids, labels, num_items=torch.tensor(20))
    plain_loss = model(input_ids=ids, labels=labels).loss.detach()
    apply_stablemax(model).train()
    out = model(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(20))
    assert_close(out.loss, ref_loss)
    model.eval()
    out = model(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(20))
    assert out.logits.shape == (2, 7, VOCAB)
    assert_close(out.loss, ref_loss)
    assert isinstance(model(ids, return_dict=False), tuple)
    patched_generation = model.generate(ids[:1], max_new_tokens=3, do_sample=False)
    remove_stablemax(model)
    plain_generation = model.generate(ids[:1], max_new_tokens=3, do_sample=False)
    assert torch.equal(patched_generation, plain_generation)  # cache plumbing intact
    assert_close(model(input_ids=ids, labels=labels).loss, plain_loss)


def test_other_architectures_through_the_same_hook():
    seed_all(0)
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2, n_positions=32,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    model = transformers.GPT2LMHeadModel(config).double()
    ids, labels = batch()
    ref_loss, ref_grads = stablemax_oracle(model, ids, labels)
    apply_stablemax(model).train()
    out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    assert out.logits is None
    assert_close(out.loss, ref_loss)
    for name, p in model.named_parameters():
        assert_close(p.grad, ref_grads[name], msg=name)


def test_refuses_models_that_postprocess_logits():
    model = tiny_llama()
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(TypeError, match="final_logit_softcapping"):
        apply_stablemax(model)
    with pytest.raises(TypeError, match="causal LM"):
        apply_stablemax(torch.nn.Linear(2, 2))


class _State:
    def __init__(self):
        self.global_step = 0
        self.log_history = []


@pytest.mark.parametrize("patched", [True, False])
def test_callback_records_collapse_fractions(patched):
    model = tiny_llama(torch.float32)
    with torch.no_grad():  # scale the head so that some rows collapse in fp32 softmax
        model.lm_head.weight.mul_(400.0)
    if patched:
        apply_stablemax(model)
    model.train()
    ids, labels = batch()
    with torch.no_grad():  # targets = the model's own arg-max: confident rows that can collapse
        labels[:, 1:] = model(input_ids=ids).logits[:, :-1].argmax(-1)
    labels[0, :2] = -100
    cb = SoftmaxCollapseCallback(every_n_steps=2, max_rows=5)
    state = _State()
    for step in range(3):
        state.global_step = step
        cb.on_step_begin(None, state, None, model=model)
        model(input_ids=ids, labels=labels).loss.backward()
        cb.on_step_end(None, state, None, model=model)
    assert [r["step"] for r in cb.history] == [0, 2]
    record = cb.history[0]
    for key in (
        "softmax_collapse_fraction",
        "softmax_zero_loss_fraction",
        "stablemax_collapse_fraction",
        "stablemax_zero_loss_fraction",
    ):
        assert 0.0 <= record[key] <= 1.0
    assert record["softmax_collapse_fraction"] > 0.0  # scaled head: fp32 softmax collapses
    assert record["stablemax_collapse_fraction"] == 0.0
    logs = {"loss": 1.0}
    cb.on_log(None, state, None, logs=logs)
    assert "softmax_collapse_fraction" in logs and state.log_history[-1]["step"] == 2
    cb.on_train_end(None, state, None)


def test_trainer_runs_with_stablemax_and_callback(tmp_path):
    pytest.importorskip("accelerate")
    model = tiny_llama(torch.float32)
    apply_stablemax(model)
    ids, labels = batch()
    data = [{"input_ids": ids[i], "labels": labels[i]} for i in range(2)] * 4
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        max_steps=4,
        logging_steps=2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        learning_rate=1e-2,
        disable_tqdm=True,
    )
    cb = SoftmaxCollapseCallback(every_n_steps=2)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[cb])
    result = trainer.train()
    assert result.training_loss == result.training_loss  # finite, not NaN
    assert len(cb.history) == 2
    assert any("softmax_collapse_fraction" in r for r in trainer.state.log_history)
