"""Triton kernels for StableMax and log-StableMax over the last dimension of a [rows, cols] view.

StableMax replaces exp by s(x) = x + 1 (x >= 0), 1 / (1 - x) (x < 0). Since s(x) <= 1 + |x| no
max-subtraction is needed to avoid overflow, but a row sum of huge values can still pass the
float32 range, so the sum is accumulated relative to a running maximum (one reciprocal per block,
not per element). log s(x) = g(x) = sign(x) * log1p|x| keeps log-StableMax accurate where
log(s(x)) would round s(x) first.

One program handles one row. Rows that fit in one block are loaded once; longer rows are
streamed in blocks (twice forward: sum, then write; twice backward: dot, then write).
Loads upcast to float32 right away (the interpreter is exact in fp32, and bf16 arithmetic on
GPUs is both slow and inexact); offsets are int64 because rows x cols can pass 2^31.
"""

from __future__ import annotations

import triton
import triton.language as tl

#: Rows up to this length are held in registers in one block; longer rows are streamed.
MAX_SINGLE_BLOCK = 8192
#: Block width when streaming a long row.
STREAM_BLOCK = 4096


@triton.jit
def _log1p(a):
    # log1p without libdevice (not portable across Triton versions and the interpreter):
    # u = 1 + a rounds, and log(u) * a / (u - 1) corrects that rounding (Goldberg's trick).
    u = 1.0 + a
    d = u - 1.0
    safe_d = tl.where(d == 0.0, 1.0, d)
    return tl.where(d == 0.0, a, tl.log(u) * (a / safe_d))


@triton.jit
def _s(x):
    # 1 / (1 + |x|) equals 1 / (1 - x) where it is selected, never divides by zero, and keeps NaN.
    return tl.where(x >= 0.0, x + 1.0, 1.0 / (1.0 + tl.abs(x)))


@triton.jit
def _g(x):
    lg = _log1p(tl.abs(x))
    return tl.where(x >= 0.0, lg, -lg)


