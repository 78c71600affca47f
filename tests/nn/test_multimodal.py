"""3MAT CascadedModalityTransformer: missing modalities (no NaN, skip == absent), dropout, errors."""

from __future__ import annotations

import itertools

import pytest
import torch

from stablecore.nn.multimodal import (
    CascadedModalityTransformer,
    ImageEncoder,
    TabularEncoder,
    drop_modalities,
)
from stablecore.testing import assert_close, poison_, seed_all

D = 16


def _net(seed: int = 0, modality_dropout: float = 0.25) -> CascadedModalityTransformer:
    seed_all(seed)
    enc = {
        "tab": TabularEncoder(5, D),
        "img": ImageEncoder(2, D, hidden=4),
        "lab": TabularEncoder(3, D),
    }
    return CascadedModalityTransformer(
        enc, D, 3, n_heads=2, n_queries=2, modality_dropout=modality_dropout
    )


def _inputs(n: int, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "tab": torch.randn(n, 5, generator=g),
        "img": torch.randn(n, 2, 8, 8, generator=g),
        "lab": torch.randn(n, 3, generator=g),
    }


def _all_patterns() -> torch.Tensor:
    """All 8 availability patterns of 3 modalities (one sample each, the empty one included)."""
    return torch.tensor(list(itertools.product([True, False], repeat=3)))


def _present(mask: torch.Tensor) -> dict[str, torch.Tensor]:
    return {name: mask[:, j] for j, name in enumerate(("tab", "img", "lab"))}


@pytest.mark.parametrize("train", [False, True])
def test_missing_modalities_never_give_nan_values_or_gradients(train):
    net = _net().train(train)
    mask = _all_patterns()
    x = _inputs(8)
    for j, v in enumerate(x.values()):  # absent rows hold NaN: they must never be read
        v[~mask[:, j]] = poison_(v[~mask[:, j]])  # boolean indexing copies: write back
    assert all(bool(v.isnan().any()) for v in x.values())
    for v in x.values():
        v.requires_grad_(True)
    out = net(x, _present(mask), generator=torch.Generator().manual_seed(0))
    loss = net.loss(out, torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]))
    assert bool(torch.isfinite(out.logits).all()) and bool(torch.isfinite(out.aux_logits).all())
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in net.named_parameters():
        assert p.grad is None or bool(torch.isfinite(p.grad).all()), name
    for j, v in enumerate(x.values()):
        assert bool(torch.isfinite(v.grad).all())
        assert bool((v.grad[~mask[:, j]] == 0).all())  # absent rows get no gradient
    assert bool((out.present <= mask).all())  # dropout only removes modalities


def test_whole_modality_absent_and_no_modality_at_all():
    net = _net().eval()
    x = _inputs(4)
    out = net({"tab": x["tab"], "img": None})
    assert out.present[:, 1:].any().item() is False
    # A batch where nobody has anything still gives finite (query-only) logits.
    none = net({"tab": x["tab"]}, {"tab": torch.zeros(4, dtype=torch.bool)})
    assert bool(torch.isfinite(none.logits).all())
    assert_close(none.logits, none.logits[:1].expand(4, -1))
    loss = net.loss(none, torch.tensor([0, 1, 2, 0]))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in net.parameters())


def test_absent_equals_skipped_stage_and_batch_independence():
    """A sample's output depends only on its own available modalities, not on the batch."""
    net = _net().eval()
    mask = _all_patterns()
    x = _inputs(8)
    batched = net(x, _present(mask)).logits
    for i in range(8):
        xi = {k: (v[i : i + 1] if mask[i, j] else None) for j, (k, v) in enumerate(x.items())}
        if not mask[i].any():
            xi["tab"] = torch.full((1, 5), float("nan"))
            single = net(xi, {"tab": torch.tensor([False])}).logits
        else:
            single = net(xi).logits
        assert_close(batched[i : i + 1], single, msg=f"pattern {mask[i].tolist()}")
    # Skipping = passing h through: a stage whose input changes does not matter when absent.
    x2 = {k: v.clone() for k, v in x.items()}
    x2["img"][~mask[:, 1]] += 5.0
    assert_close(net(x2, _present(mask)).logits, batched)
    x2["img"][mask[:, 1]] += 5.0
    changed = (net(x2, _present(mask)).logits - batched).abs().amax(1) > 1e-4
    assert torch.equal(changed, mask[:, 1])


def test_modality_dropout_only_in_training():
    net = _net(modality_dropout=0.9)
    x = _inputs(64)
    net.eval()
    a, b = net(x).logits, net(x).logits
    assert torch.equal(a, b)
    net.train()
    out = net(x, generator=torch.Generator().manual_seed(0))
    assert not bool(out.present.all())
    assert bool(out.present.any(1).all())  # never all of a sample's modalities


