"""Model assembly on tiny SD1.5- and SDXL-shaped UNets: config, copied weights, mapping, errors."""

from __future__ import annotations

import pytest
import torch

from stablecore.testing import seed_all

diffusers = pytest.importorskip("diffusers")
from stablecore.integrations.diffusers.assembly import (  # noqa: E402
    assemble_unet,
    bk_sdm_removals,
)


def _sd15(**overrides):
    """SD1.5's block layout (3 cross-attention levels + 1 plain, 2 layers each), tiny widths."""
    seed_all(0)
    kw = dict(
        block_out_channels=(8, 16, 24, 24), layers_per_block=2, sample_size=8, in_channels=4,
        out_channels=4, cross_attention_dim=8, attention_head_dim=2, norm_num_groups=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )  # fmt: skip
    kw.update(overrides)
    return diffusers.UNet2DConditionModel(**kw).eval()


def _sdxl(**overrides):
    """SDXL's layout: plain level then 2 cross-attention levels with deeper transformers."""
    seed_all(0)
    kw = dict(
        block_out_channels=(8, 16, 24), layers_per_block=2, sample_size=8, in_channels=4,
        out_channels=4, cross_attention_dim=8, attention_head_dim=(2, 2, 4), norm_num_groups=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 3), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=8 + 6 * 4,
    )  # fmt: skip
    kw.update(overrides)
    return diffusers.UNet2DConditionModel(**kw).eval()


def _inputs(unet):
    gen = torch.Generator().manual_seed(3)
    x, ctx = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 5, 8, generator=gen)
    kw = {}
    if unet.config.addition_embed_type == "text_time":
        kw["added_cond_kwargs"] = {
            "text_embeds": torch.randn(2, 8, generator=gen),
            "time_ids": torch.rand(2, 6, generator=gen) * 512,
        }
    return (x, torch.tensor([700, 20])), {"encoder_hidden_states": ctx, **kw}


def _out(unet):
    args, kwargs = _inputs(unet)
    with torch.no_grad():
        return unet(*args, **kwargs).sample


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def teacher(request):
    return {"sd15": _sd15, "sdxl": _sdxl}[request.param]()


def test_removing_nothing_is_an_exact_copy(teacher):
    student, mapping = assemble_unet(teacher, remove=[])
    assert student is not teacher
    assert torch.equal(_out(student), _out(teacher))
    assert set(mapping.params) == set(teacher.state_dict())
    assert all(k == v for k, v in mapping.params.items())
    assert mapping.removed == () and mapping.uninitialized == ()


def test_bk_sdm_spec_gives_a_lighter_unet_with_the_kept_weights(teacher):
    spec = bk_sdm_removals(teacher)
    student, mapping = assemble_unet(teacher, remove=spec)
    assert student.config.layers_per_block == 1 and student.mid_block is None
    assert all(len(b.resnets) == 2 for b in student.up_blocks)
    n_t = sum(p.numel() for p in teacher.parameters())
    n_s = sum(p.numel() for p in student.parameters())
    assert n_s < 0.8 * n_t
    out = _out(student)
    assert out.shape == _out(teacher).shape and torch.isfinite(out).all()
    # every student tensor comes from the teacher, and the mapping names where from
    teacher_sd, student_sd = teacher.state_dict(), student.state_dict()
    assert set(mapping.params) == set(student_sd)
    for key, src in mapping.params.items():
        assert torch.equal(student_sd[key], teacher_sd[src]), key
    # down layer 1 of 2 is gone; its up partner is the middle layer 1 of 3 (first/last stay)
    assert mapping.layers["down_blocks.1.resnets.0"] == "down_blocks.1.resnets.0"
    assert mapping.layers["up_blocks.1.resnets.0"] == "up_blocks.1.resnets.0"
    assert mapping.layers["up_blocks.1.attentions.1"] == "up_blocks.1.attentions.2"
    assert "down_blocks.1.attentions.1" in mapping.removed and "mid_block" in mapping.removed
    assert "up_blocks.1.resnets.1" in mapping.removed
    assert mapping.blocks["up_blocks.0"] == "up_blocks.0" and "mid_block" not in mapping.blocks
    # teacher and student module outputs line up for feature distillation
    assert all(student.get_submodule(s) is not None for s in mapping.layers)
    assert all(teacher.get_submodule(t) is not None for t in mapping.layers.values())


def test_removing_only_the_mid_block_changes_only_the_mid_path():
    teacher = _sd15()
    student, mapping = assemble_unet(teacher, remove=["mid_block"])
    assert student.mid_block is None and student.config.layers_per_block == 2
    assert mapping.removed == ("mid_block",)
    # without the mid block the output differs but every other tensor is the teacher's
    assert not torch.allclose(_out(student), _out(teacher))
    assert len(mapping.params) == len([k for k in teacher.state_dict() if "mid_block" not in k])


