"""A-SDM / BK-SDM model assembly: a lighter ``UNet2DConditionModel`` built by removing layers.

:func:`assemble_unet` removes chosen resnet+attention *layers* inside the down/up blocks and/or
the whole mid block, writes the matching config (per-block ``layers_per_block``, supported by
diffusers >= 0.2x as a tuple, and per-layer ``transformer_layers_per_block`` when the teacher
uses the nested form), builds the student from it, copies every kept weight by a name mapping
and returns that mapping for the distillation trainers (which teacher block/layer feeds which
student block/layer, e.g. BK-SDM's block-output feature KD).

Removal names (teacher module names):

* ``"mid_block"``: the whole mid block (config ``mid_block_type=None``; BK-SDM-Base/Small);
* ``"down_blocks.i.resnets.j"`` or ``"down_blocks.i.attentions.j"``: layer ``j`` of down block
  ``i`` (a resnet and, in cross-attention blocks, the attention after it: they go together);
* ``"up_blocks.i.resnets.j"`` / ``"up_blocks.i.attentions.j"``: the same in up block ``i``.

Why removals come in pairs: up block ``i`` reads one skip connection per layer from down block
``n-1-i`` plus one from the shallower level, so diffusers ties its depth to
``layers_per_block + 1``. Removing ``k`` layers from a down block therefore removes ``k`` layers
from its up block. When a level lists only down removals, the up layer that consumed the
removed layer's skip output is dropped with it (teacher up layer ``L-1-j`` for down layer ``j``
of ``L``), but never the first or last up layer: the first takes the deeper block's output and
the last the shallower level's skip, so only the middle layers are interchangeable in shape
(BK-SDM likewise drops the middle pair of each up stage). List up removals yourself to choose
others; a resulting shape mismatch is reported, or left freshly initialised with
``strict=False``.

Example (BK-SDM-Base-like: one layer less per down block, no mid block)::

    >>> student, mapping = assemble_unet(unet, remove=bk_sdm_removals(unet))
    >>> mapping.layers["up_blocks.1.resnets.1"]     # student layer <- teacher layer
    'up_blocks.1.resnets.2'
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

from torch import nn

__all__ = ["AssemblyMap", "AssembledUNet", "assemble_unet", "bk_sdm_removals"]

_LAYER = re.compile(r"^(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)$")
_PARAM = re.compile(r"^(down|up)_blocks\.(\d+)\.(?:(resnets|attentions)\.(\d+)(\..*)?|(.*))$")


@dataclass
class AssemblyMap:
    """How the student relates to the teacher (names are module/parameter qualified names).

    Attributes:
        layers: student layer -> teacher layer, e.g. ``"down_blocks.1.attentions.0"`` ->
            ``"down_blocks.1.attentions.0"``; every resnet/attention of the down/up blocks.
        blocks: student block -> teacher block (``down_blocks.i``, ``mid_block``, ``up_blocks.i``)
            for block-output feature distillation (BK-SDM's feature KD).
        params: student state-dict key -> teacher key it was copied from.
        removed: teacher layers/blocks with no student counterpart.
        uninitialized: student keys left freshly initialised (only with ``strict=False``).
    """

    layers: dict[str, str] = field(default_factory=dict)
    blocks: dict[str, str] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    removed: tuple[str, ...] = ()
    uninitialized: tuple[str, ...] = ()


class AssembledUNet(NamedTuple):
    unet: nn.Module
    mapping: AssemblyMap


def _as_list(value, n: int) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


def _parse(unet: nn.Module, remove: Iterable[str]) -> tuple[bool, dict, dict]:
    """(remove mid block, {down block: set of layers}, {up block: set of layers})."""
    if isinstance(remove, str):
        raise TypeError(f"remove must be a list of module names, got the string {remove!r}")
    drop_mid, down, up = False, {}, {}
    for name in remove:
        if not isinstance(name, str):
            raise TypeError(f"remove entries must be str, got {type(name).__name__}: {name!r}")
        if name == "mid_block":
            if unet.mid_block is None:
                raise ValueError("remove lists 'mid_block' but this UNet has no mid block")
            drop_mid = True
            continue
        m = _LAYER.match(name)
        if m is None:
            raise ValueError(
                f"cannot remove {name!r}: expected 'mid_block', 'down_blocks.i.resnets.j', "
                f"'down_blocks.i.attentions.j' or the same under 'up_blocks'"
            )
        side, i, kind, j = m.group(1), int(m.group(2)), m.group(3), int(m.group(4))
        blocks = unet.down_blocks if side == "down" else unet.up_blocks
        if i >= len(blocks):
            raise ValueError(f"cannot remove {name!r}: the UNet has {len(blocks)} {side} blocks")
        layers = getattr(blocks[i], kind, None)
        if layers is None or j >= len(layers):
            count = 0 if layers is None else len(layers)
            raise ValueError(f"cannot remove {name!r}: {side}_blocks.{i} has {count} {kind}")
        (down if side == "down" else up).setdefault(i, set()).add(j)
    return drop_mid, down, up


def _paired_up_removals(gone: set[int], depth: int) -> set[int]:
    """Up layers to drop with down layers ``gone`` of a level with ``depth`` down layers.

    Up layer ``j < depth`` read the skip output of down layer ``depth - 1 - j``; that one goes,
    except that the first and last up layers never go by default: they take the deeper block's
    output and the shallower level's skip, so only the middle ones share a weight shape.
    """
    middle = range(1, depth)
    chosen = {depth - 1 - j for j in gone} & set(middle)
    for j in middle:
        if len(chosen) == len(gone):
            break
        chosen.add(j)
    return chosen


def _plan(unet: nn.Module, down: dict, up: dict) -> tuple[list[list[int]], list[list[int]]]:
    """Kept teacher layer indices per down block and per up block (paired as explained above)."""
    n = len(unet.down_blocks)
    kept_down, kept_up = [], [None] * n
    for i, block in enumerate(unet.down_blocks):
        depth = len(block.resnets)
        gone = down.get(i, set())
        if len(gone) >= depth:
            raise ValueError(
                f"removing {sorted(gone)} would leave down_blocks.{i} with no layer "
                f"(it has {depth}); keep at least one"
            )
        kept_down.append([j for j in range(depth) if j not in gone])
        u = n - 1 - i  # the up block reading this level's skip connections
        up_depth = len(unet.up_blocks[u].resnets)
        up_gone = up.get(u)
        if up_gone is None:
            up_gone = _paired_up_removals(gone, depth)
        if len(up_gone) != len(gone):
            raise ValueError(
                f"up_blocks.{u} must lose as many layers as down_blocks.{i} (diffusers gives an "
                f"up block layers_per_block + 1 layers): got {len(up_gone)} up removals "
                f"{sorted(up_gone)} for {len(gone)} down removals {sorted(gone)}"
            )
        kept_up[u] = [j for j in range(up_depth) if j not in up_gone]
    return kept_down, kept_up


def _student_config(unet: nn.Module, drop_mid: bool, kept_down, kept_up) -> dict:
    config = {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}
    n = len(kept_down)
    lpb = [len(k) for k in kept_down]
    config["layers_per_block"] = lpb[0] if len(set(lpb)) == 1 else tuple(lpb)
    # Nested (per-layer) transformer depths must lose the removed layers' entries too.
    tlpb = config.get("transformer_layers_per_block", 1)
    if isinstance(tlpb, (list, tuple)) and any(isinstance(t, (list, tuple)) for t in tlpb):
        config["transformer_layers_per_block"] = tuple(
            tuple(t[j] for j in kept) if isinstance(t, (list, tuple)) else t
            for t, kept in zip(tlpb, kept_down)
        )
    rev = config.get("reverse_transformer_layers_per_block")
    if rev is not None:
        config["reverse_transformer_layers_per_block"] = tuple(
            tuple(t[j] for j in kept) if isinstance(t, (list, tuple)) else t
            for t, kept in zip(_as_list(rev, n), kept_up)
        )
    if drop_mid:
        config["mid_block_type"] = None
    return config


def _param_source(name: str, kept_down, kept_up) -> str:
    """The teacher key a student state-dict key copies from."""
    m = _PARAM.match(name)
    if m is None:
        return name  # conv_in, time embedding, mid block, conv_out...: same name
    side, i, kind, j, rest, other = m.groups()
    if kind is None:
        return name  # down/upsamplers: blocks keep their index
    kept = (kept_down if side == "down" else kept_up)[int(i)]
    return f"{side}_blocks.{i}.{kind}.{kept[int(j)]}{rest or ''}"


def assemble_unet(
    unet: nn.Module, remove: Iterable[str] = (), *, strict: bool = True
) -> AssembledUNet:
    """Build a lighter copy of ``unet`` without the layers/blocks named in ``remove``.

    Args:
        unet: a diffusers ``UNet2DConditionModel`` (SD1.x/2.x/XL shapes; any subclass built by
            ``from_config``); left unchanged.
        remove: teacher module names (see the module docstring); empty = an exact copy.
        strict: raise ``ValueError`` when a kept weight's shape differs between teacher and
            student (removing the first layer of a down block or the first/last layer of an up
            block where the level changes width); with
            ``False`` such weights stay freshly initialised and are listed in
            ``mapping.uninitialized``.

    Returns:
        ``(student, mapping)``: the student on the teacher's device/dtype, in the teacher's
        train/eval mode, with default attention processors; :class:`AssemblyMap` as described.

    Raises:
        TypeError: ``unet`` has no diffusers UNet config, or ``remove`` is not a list of str.
        ValueError: an unknown name, an index out of range, a down block left without layers,
            up/down removal counts that differ per level, or (strict) a weight shape mismatch.
    """
    config = getattr(unet, "config", None)
    if config is None or "down_block_types" not in config or not hasattr(type(unet), "from_config"):
        raise TypeError(f"expected a diffusers UNet2DConditionModel, got {type(unet).__name__}")
    drop_mid, down, up = _parse(unet, remove)
    kept_down, kept_up = _plan(unet, down, up)
    student = type(unet).from_config(_student_config(unet, drop_mid, kept_down, kept_up))
    ref = next(unet.parameters())
    student = student.to(device=ref.device, dtype=ref.dtype).train(unet.training)

    teacher_sd, student_sd = unet.state_dict(), student.state_dict()
    params, mismatched, new_sd = {}, [], {}
    for key, value in student_sd.items():
        src = _param_source(key, kept_down, kept_up)
        t = teacher_sd.get(src)
        if t is None or t.shape != value.shape:
            got = "missing" if t is None else f"shape {tuple(t.shape)}"
            mismatched.append(f"{key} {tuple(value.shape)} <- {src} ({got})")
            continue
        params[key] = src
        new_sd[key] = t
    if mismatched and strict:
        raise ValueError(
            "the assembled UNet cannot take these teacher weights (a down block's first layer, an "
            "up block's first and last layers take other input channels than the middle ones; "
            "strict=False leaves them initialised): "
            + "; ".join(mismatched[:6])
            + (f" (+{len(mismatched) - 6} more)" if len(mismatched) > 6 else "")
        )
    student.load_state_dict(new_sd, strict=False)

    mapping = AssemblyMap(params=params, uninitialized=tuple(m.split(" ")[0] for m in mismatched))
    removed = ["mid_block"] if drop_mid else []
    for side, kept_all, blocks in (
        ("down", kept_down, unet.down_blocks),
        ("up", kept_up, unet.up_blocks),
    ):
        for i, kept in enumerate(kept_all):
            mapping.blocks[f"{side}_blocks.{i}"] = f"{side}_blocks.{i}"
            kinds = [k for k in ("resnets", "attentions") if getattr(blocks[i], k, None)]
            for j_student, j in enumerate(kept):
                for kind in kinds:
                    mapping.layers[f"{side}_blocks.{i}.{kind}.{j_student}"] = (
                        f"{side}_blocks.{i}.{kind}.{j}"
                    )
            for j in range(len(blocks[i].resnets)):
                if j not in kept:
                    removed += [f"{side}_blocks.{i}.{kind}.{j}" for kind in kinds]
    if student.mid_block is not None:
        mapping.blocks["mid_block"] = "mid_block"
    mapping.removed = tuple(removed)
    return AssembledUNet(student, mapping)


def bk_sdm_removals(unet: nn.Module, remove_mid: bool = True) -> list[str]:
    """BK-SDM-Base-style spec: the last layer of every down block that has more than one
    (its up-block partner goes with it) and, by default, the mid block (arXiv 2305.15798)."""
    names = [
        f"down_blocks.{i}.resnets.{len(b.resnets) - 1}"
        for i, b in enumerate(unet.down_blocks)
        if len(b.resnets) > 1
    ]
    if remove_mid and unet.mid_block is not None:
        names.append("mid_block")
    return names
