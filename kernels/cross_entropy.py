"""Triton kernel: fused softmax cross-entropy (loss and logit gradient in one launch).

The softmax twin of :mod:`stablecore.kernels.stablemax_cross_entropy`, used by the fused
linear + cross-entropy op so that users can compare StableMax against the softmax they know
with the same chunking and the same arithmetic.

Numerics: an online max over the off-target logits with Q = sum_{k != y} exp(x_k - m) kept
separately, so 1 - p_y = Q / S is free of cancellation (the naive p_y - 1 is exactly 0 once
the row collapses, which is the Softmax Collapse the paper measures; this kernel still returns
the tiny true value). Loss: -log1p(-Q / S) while Q / S < 1/2, else log S + m - x_y. Label
smoothing follows torch: (1 - eps) nll + eps (logsumexp - mean_j x_j).

One program per row, int64 offsets; block sizes come from
:func:`stablecore.kernels.stablemax_cross_entropy.launch_config` (rows up to its
``MAX_SINGLE_BLOCK`` are read once, longer rows twice). The gradient may be written over the logits.
"""

from __future__ import annotations

import triton
import triton.language as tl
from stablecore.kernels.stablemax_cross_entropy import _log1p, launch_config

LOG2E = 1.4426950408889634


@triton.jit
def _softmax_row_loss(m, q_sum, xy, x_sum, n_cols, smoothing, HAS_SMOOTHING: tl.constexpr):
    # m: max over off-target logits (-inf when there are none); q_sum is relative to m.
    big = tl.where(m == float("-inf"), xy, tl.maximum(m, xy))
    m_safe = tl.where(m == float("-inf"), big, m)
    q_rel = tl.where(q_sum == 0.0, 0.0, q_sum * tl.exp(m_safe - big))
    total = q_rel + tl.exp(xy - big)
    q = q_rel / total
    lse = big + tl.log(total)
    nll = tl.where(q < 0.5, -_log1p(-tl.minimum(q, 0.5)), lse - xy)
    if HAS_SMOOTHING:
        nll = (1.0 - smoothing) * nll + smoothing * (lse - x_sum / n_cols)
    return nll, big, total, q


@triton.jit
def _softmax_row_grad(
    x, offs, y, big, inv_total, q, smoothing, n_cols, scale, HAS_SMOOTHING: tl.constexpr
):
    p = tl.exp(x - big) * inv_total
    dy = -q
    if HAS_SMOOTHING:
        p = p - smoothing / n_cols
        dy = dy + smoothing - smoothing / n_cols
    return tl.where(offs == y, dy, p) * scale


@triton.jit
def _softmax_ce_fwd_kernel(
    x_ptr,
    target_ptr,
    loss_ptr,
    grad_ptr,
    scale_ptr,
    n_cols,
    x_row_stride,
    grad_row_stride,
    ignore_index,
    smoothing,
    HAS_SMOOTHING: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
    SINGLE_BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_row_stride
    grad_row = grad_ptr + row * grad_row_stride
    y = tl.load(target_ptr + row).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    if y == ignore_index:
        tl.store(loss_ptr + row, 0.0)
        if COMPUTE_GRAD:
            for start in range(0, n_cols, BLOCK):
                offs = start + cols
                zero = tl.zeros([BLOCK], tl.float32)
                tl.store(grad_row + offs, zero.to(grad_ptr.dtype.element_ty), mask=offs < n_cols)
    else:
        valid = (y >= 0) & (y < n_cols)
        y_safe = tl.where(valid, y, 0)
        xy = tl.load(x_row + y_safe).to(tl.float32)
        xy = tl.where(valid, xy, float("nan"))
        scale = tl.load(scale_ptr).to(tl.float32)
        if SINGLE_BLOCK:
            mask = cols < n_cols
            x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
            off_target = mask & (cols != y)
            m = tl.max(tl.where(off_target, x, float("-inf")), axis=0)
            m_safe = tl.where(m == float("-inf"), 0.0, m)
            q_sum = tl.sum(tl.where(off_target, tl.exp(x - m_safe), 0.0), axis=0)
            x_sum = 0.0
            if HAS_SMOOTHING:
                x_sum = tl.sum(tl.where(mask, x, 0.0), axis=0)
            loss, big, total, q = _softmax_row_loss(
                m, q_sum, xy, x_sum, n_cols, smoothing, HAS_SMOOTHING
            )
            tl.store(loss_ptr + row, loss)
            if COMPUTE_GRAD:
                d = _softmax_row_grad(
                    x, cols, y, big, 1.0 / total, q, smoothing, n_cols, scale, HAS_SMOOTHING
                )
                tl.store(grad_row + cols, d.to(grad_ptr.dtype.element_ty), mask=mask)
        else:
            m = tl.max(tl.full([BLOCK], float("-inf"), tl.float32), axis=0)
            acc = tl.zeros([BLOCK], tl.float32)
            acc_x = tl.zeros([BLOCK], tl.float32)
            for start in range(0, n_cols, BLOCK):
                offs = start + cols
                mask = offs < n_cols
                x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
                off_target = mask & (offs != y)
                new_m = tl.maximum(m, tl.max(tl.where(off_target, x, float("-inf")), axis=0))
                new_safe = tl.where(new_m == float("-inf"), 0.0, new_m)
                # Rescale the running sum only when the max moved (exp(-inf - -inf) is NaN).
                alpha = tl.where(m == new_m, 1.0, tl.exp(m - new_safe))
                acc = acc * alpha + tl.where(off_target, tl.exp(x - new_safe), 0.0)
                m = new_m
                if HAS_SMOOTHING:
                    acc_x += tl.where(mask, x, 0.0)
            loss, big, total, q = _softmax_row_loss(
                m,
                tl.sum(acc, axis=0),
                xy,
                tl.sum(acc_x, axis=0),
                n_cols,
                smoothing,
                HAS_SMOOTHING,
            )
            tl.store(loss_ptr + row, loss)
            if COMPUTE_GRAD:
                inv_total = 1.0 / total
                for start in range(0, n_cols, BLOCK):
                    offs = start + cols
                    mask = offs < n_cols
                    x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
                    d = _softmax_row_grad(
                        x, offs, y, big, inv_total, q, smoothing, n_cols, scale, HAS_SMOOTHING
                    )
                    tl.store(grad_row + offs, d.to(grad_ptr.dtype.element_ty), mask=mask)


def softmax_ce_fwd(
    x2d,
    target,
    loss,
    grad2d,
    scale,
    ignore_index: int,
    smoothing: float,
    compute_grad: bool,
    max_single: int | None = None,
    stream: int | None = None,
) -> None:
    """Same contract as :func:`stablecore.kernels.stablemax_cross_entropy.stablemax_ce_fwd`."""
    rows, n_cols = x2d.shape
    block, single, num_warps = launch_config(n_cols, max_single, stream)
    g = grad2d if compute_grad else x2d
    _softmax_ce_fwd_kernel[(rows,)](
        x2d,
        target,
        loss,
        g,
        scale,
        n_cols,
        x2d.stride(0),
        g.stride(0),
        ignore_index,
        float(smoothing),
        HAS_SMOOTHING=smoothing != 0.0,
        COMPUTE_GRAD=compute_grad,
        BLOCK=block,
        SINGLE_BLOCK=single,
        num_warps=num_warps,
    )