def test_explicit_up_removal_and_per_block_layer_counts():
    teacher = _sd15()
    student, mapping = assemble_unet(
        teacher, remove=["down_blocks.1.attentions.1", "up_blocks.2.resnets.1"]
    )
    assert tuple(student.config.layers_per_block) == (2, 1, 2, 2)
    assert [len(b.resnets) for b in student.up_blocks] == [3, 3, 2, 3]
    assert mapping.layers["down_blocks.1.attentions.0"] == "down_blocks.1.attentions.0"
    assert mapping.layers["up_blocks.2.resnets.1"] == "up_blocks.2.resnets.2"
    assert _out(student).shape == (2, 4, 8, 8)
    # state_dict round-trips through a fresh model of the student's config
    clone = type(student).from_config(student.config)
    clone.load_state_dict(student.state_dict())
    assert torch.equal(_out(clone.eval()), _out(student))


def test_student_trains():
    student, _ = assemble_unet(_sdxl(), remove=bk_sdm_removals(_sdxl()))
    student.train()
    args, kwargs = _inputs(student)
    student(*args, **kwargs).sample.square().mean().backward()
    grads = [p.grad for p in student.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize(
    ("remove", "key"),
    [
        # up_blocks.2's last layer reads 8 skip channels where its others read 16
        (
            ["down_blocks.1.resnets.1", "up_blocks.2.resnets.2"],
            "up_blocks.2.resnets.1.conv1.weight",
        ),
        # down_blocks.1's first layer reads 8 channels (the level above), its second 16
        (["down_blocks.1.resnets.0"], "down_blocks.1.resnets.0.conv1.weight"),
    ],
)
def test_layers_whose_input_width_differs(remove, key):
    teacher = _sd15()
    with pytest.raises(ValueError, match=key):
        assemble_unet(teacher, remove=remove)
    student, mapping = assemble_unet(teacher, remove=remove, strict=False)
    assert key in mapping.uninitialized and key not in mapping.params
    assert _out(student).shape == (2, 4, 8, 8)
    # removing the first layer where the width does not change copies everything
    student, mapping = assemble_unet(teacher, remove=["down_blocks.3.resnets.0"])
    assert mapping.uninitialized == () and mapping.layers["up_blocks.0.resnets.1"].endswith(".2")


def test_nested_transformer_depths_lose_the_removed_layers():
    teacher = _sdxl(
        transformer_layers_per_block=(1, (1, 2), (3, 1)),
        reverse_transformer_layers_per_block=((1, 2, 1), (2, 1, 1), (1, 1, 1)),
    )
    student, mapping = assemble_unet(teacher, remove=["down_blocks.2.resnets.1"])
    assert tuple(student.config.transformer_layers_per_block[2]) == (3,)
    assert len(student.down_blocks[2].attentions[0].transformer_blocks) == 3
    assert len(student.up_blocks[0].attentions[1].transformer_blocks) == 1
    assert mapping.layers["up_blocks.0.attentions.0"] == "up_blocks.0.attentions.0"
    assert mapping.layers["up_blocks.0.attentions.1"] == "up_blocks.0.attentions.2"
    assert _out(student).shape == (2, 4, 8, 8)


@pytest.mark.parametrize(
    ("remove", "error", "match"),
    [
        (["mid_blocks"], ValueError, "cannot remove 'mid_blocks'"),
        (["down_blocks.9.resnets.0"], ValueError, "has 4 down blocks"),
        (["down_blocks.3.attentions.0"], ValueError, "has 0 attentions"),
        (["up_blocks.0.resnets.3"], ValueError, "has 3 resnets"),
        (["down_blocks.0.resnets.0", "down_blocks.0.resnets.1"], ValueError, "no layer"),
        (["down_blocks.0.resnets.0", "up_blocks.3.resnets.0", "up_blocks.3.resnets.1"],
         ValueError, "as many layers"),
        (["up_blocks.1.resnets.0"], ValueError, "as many layers"),
        ("mid_block", TypeError, "list of module names"),
        ([3], TypeError, "must be str"),
    ],
)  # fmt: skip
def test_bad_specs_raise(remove, error, match):
    with pytest.raises(error, match=match):
        assemble_unet(_SD15, remove=remove)


def test_not_a_unet_and_missing_mid_block():
    with pytest.raises(TypeError, match="UNet2DConditionModel"):
        assemble_unet(torch.nn.Linear(2, 2))
    student, _ = assemble_unet(_SD15, remove=["mid_block"])
    with pytest.raises(ValueError, match="no mid block"):
        assemble_unet(student, remove=["mid_block"])


_SD15 = _sd15()


def test_assembled_unet_serves_steps_through_unet_switch():
    # A-SDM multi-UNet switching with an assembled student as the cheap UNet.
    from stablecore.integrations.diffusers.feature_inheritance import UNetSwitch

    teacher = _sd15()
    student, _ = assemble_unet(teacher, remove=bk_sdm_removals(teacher))
    ref_teacher, ref_student = _out(teacher), _out(student)
    switch = UNetSwitch(teacher, student, cheap_steps=[1], num_steps=2)
    assert torch.equal(_out(teacher), ref_teacher)  # step 0: the teacher
    assert torch.equal(_out(teacher), ref_student)  # step 1: the student
    switch.remove()
