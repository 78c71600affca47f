"""Shared plumbing of the op layer: backend registration, fallbacks, the op table, reference mode.

Every op module uses the same three pieces:

* :func:`register_triton_kernel` registers a Triton launcher for the device types that
  :mod:`stablecore._backends` allows (``cuda``; ``cpu`` under ``TRITON_INTERPRET=1``). The
  launcher is wrapped so that an input it cannot serve (float64, say) goes to the reference with
  the reason logged once: an unsupported input is slower, never wrong.
* :func:`describe_op` records what ``python -m stablecore.info`` prints for the op.
* :func:`reference_mode` makes public functions bypass their custom op and run the plain-PyTorch
  reference, which torch.func can transform (custom ops have no forward-mode AD, so
  forward-over-reverse Hessian-vector products need this).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from stablecore import _backends

# A thread-local flag rather than a ContextVar: torch.compile can trace a plain attribute read.
_MODE = threading.local()


@contextlib.contextmanager
def reference_mode(enabled: bool = True) -> Iterator[None]:
    """Within this block, stablecore ops run their plain-PyTorch reference (differentiable by
    autograd and torch.func to any order). Example::

        with stablecore.ops.reference_mode():
            hvp = torch.func.jvp(torch.func.grad(loss_fn), (params,), (v,))[1]
    """
    previous = getattr(_MODE, "reference", False)
    _MODE.reference = enabled
    try:
        yield
    finally:
        _MODE.reference = previous


def plain_reference_requested() -> bool:
    """True inside :func:`reference_mode`, or when ``STABLECORE_FORCE_REFERENCE=1``."""
    return getattr(_MODE, "reference", False) or _backends.environment().force_reference


@dataclass(frozen=True)
class OpDescription:
    name: str
    triton_dtypes: tuple[torch.dtype, ...]
    note: str = ""


OP_TABLE: dict[str, OpDescription] = {}
#: (op name, device type) -> (backend name, what it serves), filled as kernels are registered.
REGISTERED: dict[tuple[str, str], tuple[str, str]] = {}


def describe_op(name: str, *, triton_dtypes: tuple[torch.dtype, ...] = (), note: str = "") -> None:
    OP_TABLE[name] = OpDescription(name, triton_dtypes, note)


def _dtype_names(dtypes) -> str:
    return "/".join(str(d).removeprefix("torch.") for d in dtypes)


def _serving(name: str, device_type: str) -> tuple[str, str]:
    registered = REGISTERED.get((name, device_type))
    if registered is None:
        if not OP_TABLE[name].triton_dtypes:
            return "reference", "no Triton kernel for this op"
        return "reference", str(_backends.triton_unavailable_reason(device_type))
    if _backends.environment().force_reference:
        return "reference", "STABLECORE_FORCE_REFERENCE=1"
    return registered


def backend_rows() -> list[dict[str, str]]:
    """One row per (op, device type): which backend serves it and why (for ``stablecore.info``)."""
    rows = []
    for name in OP_TABLE:
        for device_type in ("cpu", "cuda"):
            backend, why = _serving(name, device_type)
            rows.append({"op": name, "device": device_type, "backend": backend, "why": why})
    return rows


def _register(op, backend: str, device_types, launcher, reference, unsupported_reason, serves):
    name = op._qualname.removeprefix("stablecore::")
    for device_type in device_types:

        def kernel(*args, _device_type=device_type, **kwargs):
            reason = unsupported_reason(*args, **kwargs)
            if reason is None and backend == "triton":
                reason = _backends.triton_unavailable_reason(_device_type)
            if reason is None and _backends.environment().force_reference:
                reason = "STABLECORE_FORCE_REFERENCE=1"
            if reason is not None:
                _backends.log_fallback_once(name, reason)
                return reference(*args, **kwargs)
            return launcher(*args, **kwargs)

        op.register_kernel(device_type)(kernel)
        REGISTERED[(name, device_type)] = (backend, serves)


def register_triton_kernel(
    op,
    launcher: Callable,
    reference: Callable,
    unsupported_reason: Callable[..., str | None],
    dtypes: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32),
) -> None:
    """Register ``launcher`` as ``op``'s kernel on every device type Triton may serve.

    ``unsupported_reason(*args, **kwargs)`` returns why the launcher cannot serve these inputs
    (``None`` when it can); then ``reference`` runs instead and the reason is logged once.
    """
    serves = f"{_dtype_names(dtypes)}; other inputs use the reference"
    _register(
        op,
        "triton",
        _backends.triton_device_types(),
        launcher,
        reference,
        unsupported_reason,
        serves,
    )


def register_native_kernel(
    op,
    device_type: str,
    launcher: Callable,
    reference: Callable,
    unsupported_reason: Callable[..., str | None],
    serves: str,
) -> None:
    """Register a kernel of the compiled extension (``csrc/``) for ``device_type``, unless a
    Triton launcher already serves that device type (under the interpreter, tests want Triton)."""
    if not _backends.environment().compiled_extension:
        return
    if device_type in _backends.triton_device_types():
        return
    _register(op, "native (csrc)", (device_type,), launcher, reference, unsupported_reason, serves)


def check_floating(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(
            f"{name} must be a floating-point tensor (float16/bfloat16/float32/float64), "
            f"got dtype {t.dtype} with shape {tuple(t.shape)}"
        )


def check_same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items() if isinstance(t, torch.Tensor)}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")


def normalize_dim(dim: int, ndim: int, shape: tuple[int, ...]) -> int:
    """``dim`` in ``[-ndim, ndim)`` (a 0-d tensor counts as 1-d, as in ``torch.softmax``)."""
    rank = max(ndim, 1)
    if not -rank <= dim < rank:
        raise ValueError(f"dim {dim} is out of range for a tensor of shape {tuple(shape)}")
    return dim % rank