@triton.jit
def _stablemax_fwd_kernel(
    x_ptr,
    out_ptr,
    log_norm_ptr,
    n_cols,
    x_row_stride,
    out_row_stride,
    LOG: tl.constexpr,
    BLOCK: tl.constexpr,
    SINGLE_BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_row_stride
    out_row = out_ptr + row * out_row_stride
    cols = tl.arange(0, BLOCK)
    if SINGLE_BLOCK:
        mask = cols < n_cols
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        s = tl.where(mask, _s(x), 0.0)
        row_max = tl.max(s, axis=0)
        total = tl.sum(s * (1.0 / row_max), axis=0)
        log_norm = tl.log(row_max) + tl.log(total)
        if LOG:
            out = _g(x) - log_norm
        else:
            out = s / row_max / total
        tl.store(out_row + cols, out.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        # Online sum relative to the running max: acc * row_max == sum of s seen so far.
        row_max = tl.max(tl.zeros([BLOCK], tl.float32), axis=0)
        acc = tl.zeros([BLOCK], tl.float32)
        for start in range(0, n_cols, BLOCK):
            offs = start + cols
            mask = offs < n_cols
            x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
            s = tl.where(mask, _s(x), 0.0)
            new_max = tl.maximum(row_max, tl.max(s, axis=0))
            acc = acc * (row_max / new_max) + s * (1.0 / new_max)
            row_max = new_max
        total = tl.sum(acc, axis=0)
        log_norm = tl.log(row_max) + tl.log(total)
        for start in range(0, n_cols, BLOCK):
            offs = start + cols
            mask = offs < n_cols
            x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
            if LOG:
                out = _g(x) - log_norm
            else:
                out = _s(x) / row_max / total
            tl.store(out_row + offs, out.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(log_norm_ptr + row, log_norm)


@triton.jit
def _stablemax_bwd_kernel(
    grad_ptr,
    x_ptr,
    log_norm_ptr,
    grad_x_ptr,
    n_cols,
    grad_row_stride,
    x_row_stride,
    grad_x_row_stride,
    LOG: tl.constexpr,
    BLOCK: tl.constexpr,
    SINGLE_BLOCK: tl.constexpr,
):
    # With p = stablemax(x) and z = g(x):  d/dz of log p is  gy - p * sum(gy),
    # d/dz of p is  p * (gp - sum(gp * p)),  and dz/dx = g'(x) = 1 / (1 + |x|).
    # p is recomputed from x and the saved log-normaliser instead of being read from memory.
    row = tl.program_id(0).to(tl.int64)
    grad_row = grad_ptr + row * grad_row_stride
    x_row = x_ptr + row * x_row_stride
    gx_row = grad_x_ptr + row * grad_x_row_stride
    log_norm = tl.load(log_norm_ptr + row)
    cols = tl.arange(0, BLOCK)
    if SINGLE_BLOCK:
        mask = cols < n_cols
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        gy = tl.load(grad_row + cols, mask=mask, other=0.0).to(tl.float32)
        p = tl.where(mask, tl.exp(_g(x) - log_norm), 0.0)
        if LOG:
            gz = gy - p * tl.sum(gy, axis=0)
        else:
            gz = p * (gy - tl.sum(gy * p, axis=0))
        gx = gz / (1.0 + tl.abs(x))
        tl.store(gx_row + cols, gx.to(grad_x_ptr.dtype.element_ty), mask=mask)
    else:
        dot = tl.zeros([BLOCK], tl.float32)
        for start in range(0, n_cols, BLOCK):
            offs = start + cols
            mask = offs < n_cols
            gy = tl.load(grad_row + offs, mask=mask, other=0.0).to(tl.float32)
            if LOG:
                dot += gy
            else:
                x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
                dot += tl.where(mask, gy * tl.exp(_g(x) - log_norm), 0.0)
        total = tl.sum(dot, axis=0)
        for start in range(0, n_cols, BLOCK):
            offs = start + cols
            mask = offs < n_cols
            x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
            gy = tl.load(grad_row + offs, mask=mask, other=0.0).to(tl.float32)
            p = tl.exp(_g(x) - log_norm)
            if LOG:
                gz = gy - p * total
            else:
                gz = p * (gy - total)
            gx = gz / (1.0 + tl.abs(x))
            tl.store(gx_row + offs, gx.to(grad_x_ptr.dtype.element_ty), mask=mask)


def _launch_config(n_cols: int) -> tuple[int, bool, int]:
    if n_cols <= MAX_SINGLE_BLOCK:
        block = triton.next_power_of_2(max(n_cols, 1))
        single = True
    else:
        block, single = STREAM_BLOCK, False
    num_warps = 4 if block <= 2048 else (8 if block <= 8192 else 16)
    return block, single, num_warps


def stablemax_fwd(x2d, out2d, log_norm, log: bool) -> None:
    """x2d, out2d: [rows, cols] with unit column stride; log_norm: [rows] float32 (written)."""
    rows, n_cols = x2d.shape
    block, single, num_warps = _launch_config(n_cols)
    _stablemax_fwd_kernel[(rows,)](
        x2d,
        out2d,
        log_norm,
        n_cols,
        x2d.stride(0),
        out2d.stride(0),
        LOG=log,
        BLOCK=block,
        SINGLE_BLOCK=single,
        num_warps=num_warps,
    )


def stablemax_bwd(grad2d, x2d, log_norm, grad_x2d, log: bool) -> None:
    """grad2d, x2d, grad_x2d: [rows, cols] with unit column stride; log_norm: [rows] float32."""
    rows, n_cols = x2d.shape
    block, single, num_warps = _launch_config(n_cols)
    _stablemax_bwd_kernel[(rows,)](
        grad2d,
        x2d,
        log_norm,
        grad_x2d,
        n_cols,
        grad2d.stride(0),
        x2d.stride(0),
        grad_x2d.stride(0),
        LOG=log,
        BLOCK=block,
        SINGLE_BLOCK=single,
        num_warps=num_warps,
    )
