"""The loss Hessian (or its Gauss-Newton part) as a matrix-free operator on flat vectors.

``HessianOperator(model, loss_fn, data).matvec(V)`` maps ``V: [P, D]`` (``P`` probe vectors over
the ``D`` selected parameters, flattened in ``named_parameters`` order) to ``H V``, averaged over
the batches of ``data`` weighted by batch size. Backends, tried in this order until one works:

0. ``structured``: hand-written R-op rules for ``nn.Sequential`` MLPs (``nn.Linear`` and pointwise
   activations) with ``nn.CrossEntropyLoss``/``nn.MSELoss`` (:mod:`.structured`): no autograd in
   the loop, one GEMM per product for all probes; the forward/backward cache of a single batch is
   kept while the parameters are unchanged. Other models skip it;
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

from stablecore import _backends
from stablecore.methods._hessian.autograd import AutogradBackends
from stablecore.methods._hessian.losses import (
    LogitHVP,
    _resolve_logit_hvp,
    _to_device,
    batch_size,
    is_single_batch,
    softmax_ce_logit_hvp,
    stablemax_ce_logit_hvp,
)
from stablecore.methods._hessian.structured import StructuredHVP
from stablecore.methods._hessian.taylor import quadratic_forms

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
_BACKENDS = ("structured", "func_rr", "func", "func_loop", "double_backward")
# probes per batched HVP call on CPU when probe_chunk is None: bigger chunks spill the
# [n, chunk, features] intermediates out of L2 (measured on a 7k-parameter MLP, 256 samples,
# 32 probes, shared 2-core machine: chunks of 4-8 1.2x faster than 16, 1.4x faster than 32)
_CPU_PROBE_CHUNK = 8
_FALLBACK_ERRORS = (RuntimeError, NotImplementedError)


class HessianOperator(AutogradBackends):
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
            ``"structured"``, ``"func"``, ``"func_rr"``, ``"func_loop"``, ``"double_backward"``.
        probe_chunk: batch at most this many probes per HVP call (bounds memory); ``None``: 8 on
            CPU (cache-sized intermediates), all on other devices.

    Attributes: ``dim`` (D), ``names``, ``dtype``, ``device``, ``backend_used`` (e.g.
    ``"double_backward+reference"``), ``num_matvecs``, ``num_quadratic_forms``.

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
        self._structured: StructuredHVP | None = None
        self._structured_reason = "structured HVP: kind='ggn'"
        self._structured_cache: tuple[Any, Any] | None = None
        if self.kind == "hessian" and backend in ("auto", "structured"):
            try:
                self._structured = StructuredHVP(model, loss_fn, self.names)
            except NotImplementedError as exc:
                self._structured_reason = str(exc)
        self._vjp_cache: tuple[Any, Callable] | None = None
        self._grad_cache: tuple[Any, tuple] | None = None
        self._single_probe_graph = is_single_batch(data) and self.kind == "hessian"
        self.backend_used: str | None = None
        self.num_matvecs = 0
        self.num_quadratic_forms = 0
        first = _to_device(next(iter(self.batches()), None), self.device)
        self._device_data = first
        if first is None:
            raise ValueError("data holds no batches")
        if self._structured is not None and is_single_batch(data):
            # the structured forward/backward doubles as the first matvec's cache: no extra pass
            try:
                with self._mode():
                    cache = self._structured.prepare(first)
                self._structured_cache = (self._param_key(), cache)
                #: the loss at the current parameters (first batch)
                self.loss_value = cache.loss
                #: parameters the loss does not depend on (their Hessian rows are zero)
                self.unused: set[str] = set()
                return
            except NotImplementedError as exc:
                self._structured, self._structured_reason = None, str(exc)
        with torch.enable_grad(), self._mode():  # fail early (ValueError) on a non-scalar loss
            loss = self._eager_loss(first)
            grads = torch.autograd.grad(loss, self.params, allow_unused=True)
        self.loss_value = float(loss.detach())
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

    def _param_key(self) -> tuple:
        # in-place updates bump _version, reassigned tensors change data_ptr
        if self._structured is not None:  # its layers hold every parameter: skip the module walk
            return self._structured.param_key()
        return (
            self.model.training,
            tuple((p.data_ptr(), p._version) for p in self.model.parameters()),
        )

    def _chunk(self, num: int) -> int:
        if self.probe_chunk is not None:
            return max(1, min(self.probe_chunk, num))
        return min(_CPU_PROBE_CHUNK, num) if self.device.type == "cpu" else num

    def _structured_prepared(self, batch: Any) -> Any:
        """The structured backend's forward/backward cache for ``batch`` (kept for one batch
        while the parameters are unchanged)."""
        if self._structured is None:
            raise NotImplementedError(self._structured_reason)
        key = self._param_key() if is_single_batch(self.data) else None
        if key is not None and self._structured_cache and self._structured_cache[0] == key:
            return self._structured_cache[1]
        cache = self._structured.prepare(batch)
        if key is not None:
            self._structured_cache = (key, cache)
        return cache

    def _hvp_structured(self, batch: Any, V: Tensor) -> Tensor:
        cache = self._structured_prepared(batch)
        if V.shape[0] == 1:
            return self._structured.apply_one(cache, V[0]).unsqueeze(0)
        step = self._chunk(V.shape[0])
        if step >= V.shape[0]:
            return self._structured.apply(cache, V)
        return torch.cat(
            [self._structured.apply(cache, V[i : i + step]) for i in range(0, V.shape[0], step)]
        )

    def _run(self, choice: tuple[str, bool], batch: Any, V: Tensor) -> Tensor:
        name, reference = choice
        if name == "structured":
            return self._hvp_structured(batch, V)
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
        if self.backend == "auto" and self._structured is None:
            names = names[1:]
        if self.kind == "ggn":
            names = [n for n in names if n in ("func", "func_loop")] or ["func"]
        refs = (False, True) if _reference_mode_factory() is not None else (False,)
        # the structured rules run no stablecore op: reference mode cannot change them
        return [(n, r) for r in refs for n in names if not (r and n == "structured")]

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
        if self._chosen is not None and is_single_batch(self.data) and self.train is None:
            # one batch, backend known: no weighting, no mode switch (Lanczos calls this per step)
            self.num_matvecs += V.shape[0]
            out = self._run(self._chosen, self._device_data, V).detach()
            return out[0] if vectors.dim() == 1 else out
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

    def quadratic_forms(self, vectors: Tensor) -> Tensor:
        """``v^T H v`` for each row of ``vectors: [P, D]`` -> ``[P]`` float64 (Hutchinson needs no
        more). The structured MLP backend evaluates them forward only (:mod:`.taylor`, about half
        the work of ``H v``); every other backend takes ``sum(v * H v)``."""
        if not isinstance(vectors, Tensor) or vectors.dim() != 2 or vectors.shape[1] != self.dim:
            shape = tuple(vectors.shape) if isinstance(vectors, Tensor) else type(vectors).__name__
            raise ValueError(f"vectors must be [P, D] with D={self.dim}; got {shape}")
        V = vectors.to(device=self.device, dtype=self.dtype)
        if self._structured is not None and self._chosen in (None, ("structured", False)):
            try:
                total, weight = 0.0, 0
                with self._mode():
                    for batch in self.batches():
                        batch = _to_device(batch, self.device)
                        cache = self._structured_prepared(batch)
                        step, w = self._chunk(V.shape[0]), batch_size(batch)
                        q = torch.cat(
                            [
                                quadratic_forms(self._structured, cache, V[i : i + step])
                                for i in range(0, V.shape[0], step)
                            ]
                        )
                        total, weight = total + q * w, weight + w
                if weight == 0:
                    raise ValueError("data holds no batches")
                self._chosen, self.backend_used = ("structured", False), "structured"
                self.num_quadratic_forms += V.shape[0]
                return total / weight
            except NotImplementedError as exc:  # e.g. a later batch it cannot read
                self._structured, self._structured_reason = None, str(exc)
                self._chosen = None  # let matvec pick a generic backend
        out = (V * self.matvec(V)).sum(-1, dtype=torch.float64)
        self.num_quadratic_forms += V.shape[0]
        return out

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
