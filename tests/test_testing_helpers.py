"""The shared test helpers must be able to fail."""

from __future__ import annotations

import pytest
import torch

from stablecore import _backends
from stablecore.ops import _dispatch, stablemax
from stablecore.testing import (
    assert_close,
    assert_error_within_factor,
    nan_poisoned,
    tolerance,
)


def test_assert_close_uses_the_dtype_row():
    x = torch.ones(4)
    assert_close(x + tolerance(torch.float32).atol / 10, x)
    with pytest.raises(AssertionError):
        assert_close(x + 1e-3, x)
    assert_close((x + 1e-3).half(), x)  # within the float16 row


def test_error_within_factor_fails_on_a_worse_kernel():
    oracle = torch.randn(100, dtype=torch.float64)
    torch_err = (oracle + 1e-4).float()
    assert_error_within_factor((oracle + 1.5e-4).float(), torch_err, oracle, floor=0.0)
    with pytest.raises(AssertionError, match="exceeds"):
        assert_error_within_factor((oracle + 3e-4).float(), torch_err, oracle, floor=0.0)
    with pytest.raises(AssertionError):
        nan = oracle.float().clone()
        nan[0] = float("nan")
        assert_error_within_factor(nan, torch_err, oracle)


def test_nan_poisoned():
    assert nan_poisoned(3, 2).isnan().all()


def test_force_reference_routes_everything_to_the_reference(monkeypatch):
    monkeypatch.setenv("STABLECORE_FORCE_REFERENCE", "1")
    try:
        _backends.refresh()
        assert _dispatch.plain_reference_requested()
        rows = _dispatch.backend_rows()
        assert {r["backend"] for r in rows} == {"reference"}
        assert torch.allclose(stablemax(torch.tensor([0.0, 1.0])).sum(), torch.tensor(1.0))
    finally:
        monkeypatch.delenv("STABLECORE_FORCE_REFERENCE")
        _backends.refresh()
    assert not _dispatch.plain_reference_requested()


def test_reference_mode_nests():
    with _dispatch.reference_mode():
        with _dispatch.reference_mode(False):
            assert not _dispatch.plain_reference_requested()
        assert _dispatch.plain_reference_requested()
    assert not _dispatch.plain_reference_requested()
