"""log_stablemax forward + backward against eager and compiled references (same process).

GPU size: [8192, 128256] bf16 (a LLaMA-3 vocabulary). Floor: read x, write y forward; read dy
and x, write dx backward: 5 bytes moves of the element size per element.
"""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, SMOKE

from stablecore.ops import log_stablemax

SHAPES = [(64, 1000)] if SMOKE else [(8192, 32000), (8192, 128256)]
DTYPE = torch.float32 if DEVICE.type == "cpu" else torch.bfloat16


def reference(x: torch.Tensor) -> torch.Tensor:
    """log_stablemax as a user writes it in eager PyTorch (the peer)."""
    xf = x.float()
    return torch.log_softmax(torch.sign(xf) * torch.log1p(xf.abs()), dim=-1).to(x.dtype)


def _fwd_bwd(fn, x, grad):
    def step():
        x.grad = None
        fn(x).backward(grad)

    return step


IMPLS = {
    "stablecore": log_stablemax,
    "eager reference": reference,
    "torch.log_softmax (softmax, for scale)": lambda x: torch.log_softmax(x, -1),
}


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("impl", [*IMPLS, "torch.compile reference"])
def test_log_stablemax_fwd_bwd(measure, shape, impl):
    if impl == "torch.compile reference":
        if DEVICE.type != "cuda":
            pytest.skip("torch.compile peer is timed on CUDA only (CPU compile takes minutes)")
        fn = torch.compile(reference)
    else:
        fn = IMPLS[impl]
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    x = (torch.randn(shape, device=DEVICE, generator=gen) * 5).to(DTYPE).requires_grad_()
    grad = torch.randn(shape, device=DEVICE, generator=gen).to(DTYPE)
    step = _fwd_bwd(fn, x, grad)
    step()  # warm-up and compile outside the timing
    measure(
        step,
        case=f"log_stablemax fwd+bwd {shape} {DTYPE}",
        impl=impl,
        floor_bytes=5 * x.numel() * x.element_size(),
    )
