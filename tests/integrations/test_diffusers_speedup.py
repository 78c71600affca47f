"""SpeedUpAttnProcessor as ONE fused multi_cross_attention call (normalisation inside the op),
trained: its gradients equal those of the released formula written out eagerly. (The forward
formula test lives with the other processors in ``test_diffusers_processors.py``.)"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

diffusers = pytest.importorskip("diffusers")

from stablecore.integrations.diffusers import apply_speedup, attention_layers  # noqa: E402

from stablecore.testing import assert_close  # noqa: E402

CAD = 8  # cross_attention_dim of the tiny UNet


def tiny_unet():
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        block_out_channels=(4, 8),
        norm_num_groups=4,
        layers_per_block=1,
        sample_size=16,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=CAD,
        attention_head_dim=2,
    ).eval()


def a_cross_layer(unet):
    return next(iter(attention_layers(unet, "cross").values()))


def sdpa(attn, tokens, context, to_k=None, to_v=None):
    """One attention of a diffusers layer, restated: [B, L, C] -> [B, L, inner]."""
    b, heads = tokens.shape[0], attn.heads
    split = lambda x: x.view(b, x.shape[1], heads, -1).transpose(1, 2)  # noqa: E731
    q = split(attn.to_q(tokens))
    k, v = split((to_k or attn.to_k)(context)), split((to_v or attn.to_v)(context))
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, tokens.shape[1], -1)


def out_proj(attn, z):
    return attn.to_out[0](z) / attn.rescale_output_factor


def test_speedup_is_one_fused_call_and_trains(monkeypatch):
    """The normalisation runs inside ONE multi_cross_attention call, and the adapter's
    gradients (projections, per-channel alpha/beta) equal those of the eager formula."""
    from stablecore.integrations.diffusers import processors

    unet = tiny_unet()
    apply_speedup(unet, norm="batch")
    attn = a_cross_layer(unet)
    proc = attn.processor
    with torch.no_grad():
        for p in proc.parameters():
            p.add_(0.1 * torch.randn_like(p))
    calls = []
    op = processors.multi_cross_attention
    monkeypatch.setattr(
        processors, "multi_cross_attention", lambda *a, **k: (calls.append(k), op(*a, **k))[1]
    )
    gen = torch.Generator().manual_seed(4)
    tokens = torch.randn(2, 16, attn.to_q.in_features, generator=gen)
    pos, neg = torch.randn(2, 7, CAD, generator=gen), torch.randn(2, 5, CAD, generator=gen)
    grad = torch.randn(2, 16, attn.to_out[0].out_features, generator=gen)
    params = [proc.alpha_neg, proc.beta_neg, proc.to_k_neg.weight, proc.to_v_neg.weight]
    proc(attn, tokens, pos, neg_encoder_hidden_states=neg).backward(grad)
    assert len(calls) == 1 and calls[0]["norm_streams"] == [1]
    got = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    z_pos = sdpa(attn, tokens, pos)
    z_neg = sdpa(attn, tokens, neg, proc.to_k_neg, proc.to_v_neg)
    z_neg = proc.alpha_neg * z_neg * z_pos.norm() / z_neg.norm() + proc.beta_neg
    out_proj(attn, z_pos - z_neg).backward(grad)
    for mine, theirs in zip(got, params):
        assert mine.abs().sum() > 0
        assert_close(mine, theirs.grad)
