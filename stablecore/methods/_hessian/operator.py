"""The loss Hessian (or its Gauss-Newton part) as a matrix-free operator on flat vectors.

``HessianOperator(model, loss_fn, data).matvec(V)`` maps ``V: [P, D]`` (``P`` probe vectors over
the ``D`` selected parameters, flattened in ``named_parameters`` order) to ``H V``, averaged over
the batches of ``data`` weighted by batch size. Backends, tried in this order until one works:

1. ``func_rr``: reverse-over-reverse ``vjp(grad(f))`` from ``torch.func``, vmapped over the
   probes; for a single batch the gradient's graph is cached while the parameters are unchanged,
   so Lanczos pays one backward per step (measured faster than 2 on CPU, and torch 2.13's
   forward-mode AD of ``F.mse_loss``'s backward fails with "ZeroTensors are immutable");
2. ``func``: forward-over-reverse ``jvp(grad(f))``, vmapped: keeps no graph between calls
   (leaner in memory; choose it with ``backend="func"``);
3. ``func_loop``: forward-over-reverse without ``vmap`` (an op with no batching rule);
4. ``double_backward``: ``autograd.grad`` of ``g . v`` with ``create_graph=True`` (what PyHessian
   does; works with ops that have a backward of their backward but no forward-mode AD);
5. the four again inside ``stablecore.ops.reference_mode()``, where every stablecore op runs its
   plain-PyTorch reference: fused kernels without a double backward end up here.

The first backend that works is kept for later calls. A model that fails them all gets a
``RuntimeError`` naming each backend's error.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vjp, vmap

from stablecore import _backends
from stablecore.methods._hessian.losses import (
    LogitHVP,
    _args_kwargs,
    _resolve_logit_hvp,
    _scalar_loss,
    _split,
    _to_device,
    batch_size,
    is_single_batch,
    softmax_ce_logit_hvp,
    stablemax_ce_logit_hvp,
)

__all__ = [
    "HessianOperator",
    "softmax_ce_logit_hvp",
    "stablemax_ce_logit_hvp",
]


def _reference_mode_factory() -> Callable[[], contextlib.AbstractContextManager] | None:
    """``stablecore.ops.reference_mode`` (or its home in ``_dispatch``), or None if absent."""
    try:
        import stablecore.ops as ops
    except Exception:  # a broken ops package must not break measurements of plain models
        return None
    factory = getattr(ops, "reference_mode", None)
    if factory is None:
        try:
            from stablecore.ops import _dispatch

            factory = getattr(_dispatch, "reference_mode", None)
        except Exception:
            factory = None
    return factory


# ----------------------------------------------------------------------------- the operator
_BACKENDS = ("func_rr", "func", "func_loop", "double_backward")
_FALLBACK_ERRORS = (RuntimeError, NotImplementedError)


class HessianOperator:
    """``V -> H V`` for the loss Hessian (``kind="hessian"``) or Gauss-Newton matrix (``"ggn"``).

    Args:
        model: an ``nn.Module``; measured in its current train/eval mode unless ``train`` is set.
        loss_fn: ``loss_fn(outputs, targets) -> scalar``; ``None`` when the model's output is the
            loss, or has a ``.loss``/``["loss"]`` (transformers models with ``labels`` in the batch).
        data: one batch or a re-iterable of batches (a list, a ``DataLoader``). A batch is
            ``(inputs, targets)`` with a ``loss_fn``, else the model's inputs; inputs are a tensor
            (``model(x)``), a tuple (``model(*x)``) or a dict (``model(**x)``).
        params: which parameters: ``None`` (all with ``requires_grad``), names, Parameters, or a
            predicate on the name. The Hessian is the block of those (the rest held fixed).
        kind: ``"hessian"``, or ``"ggn"``/``"fisher"``: ``J^T H_out J`` with the Hessian of the loss in
            the model outputs (for softmax cross-entropy, the Fisher equals the GGN).
        loss_hessian: for the GGN: ``"auto"`` (analytic for ``nn.CrossEntropyLoss``/``F.cross_entropy``,
            else ``"exact"``), ``"softmax_ce"``, ``"stablemax_ce"``, or ``f(outputs, targets, u)``.
        train: ``True``/``False`` puts the model in that mode while measuring; ``None`` keeps it.
        backend: ``"auto"`` (fall back along the chain in the module docstring), or one of
            ``"func"``, ``"func_rr"``, ``"func_loop"``, ``"double_backward"``.
        probe_chunk: vmap at most this many probes at once (bounds memory); ``None``: all.

    Attributes: ``dim`` (D), ``names``, ``dtype``, ``device``, ``backend_used`` (e.g.
    ``"double_backward+reference"``), ``num_matvecs``.

    Example::

        >>> op = HessianOperator(nn.Linear(3, 1), nn.MSELoss(), (torch.randn(8, 3), torch.randn(8, 1)))
        >>> op.matvec(torch.randn(2, op.dim)).shape
        torch.Size([2, 4])
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable | None,
        data: Any,
        *,
        params: Sequence[str] | Sequence[Tensor] | Callable[[str], bool] | None = None,
        kind: str = "hessian",
        loss_hessian: str | LogitHVP = "auto",
        train: bool | None = None,
        backend: str = "auto",
        probe_chunk: int | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
        if kind not in ("hessian", "ggn", "fisher"):
            raise ValueError(f"kind must be 'hessian', 'ggn' or 'fisher'; got {kind!r}")
        if backend not in ("auto", *_BACKENDS):
            raise ValueError(f"backend must be 'auto' or one of {_BACKENDS}; got {backend!r}")
        if not is_single_batch(data) and iter(data) is data:
            raise ValueError(
                "data must be one batch or re-iterable (a list or DataLoader), "
                "not a one-shot iterator: the operator passes over it once per matvec"
            )
        self.model, self.loss_fn, self.data = model, loss_fn, data
        self.kind = "ggn" if kind == "fisher" else kind
        self.train, self.backend, self.probe_chunk = train, backend, probe_chunk
        self._select(params)
        if self.kind == "ggn":
            if loss_fn is None:
                raise ValueError(
                    "kind='ggn' needs a loss_fn(outputs, targets) on the model outputs"
                )
            self._logit_hvp = _resolve_logit_hvp(loss_fn, loss_hessian)
        self._chosen: tuple[str, bool] | None = None
        self._vjp_cache: tuple[Any, Callable] | None = None
        self._grad_cache: tuple[Any, tuple] | None = None
        self._single_probe_graph = is_single_batch(data) and self.kind == "hessian"
        self.backend_used: str | None = None
        self.num_matvecs = 0
        with torch.enable_grad(), self._mode():  # fail early (ValueError) on a non-scalar loss
            first = _to_device(next(iter(self.batches()), None), self.device)
            if first is None:
                raise ValueError("data holds no batches")
            loss = self._eager_loss(first)
            grads = torch.autograd.grad(loss, self.params, allow_unused=True)
        self.loss_value = float(loss.detach())
        #: parameters the loss does not depend on (their Hessian rows are zero)
        self.unused = {n for n, g in zip(self.names, grads) if g is None}

    # -- parameters and flat vectors
    def _select(self, params) -> None:
        named = list(self.model.named_parameters())
        if params is None:
            chosen = [(n, p) for n, p in named if p.requires_grad]
        elif callable(params):
            chosen = [(n, p) for n, p in named if p.requires_grad and params(n)]
        else:
            params = list(params)
            by_name, by_id = dict(named), {id(p): n for n, p in named}
            names = []
            for item in params:
                name = item if isinstance(item, str) else by_id.get(id(item))
                if name not in by_name:
                    raise ValueError(
                        f"parameter {item if isinstance(item, str) else '<tensor>'} "
                        "is not a parameter of the model"
                    )
                names.append(name)
            chosen = [(n, p) for n, p in named if n in set(names)]
            frozen = [n for n, p in chosen if not p.requires_grad]
            if frozen:
                raise ValueError(f"parameters {frozen} do not require grad")
        if not chosen:
            raise ValueError(
                "the model has no parameters with requires_grad=True"
                + ("" if params is None else " in the selection")
                + "; there is no Hessian to measure"
            )
        bad = [n for n, p in chosen if not p.is_floating_point()]
        if bad:
            raise TypeError(f"parameters {bad} are not floating point")
        self.names = [n for n, _ in chosen]
        self.params = [p for _, p in chosen]
        self.shapes = [p.shape for p in self.params]
        self.numels = [p.numel() for p in self.params]
        self.dim = sum(self.numels)
        self.dtype = self.params[0].dtype
        for p in self.params[1:]:
            self.dtype = torch.promote_types(self.dtype, p.dtype)
        self.device = self.params[0].device

    def unflatten(self, v: Tensor) -> dict[str, Tensor]:
        """``v: [..., D]`` -> ``{name: [..., *shape]}`` in each parameter's dtype."""
        lead = v.shape[:-1]
        parts = v.split(self.numels, dim=-1)
        return {
            n: x.reshape(*lead, *s).to(p.dtype)
            for n, x, s, p in zip(self.names, parts, self.shapes, self.params)
        }

    def flatten(self, tensors: Mapping[str, Tensor] | Sequence[Tensor], lead: int = 1) -> Tensor:
        """Inverse of :meth:`unflatten` for tensors with ``lead`` leading (probe) dimensions."""
        seq = [tensors[n] for n in self.names] if isinstance(tensors, Mapping) else list(tensors)
        return torch.cat([t.reshape(*t.shape[:lead], -1).to(self.dtype) for t in seq], dim=-1)

    def batches(self) -> Iterator[Any]:
        if is_single_batch(self.data):
            yield self.data
        else:
            yield from self.data

    @contextlib.contextmanager
    def _mode(self) -> Iterator[None]:
        if self.train is None:
            yield
            return
        was = self.model.training
        self.model.train(self.train)
        try:
            yield
        finally:
            self.model.train(was)

    # -- losses
    def _eager_loss(self, batch: Any) -> Tensor:
        inputs, targets = _split(batch, self.loss_fn)
        args, kwargs = _args_kwargs(inputs)
        return _scalar_loss(self.loss_fn, self.model(*args, **kwargs), targets)

    def _functional(self, batch: Any, with_loss: bool) -> tuple[Callable, dict[str, Tensor]]:
        inputs, targets = _split(batch, self.loss_fn)
        args, kwargs = _args_kwargs(inputs)
        live = set(self.names) - self.unused
        # the other parameters enter as constants, so no transform differentiates through them
        # (unused ones too: jvp-of-grad fails on their ZeroTensor gradients in torch 2.13)
        frozen = {n: p.detach() for n, p in self.model.named_parameters() if n not in live}
        primals = {n: p.detach() for n, p in zip(self.names, self.params) if n in live}

        def f(p: dict[str, Tensor]) -> Any:
            out = functional_call(self.model, {**frozen, **p}, args, kwargs)
            return _scalar_loss(self.loss_fn, out, targets) if with_loss else out

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

    def _param_key(self) -> tuple:
        return (
            self.model.training,
            tuple((p.data_ptr(), p._version) for p in self.model.parameters()),
        )

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
            out = vmap(one, randomness="same", chunk_size=self.probe_chunk)(Vd)
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

    def _run(self, choice: tuple[str, bool], batch: Any, V: Tensor) -> Tensor:
        name, reference = choice
        ctx = contextlib.nullcontext()
        if reference:
            factory = _reference_mode_factory()
            if factory is None:
                raise RuntimeError("stablecore.ops.reference_mode is not available")
            ctx = factory()
        with ctx:
            if name == "func_rr" and V.shape[0] == 1 and self._single_probe_graph:
                # one probe at a time (Lanczos, power iteration): a cached autograd graph costs
                # one backward per HVP without torch.func's per-call overhead (2x measured)
                try:
                    return self._hvp_double_backward(batch, V)
                except _FALLBACK_ERRORS:
                    self._single_probe_graph = False
            if name == "double_backward":
                return self._hvp_double_backward(batch, V)
            return self._hvp_func(batch, V, vmapped=name != "func_loop", reverse=name == "func_rr")

    def _candidates(self) -> list[tuple[str, bool]]:
        names = _BACKENDS if self.backend == "auto" else (self.backend,)
        if self.kind == "ggn":
            names = [n for n in names if n in ("func", "func_loop")] or ["func"]
        refs = (False, True) if _reference_mode_factory() is not None else (False,)
        return [(n, r) for r in refs for n in names]

    def _hvp_batch(self, batch: Any, V: Tensor) -> Tensor:
        if self._chosen is not None:
            return self._run(self._chosen, batch, V)
        errors = []
        for choice in self._candidates():
            try:
                out = self._run(choice, batch, V)
            except _FALLBACK_ERRORS as exc:
                errors.append(
                    f"{choice[0]}{'+reference' if choice[1] else ''}: "
                    f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
                )
                continue
            self._chosen = choice
            self.backend_used = f"{choice[0]}{'+reference' if choice[1] else ''}"
            if errors:
                _backends.log_fallback_once(
                    "sharpness.hvp", f"using {self.backend_used} after: {'; '.join(errors)}"
                )
            return out
        hint = (
            ""
            if _reference_mode_factory() is not None
            else " stablecore.ops.reference_mode is not available, so fused ops cannot fall back."
        )
        raise RuntimeError(
            "no backend could compute Hessian-vector products for this model: an op has neither "
            "forward-mode AD nor a differentiable backward (a fused kernel without double "
            "backward?)." + hint + " Try kind='ggn' with an analytic loss Hessian, or make the op "
            "differentiable twice. Errors:\n  " + "\n  ".join(errors)
        )

    # -- public
    def matvec(self, vectors: Tensor) -> Tensor:
        """``H v`` for ``vectors: [D]`` or ``[P, D]`` (result in the same shape, dtype ``self.dtype``)."""
        if (
            not isinstance(vectors, Tensor)
            or vectors.dim() not in (1, 2)
            or (vectors.shape[-1] != self.dim)
        ):
            shape = tuple(vectors.shape) if isinstance(vectors, Tensor) else type(vectors).__name__
            raise ValueError(f"vectors must be [D] or [P, D] with D={self.dim}; got {shape}")
        V = vectors.reshape(-1, self.dim).to(device=self.device, dtype=self.dtype)
        total, weight = None, 0
        with self._mode():
            for batch in self.batches():
                batch = _to_device(batch, self.device)
                w = batch_size(batch)
                hv = self._hvp_batch(batch, V) * w
                total = hv if total is None else total + hv
                weight += w
        if total is None:
            raise ValueError("data holds no batches")
        self.num_matvecs += V.shape[0]
        out = (total / weight).detach()
        return out[0] if vectors.dim() == 1 else out

    def dense(self) -> Tensor:
        """The full ``[D, D]`` matrix (``D`` matvecs): for tests and tiny models only."""
        return self.matvec(torch.eye(self.dim, dtype=self.dtype, device=self.device))

    def gradient(self) -> Tensor:
        """The loss gradient ``[D]`` over the selected parameters (batch-size weighted mean)."""
        total, weight = torch.zeros(self.dim, dtype=self.dtype, device=self.device), 0
        with self._mode():
            for batch in self.batches():
                batch = _to_device(batch, self.device)
                with torch.enable_grad():
                    g = torch.autograd.grad(self._eager_loss(batch), self.params, allow_unused=True)
                g = [torch.zeros_like(p) if gi is None else gi for gi, p in zip(g, self.params)]
                w = batch_size(batch)
                total += self.flatten(g, lead=0) * w
                weight += w
        return total / weight
