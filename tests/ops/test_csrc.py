"""The native CPU kernels of csrc/ against the reference (runs where the extension is built;
CI builds it: see .ci/run)."""

from __future__ import annotations

import importlib

import pytest
import torch

from stablecore import _backends
from stablecore.ops import log_stablemax, reference_mode, stablemax
from stablecore.ops._dispatch import backend_rows
from stablecore.testing import assert_close

pytestmark = pytest.mark.skipif(
    not _backends.environment().compiled_extension,
    reason=f"compiled extension: {_backends.environment().compiled_extension_error}",
)
stablemax_module = importlib.import_module("stablecore.ops.stablemax")


def test_info_reports_native_backend():
    rows = [r for r in backend_rows() if r["op"] == "log_stablemax" and r["device"] == "cpu"]
    expected = "triton" if _backends.environment().triton_interpret else "native (csrc)"
    assert rows[0]["backend"] == expected


@pytest.mark.parametrize("fn", [stablemax, log_stablemax])
@pytest.mark.parametrize("shape, dim", [((5, 1), -1), ((3, 7, 300), 1), ((2, 40000), -1)])
def test_native_matches_reference(fn, shape, dim):
    x = (torch.randn(shape) * 20).requires_grad_()
    out = fn(x, dim=dim)
    grad = torch.randn_like(out)
    out.backward(grad)
    x64 = x.detach().double().requires_grad_()
    with reference_mode():
        ref = fn(x64, dim=dim)
    ref.backward(grad.double())
    assert_close(out, ref, dtype=torch.float32)
    assert_close(x.grad, x64.grad, dtype=torch.float32)


def test_native_op_checks_inputs():
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.stablecore_C.stablemax_fwd(torch.randn(2, 3, dtype=torch.float64), True)
    torch.library.opcheck(stablemax_module._log_stablemax_op, (torch.randn(4, 9), -1))
