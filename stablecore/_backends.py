"""The one place that reads the environment and decides which backend serves an op.

Every other module asks this one instead of reading ``os.environ`` or probing for Triton:

* ``TRITON_INTERPRET=1``: Triton kernels run on CPU tensors (through the interpreter). This is how
  CI checks kernel logic without a GPU. It must be set before ``stablecore`` is imported, because
  ``triton.jit`` reads it when a kernel is defined.
* ``STABLECORE_FORCE_REFERENCE=1``: every op runs its pure-PyTorch reference, on every device.
  Useful to bisect a suspected kernel bug.
* The compiled extension ``stablecore._C`` (built from ``csrc/`` with ``STABLECORE_BUILD_EXT=1``).

Nothing here initialises CUDA: ``torch.cuda.is_available()`` only asks the driver how many
devices there are, and it is called lazily (by ``stablecore.info``, never at import).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import os
from dataclasses import dataclass

logger = logging.getLogger("stablecore")

_TRUE = {"1", "true", "yes", "on"}


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in _TRUE


@dataclass(frozen=True)
class Environment:
    """What this process can run, read once (call :func:`refresh` after changing variables)."""

    triton_version: str | None
    triton_interpret: bool
    force_reference: bool
    compiled_extension: bool
    compiled_extension_error: str | None


_ENVIRONMENT: Environment | None = None


def environment() -> Environment:
    """The cached :class:`Environment` (a plain global, so torch.compile can trace the read)."""
    global _ENVIRONMENT
    if _ENVIRONMENT is None:
        _ENVIRONMENT = _read_environment()
    return _ENVIRONMENT


def _read_environment() -> Environment:
    triton_version = None
    if importlib.util.find_spec("triton") is not None:
        try:
            import triton

            triton_version = triton.__version__
        except Exception as exc:  # a broken triton install must not break `import stablecore`
            logger.warning("triton is installed but fails to import (%s); using references", exc)
    ext_ok, ext_err = False, None
    if importlib.util.find_spec("stablecore._C") is not None:
        try:
            importlib.import_module("stablecore._C")
            ext_ok = True
        except Exception as exc:
            ext_err = f"{type(exc).__name__}: {exc}"
    else:
        ext_err = "not built (STABLECORE_BUILD_EXT=1 pip install --no-build-isolation -e .)"
    return Environment(
        triton_version=triton_version,
        triton_interpret=_flag("TRITON_INTERPRET"),
        force_reference=_flag("STABLECORE_FORCE_REFERENCE"),
        compiled_extension=ext_ok,
        compiled_extension_error=ext_err,
    )


def refresh() -> Environment:
    """Forget the cached environment (tests that flip ``STABLECORE_FORCE_REFERENCE`` use it)."""
    global _ENVIRONMENT
    _ENVIRONMENT = None
    return environment()


def triton_device_types() -> tuple[str, ...]:
    """Device types for which Triton launchers are registered at import time."""
    env = environment()
    if env.triton_version is None:
        return ()
    return ("cpu",) if env.triton_interpret else ("cuda",)


def triton_unavailable_reason(device_type: str) -> str | None:
    """Why Triton cannot serve ``device_type`` in this process, or ``None`` when it can."""
    env = environment()
    if env.force_reference:
        return "STABLECORE_FORCE_REFERENCE=1"
    if env.triton_version is None:
        return "triton is not installed"
    if device_type == "cpu" and not env.triton_interpret:
        return "Triton runs on CPU only under TRITON_INTERPRET=1"
    if device_type == "cuda" and env.triton_interpret:
        return "TRITON_INTERPRET=1 routes Triton to CPU tensors"
    if device_type not in ("cpu", "cuda"):
        return f"no Triton backend for device type {device_type!r}"
    return None


@functools.cache
def _warn_once(op: str, reason: str) -> None:
    logger.warning("stablecore::%s falls back to the PyTorch reference: %s", op, reason)


def log_fallback_once(op: str, reason: str) -> None:
    """Log (once per op and reason) that an input is served by the reference, and why."""
    _warn_once(op, reason)


def cuda_devices() -> list[str]:
    """Names of visible CUDA devices; asks the driver, never creates a CUDA context."""
    import torch

    if not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
