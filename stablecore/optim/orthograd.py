"""⊥Grad (OrthoGrad): project out the naive-loss-minimisation direction before any optimizer step.

Prieto et al., "Grokking at the Edge of Numerical Stability" (ICLR 2025). After a network fits
its training set, the gradient aligns with the weights themselves: scaling the weights up
scales the logits and lowers the loss without changing a prediction ("naive loss minimisation",
NLM), until float32 softmax collapses. ⊥Grad removes, per tensor, the gradient component along
the weights, so the base optimizer only ever sees the orthogonal part.

* :class:`OrthoGrad` wraps any ``torch.optim.Optimizer`` (class or instance; stablecore's
  ``StableSPAM`` included). Every base hyperparameter is passed through (the authors' script
  rebuilt AdamW from ``lr``/``weight_decay`` only and silently lost betas and eps: their issue #11).
* :func:`orthogonalize_` is the functional form; :func:`nlm_alignment` measures cos(-g, w).

Both call the fused op :func:`stablecore.ops.orthogonalize.orthogonalize_` once per step (all
tensors of a dtype pair in one Triton launch per pass on CUDA) and never sync the host.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from stablecore.ops import orthogonalize as _ops
from stablecore.optim import _distributed

__all__ = ["NLMAlignment", "OrthoGrad", "nlm_alignment", "orthogonalize_"]


def _with_grads(params: Iterable[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    ws, gs = [], []
    for p in params:
        if not isinstance(p, Tensor):
            raise TypeError(f"expected tensors (parameters), got {type(p).__name__}")
        if p.grad is not None:
            ws.append(p.detach())
            gs.append(p.grad)
    return ws, gs


@torch.no_grad()
def orthogonalize_(params: Iterable[Tensor], renorm: bool = True) -> None:
    """Replace each ``p.grad`` by its component orthogonal to ``p`` (per tensor, in place).

    Args:
        params: parameters (tensors with ``.grad``; those whose grad is None are skipped).
        renorm: rescale each projected gradient to the original gradient norm.

    Example::

        >>> loss.backward(); orthogonalize_(model.parameters()); opt.step()
    """
    params = list(params)
    if any(_distributed.is_dtensor(p) for p in params):  # FSDP2: whole-tensor statistics
        _distributed.orthogonalize_dtensor_(params, renorm=renorm)
        return
    ws, gs = _with_grads(params)
    _ops.orthogonalize_(ws, gs, renorm=renorm)


class NLMAlignment(NamedTuple):
    """cos(-grad, weights): ``per_tensor [T]`` float64 (0 where a norm is 0) and ``total`` (0-d,
    over all tensors as one vector). Near +1 after overfitting means the step mostly scales the
    weights up (NLM); ⊥Grad drives it to 0."""

    per_tensor: Tensor
    total: Tensor


@torch.no_grad()
def nlm_alignment(params: Iterable[Tensor]) -> NLMAlignment:
    """Alignment of ``-grad`` with the weights, per tensor and global (device tensors, no sync).

    Example::

        >>> a = nlm_alignment(model.parameters()); float(a.total)  # in [-1, 1]
    """
    ws, gs = _with_grads(params)
    stats = _ops.orthogonalize_stats(ws, gs)
    dot, ww, gg = stats.unbind(1)

    def cos(d: Tensor, a: Tensor, b: Tensor) -> Tensor:
        den = (a * b).sqrt()
        return torch.where(den > 0, -d / torch.where(den > 0, den, 1), 0)

    return NLMAlignment(cos(dot, ww, gg), cos(dot.sum(), ww.sum(), gg.sum()))


class OrthoGrad(torch.optim.Optimizer):
    """Wrap an optimizer so that every step uses ⊥Grad gradients.

    Args:
        params: parameters or param-group dicts (as for any optimizer). With an optimizer
            *instance* as ``base_optimizer``, pass ``None`` (or the same parameters).
        base_optimizer: an optimizer class (built as ``base_optimizer(param_groups, **kwargs)``)
            or an already built instance. Default ``torch.optim.AdamW``.
        renorm: rescale each projected gradient to its original norm (the authors' code does).
        **kwargs: every hyperparameter of the base optimizer, passed through unchanged.

    Group keys ``renorm`` and ``orthogonalize`` (default True; False skips a group, e.g. norms
    and biases) may be set per param group. ``param_groups`` and ``state`` are the base
    optimizer's own objects, so LR schedulers and ``state_dict`` round trips work as usual.

    Example (the paper's ⊥AdamW)::

        >>> opt = OrthoGrad(model.parameters(), torch.optim.AdamW, lr=1e-2,
        ...                 betas=(0.9, 0.99), eps=1e-25, weight_decay=0.0)
        >>> loss.backward(); opt.step(); opt.zero_grad()
    """

    def __init__(
        self,
        params: Iterable[Any] | None,
        base_optimizer: type[torch.optim.Optimizer] | torch.optim.Optimizer = torch.optim.AdamW,
        renorm: bool = True,
        **kwargs: Any,
    ) -> None:
        defaults = {"renorm": bool(renorm), "orthogonalize": True}
        if isinstance(base_optimizer, torch.optim.Optimizer):
            if kwargs:
                raise TypeError(
                    f"hyperparameters {sorted(kwargs)} cannot be passed with an optimizer "
                    "instance; set them on the instance"
                )
            base = base_optimizer
            if params is not None:
                given = {id(p) for p in _flatten_params(params)}
                owned = {id(p) for g in base.param_groups for p in g["params"]}
                if given != owned:
                    raise ValueError(
                        f"params ({len(given)} tensors) differ from the parameters of the given "
                        f"{type(base).__name__} ({len(owned)} tensors); pass params=None"
                    )
            # Adds the renorm/orthogonalize defaults to the base's own group dicts.
            super().__init__(base.param_groups, defaults)
        elif isinstance(base_optimizer, type) and issubclass(base_optimizer, torch.optim.Optimizer):
            if params is None:
                raise ValueError("params is required when base_optimizer is a class")
            super().__init__(params, defaults)
            # The base optimizer receives these very group dicts and adds its own defaults: all
            # of kwargs reach it (the authors' script dropped betas and eps, their issue #11).
            base = base_optimizer(self.param_groups, **kwargs)
        else:
            raise TypeError(
                "base_optimizer must be a torch.optim.Optimizer subclass or instance, got "
                f"{base_optimizer!r}"
            )
        self.base_optimizer = base
        # Share the base optimizer's objects: one source of truth for lr, state and schedulers.
        self.defaults = {**base.defaults, **defaults}
        self.param_groups = base.param_groups
        self.state = base.state

    def __repr__(self) -> str:
        return f"OrthoGrad({self.base_optimizer!r})"

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        base = getattr(self, "base_optimizer", None)
        if base is None:  # while torch.optim.Optimizer.__init__ builds the groups
            return super().add_param_group(param_group)
        param_group.setdefault("renorm", self.defaults["renorm"])
        param_group.setdefault("orthogonalize", True)
        base.add_param_group(param_group)

    @torch.no_grad()
    def orthogonalize_grads(self) -> None:
        """Apply ⊥Grad to the gradients of every group with ``orthogonalize=True``."""
        by_renorm: dict[bool, list[Tensor]] = {True: [], False: []}
        for group in self.param_groups:
            if group.get("orthogonalize", True):
                by_renorm[bool(group.get("renorm", True))].extend(group["params"])
        for renorm, params in by_renorm.items():
            if params:
                orthogonalize_(params, renorm=renorm)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """Evaluate ``closure`` (if any), orthogonalize the gradients, step the base optimizer."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.orthogonalize_grads()
        self.base_optimizer.step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.base_optimizer.load_state_dict(state_dict)
        # load_state_dict replaces the base's group dicts and state: share the new objects.
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state


def _flatten_params(params: Iterable[Any]) -> list[Tensor]:
    out: list[Tensor] = []
    for item in params:
        if isinstance(item, dict):
            group = item["params"]
            out.extend([group] if isinstance(group, Tensor) else group)
        else:
            out.append(item)
    return out
