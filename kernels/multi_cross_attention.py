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

Masks: ``key_keep`` [B, S_total] int8, 1 = attend. Head dims that are not powers of two (40, 80,
160) are padded to the next power of two in registers and masked on load and store.
"""

from __future__ import annotations

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
        out += weight * acc * inv_l[:, None]
        lse = tl.where(has_keys, m_i + tl.log(tl.where(has_keys, l_i, 1.0)), float("inf"))
        tl.store(lse_ptr + (bh * q_len + rows) * NUM_STREAMS + s, lse, mask=row_ok)
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
        do_s = do * weight
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
        delta = tl.sum(do_s * o_s, axis=1)
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


def mca_fwd(q, k, v, keep, offsets, weights, out, lse, scale: float) -> None:
    """q/out: [B, H, L, D]; k/v: [B, H, S_total, D] (same strides); keep: [B, S_total] int8;
    offsets: int32 [S + 1]; weights: float32 [S]; lse: float32 [B, H, L, S] (written)."""
    batch, heads, q_len, head_dim = q.shape
    block_m, block_n, block_d = _blocks(head_dim)
    grid = (triton.cdiv(q_len, block_m), batch * heads)
    _mca_fwd_kernel[grid](
        q,
        k,
        v,
        keep,
        offsets,
        weights,
        out,
        lse,
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
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
    )


def mca_bwd(q, k, v, keep, offsets, weights, lse, dout, dq, dk, dv, scale: float) -> None:
    """Gradients of :func:`mca_fwd`; dk/dv must be zero-filled float32 (atomically accumulated);
    q, dout, dq share strides, as do k, v, dk, dv."""
    batch, heads, q_len, head_dim = q.shape
    block_m, block_n, block_d = _blocks(head_dim)
    grid = (triton.cdiv(q_len, block_m), batch * heads)
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
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
    )
