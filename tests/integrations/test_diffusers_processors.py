"""diffusers processors (NASA, PPD user embeddings, SpeedUpNet, GRI) on tiny offline UNets and a
tiny StableDiffusionPipeline: each reproduces its formula, installs without disturbing other
layers, runs end to end on CPU, and rejects bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from diffusers.models.attention_processor import AttnProcessor2_0  # noqa: E402
from stablecore.integrations.diffusers import (  # noqa: E402
    GRIAttnProcessor,
    NASAAttnProcessor,
    SpeedUpAttnProcessor,
    UserEmbeddingAttnProcessor,
    apply_gri,
    apply_nasa,
    apply_speedup,
    apply_user_embedding,
    attention_layers,
    nasa_generate,
    speedup_generate,
    user_embedding_generate,
)

from stablecore.ops.gri_attention import pool_global_tokens  # noqa: E402
from stablecore.testing import assert_close  # noqa: E402

CAD = 8  # cross_attention_dim of the tiny models


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
        in_channels=4,
        out_channels=4,
    ).eval()


def unet_inputs(batch=2, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 16, 16, generator=gen)
    pos = torch.randn(batch, 7, CAD, generator=gen)
    neg = torch.randn(batch, 5, CAD, generator=gen)
    return x, torch.tensor([10]), pos, neg


def a_cross_layer(unet):
    return next(iter(attention_layers(unet, "cross").values()))


def sdpa(attn, tokens, context, to_k=None, to_v=None):
    """Independent restatement of one attention of a diffusers layer: [B, L, C] -> [B, L, inner]."""
    b, heads = tokens.shape[0], attn.heads
    split = lambda x: x.view(b, x.shape[1], heads, -1).transpose(1, 2)  # noqa: E731
    q = split(attn.to_q(tokens))
    k, v = split((to_k or attn.to_k)(context)), split((to_v or attn.to_v)(context))
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, tokens.shape[1], -1)


def out_proj(attn, z):
    return attn.to_out[0](z) / attn.rescale_output_factor


# ----------------------------------------------------------------------------- NASA
@torch.no_grad()
def test_nasa_alpha_zero_equals_attn_processor_2_0_and_alpha_changes_output():
    unet = tiny_unet()
    x, t, pos, neg = unet_inputs()
    unet.set_attn_processor(AttnProcessor2_0())
    expected = unet(x, t, encoder_hidden_states=pos).sample
    assert apply_nasa(unet) == []
    kwargs = {"neg_encoder_hidden_states": neg, "nasa_alpha": 0.0}
    got = unet(x, t, encoder_hidden_states=pos, cross_attention_kwargs=kwargs).sample
    assert_close(got, expected)
    kwargs["nasa_alpha"] = 0.5
    steered = unet(x, t, encoder_hidden_states=pos, cross_attention_kwargs=kwargs).sample
    assert (steered - expected).abs().max() > 1e-4


@torch.no_grad()
def test_nasa_layer_formula_and_family_defaults():
    unet = tiny_unet()
    attn = a_cross_layer(unet)
    gen = torch.Generator().manual_seed(2)
    tokens = torch.randn(2, 16, attn.to_q.in_features, generator=gen)
    pos, neg = torch.randn(2, 7, CAD, generator=gen), torch.randn(1, 5, CAD, generator=gen)
    proc = NASAAttnProcessor(family="sd21")
    assert proc.alpha == 0.2 and NASAAttnProcessor().alpha == 0.1
    got = proc(attn, tokens, pos, neg_encoder_hidden_states=neg)
    expected = sdpa(attn, tokens, pos) - 0.2 * sdpa(attn, tokens, neg.expand(2, -1, -1))
    assert_close(got, out_proj(attn, expected))


def test_apply_keeps_other_processors():
    unet = tiny_unet()
    apply_nasa(unet)
    procs = unet.attn_processors
    assert all(isinstance(p, NASAAttnProcessor) for k, p in procs.items() if "attn2" in k)
    assert all(not isinstance(p, NASAAttnProcessor) for k, p in procs.items() if "attn1" in k)
    apply_gri(unet, window_size=4)
    procs = unet.attn_processors
    assert all(isinstance(p, GRIAttnProcessor) for k, p in procs.items() if "attn1" in k)
    assert all(isinstance(p, NASAAttnProcessor) for k, p in procs.items() if "attn2" in k)


# ----------------------------------------------------------------------------- PPD
@torch.no_grad()
def test_user_embedding_noop_formula_and_state_dict():
    unet = tiny_unet()
    x, t, pos, _ = unet_inputs()
    base = unet(x, t, encoder_hidden_states=pos).sample
    params = apply_user_embedding(unet, user_dim=6, scale=0.7)
    n_cross = len(attention_layers(unet, "cross"))
    assert len(params) == 2 * n_cross and all(p.requires_grad for p in params)
    assert sum("to_k_user" in k for k in unet.state_dict()) == n_cross
    user = torch.randn(2, 3, 6)
    fresh = unet(x, t, encoder_hidden_states=pos, cross_attention_kwargs={"user_embeds": user})
    assert_close(fresh.sample, base)  # zero-initialised to_v_user: installed branch is a no-op
    for p in params:
        torch.nn.init.normal_(p)
    zero_user = {"user_embeds": torch.zeros(2, 3, 6)}
    assert_close(
        unet(x, t, encoder_hidden_states=pos, cross_attention_kwargs=zero_user).sample, base
    )
    trained = unet(x, t, encoder_hidden_states=pos, cross_attention_kwargs={"user_embeds": user})
    assert (trained.sample - base).abs().max() > 1e-4
    attn = a_cross_layer(unet)
    proc = attn.processor
    tokens = torch.randn(2, 16, attn.to_q.in_features)
    got = proc(attn, tokens, pos, user_embeds=user, user_scale=0.3)
    expected = sdpa(attn, tokens, pos) + 0.3 * sdpa(
        attn, tokens, user, proc.to_k_user, proc.to_v_user
    )
    assert_close(got, out_proj(attn, expected))


def test_user_embedding_trains():
    unet = tiny_unet()
    x, t, pos, _ = unet_inputs()
    params = apply_user_embedding(unet, user_dim=6)
    loss = (
        unet(
            x,
            t,
            encoder_hidden_states=pos,
            cross_attention_kwargs={"user_embeds": torch.randn(2, 3, 6)},
        )
        .sample.square()
        .mean()
    )
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


# ----------------------------------------------------------------------------- SpeedUpNet
@torch.no_grad()
@pytest.mark.parametrize("norm", ["batch", "sample"])
def test_speedup_formula(norm):
    unet = tiny_unet()
    params = apply_speedup(unet, norm=norm, add_pos=True)
    assert len(params) == 8 * len(attention_layers(unet, "cross"))
    for p in params:
        p.add_(0.1 * torch.randn_like(p))
    attn = a_cross_layer(unet)
    proc = attn.processor
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randn(2, 16, attn.to_q.in_features, generator=gen)
    pos, neg = torch.randn(2, 7, CAD, generator=gen), torch.randn(2, 5, CAD, generator=gen)
    got = proc(attn, tokens, pos, neg_encoder_hidden_states=neg)
    z_pos = sdpa(attn, tokens, pos)

    def normalise(z, name):
        if norm == "batch":  # one Frobenius norm over the whole tensor, batch included
            z = z * z_pos.norm() / z.norm()
        else:
            z = torch.stack([zi * zp.norm() / zi.norm() for zi, zp in zip(z, z_pos)])
        return getattr(proc, f"alpha_{name}") * z + getattr(proc, f"beta_{name}")

    z_neg = normalise(sdpa(attn, tokens, neg, proc.to_k_neg, proc.to_v_neg), "neg")
    z_p = normalise(sdpa(attn, tokens, pos, proc.to_k_pos, proc.to_v_pos), "pos")
    assert_close(got, out_proj(attn, z_pos - z_neg + z_p))


# ----------------------------------------------------------------------------- GRI
@torch.no_grad()
def test_gri_layer_formula_and_unet_runs():
    unet = tiny_unet()
    x, t, pos, _ = unet_inputs()
    base = unet(x, t, encoder_hidden_states=pos).sample
    apply_gri(unet, window_size=4, pool_size=2)
    out = unet(x, t, encoder_hidden_states=pos).sample
    assert out.shape == base.shape and torch.isfinite(out).all()
    assert (out - base).abs().max() > 1e-6  # 16x16 grid, 4x4 windows: not full attention
    attn = next(iter(attention_layers(unet, "self").values()))
    gh, gw = 6, 10
    tokens = torch.randn(1, gh * gw, attn.to_q.in_features, dtype=torch.float64)
    attn.double()
    attn.processor.grid_state.latent_hw = (gh, gw)
    got = attn.processor(attn, tokens)
    split = lambda z: z.view(1, gh * gw, attn.heads, -1).transpose(1, 2)  # noqa: E731
    q, k, v = split(attn.to_q(tokens)), split(attn.to_k(tokens)), split(attn.to_v(tokens))
    kg, vg = pool_global_tokens(k, (gh, gw), 2), pool_global_tokens(v, (gh, gw), 2)
    r, c = torch.arange(gh).repeat_interleave(gw), torch.arange(gw).repeat(gh)
    win = (r // 4) * 1000 + c // 4
    allow = torch.cat([win[:, None] == win[None, :], torch.ones(gh * gw, kg.shape[2]).bool()], 1)
    z = F.scaled_dot_product_attention(q, torch.cat([k, kg], 2), torch.cat([v, vg], 2), allow)
    assert_close(got, out_proj(attn, z.transpose(1, 2).reshape(1, gh * gw, -1)))


# ----------------------------------------------------------------------------- pipeline
def tiny_pipeline():
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(4, 8),
        layers_per_block=1,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=CAD,
        norm_num_groups=2,
    )
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        block_out_channels=[4, 8],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        latent_channels=4,
        norm_num_groups=2,
    )
    torch.manual_seed(0)
    text = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=0,
            eos_token_id=2,
            hidden_size=CAD,
            intermediate_size=16,
            layer_norm_eps=1e-5,
            num_attention_heads=2,
            num_hidden_layers=2,
            pad_token_id=1,
            vocab_size=1000,
        )
    )
    words = [
        "l",
        "o",
        "w",
        "e",
        "r",
        "s",
        "t",
        "i",
        "d",
        "n",
        "lo",
        "l</w>",
        "w</w>",
        "r</w>",
        "t</w>",
        "low</w>",
        "er</w>",
        "lowest</w>",
        "newer</w>",
        "wider",
        "<unk>",
        "<|startoftext|>",
        "<|endoftext|>",
    ]
    tokenizer = CLIPTokenizer(
        vocab={w: i for i, w in enumerate(words)},
        merges=[("l", "o"), ("lo", "w</w>"), ("e", "r</w>")],
        unk_token="<unk>",
        model_max_length=77,
    )
    scheduler = diffusers.DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = diffusers.StableDiffusionPipeline(
        unet=unet,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text,
        tokenizer=tokenizer,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_tiny_pipeline_end_to_end_with_each_processor():
    pipe = tiny_pipeline()
    run = dict(output_type="pt", num_inference_steps=2)
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    assert pipe.tokenizer("lower newer").input_ids[1:-1] != [2] * 2  # real tokens, not all <eot>
    plain = pipe("lower newer", guidance_scale=0.0, generator=gen(), **run).images
    nasa0 = nasa_generate(pipe, "lower newer", "wider", alpha=0.0, generator=gen(), **run).images
    assert_close(nasa0, plain)
    nasa = nasa_generate(pipe, "lower newer", "wider", alpha=1.0, generator=gen(), **run).images
    assert nasa.shape == (1, 3, 64, 64) and (nasa - plain).abs().max() > 0
    cfg = nasa_generate(
        pipe, "low", "wider", guidance_scale=2.0, num_images_per_prompt=2, generator=gen(), **run
    )  # negatives tiled over [uncond, cond] x images
    assert cfg.images.shape == (2, 3, 64, 64) and torch.isfinite(cfg.images).all()
    with pytest.raises(ValueError, match="2 negative prompts for a batch of 1"):
        nasa_generate(pipe, "low", ["a", "b"], **run)
    with pytest.raises(ValueError, match="apply_user_embedding"):
        user_embedding_generate(pipe, "low", torch.randn(1, 2, 6))
    apply_user_embedding(pipe.unet, user_dim=6)
    user = user_embedding_generate(pipe, "low", torch.randn(1, 2, 6), generator=gen(), **run)
    assert torch.isfinite(user.images).all()
    with pytest.raises(ValueError, match="user_embeds"):
        user_embedding_generate(pipe, "low", torch.randn(2, 6))
    apply_speedup(pipe.unet)
    scheduler = pipe.scheduler
    sun = speedup_generate(pipe, "low", "wider", generator=gen(), output_type="pt")
    assert torch.isfinite(sun.images).all()
    assert pipe.scheduler is scheduler  # the trailing-spacing scheduler was only for the call
    apply_gri(pipe.unet, window_size=4)
    gri = pipe("low", guidance_scale=0.0, generator=gen(), **run).images
    assert gri.shape == (1, 3, 64, 64) and torch.isfinite(gri).all()


# ----------------------------------------------------------------------------- errors
@torch.no_grad()
def test_bad_input_errors():
    unet = tiny_unet()
    attn = a_cross_layer(unet)
    tokens = torch.randn(2, 16, attn.to_q.in_features)
    pos = torch.randn(2, 7, CAD)
    nasa = NASAAttnProcessor(0.1)
    with pytest.raises(ValueError, match="feature size 5"):
        nasa(attn, tokens, pos, neg_encoder_hidden_states=torch.randn(2, 5, 5))
    with pytest.raises(ValueError, match="batch 3"):
        nasa(attn, tokens, pos, neg_encoder_hidden_states=torch.randn(3, 5, CAD))
    with pytest.raises(ValueError, match="one device.*meta"):
        nasa(
            attn,
            tokens,
            pos,
            neg_encoder_hidden_states=torch.randn(2, 5, CAD),
            neg_attention_mask=torch.ones(2, 5, dtype=torch.bool, device="meta"),
        )
    with pytest.raises(ValueError, match=r"mask must be.*\(2, 4\)"):
        nasa(
            attn,
            tokens,
            pos,
            neg_encoder_hidden_states=torch.randn(2, 5, CAD),
            neg_attention_mask=torch.ones(2, 4, dtype=torch.bool),
        )
    with pytest.raises(ValueError, match="family"):
        NASAAttnProcessor(family="flux")
    with pytest.raises(ValueError, match="norm"):
        SpeedUpAttnProcessor(8, CAD, norm="layer")
    user = UserEmbeddingAttnProcessor(attn.to_k.out_features, 6)
    with pytest.raises(ValueError, match="feature size 4"):
        user(attn, tokens, pos, user_embeds=torch.randn(2, 3, 4))
    gri = GRIAttnProcessor(window_size=2)
    self_attn = next(iter(attention_layers(unet, "self").values()))
    with pytest.raises(ValueError, match="grid of 15 tokens"):
        gri(self_attn, torch.randn(1, 15, self_attn.to_q.in_features))
    with pytest.raises(TypeError, match="diffusers UNet"):
        apply_nasa(torch.nn.Linear(2, 2))
