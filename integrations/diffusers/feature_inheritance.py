"""A-SDM feature inheritance for diffusers UNets: reuse deep outputs of an earlier step.

On a *full* step every hooked module runs and its output is stored; on an *inherit* step the
hooked modules return the stored output without computing (A-SDM: "skipping local computations
at the block, layer, or unit level", notes §1; DeepCache is the peer, §9). The hooks are
``diffusers.hooks.ModelHook``s (imported lazily, so ``import stablecore`` stays lean).

Which modules (``level``, for the ``depth`` deepest resolution levels of the UNet):

* ``"block"``: ``down_blocks[-depth:]``, ``mid_block``, ``up_blocks[:depth]`` (whole blocks);
* ``"layer"``: their ``resnets[j]`` and ``attentions[j]`` (up/down-samplers still run);
* ``"unit"``: ``attn1``/``attn2``/``ff`` of every transformer block inside them;
* or an explicit ``modules=[qualified names]``.

The schedule is a tuple of booleans (True = full step), one per UNet call of a sampling run,
from :func:`inheritance_schedule` (uniform interval, or DeepCache's quadratic non-uniform
``"quad"`` mode). The step is a Python counter advanced by a hook on the UNet itself, so there is
no ``timesteps.index(t.item())`` and no host sync; after ``len(schedule)`` calls the counter
wraps (a new sampling run). CFG halves batched in one call share the step (as in diffusers).
A-SDM's own sampling modes are UNVERIFIED (only the abstract is available).

The schedule counts UNet *calls*, so it must not be longer than a sampling run: a run that
stops early would leave the next run starting mid-schedule. Pass ``num_steps`` (the pipeline's
``num_inference_steps``) to have that checked, or call :meth:`FeatureInheritance.reset` between
runs of different lengths.

Example::

    from stablecore.integrations.diffusers import FeatureInheritance, inheritance_schedule
    fi = FeatureInheritance(unet, level="block", depth=1, schedule=inheritance_schedule(50, 3),
                            num_steps=50)
    images = pipe(prompt, num_inference_steps=50).images   # 1 full step in 3
    fi.disable(); fi.reset(); fi.remove()
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["FeatureInheritance", "UNetSwitch", "inheritance_schedule"]

_LEVELS = ("block", "layer", "unit")
_HOOK = "stablecore_feature_inheritance"


def inheritance_schedule(
    num_steps: int,
    interval: int = 1,
    mode: str = "uniform",
    center: float = 0.5,
    full_steps: Sequence[int] | None = None,
) -> tuple[bool, ...]:
    """Which of ``num_steps`` UNet calls are full (True) and which inherit (False).

    ``mode="uniform"``: every ``interval``-th step is full (``interval=1``: all full).
    ``mode="quad"``: about ``ceil(num_steps / interval)`` full steps placed densest around
    ``center`` (fraction of the run), DeepCache's ``sample_from_quad_center`` idea.
    ``full_steps``: explicit step indices (each ``< num_steps``). Step 0 is always full.
    """
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
    if not isinstance(interval, int) or interval < 1:
        raise ValueError(f"interval must be a positive int, got {interval!r}")
    if full_steps is not None:
        steps = sorted(set(full_steps))
        if len(full_steps) > num_steps or (steps and (steps[0] < 0 or steps[-1] >= num_steps)):
            raise ValueError(
                f"full_steps {list(full_steps)} does not fit a schedule of {num_steps} steps"
            )
        chosen = set(steps) | {0}
    elif mode == "uniform":
        chosen = set(range(0, num_steps, interval))
    elif mode == "quad":
        if not 0.0 <= center <= 1.0:
            raise ValueError(f"center must be in [0, 1], got {center}")
        n_full = -(-num_steps // interval)
        c = center * (num_steps - 1)
        # x in [-1, 1] mapped through sign(x) x^2: dense near the centre, sparse at the ends
        xs = torch.linspace(-1, 1, n_full, dtype=torch.float64)
        pos = c + torch.where(xs < 0, c, num_steps - 1 - c) * xs.abs().square() * xs.sign()
        chosen = {int(round(float(p))) for p in pos} | {0}
    else:
        raise ValueError(f"mode must be 'uniform' or 'quad', got {mode!r}")
    return tuple(i in chosen for i in range(num_steps))


def _get(root: nn.Module, name: str) -> nn.Module | None:
    try:
        return root.get_submodule(name)
    except AttributeError:  # e.g. mid_block=None
        return None


def _select(unet: nn.Module, level: str, depth: int) -> list[str]:
    if level not in _LEVELS:
        raise ValueError(f"level must be one of {_LEVELS}, got {level!r}")
    n = len(unet.down_blocks)
    if not isinstance(depth, int) or not 1 <= depth <= n:
        raise ValueError(f"depth must be an int in [1, {n}] for this UNet, got {depth!r}")
    blocks = [f"down_blocks.{i}" for i in range(n - depth, n)] + ["mid_block"]
    blocks += [f"up_blocks.{i}" for i in range(depth)]
    if level == "block":
        return [b for b in blocks if _get(unet, b) is not None]
    names = []
    for b in blocks:
        block = _get(unet, b)
        if block is None:
            continue
        for sub, _module in block.named_modules():
            parts = sub.split(".")
            if level == "layer" and len(parts) == 2 and parts[0] in ("resnets", "attentions"):
                names.append(f"{b}.{sub}")
            if level == "unit" and parts[-1] in ("attn1", "attn2", "ff") and len(parts) >= 2:
                if parts[-2].isdigit() and "transformer_blocks" in parts:
                    names.append(f"{b}.{sub}")
    return names


class FeatureInheritance:
    """Hook ``unet`` so that the chosen modules reuse their outputs on inherit steps.

    Args:
        unet: a diffusers ``UNet2DConditionModel`` (SD1.x/2.x/XL shapes) or any module with
            ``down_blocks``/``mid_block``/``up_blocks`` (only needed when ``modules`` is None).
        level, depth, modules: which modules inherit (see the module docstring).
        schedule: booleans, one per UNet call (True = full); default: all full.
        num_steps: UNet calls per sampling run, if known; a longer schedule is an error.
    """

    def __init__(
        self,
        unet: nn.Module,
        level: str = "block",
        schedule: Sequence[bool] | None = None,
        depth: int = 1,
        modules: Sequence[str] | None = None,
        num_steps: int | None = None,
    ) -> None:
        from diffusers.hooks import HookRegistry, ModelHook

        self.schedule = tuple(bool(s) for s in (schedule or (True,)))
        if not self.schedule[0]:
            raise ValueError("schedule[0] must be a full step (nothing to inherit yet)")
        if num_steps is not None:
            if not isinstance(num_steps, int) or num_steps < 1:
                raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
            if len(self.schedule) > num_steps:
                raise ValueError(
                    f"the schedule has {len(self.schedule)} steps but a run has {num_steps} "
                    f"UNet calls: build it with inheritance_schedule({num_steps}, ...)"
                )
        names = list(modules) if modules is not None else _select(unet, level, depth)
        if not names:
            raise ValueError(f"no modules selected for level={level!r}, depth={depth}")
        for name in names:
            if _get(unet, name) is None:
                raise ValueError(f"module {name!r} is not in this UNet")
        self.unet, self.names = unet, names
        self.enabled, self.step, self._full = True, 0, True
        self.cache: dict[str, object] = {}
        owner = self

        class _StepHook(ModelHook):
            def pre_forward(self, module, *args, **kwargs):
                owner._full = (not owner.enabled) or owner.schedule[owner.step]
                return args, kwargs

            def post_forward(self, module, output):
                owner.step = (owner.step + 1) % len(owner.schedule)
                return output

        class _ReuseHook(ModelHook):
            def __init__(self, name: str) -> None:
                super().__init__()
                self.name = name

            def new_forward(self, module, *args, **kwargs):
                if not owner._full and self.name in owner.cache:
                    return owner.cache[self.name]
                out = self.fn_ref.original_forward(*args, **kwargs)
                if owner.enabled:
                    owner.cache[self.name] = out
                return out

        self._registries = []
        for name in names:
            registry = HookRegistry.check_if_exists_or_initialize(unet.get_submodule(name))
            registry.register_hook(_ReuseHook(name), _HOOK)
            self._registries.append(registry)
        top = HookRegistry.check_if_exists_or_initialize(unet)
        top.register_hook(_StepHook(), _HOOK)
        self._registries.append(top)

    def enable(self) -> None:
        self.enabled = True

    def disable(self) -> None:
        """Every call computes everything (the cache is dropped)."""
        self.enabled = False
        self.reset()

    def reset(self) -> None:
        """Forget cached features and restart the schedule at step 0."""
        self.cache.clear()
        self.step, self._full = 0, True

    def remove(self) -> None:
        """Take the hooks off the UNet."""
        for registry in self._registries:
            registry.remove_hook(_HOOK, recurse=False)
        self._registries = []
        self.reset()

    def full_steps(self) -> int:
        """How many of the schedule's steps compute everything."""
        return sum(self.schedule)


