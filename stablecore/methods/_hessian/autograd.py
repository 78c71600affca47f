"""The autograd HVP backends of :class:`~stablecore.methods._hessian.operator.HessianOperator`.

``torch.func`` forward-over-reverse (``func``, ``func_loop``), reverse-over-reverse with a cached
gradient graph (``func_rr``), PyHessian-style double backward, and the Gauss-Newton product, as a
mixin on the operator (they read its parameters, data and caches). Each maps one batch and
``V: [P, D]`` to ``H V: [P, D]``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.func import functional_call, grad, jvp, vjp, vmap

from stablecore.methods._hessian.losses import (
    _args_kwargs,
    _scalar_loss,
    _split,
    forward_mode_safe,
    is_single_batch,
)

__all__ = ["AutogradBackends"]


class AutogradBackends:
    """Mixin: needs ``model, loss_fn, data, names, params, unused, kind, _logit_hvp, _chunk,
    _param_key, unflatten, flatten, _vjp_cache, _grad_cache``."""

    # -- losses
    def _eager_loss(self, batch: Any) -> Tensor:
        inputs, targets = _split(batch, self.loss_fn)
        args, kwargs = _args_kwargs(inputs)
        return _scalar_loss(self.loss_fn, self.model(*args, **kwargs), targets)

    def _functional(self, batch: Any, with_loss: bool) -> tuple[Callable, dict[str, Tensor]]:
        holders = [
            id(m)
            for _, m in self.model.named_modules(remove_duplicate=False)
            if m._parameters or m._buffers
        ]
        if len(set(holders)) != len(holders):
            # one module with tensors at two places: torch 2.13's functional_call swaps it twice
            # and restores the swapped-in tensor, leaving the model's parameter without storage
            raise NotImplementedError("a module is used twice: torch.func cannot reparametrize it")
        inputs, targets = _split(batch, self.loss_fn)
        args, kwargs = _args_kwargs(inputs)
        loss_fn = forward_mode_safe(self.loss_fn)
        live = set(self.names) - self.unused
        # the other parameters enter as constants, so no transform differentiates through them
        # (unused ones too: jvp-of-grad fails on their ZeroTensor gradients in torch 2.13)
        frozen = {n: p.detach() for n, p in self.model.named_parameters() if n not in live}
        primals = {n: p.detach() for n, p in zip(self.names, self.params) if n in live}

        def f(p: dict[str, Tensor]) -> Any:
            out = functional_call(self.model, {**frozen, **p}, args, kwargs)
            return _scalar_loss(loss_fn, out, targets) if with_loss else out

        return f, primals

    # -- backends (one batch; V: [P, D] -> [P, D])
    def _hvp_func(self, batch: Any, V: Tensor, vmapped: bool, reverse: bool = False) -> Tensor:
        if self.kind == "ggn":
            return self._ggn_func(batch, V, vmapped)
        if reverse:  # reverse-over-reverse: one backward graph, vmapped vjps through it
            vjp_fn = self._grad_vjp(batch)
            return self._map(lambda v: vjp_fn(v)[0], V, vmapped)
        f, primals = self._functional(batch, with_loss=True)
        grad_f = grad(f)

        def one(v: dict[str, Tensor]) -> dict[str, Tensor]:
            return jvp(grad_f, (primals,), (v,))[1]

        return self._map(one, V, vmapped)

    def _grad_vjp(self, batch: Any) -> Callable:
        """``vjp`` of the gradient at the current parameters. For a single batch it is cached
        until a parameter changes (in-place updates bump ``_version``), so the sequential
        matvecs of Lanczos pay one backward each, not a forward and two backwards."""
        key = None
        if is_single_batch(self.data):
            key = self._param_key()
            if self._vjp_cache is not None and self._vjp_cache[0] == key:
                return self._vjp_cache[1]
        f, primals = self._functional(batch, with_loss=True)
        _, vjp_fn = vjp(grad(f), primals)
        if key is not None:
            self._vjp_cache = (key, vjp_fn)
        return vjp_fn

    def _ggn_func(self, batch: Any, V: Tensor, vmapped: bool) -> Tensor:
        f, primals = self._functional(batch, with_loss=False)
        targets = _split(batch, self.loss_fn)[1]
        out, vjp_fn = vjp(f, primals)
        if not isinstance(out, Tensor):
            raise ValueError(
                f"kind='ggn' needs the model to return a tensor; got {type(out).__name__}"
            )
        out = out.detach()

        def one(v: dict[str, Tensor]) -> dict[str, Tensor]:
            jv = jvp(f, (primals,), (v,))[1]
            return vjp_fn(self._logit_hvp(out, targets, jv))[0]

        return self._map(one, V, vmapped)

    def _map(self, one: Callable, V: Tensor, vmapped: bool) -> Tensor:
        Vd = {n: t for n, t in self.unflatten(V).items() if n not in self.unused}
        if vmapped and V.shape[0] > 1:  # vmap costs more than it saves for one probe
            out = vmap(one, randomness="same", chunk_size=self._chunk(V.shape[0]))(Vd)
        else:
            rows = [one({n: t[i] for n, t in Vd.items()}) for i in range(V.shape[0])]
            out = {n: torch.stack([r[n] for r in rows]) for n in Vd}
        zeros = {n: V.new_zeros(V.shape[0], *s) for n, s in zip(self.names, self.shapes)}
        return self.flatten({**zeros, **out}, lead=1)

    def _hvp_double_backward(self, batch: Any, V: Tensor) -> Tensor:
        if self.kind == "ggn":
            raise NotImplementedError("the GGN is computed with torch.func only")
        key = self._param_key() if is_single_batch(self.data) else None
        if key is not None and self._grad_cache is not None and self._grad_cache[0] == key:
            grads = self._grad_cache[1]
        else:
            with torch.enable_grad():
                loss = self._eager_loss(batch)
                grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
            if key is not None:  # PyHessian's trick: one graph serves every later HVP
                self._grad_cache = (key, grads)
        # unused parameters (PyHessian issue #8) contribute zero rows of H. A gradient with no
        # graph means a backward that autograd cannot differentiate (once_differentiable, a
        # fused kernel): treating it as constant would silently drop curvature, so refuse.
        dead = [n for n, g in zip(self.names, grads) if g is not None and not g.requires_grad]
        if dead:
            raise RuntimeError(
                f"the gradient of {dead[:3]} is not differentiable: an op's "
                "backward has no double backward"
            )
        live = [i for i, g in enumerate(grads) if g is not None]
        Vd = list(self.unflatten(V).values())
        rows = []
        for j in range(V.shape[0]):
            hv = [torch.zeros_like(p) for p in self.params]
            if live:
                parts = torch.autograd.grad(
                    [grads[i] for i in live],
                    [self.params[i] for i in live],
                    grad_outputs=[Vd[i][j] for i in live],
                    retain_graph=True,
                    allow_unused=True,
                )
                if all(h is None for h in parts):
                    # the gradient's graph does not reach the parameters: a backward that
                    # cut it (once_differentiable, a fused kernel), not a zero Hessian
                    raise RuntimeError(
                        "the gradient is not differentiable in the parameters: "
                        "an op's backward has no double backward"
                    )
                for i, h in zip(live, parts):
                    if h is not None:
                        hv[i] = h.detach()
            rows.append(self.flatten(hv, lead=0))
        return torch.stack(rows)
