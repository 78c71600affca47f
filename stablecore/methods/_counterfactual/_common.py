"""Shared pieces of T-Rex: the model contract, result type, input checks, outputs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

Model = Callable[[Tensor], Tensor]


@dataclass
class Counterfactuals:
    """Result of a search: ``x_cf: [B, d]``; ``valid: [B]`` bool (model predicts the target);
    ``stability: [B]`` R-hat (NaN where not computed); ``steps: [B]`` int64 iterations used."""

    x_cf: Tensor
    valid: Tensor
    stability: Tensor
    steps: Tensor


def _check_points(x: Tensor, name: str = "x") -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} must have shape [B, d] with B, d > 0, got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be floating point, got dtype {x.dtype}")


def _outputs(model: Model, x: Tensor) -> Tensor:
    out = model(x)
    if not isinstance(out, Tensor):
        raise TypeError(f"model must return a torch.Tensor, got {type(out).__name__}")
    if not out.is_floating_point():
        raise TypeError(f"model must return floating logits/probabilities, got dtype {out.dtype}")
    if out.ndim == 2 and out.shape[1] == 1:
        out = out[:, 0]
    if out.shape[0] != x.shape[0] or out.ndim not in (1, 2):
        raise ValueError(
            f"model output must be [N, C] or [N] for input {tuple(x.shape)}, got {tuple(out.shape)}"
        )
    if x.requires_grad and not out.requires_grad and torch.is_grad_enabled():
        raise TypeError(
            "model output does not depend differentiably on its input (no autograd graph: "
            "detached, numpy-based or run under torch.no_grad); T-Rex needs d m(x) / d x"
        )
    return out


def class_probability(model: Model, x: Tensor, target: int, output: str = "logits") -> Tensor:
    """``m(x)``: probability of class ``target`` for ``x: [N, d]``, shape ``[N]``."""
    if output not in ("logits", "probs"):
        raise ValueError(f"output must be 'logits' or 'probs', got {output!r}")
    out = _outputs(model, x)
    n_cls = 2 if out.ndim == 1 else out.shape[1]
    if not 0 <= int(target) < n_cls:
        raise ValueError(f"target {target} out of range for a model with {n_cls} classes")
    if out.ndim == 1:
        p1 = torch.sigmoid(out) if output == "logits" else out
        return p1 if target == 1 else 1.0 - p1
    probs = out.softmax(dim=1) if output == "logits" else out
    return probs[:, target]


def predict(model: Model, x: Tensor, output: str = "logits") -> Tensor:
    """Predicted class ``[N]`` (int64) of ``x: [N, d]`` (no autograd)."""
    with torch.no_grad():
        out = _outputs(model, x)
    return (out > (0.0 if output == "logits" else 0.5)).long() if out.ndim == 1 else out.argmax(1)
