"""``import stablecore`` stays lean: no framework imports, no CUDA initialisation."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import sys, torch
import stablecore, stablecore.ops, stablecore.nn, stablecore.optim, stablecore.methods
import stablecore.testing, stablecore.kernels, stablecore.integrations, stablecore.info
x = stablecore.ops.stablemax(torch.randn(3, 4))
heavy = [m for m in ("transformers", "diffusers", "torch_geometric") if m in sys.modules]
print("HEAVY", heavy)
print("CUDA_INIT", torch.cuda.is_initialized())
"""


def test_import_is_lean():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True)
    assert "HEAVY []" in out.stdout, out.stdout + out.stderr
    assert "CUDA_INIT False" in out.stdout, out.stdout + out.stderr


def test_lazy_submodules():
    import stablecore

    assert stablecore.ops.stablemax is not None
    assert "ops" in dir(stablecore)
    try:
        stablecore.not_a_module  # noqa: B018
    except AttributeError as exc:
        assert "not_a_module" in str(exc)
    else:
        raise AssertionError("unknown attribute must raise AttributeError")
