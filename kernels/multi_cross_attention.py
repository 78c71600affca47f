"""Triton kernels for multi-stream cross-attention: out = sum_i w_i softmax(q k_i^T s) v_i.

The keys (and values) of all streams are concatenated along the key axis; ``stream_offsets``
[S + 1] says where each stream starts. One program owns a block of queries of one (batch, head):
it loads q once and runs one online softmax per stream (its own max and sum), so each stream is
normalised separately and the weighted sum is formed in registers: one pass over q, one write.

Forward saves the per-stream log-sum-exp [B, H, L, S] (+inf for a stream whose keys are all
masked, so that backward recomputes p = 0 for it). Backward recomputes p per stream, first to get
the stream's normalised output O_i (for Delta_i = rowsum(dO_i * O_i)), then for the gradients;
dK and dV are accumulated with atomics because query blocks of the same (batch, head) share keys
(cross-attention has few keys: 77 text tokens).

SpeedUpNet normalisation (HAS_NORM): streams marked in the constexpr SLOTS keep their raw output
Z_i in an fp32 buffer instead of adding w_i Z_i, the program adds w_i beta_i where the stream has
keys, and stores the block's sums of squares of Z_0 and each Z_i (the norms are global, so the
rescaling happens in :mod:`.multi_cross_attention_norm`'s epilogue). In backward each stream's
upstream gradient becomes m[s, b] * a[s, h, :] * dO + c[s, b] * O_s, with coefficients from
``stablecore.ops._mca_norm`` (O_s is recomputed in pass 1 anyway).

Masks: ``key_keep`` [B, S_total] int8, 1 = attend. Head dims that are not powers of two (40, 80,
160) are padded to the next power of two in registers and masked on load and store.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _mca_fwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    keep_ptr,
    offsets_ptr,
    weights_ptr,
    out_ptr,
    lse_ptr,
    z_ptr,
    part_ptr,
    shift_ptr,
    n_heads,
    q_len,
    head_dim,
    scale,
    stride_qb,
    stride_qh,
    stride_ql,
    stride_kb,
    stride_kh,
    stride_kl,
    stride_ob,
    stride_oh,
    stride_ol,
    stride_keep_b,
    kv_len_total,
    NUM_STREAMS: tl.constexpr,
    HAS_NORM: tl.constexpr,
    SLOTS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // n_heads
    h = bh % n_heads
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < q_len
    dim_ok = dims < head_dim
    q = tl.load(
        q_ptr + b * stride_qb + h * stride_qh + rows[:, None] * stride_ql + dims[None, :],
        mask=row_ok[:, None] & dim_ok[None, :],
        other=0.0,
    ).to(tl.float32)
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_kb + h * stride_kh
    out = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for s in tl.static_range(NUM_STREAMS):
        start = tl.load(offsets_ptr + s)
        end = tl.load(offsets_ptr + s + 1)
        weight = tl.load(weights_ptr + s)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for n0 in range(start, end, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            col_ok = cols < end
            keep = tl.load(keep_ptr + b * stride_keep_b + cols, mask=col_ok, other=0) != 0
            kv_mask = col_ok[:, None] & dim_ok[None, :]
            k = tl.load(k_base + cols[:, None] * stride_kl + dims[None, :], mask=kv_mask, other=0.0)
            v = tl.load(v_base + cols[:, None] * stride_kl + dims[None, :], mask=kv_mask, other=0.0)
            scores = tl.dot(q, tl.trans(k.to(tl.float32))) * scale
            scores = tl.where((col_ok & keep)[None, :], scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, axis=1))
            # A row that has seen only masked keys keeps m = -inf; shift by 0 instead of -inf
            # so that exp() gives 0 rather than NaN.
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(scores - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32))
            m_i = m_new
        has_keys = l_i > 0.0
        inv_l = tl.where(has_keys, 1.0 / tl.where(has_keys, l_i, 1.0), 0.0)
        z = acc * inv_l[:, None]
        lse = tl.where(has_keys, m_i + tl.log(tl.where(has_keys, l_i, 1.0)), float("inf"))
        tl.store(lse_ptr + (bh * q_len + rows) * NUM_STREAMS + s, lse, mask=row_ok)
        if HAS_NORM:
            # SLOTS holds (normalisation slot + 1) of stream s in bits 4s..4s+3 (0: plain).
            SLOT = ((SLOTS >> (4 * s)) & 15) - 1
            # Padding rows (past q_len) hold a uniform average of v: keep them out of the norms.
            z_sq = tl.sum(tl.sum(tl.where(row_ok[:, None], z * z, 0.0), axis=1), axis=0)
            n_blocks = tl.num_programs(0)
            n_bh = tl.num_programs(1)
            if s == 0:
                tl.store(part_ptr + bh * n_blocks + pid_m, z_sq)
            if SLOT >= 0:
                tl.store(part_ptr + ((SLOT + 1) * n_bh + bh) * n_blocks + pid_m, z_sq)
                z_off = ((SLOT * n_bh + bh) * q_len + rows[:, None]) * head_dim + dims[None, :]
                tl.store(z_ptr + z_off, z, mask=row_ok[:, None] & dim_ok[None, :])
                # w * beta per channel, only where the stream has keys (masked: exact zero).
                shift = tl.load(shift_ptr + (SLOT * n_heads + h) * head_dim + dims, mask=dim_ok)
                out += tl.where(has_keys[:, None], shift[None, :], 0.0)
            else:
                out += weight * z
        else:
            out += weight * z
    tl.store(
        out_ptr + b * stride_ob + h * stride_oh + rows[:, None] * stride_ol + dims[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=row_ok[:, None] & dim_ok[None, :],
    )


@triton.jit
def _mca_bwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    keep_ptr,
    offsets_ptr,
    weights_ptr,
    lse_ptr,
    dout_ptr,
    dq_ptr,
    dk_ptr,
    dv_ptr,
    coef_a_ptr,
    coef_mc_ptr,
    rowdot_ptr,
    n_heads,
    q_len,
    head_dim,
    scale,
    stride_qb,
    stride_qh,
    stride_ql,
    stride_kb,
    stride_kh,
    stride_kl,
    stride_keep_b,
    NUM_STREAMS: tl.constexpr,
    HAS_NORM: tl.constexpr,
    WEIGHT_GRAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # q, dout, dq share q's strides; k, v, dk, dv share k's (the launcher makes them so).
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // n_heads
    h = bh % n_heads
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < q_len
    dim_ok = dims < head_dim
    q_off = b * stride_qb + h * stride_qh + rows[:, None] * stride_ql + dims[None, :]
    q_mask = row_ok[:, None] & dim_ok[None, :]
    q = tl.load(q_ptr + q_off, mask=q_mask, other=0.0).to(tl.float32)
    do = tl.load(dout_ptr + q_off, mask=q_mask, other=0.0).to(tl.float32)
    kv_base = b * stride_kb + h * stride_kh
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for s in tl.static_range(NUM_STREAMS):
        start = tl.load(offsets_ptr + s)
        end = tl.load(offsets_ptr + s + 1)
        weight = tl.load(weights_ptr + s)
        lse = tl.load(
            lse_ptr + (bh * q_len + rows) * NUM_STREAMS + s, mask=row_ok, other=float("inf")
        )
        # Pass 1: the stream's normalised output, for Delta = rowsum(dO_s * O_s).
        o_s = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for n0 in range(start, end, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            col_ok = cols < end
            keep = tl.load(keep_ptr + b * stride_keep_b + cols, mask=col_ok, other=0) != 0
            kv_off = kv_base + cols[:, None] * stride_kl + dims[None, :]
            kv_mask = col_ok[:, None] & dim_ok[None, :]
            k = tl.load(k_ptr + kv_off, mask=kv_mask, other=0.0).to(tl.float32)
            v = tl.load(v_ptr + kv_off, mask=kv_mask, other=0.0).to(tl.float32)
            scores = tl.dot(q, tl.trans(k)) * scale
            p = tl.where((col_ok & keep)[None, :], tl.exp(scores - lse[:, None]), 0.0)
            o_s += tl.dot(p, v)
        if HAS_NORM:
            # Upstream gradient of stream s: m[s, b] * a[s, h, :] * dO + c[s, b] * O_s (the
            # SpeedUpNet norm's chain rule, coefficients from stablecore.ops._mca_norm).
            a_s = tl.load(coef_a_ptr + (s * n_heads + h) * head_dim + dims, mask=dim_ok, other=0.0)
            n_batch = tl.num_programs(1) // n_heads
            m_s = tl.load(coef_mc_ptr + (s * n_batch + b) * 2)
            c_s = tl.load(coef_mc_ptr + (s * n_batch + b) * 2 + 1)
            do_s = do * (a_s * m_s)[None, :] + c_s * o_s
        else:
            do_s = do * weight
        delta = tl.sum(do_s * o_s, axis=1)
        if WEIGHT_GRAD:
            rowdot = tl.sum(do * o_s, axis=1)
            tl.store(rowdot_ptr + (bh * q_len + rows) * NUM_STREAMS + s, rowdot, mask=row_ok)
        # Pass 2: gradients. dS = P * (dO_s V^T - Delta).
        for n0 in range(start, end, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            col_ok = cols < end
            keep = tl.load(keep_ptr + b * stride_keep_b + cols, mask=col_ok, other=0) != 0
            kv_off = kv_base + cols[:, None] * stride_kl + dims[None, :]
            kv_mask = col_ok[:, None] & dim_ok[None, :]
            k = tl.load(k_ptr + kv_off, mask=kv_mask, other=0.0).to(tl.float32)
            v = tl.load(v_ptr + kv_off, mask=kv_mask, other=0.0).to(tl.float32)
            scores = tl.dot(q, tl.trans(k)) * scale
            p = tl.where(
                (col_ok & keep)[None, :] & row_ok[:, None], tl.exp(scores - lse[:, None]), 0.0
            )
            dp = tl.dot(do_s, tl.trans(v))
            ds = p * (dp - delta[:, None]) * scale
            dq += tl.dot(ds, k)
            tl.atomic_add(dk_ptr + kv_off, tl.dot(tl.trans(ds), q), mask=kv_mask)
            tl.atomic_add(dv_ptr + kv_off, tl.dot(tl.trans(p), do_s), mask=kv_mask)
    tl.store(dq_ptr + q_off, dq.to(dq_ptr.dtype.element_ty), mask=q_mask)


def _blocks(head_dim: int) -> tuple[int, int, int]:
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_m = 64 if block_d <= 64 else 32
    return block_m, 32, block_d


def mca_fwd(q, k, v, keep, offsets, weights, out, lse, scale: float, norm=None):
    """q/out: [B, H, L, D]; k/v: [B, H, S_total, D] (same strides); keep: [B, S_total] int8;
    offsets: int32 [S + 1]; weights: float32 [S]; lse: float32 [B, H, L, S] (written).

    ``norm = (z, shift, slots)``: z fp32 [N, B, H, L, D] (written: raw normalised streams),
    shift fp32 [N, H, D] (``w_i * beta_i``), slots: per stream its slot or -1. Then ``out`` must
    be a contiguous fp32 accumulator (plain streams + shifts) and the per (slot, batch, head,
    query block) partial sums of squares are returned as fp32 [N+1, B, H * blocks]."""
    batch, heads, q_len, head_dim = q.shape
    block_m, block_n, block_d = _blocks(head_dim)
    grid = (triton.cdiv(q_len, block_m), batch * heads)
    part = None
    z = shift = lse
    slots = 0
    if norm is not None:
        z, shift, slot_list = norm
        slots = sum((slot + 1) << (4 * s) for s, slot in enumerate(slot_list))
        part = torch.empty(
            (z.shape[0] + 1, batch, heads * grid[0]), dtype=torch.float32, device=q.device
        )
    _mca_fwd_kernel[grid](
        q,
        k,
        v,
        keep,
        offsets,
        weights,
        out,
        lse,
        z,
        lse if part is None else part,
        shift,
        heads,
        q_len,
        head_dim,
        scale,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        keep.stride(0),
        k.shape[2],
        NUM_STREAMS=weights.numel(),
        HAS_NORM=norm is not None,
        SLOTS=slots,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
    )
    return part


def mca_bwd(
    q, k, v, keep, offsets, weights, lse, dout, dq, dk, dv, scale: float, coef=None, rowdot=None
):
    """Gradients of :func:`mca_fwd`; dk/dv must be zero-filled float32 (atomically accumulated);
    q, dout, dq share strides, as do k, v, dk, dv. ``coef = (a, mc)``: fp32 [S, H, D] and
    [S, B, 2] (m, c), the normalisation's upstream-gradient coefficients. ``rowdot``: fp32
    [B, H, L, S], written with rowsum(dO * O_s) (the weight gradient's per-row terms)."""
    batch, heads, q_len, head_dim = q.shape
    block_m, block_n, block_d = _blocks(head_dim)
    grid = (triton.cdiv(q_len, block_m), batch * heads)
    coef_a, coef_mc = coef if coef is not None else (weights, weights)
    _mca_bwd_kernel[grid](
        q,
        k,
        v,
        keep,
        offsets,
        weights,
        lse,
        dout,
        dq,
        dk,
        dv,
        coef_a,
        coef_mc,
        lse if rowdot is None else rowdot,
        heads,
        q_len,
        head_dim,
        scale,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        keep.stride(0),
        NUM_STREAMS=weights.numel(),
        HAS_NORM=coef is not None,
        WEIGHT_GRAD=rowdot is not None,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
    )
