"""Feature inheritance on a tiny diffusers UNet: interval 1 is exact, inherit steps skip work."""

from __future__ import annotations

import pytest
import torch

from stablecore.testing import assert_close, seed_all

diffusers = pytest.importorskip("diffusers")
from stablecore.integrations.diffusers.feature_inheritance import (  # noqa: E402
    FeatureInheritance,
    UNetSwitch,
    inheritance_schedule,
)


@pytest.fixture(scope="module")
def unet_and_ref():
    """One tiny UNet for the module (every test removes its hooks) and its plain outputs."""
    unet = _build_unet()
    return unet, _run(unet)


def _build_unet():
    seed_all(0)
    return diffusers.UNet2DConditionModel(
        block_out_channels=(4, 8), layers_per_block=1, sample_size=16, in_channels=4,
        out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=8,
        norm_num_groups=2,
    ).eval()  # fmt: skip


def _run(unet, steps=4):
    """A bare sampling loop: the latent changes each step, as in a pipeline."""
    gen = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(2, 4, 16, 16, generator=gen), torch.randn(2, 3, 8, generator=gen)
    outs = []
    with torch.no_grad():
        for i in range(steps):
            eps = unet(x, torch.tensor(900 - 200 * i), encoder_hidden_states=ctx).sample
            outs.append(eps)
            x = x - 0.1 * eps
    return outs


@pytest.mark.parametrize("level", ["block", "layer", "unit"])
def test_interval_one_reproduces_full_computation_exactly(level, unet_and_ref):
    unet, ref = unet_and_ref
    fi = FeatureInheritance(unet, level=level, schedule=inheritance_schedule(4, 1))
    for a, b in zip(_run(unet), ref):
        assert torch.equal(a, b)
    fi.remove()


def test_inherit_steps_skip_the_hooked_modules_and_full_steps_match(unet_and_ref):
    unet, ref = unet_and_ref
    calls = []
    # a child of the hooked block runs only when the block computes (a hook on the block itself
    # would fire on inherit steps too: nn.Module.__call__ wraps the replaced forward)
    handle = unet.mid_block.resnets[0].register_forward_hook(lambda *a: calls.append(1))
    fi = FeatureInheritance(unet, level="block", schedule=inheritance_schedule(4, 2))
    outs = _run(unet)
    assert len(calls) == 2  # steps 0 and 2 only
    assert torch.equal(outs[0], ref[0])
    assert not torch.allclose(outs[1], ref[1])  # reused features: an approximation
    rel = (outs[1] - ref[1]).norm() / ref[1].norm()
    assert rel < 1.0
    fi.disable()
    for a, b in zip(_run(unet), ref):
        assert torch.equal(a, b)
    fi.enable()
    fi.reset()
    assert_close(_run(unet)[1], outs[1])
    fi.remove()
    handle.remove()
    for a, b in zip(_run(unet), ref):
        assert torch.equal(a, b)


def test_schedules_and_errors(unet_and_ref):
    unet = unet_and_ref[0]
    assert inheritance_schedule(7, 3) == (True, False, False, True, False, False, True)
    quad = inheritance_schedule(20, 4, mode="quad", center=0.5)
    assert quad[0] and 3 <= sum(quad) <= 5
    assert inheritance_schedule(4, full_steps=[2]) == (True, False, True, False)
    with pytest.raises(ValueError, match="does not fit a schedule of 3 steps"):
        inheritance_schedule(3, full_steps=[0, 1, 2, 3])
    with pytest.raises(ValueError, match="does not fit"):
        inheritance_schedule(3, full_steps=[5])
    with pytest.raises(ValueError, match="level"):
        FeatureInheritance(unet, level="tile")
    with pytest.raises(ValueError, match="depth"):
        FeatureInheritance(unet, depth=5)
    with pytest.raises(ValueError, match="schedule"):
        FeatureInheritance(unet, schedule=(False, True))
    with pytest.raises(ValueError, match="schedule has 5 steps but a run has 4"):
        FeatureInheritance(unet, schedule=inheritance_schedule(5, 2), num_steps=4)
    with pytest.raises(ValueError, match="num_steps"):
        FeatureInheritance(unet, num_steps=0)
    with pytest.raises(ValueError, match="not in this UNet"):
        FeatureInheritance(unet, modules=["down_blocks.7"])
    hooks = getattr(getattr(unet, "_diffusers_hook", None), "hooks", {})
    assert not hooks  # a failed constructor leaves no hook behind


def test_unet_switch_serves_chosen_steps_with_the_cheap_unet(unet_and_ref):
    unet, ref = unet_and_ref
    cheap = _build_unet()
    with torch.no_grad():
        for p in cheap.parameters():
            p.mul_(0.5)
    cheap_ref = _run(cheap)
    switch = UNetSwitch(unet, cheap, cheap_steps=[0], num_steps=4)
    outs = _run(unet)
    assert torch.equal(outs[0], cheap_ref[0]) and not torch.equal(outs[0], ref[0])
    assert not torch.equal(outs[1], ref[1])  # the latent moved differently after step 0
    switch.remove()
    assert torch.equal(_run(unet)[0], ref[0])
    with pytest.raises(ValueError, match="does not fit 4 steps"):
        UNetSwitch(unet, cheap, cheap_steps=[4], num_steps=4)


def _sdxl_unet():
    seed_all(0)
    return diffusers.UNet2DConditionModel(
        block_out_channels=(4, 8, 8), layers_per_block=1, sample_size=8, in_channels=4,
        out_channels=4, down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 2,
        up_block_types=("CrossAttnUpBlock2D",) * 2 + ("UpBlock2D",), cross_attention_dim=8,
        norm_num_groups=2, transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 2, 4),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=8 + 6 * 4,
    ).eval()  # fmt: skip


def _run_sdxl(unet, steps=3):
    gen = torch.Generator().manual_seed(2)
    x, ctx = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 3, 8, generator=gen)
    added = {
        "text_embeds": torch.randn(2, 8, generator=gen),
        "time_ids": torch.rand(2, 6, generator=gen) * 64,
    }
    outs = []
    with torch.no_grad():
        for i in range(steps):
            eps = unet(
                x, torch.tensor(800 - 300 * i), encoder_hidden_states=ctx, added_cond_kwargs=added
            ).sample
            outs.append(eps)
            x = x - 0.1 * eps
    return outs


@pytest.mark.parametrize("level", ["block", "unit"])
def test_sdxl_shaped_unet(level):
    unet = _sdxl_unet()
    ref = _run_sdxl(unet)
    fi = FeatureInheritance(unet, level=level, depth=2, schedule=inheritance_schedule(3, 1))
    assert all(torch.equal(a, b) for a, b in zip(_run_sdxl(unet), ref))
    fi.remove()
    fi = FeatureInheritance(unet, level=level, depth=2, schedule=inheritance_schedule(3, 3))
    outs = _run_sdxl(unet)
    assert torch.equal(outs[0], ref[0]) and not torch.equal(outs[1], ref[1])
    fi.remove()
    assert all(torch.equal(a, b) for a, b in zip(_run_sdxl(unet), ref))


def test_old_import_path_still_works():
    from stablecore.methods import feature_inheritance as old

    assert old.FeatureInheritance is FeatureInheritance
    assert old.inheritance_schedule is inheritance_schedule
    with pytest.raises(AttributeError, match="nope"):
        old.nope  # noqa: B018