class UNetSwitch:
    """Multi-UNet switching (A-SDM): a cheaper UNet serves the chosen steps of each run.

    ``UNetSwitch(unet, cheap_unet, cheap_steps=range(30, 50), num_steps=50)`` hooks ``unet``
    (the one the pipeline holds) so that its calls number ``cheap_steps`` (counted per call,
    wrapping every ``num_steps`` calls, no host sync) run ``cheap_unet`` with the same
    arguments instead. ``cheap_unet`` must accept ``unet``'s inputs and give the same output
    type (e.g. an assembled, distilled UNet of the same config family). :meth:`remove` undoes it.
    """

    def __init__(
        self, unet: nn.Module, cheap_unet: nn.Module, cheap_steps: Sequence[int], num_steps: int
    ) -> None:
        from diffusers.hooks import HookRegistry, ModelHook

        steps = set(cheap_steps)
        if not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
        if len(steps) > num_steps or any(not 0 <= i < num_steps for i in steps):
            raise ValueError(f"cheap_steps {sorted(steps)} does not fit {num_steps} steps")
        self.step, self.num_steps, self.cheap_steps = 0, num_steps, frozenset(steps)
        owner = self

        class _SwitchHook(ModelHook):
            def new_forward(self, module, *args, **kwargs):
                step = owner.step
                owner.step = (step + 1) % owner.num_steps
                if step in owner.cheap_steps:
                    return cheap_unet(*args, **kwargs)
                return self.fn_ref.original_forward(*args, **kwargs)

        self._registry = HookRegistry.check_if_exists_or_initialize(unet)
        self._registry.register_hook(_SwitchHook(), _HOOK + "_switch")

    def reset(self) -> None:
        self.step = 0

    def remove(self) -> None:
        self._registry.remove_hook(_HOOK + "_switch", recurse=False)
        self.reset()
