"""Hessian-vector products by hand-written R-op rules for MLPs: no autograd in the loop.

For ``nn.Sequential`` stacks of ``nn.Linear`` and pointwise activations trained with
``nn.CrossEntropyLoss`` or ``nn.MSELoss`` the HVP has a closed form (Pearlmutter's R-operator): a
forward pass carries the tangent ``R z`` next to the activations, the loss's logit Hessian maps it
to ``R delta``, and a backward pass carries ``R delta`` next to the cached gradients. Autograd's
double backward computes the same products (14 matrix products per probe for a 3-layer MLP), but
through a graph of ~60 nodes whose per-node overhead dominates small models, and vmapped over
probes it multiplies weights one probe at a time. Here each product is ONE large GEMM over all
probes: tangents live in a ``[n, P, features]`` layout so ``a @ V^T`` (shared activations ``a:
[n, in]``, per-probe weights ``V: [P, out, in]``) is ``[n, in] @ [in, P*out]`` with no copy, and
second-derivative terms reuse cached ``act'`` and ``act''``; on a CPU the ``[n, P, features]``
intermediates live in a reused :class:`Workspace`. Hutchinson's quadratic forms alone take half
the products again (:mod:`.taylor`). Measured in ``bench/test_bench_sharpness.py``.

:class:`StructuredHVP` is tried first by :class:`HessianOperator`; any model or loss it does not
know raises ``NotImplementedError`` and the generic ``torch.func`` backends take over.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stablecore.methods._hessian.rop import hvp_batched, hvp_single

__all__ = ["StructuredHVP", "unsupported_reason"]

_SQRT_2PI = math.sqrt(2 * math.pi)


def _tanh(z: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
    t = torch.tanh(z)
    d1 = 1 - t * t
    return t, d1, -2 * t * d1


def _sigmoid(z: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
    s = torch.sigmoid(z)
    d1 = s * (1 - s)
    return s, d1, d1 * (1 - 2 * s)


def _relu(z: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
    # the second derivative is 0 almost everywhere: autograd's double backward agrees
    return torch.relu(z), (z > 0).to(z.dtype), None


def _silu(z: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
    s = torch.sigmoid(z)
    ds = s * (1 - s)
    return z * s, s + z * ds, ds * (2 + z * (1 - 2 * s))


def _gelu(z: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
    cdf = 0.5 * (1 + torch.erf(z / math.sqrt(2)))
    pdf = torch.exp(-0.5 * z * z) / _SQRT_2PI
    return z * cdf, cdf + z * pdf, pdf * (2 - z * z)


def _activation(m: nn.Module) -> Callable[[Tensor], tuple[Tensor, Tensor, Tensor | None]] | None:
    kind = type(m)
    if kind is nn.LeakyReLU:
        slope = m.negative_slope
        return lambda z: (
            F.leaky_relu(z, slope),
            torch.where(z > 0, torch.ones_like(z), torch.full_like(z, slope)),
            None,
        )
    if kind is nn.GELU:
        return _gelu if m.approximate == "none" else None
    return {nn.Tanh: _tanh, nn.Sigmoid: _sigmoid, nn.ReLU: _relu, nn.SiLU: _silu}.get(kind)


def _flatten(module: nn.Module, prefix: str, out: list[tuple[str, nn.Module]]) -> None:
    # _modules, not named_children(): the latter lists a module used twice only once
    for name, child in module._modules.items():
        if child is None:
            continue
        if type(child) is nn.Sequential:
            _flatten(child, f"{prefix}{name}.", out)
        elif type(child) is not nn.Identity:
            out.append((f"{prefix}{name}", child))


def _hooked(m: nn.Module) -> bool:
    # hooks or an instance-level forward change what the module computes
    return bool(
        m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or "forward" in m.__dict__
    )


def unsupported_reason(model: nn.Module, loss_fn: object) -> str | None:
    """Why :class:`StructuredHVP` cannot serve ``(model, loss_fn)``, or None when it can."""
    if type(model) is not nn.Sequential:
        return f"model is a {type(model).__name__}, not an nn.Sequential"
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        return "global module hooks are registered"
    if any(_hooked(c) for c in model.modules() if type(c) is nn.Sequential):
        return "a Sequential has hooks"
    layers: list[tuple[str, nn.Module]] = []
    _flatten(model, "", layers)
    seen: set[int] = set()
    for name, m in layers:
        if _hooked(m):
            return f"module {name} has hooks"
        if type(m) is nn.Linear:
            for p in m.parameters():
                if id(p) in seen:
                    return "a parameter is shared between layers"
                seen.add(id(p))
        elif _activation(m) is None:
            return f"module {name} ({type(m).__name__}) has no R-op rule"
    if not any(type(m) is nn.Linear for _, m in layers):
        return "the model has no nn.Linear"
    if isinstance(loss_fn, nn.CrossEntropyLoss) and type(loss_fn) is nn.CrossEntropyLoss:
        if loss_fn.weight is not None or loss_fn.label_smoothing != 0.0:
            return "class weights / label smoothing"
        if loss_fn.reduction not in ("mean", "sum"):
            return f"reduction={loss_fn.reduction!r}"
    elif type(loss_fn) is nn.MSELoss:
        if loss_fn.reduction not in ("mean", "sum"):
            return f"reduction={loss_fn.reduction!r}"
    elif loss_fn not in (F.cross_entropy, F.mse_loss):
        return f"loss {type(loss_fn).__name__} has no analytic logit Hessian here"
    return None


class Workspace:
    """Scratch tensors reused across calls, keyed by name (CPU only).

    On a CPU every fresh tensor over 128 KiB is a new ``mmap`` from glibc, paid again in page
    faults on first touch and often returned to the OS when freed: for ``[n, probes, features]``
    intermediates that is most of the time of a small HVP (measured 2-10x per elementwise op on
    a 7k-parameter MLP). CUDA's caching allocator already reuses memory, so there every request
    is a fresh ``new_empty`` and nothing is kept alive between calls."""

    def __init__(self) -> None:
        self._bufs: dict[object, Tensor] = {}

    def get(self, key: object, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """An uninitialised contiguous tensor of ``shape`` (dtype/device of ``like``)."""
        if like.device.type != "cpu":
            return like.new_empty(shape)
        t = self._bufs.get(key)
        if t is None or t.shape != shape or t.dtype != like.dtype:
            t = self._bufs[key] = like.new_empty(shape)
        return t


@dataclass
class _Cache:
    """Forward/backward quantities at the current parameters for one batch."""

    inputs: list[Tensor]  # input of each layer: [n, features]
    deltas: list[Tensor]  # dL/d(output) of each layer: [n, features]
    d1: list[Tensor | None]  # act'(z) per activation layer, [n, 1, h] (None for Linear)
    d2: list[Tensor | None]  # act''(z) * delta per activation layer, [n, 1, h] (None: zero)
    out_hvp: Callable[[Tensor], Tensor]  # the loss Hessian in the outputs, on [n, P, C]
    loss: float
    # 2-D copies for the single-probe path (Lanczos): fewer ops per HVP
    d1_2d: list[Tensor | None]
    d2_2d: list[Tensor | None]
    deltas_t: list[Tensor]  # deltas[i].T
    work: Workspace = field(default_factory=Workspace)


class StructuredHVP:
    """HVPs of ``loss_fn(model(x), y)`` for an ``nn.Sequential`` MLP by explicit R-op rules.

    Args:
        model: ``nn.Sequential`` (nested ones are flattened) of ``nn.Linear``, ``nn.Identity`` and
            ``nn.Tanh``/``Sigmoid``/``ReLU``/``LeakyReLU``/``SiLU``/``GELU()``; exact types only (a
            subclass may override ``forward``), no hooks, no shared parameters.
        loss_fn: ``nn.CrossEntropyLoss`` (class-index targets, no class weights or smoothing,
            ``ignore_index`` honoured), ``nn.MSELoss``, ``F.cross_entropy`` or ``F.mse_loss``;
            reduction ``"mean"`` or ``"sum"``.
        names: the parameters to differentiate (flat order of the result); others are constants.

    ``prepare((x: [n, in], y))`` caches one batch; ``apply(cache, V: [P, D])`` returns ``H V: [P, D]``.
    Raises ``NotImplementedError`` for anything else (the caller falls back to autograd).
    """

    def __init__(self, model: nn.Module, loss_fn: object, names: Sequence[str]) -> None:
        reason = unsupported_reason(model, loss_fn)
        if reason is not None:
            raise NotImplementedError(f"structured HVP: {reason}")
        layers: list[tuple[str, nn.Module]] = []
        _flatten(model, "", layers)
        self.layers = [m for _, m in layers]
        self.loss_fn = loss_fn
        wanted = set(names)
        # per Linear layer: (offset, numel) of weight and bias in the flat vector, or None
        offsets, off = {}, 0
        numels = dict((n, p.numel()) for n, p in model.named_parameters())
        for n in names:
            offsets[n] = (off, numels[n])
            off += numels[n]
        self.dim = off
        self.slots: list[tuple | None] = []
        for name, m in layers:
            if type(m) is nn.Linear:
                w, b = f"{name}.weight", f"{name}.bias"
                self.slots.append(
                    (
                        offsets.get(w) if w in wanted else None,
                        offsets.get(b) if b in wanted and m.bias is not None else None,
                    )
                )
            else:
                self.slots.append(None)
        live = [i for i, s in enumerate(self.slots) if s is not None and s != (None, None)]
        if not live:
            raise NotImplementedError("structured HVP: no selected parameter in a Linear layer")
        self.first = live[0]  # layers before it carry no tangent and need no R-backward

    def param_key(self) -> tuple:
        """Identity and version of every parameter: changes whenever the Hessian may."""
        return tuple(
            (p.data_ptr(), p._version)
            for m in self.layers
            if type(m) is nn.Linear
            for p in (m.weight, m.bias)
            if p is not None
        )

    # -- loss: dL/dz and the Hessian of L in the outputs z
    def _loss(self, z: Tensor, y: Tensor) -> tuple[Tensor, Callable[[Tensor], Tensor], float]:
        fn = self.loss_fn
        reduction = getattr(fn, "reduction", "mean")
        if isinstance(fn, nn.CrossEntropyLoss) or fn is F.cross_entropy:
            if y.dtype not in (torch.int64, torch.int32) or y.shape != z.shape[:1]:
                raise NotImplementedError("structured HVP: CE needs class-index targets [n]")
            ignore = getattr(fn, "ignore_index", -100)
            valid = (y != ignore).to(z.dtype)
            count = float(valid.sum()) if reduction == "mean" else 1.0
            if count == 0:
                raise NotImplementedError("structured HVP: every target is ignored")
            logp = torch.log_softmax(z, -1)
            p = logp.exp()
            safe = torch.where(y == ignore, torch.zeros_like(y), y).long()
            loss = -(logp.gather(1, safe[:, None])[:, 0] * valid).sum() / count
            scale = (valid / count)[:, None]
            delta = (p - F.one_hot(safe, z.shape[1]).to(z.dtype)) * scale
            pw, sw = p.unsqueeze(1), scale.unsqueeze(1)

            def out_hvp(u: Tensor) -> Tensor:
                return (pw * u - pw * (pw * u).sum(-1, keepdim=True)) * sw

            return delta, out_hvp, float(loss)
        if y.shape != z.shape or not y.is_floating_point():
            raise NotImplementedError(f"structured HVP: MSE target {tuple(y.shape)} vs output")
        scale = 2.0 / (z.numel() if reduction == "mean" else 1)
        r = z - y
        loss = (r * r).sum() * (scale / 2)
        return r * scale, lambda u: u * scale, float(loss)

    def prepare(self, batch: object) -> _Cache:
        """Forward and backward at the current parameters for ``batch = (x: [n, in], y)``."""
        if not (isinstance(batch, tuple | list) and len(batch) == 2):
            raise NotImplementedError("structured HVP: batch must be (inputs, targets)")
        x, y = batch
        if not isinstance(x, Tensor) or x.dim() != 2 or not isinstance(y, Tensor):
            raise NotImplementedError("structured HVP: inputs must be one [n, features] tensor")
        dtypes = {p.dtype for m in self.layers for p in m.parameters()}
        if dtypes != {x.dtype}:
            raise NotImplementedError("structured HVP: parameters and inputs differ in dtype")
        with torch.no_grad():
            inputs, derivs, a = [], [], x
            for m in self.layers:
                inputs.append(a)
                if type(m) is nn.Linear:
                    a = F.linear(a, m.weight, m.bias)
                    derivs.append(None)
                else:
                    a, d1, d2 = _activation(m)(a)
                    derivs.append((d1, d2))
            delta, out_hvp, loss = self._loss(a, y)
            deltas: list[Tensor] = [delta] * len(self.layers)
            d1s: list[Tensor | None] = [None] * len(self.layers)
            d2s: list[Tensor | None] = [None] * len(self.layers)
            for i in range(len(self.layers) - 1, self.first - 1, -1):
                m, deltas[i] = self.layers[i], delta
                if type(m) is nn.Linear:
                    if i > self.first:
                        delta = delta @ m.weight
                else:
                    d1, d2 = derivs[i]
                    d1s[i] = d1.unsqueeze(1)
                    d2s[i] = None if d2 is None else (delta * d2).unsqueeze(1)
                    delta = delta * d1
        return _Cache(
            inputs,
            deltas,
            d1s,
            d2s,
            out_hvp,
            loss,
            [None if d is None else d[:, 0] for d in d1s],
            [None if d is None else d[:, 0] for d in d2s],
            [d.T for d in deltas],
        )

    def probe_weights(self, cache: _Cache, V: Tensor, i: int) -> Tensor | None:
        """Layer ``i``'s weight tangents of every probe, ``[P, out, in]`` contiguous (a copy in
        the workspace: the slice of ``V`` is strided), or None when its weight is not selected."""
        slot, m = self.slots[i], self.layers[i]
        if slot is None or slot[0] is None:
            return None
        (off, num), P = slot[0], V.shape[0]
        vw = cache.work.get(("vw", i), (P, m.out_features, m.in_features), V)
        return vw.copy_(V[:, off : off + num].view(P, m.out_features, m.in_features))

    def apply_one(self, cache: _Cache, v: Tensor) -> Tensor:
        """``H v`` for one ``v: [D]`` -> ``[D]`` (see :func:`.rop.hvp_single`)."""
        return hvp_single(self, cache, v)

    def apply(self, cache: _Cache, V: Tensor) -> Tensor:
        """``H V`` for ``V: [P, D]`` (flat over ``names``) -> ``[P, D]`` (:func:`.rop.hvp_batched`)."""
        return hvp_batched(self, cache, V)
