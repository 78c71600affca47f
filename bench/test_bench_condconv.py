"""ME-CondConv forward against a single conv2d of the same shape (the limit) and eager peers.

GPU size (ANCHORS.md): B = 8, C = O = 320, 64x64, 3x3, 4 experts. Peers in the same process:
a single ``conv2d`` (limit, ANCHORS 0.157 ms), eager mix + grouped conv (2.22x), eager loop of
4 convolutions + weighted sum (5.33x). ``stablecore`` is :func:`stablecore.nn.condconv.condconv2d`
(weight mixing + one grouped conv; no fused Triton kernel yet).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, SMOKE

from stablecore.nn.condconv import condconv2d, condconv2d_reference

B, C, HW, E = (2, 16, 16, 4) if SMOKE else (8, 320, 64, 4)
DTYPE = torch.float32 if DEVICE.type == "cpu" else torch.float16


def _tensors():
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(B, C, HW, HW, device=DEVICE, generator=gen).to(DTYPE)
    w = (torch.randn(E, C, C, 3, 3, device=DEVICE, generator=gen) / (9 * C) ** 0.5).to(DTYPE)
    bias = torch.randn(E, C, device=DEVICE, generator=gen).to(DTYPE)
    alpha = torch.rand(B, E, device=DEVICE, generator=gen).to(DTYPE)
    return x, w, bias, alpha


def _eager_grouped(x, w, bias, alpha):
    mixed = torch.einsum("be,eoikl->boikl", alpha, w).reshape(B * C, C, 3, 3)
    y = F.conv2d(x.reshape(1, B * C, HW, HW), mixed, (alpha @ bias).reshape(-1), 1, 1, 1, B)
    return y.reshape(B, C, HW, HW)


IMPLS = {
    "stablecore": lambda x, w, b, a: condconv2d(x, w, b, a, 1, 1),
    "eager mix + grouped conv": _eager_grouped,
    "eager loop of convs": lambda x, w, b, a: condconv2d_reference(x, w, b, a, 1, 1),
    "single conv2d (limit)": lambda x, w, b, a: F.conv2d(x, w[0], b[0], 1, 1),
}


@pytest.mark.parametrize("impl", list(IMPLS))
@torch.no_grad()
def test_condconv_forward(measure, impl):
    x, w, bias, alpha = _tensors()
    fn = IMPLS[impl]
    fn(x, w, bias, alpha)
    measure(
        lambda: fn(x, w, bias, alpha),
        case=f"CondConv fwd B{B} C{C} {HW}x{HW} 3x3 E{E} {DTYPE}",
        impl=impl,
    )
