"""Triton kernel: group-wise 4-bit fake quantization (quantize, then dequantize) in one pass.

The tensor is read as one flat row-major sequence cut into groups of ``group_size`` contiguous
elements (the last group may be shorter). One program handles ``ROWS`` groups as a
``[ROWS, BLOCK]`` tile held in registers, so every element is loaded once and stored once:

1. the ``K`` largest ``|x|`` of each group are marked as outliers (the lowest index wins a tie,
   exactly as ``torch.argmax`` picks the first maximum) and are written back unchanged;
2. the group statistics (absmax, or min and max) are taken over the remaining elements;
3. each remaining element is rounded to the format's grid and dequantized.

Formats (``FMT``; see :mod:`stablecore.ops.fake_quant` for their definitions):
0 INT4 asymmetric (16 levels, min/max with zero-point), 1 INT4 symmetric (15 levels, absmax/7),
2 the paper's "FP4" (9 levels, absmax/4), 3 E2M1 (15 levels, absmax/6).

Numerics: loads upcast to float32 right away, every division is ``div_rn`` (Triton's default
fp32 ``/`` is approximate on NVIDIA GPUs, which would move ties), and no multiply feeds an add
that a compiler could contract into an FMA before a rounding decision, so the kernel matches the
reference bit for bit. Round-half-to-even is built from ``floor`` (no libdevice: the interpreter
and every Triton version support it). Offsets are int64.
"""

from __future__ import annotations

import triton
import triton.language as tl

#: Largest group the kernel holds in registers; bigger groups use the reference.
MAX_GROUP = 8192
#: Largest number of outliers per group the kernel selects (one max-reduction each).
MAX_OUTLIERS = 16
#: Elements per program (ROWS * BLOCK), so small groups still give each program enough work.
TILE = 4096

FORMAT_CODES = {"int4_asym": 0, "int4_sym": 1, "fp4_paper": 2, "e2m1": 3}


@triton.jit
def _round_half_even(v):
    # v - floor(v) is exact in float32, so the tie test is exact too.
    f = tl.floor(v)
    d = v - f
    half = f * 0.5
    odd = tl.floor(half) != half
    up = (d > 0.5) | ((d == 0.5) & odd)
    return tl.where(up, f + 1.0, f)


@triton.jit
def _fake_quant_kernel(
    x_ptr,
    out_ptr,
    n_elements,
    n_groups,
    group_size,
    FMT: tl.constexpr,
    K: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    groups = pid * ROWS + tl.arange(0, ROWS).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    offs = groups[:, None] * group_size + cols[None, :]
    mask = (groups[:, None] < n_groups) & (cols[None, :] < group_size) & (offs < n_elements)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    ax = tl.abs(x)

    # Outliers: K rounds of "largest |x| not yet taken, lowest index on a tie". Masked lanes
    # score -1 so they are only ever taken after every real element of a short group.
    is_outlier = cols[None, :] < 0
    score = tl.where(mask, ax, -1.0)
    for _ in tl.static_range(K):
        best = tl.max(score, axis=1)
        first = tl.min(tl.where(score == best[:, None], cols[None, :], BLOCK), axis=1)
        taken = cols[None, :] == first[:, None]
        is_outlier = is_outlier | taken
        score = tl.where(taken, float("-inf"), score)
    rest = mask & (~is_outlier)

    if FMT == 0:
        # INT4 asymmetric: scale = (max - min) / 15, zero-point = -round(min / scale) in [0, 15].
        hi = tl.max(tl.where(rest, x, float("-inf")), axis=1)
        lo = tl.min(tl.where(rest, x, float("inf")), axis=1)
        any_rest = tl.sum(rest.to(tl.int32), axis=1) > 0
        hi = tl.where(any_rest, hi, 0.0)
        lo = tl.where(any_rest, lo, 0.0)
        scale = tl.math.div_rn(tl.maximum(hi - lo, 1e-5), 15.0)
        zero = -_round_half_even(tl.math.div_rn(lo, scale))
        zero = tl.minimum(tl.maximum(zero, 0.0), 15.0)
        q = _round_half_even(tl.math.div_rn(x, scale[:, None])) + zero[:, None]
        q = tl.minimum(tl.maximum(q, 0.0), 15.0)
        deq = (q - zero[:, None]) * scale[:, None]
    else:
        absmax = tl.max(tl.where(rest, ax, 0.0), axis=1)
        if FMT == 1:
            step = tl.math.div_rn(tl.maximum(absmax, 1e-6), 7.0)
            q = _round_half_even(tl.math.div_rn(x, step[:, None]))
            q = tl.minimum(tl.maximum(q, -8.0), 7.0)
            deq = q * step[:, None]
        elif FMT == 2:
            step = tl.maximum(absmax, 1e-6) * 0.25
            q = _round_half_even(tl.math.div_rn(x, step[:, None]))
            q = tl.minimum(tl.maximum(q, -4.0), 4.0)
            deq = q * step[:, None]
        else:
            scale = tl.math.div_rn(tl.maximum(absmax, 1e-30), 6.0)
            y = tl.minimum(tl.math.div_rn(ax, scale[:, None]), 6.0)
            # E2M1 magnitudes 0, .5, 1, 1.5 | 2, 3 | 4, 6: the spacing is 1/2, 1, 2 per binade;
            # half-even on the scaled value is half-even on the mantissa bit.
            mag = tl.where(
                y < 2.0,
                _round_half_even(y * 2.0) * 0.5,
                tl.where(y < 4.0, _round_half_even(y), _round_half_even(y * 0.5) * 2.0),
            )
            deq = tl.where(x < 0.0, -mag, mag) * scale[:, None]

    out = tl.where(is_outlier, x, deq)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def launch_config(group_size: int) -> tuple[int, int, int]:
    """(BLOCK, ROWS, num_warps) for a group size."""
    block = triton.next_power_of_2(max(group_size, 1))
    rows = max(1, TILE // block)
    num_warps = 4 if rows * block <= 4096 else 8
    return block, rows, num_warps


def fake_quant(x_flat, out_flat, fmt: str, group_size: int, keep_outliers: int) -> None:
    """x_flat, out_flat: contiguous 1-D tensors of one length (out_flat is written)."""
    n = x_flat.numel()
    n_groups = triton.cdiv(n, group_size)
    block, rows, num_warps = launch_config(group_size)
    grid = (triton.cdiv(n_groups, rows),)
    _fake_quant_kernel[grid](
        x_flat,
        out_flat,
        n,
        n_groups,
        group_size,
        FMT=FORMAT_CODES[fmt],
        K=keep_outliers,
        ROWS=rows,
        BLOCK=block,
        num_warps=num_warps,
    )