def test_drop_modalities_statistics():
    g = torch.Generator().manual_seed(0)
    present = torch.rand(20000, 3, generator=g) < 0.7
    kept = drop_modalities(present, 0.3, g)
    assert bool((kept <= present).all())
    assert torch.equal(kept.any(1), present.any(1))
    single = present.sum(1) == 1  # a lone modality is always rescued
    assert torch.equal(kept[single], present[single])
    multi = present.sum(1) == 3
    rate = 1 - kept[multi].float().mean().item()
    # Expected: 0.3 drop, minus the rescue when all three drop (0.3^3 of rows, 1 of 3 back).
    assert abs(rate - (0.3 - 0.3**3 / 3)) < 0.02
    assert torch.equal(drop_modalities(present, 0.0), present)


def test_state_dict_round_trip():
    net = _net(seed=0).eval()
    other = _net(seed=5).eval()
    x = _inputs(6)
    mask = _all_patterns()[:6]
    assert not torch.equal(net(x, _present(mask)).logits, other(x, _present(mask)).logits)
    other.load_state_dict(net.state_dict())
    assert torch.equal(net(x, _present(mask)).logits, other(x, _present(mask)).logits)


def test_learns_a_simple_multimodal_task():
    seed_all(0)
    n = 96
    y = torch.randint(0, 3, (n,))
    x = {
        "tab": torch.randn(n, 5) + torch.nn.functional.one_hot(y, 5) * 2.0,
        "img": torch.randn(n, 2, 8, 8) + y.view(-1, 1, 1, 1).float(),
        "lab": torch.randn(n, 3),
    }
    net = _net()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(40):
        loss = net.loss(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    acc = (net(x).logits.argmax(1) == y).float().mean().item()
    acc_img = net(x, {"tab": torch.zeros(n, dtype=torch.bool)}).logits.argmax(1) == y
    assert acc > 0.9 and acc_img.float().mean().item() > 0.6


def test_custom_encoder_with_single_token():
    seed_all(0)
    net = CascadedModalityTransformer({"v": torch.nn.Linear(7, D)}, D, 2, n_heads=2).eval()
    assert net({"v": torch.randn(3, 7)}).logits.shape == (3, 2)


# ----------------------------------------------------------------------------- bad input


def test_wrong_feature_size_and_shapes_raise():
    net = _net().eval()
    x = _inputs(4)
    with pytest.raises(ValueError, match=r"'tab'.*\[n, 5\]"):
        net({**x, "tab": torch.randn(4, 6)})
    with pytest.raises(ValueError, match=r"'tab'.*\[n, 5\]"):  # even if no row has it
        net({**x, "tab": torch.randn(4, 6)}, {"tab": torch.zeros(4, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"'img'.*\[n, 2, H>=4"):
        net({**x, "img": torch.randn(4, 3, 8, 8)})
    with pytest.raises(ValueError, match="batch sizes disagree"):
        net({**x, "lab": torch.randn(5, 3)})
    with pytest.raises(ValueError, match="unknown modality"):
        net({**x, "audio": torch.randn(4, 3)})
    with pytest.raises(TypeError, match="bool"):
        net(x, {"tab": torch.ones(4)})
    with pytest.raises(ValueError, match="batch sizes disagree"):
        net(x, {"tab": torch.ones(3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="is missing"):
        net({"tab": x["tab"]}, {"img": torch.ones(4, dtype=torch.bool)})
    with pytest.raises(ValueError, match="batch size unknown"):
        net({})
    with pytest.raises(TypeError, match="mapping"):
        net(x["tab"])
    with pytest.raises(ValueError, match="target"):
        net.loss(net(x), torch.zeros(3, dtype=torch.long))
    bad = CascadedModalityTransformer({"v": torch.nn.Linear(7, D + 1)}, D, 2, n_heads=2)
    with pytest.raises(ValueError, match=r"\[n, T, 16\]"):
        bad({"v": torch.randn(2, 7)})


def test_bad_constructor_arguments():
    with pytest.raises(TypeError, match="non-empty mapping"):
        CascadedModalityTransformer({}, D, 2)
    with pytest.raises(TypeError, match="nn.Module"):
        CascadedModalityTransformer({"a": lambda x: x}, D, 2)
    with pytest.raises(ValueError, match="divisible"):
        CascadedModalityTransformer({"a": TabularEncoder(2, D)}, D, 2, n_heads=3)
    with pytest.raises(ValueError, match="modality_dropout"):
        CascadedModalityTransformer({"a": TabularEncoder(2, D)}, D, 2, modality_dropout=1.5)
