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
second-derivative terms reuse cached ``act'`` and ``act''``. On a 7k-parameter MLP with 32 probes
(``bench/test_bench_sharpness.py``, one CPU thread) a Hutchinson trace takes 2.2-2.8x less CPU
time than PyHessian; the GEMMs themselves are about half of what is left.

:class:`StructuredHVP` is tried first by :class:`HessianOperator`; any model or loss it does not
know raises ``NotImplementedError`` and the generic ``torch.func`` backends take over.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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

    def apply_one(self, cache: _Cache, v: Tensor) -> Tensor:
        """``H v`` for one ``v: [D]`` -> ``[D]``: the rules of :meth:`apply` on 2-D tensors,
        about half the tensor ops (the per-op overhead dominates one probe)."""
        parts: list[Tensor] = []
        with torch.no_grad():
            tangents: list[tuple[Tensor | None, Tensor | None]] = []
            for m, slot in zip(self.layers, self.slots):
                ws, bs = slot if slot is not None else (None, None)
                vw = None if ws is None else v[ws[0] : ws[0] + ws[1]].view(m.out_features, -1)
                tangents.append((vw, None if bs is None else v[bs[0] : bs[0] + bs[1]]))
            rz: list[Tensor | None] = [None] * len(self.layers)
            r = None
            for i in range(self.first, len(self.layers)):
                m, rz[i] = self.layers[i], r
                if type(m) is nn.Linear:
                    vw, vb = tangents[i]
                    new = None if vw is None else cache.inputs[i] @ vw.T
                    if r is not None:
                        new = r @ m.weight.T if new is None else new.addmm_(r, m.weight.T)
                    if vb is not None:
                        n = cache.inputs[i].shape[0]
                        new = vb.expand(n, -1).clone() if new is None else new.add_(vb)
                    r = new
                elif r is not None:
                    r = r * cache.d1_2d[i]
            rd = cache.out_hvp(r.unsqueeze(1))[:, 0]
            for i in range(len(self.layers) - 1, self.first - 1, -1):
                m = self.layers[i]
                if type(m) is not nn.Linear:
                    rd = rd * cache.d1_2d[i]
                    if cache.d2_2d[i] is not None and rz[i] is not None:
                        rd.addcmul_(cache.d2_2d[i], rz[i])
                    continue
                (vw, _), slot = tangents[i], self.slots[i]
                if slot is not None and slot[1] is not None:
                    parts.append((slot[1][0], rd.sum(0)))
                if slot is not None and slot[0] is not None:
                    gw = rd.T @ cache.inputs[i]
                    if rz[i] is not None:
                        gw.addmm_(cache.deltas_t[i], rz[i])
                    parts.append((slot[0][0], gw.view(-1)))
                if i > self.first:
                    new = rd @ m.weight
                    rd = new if vw is None else new.addmm_(cache.deltas[i], vw)
        # every selected parameter sits in a Linear, so the parts tile [0, D) exactly
        return torch.cat([t for _, t in sorted(parts, key=lambda x: x[0])])

    def apply(self, cache: _Cache, V: Tensor) -> Tensor:
        """``H V`` for ``V: [P, D]`` (flat over ``names``) -> ``[P, D]``."""
        P, n = V.shape[0], cache.inputs[0].shape[0]
        out = V.new_zeros(P, self.dim)
        with torch.no_grad():
            tangents: list[tuple[Tensor | None, Tensor | None]] = []
            for m, slot in zip(self.layers, self.slots):
                if slot is None:
                    tangents.append((None, None))
                    continue
                (ws, bs), o = slot, m.out_features
                vw = None if ws is None else V[:, ws[0] : ws[0] + ws[1]].reshape(P, o, -1)
                vb = None if bs is None else V[:, bs[0] : bs[0] + bs[1]]
                tangents.append((vw, vb))
            # R-forward: rz[i] is the tangent of layer i's input, [n, P, features] or None (0)
            rz: list[Tensor | None] = [None] * len(self.layers)
            r = None
            for i in range(self.first, len(self.layers)):
                m, rz[i] = self.layers[i], r
                if type(m) is nn.Linear:
                    vw, vb = tangents[i]
                    o = m.out_features
                    new = None
                    if vw is not None:  # a @ V^T for all probes: [n, in] @ [in, P*out]
                        new = (cache.inputs[i] @ vw.reshape(P * o, -1).T).view(n, P, o)
                    if r is not None:
                        if new is None:
                            new = (r.reshape(n * P, -1) @ m.weight.T).view(n, P, o)
                        else:
                            new.view(n * P, o).addmm_(r.reshape(n * P, -1), m.weight.T)
                    if vb is not None:
                        new = vb.expand(n, P, o).clone() if new is None else new.add_(vb)
                    r = new
                elif r is not None:
                    r = r * cache.d1[i]
            # R-backward: rd is the tangent of dL/d(layer output)
            rd = cache.out_hvp(r)
            for i in range(len(self.layers) - 1, self.first - 1, -1):
                m = self.layers[i]
                if type(m) is not nn.Linear:
                    rd = rd * cache.d1[i]
                    if cache.d2[i] is not None and rz[i] is not None:
                        rd.addcmul_(cache.d2[i], rz[i])
                    continue
                (vw, vb), slot = tangents[i], self.slots[i]
                o, k = m.out_features, m.in_features
                if slot is not None and slot[0] is not None:
                    off, num = slot[0]
                    gw = (rd.reshape(n, P * o).T @ cache.inputs[i]).view(P, o, k)
                    if rz[i] is not None:  # delta^T R a for all probes: [out, n] @ [n, P*in]
                        gw += (
                            (cache.deltas[i].T @ rz[i].reshape(n, P * k))
                            .view(o, P, k)
                            .transpose(0, 1)
                        )
                    out[:, off : off + num] = gw.reshape(P, num)
                if slot is not None and slot[1] is not None:
                    off, num = slot[1]
                    out[:, off : off + num] = rd.sum(0)
                if i > self.first:
                    new = rd.reshape(n * P, o) @ m.weight
                    if vw is not None:  # delta @ V for all probes: [n, out] @ [out, P*in],
                        # accumulated by the GEMM ([n*P, in] and [n, P*in] share the memory)
                        vt = vw.transpose(0, 1).reshape(o, P * k)
                        new.view(n, P * k).addmm_(cache.deltas[i], vt)
                    rd = new.view(n, P, k)
        return out
