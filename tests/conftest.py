"""Test tiers: ``gpu`` tests skip without CUDA; ``interpret`` tests run only under
TRITON_INTERPRET=1 (CI runs them as a second pytest call); everything else always runs."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

from stablecore import _backends

# One profile for every hypothesis test: few, deadline-free examples (the interpreter is slow
# and CI has two cores); STABLECORE_HYPOTHESIS_PROFILE=thorough for a longer local hunt.
settings.register_profile(
    "ci",
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=False,
    print_blob=True,
)
settings.register_profile("thorough", max_examples=200, deadline=None)
settings.load_profile(os.environ.get("STABLECORE_HYPOTHESIS_PROFILE", "ci"))

INTERPRET = _backends.environment().triton_interpret


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_interp = pytest.mark.skip(
        reason="needs TRITON_INTERPRET=1 (run: TRITON_INTERPRET=1 pytest -m interpret)"
    )
    no_triton = pytest.mark.skip(reason="triton is not installed")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if "interpret" in item.keywords:
            if _backends.environment().triton_version is None:
                item.add_marker(no_triton)
            elif not INTERPRET:
                item.add_marker(skip_interp)


@pytest.fixture(autouse=True)
def _seed():
    from stablecore.testing import seed_all

    seed_all(0)
