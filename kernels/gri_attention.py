"""Triton kernels for GRI-style attention: window-local keys plus global keys, one softmax.

Tokens are in raster order of a ``[grid_h, grid_w]`` grid, cut into ``window x window`` windows.
One program owns a block of ``BLOCK_M`` queries of one window of one (batch, head): it gathers
the window's queries, runs one online softmax over the window's keys (gathered by index) and
then over the G global keys (contiguous), and writes the output and log-sum-exp.

Backward recomputes P from the saved log-sum-exp; ``delta = rowsum(dO * O)`` comes in
precomputed. dK/dV of window keys and of global keys are accumulated with float32 atomics
(query blocks of a window share its keys; every query shares the global keys).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _window_tokens(win, idx, grid_h, grid_w, n_win_w, WINDOW: tl.constexpr):
    """Token index and validity of local position ``idx`` of window ``win``."""
    r = (win // n_win_w) * WINDOW + idx // WINDOW
    c = (win % n_win_w) * WINDOW + idx % WINDOW
    ok = (idx < WINDOW * WINDOW) & (r < grid_h) & (c < grid_w)
    return r * grid_w + c, ok


@triton.jit
def _gri_fwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    kg_ptr,
    vg_ptr,
    out_ptr,
    lse_ptr,
    n_heads,
    grid_h,
    grid_w,
    n_win_w,
    n_global,
    head_dim,
    scale,
    blocks_per_window,
    WINDOW: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    win = pid // blocks_per_window
    m0 = (pid % blocks_per_window) * BLOCK_M
    n_tok = grid_h * grid_w
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < head_dim
    rows, row_ok = _window_tokens(win, m0 + tl.arange(0, BLOCK_M), grid_h, grid_w, n_win_w, WINDOW)
    base = bh * n_tok * head_dim
    gbase = bh * n_global * head_dim
    q_mask = row_ok[:, None] & dim_ok[None, :]
    q = tl.load(q_ptr + base + rows[:, None] * head_dim + dims[None, :], mask=q_mask, other=0.0)
    q = q.to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for n0 in range(0, WINDOW * WINDOW, BLOCK_N):
        cols, col_ok = _window_tokens(
            win, n0 + tl.arange(0, BLOCK_N), grid_h, grid_w, n_win_w, WINDOW
        )
        kv_off = base + cols[:, None] * head_dim + dims[None, :]
        kv_mask = col_ok[:, None] & dim_ok[None, :]
        k = tl.load(k_ptr + kv_off, mask=kv_mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + kv_off, mask=kv_mask, other=0.0).to(tl.float32)
        s = tl.where(col_ok[None, :], tl.dot(q, tl.trans(k)) * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p, v)
        m_i = m_new
    for n0 in range(0, n_global, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < n_global
        kv_off = gbase + cols[:, None] * head_dim + dims[None, :]
        kv_mask = col_ok[:, None] & dim_ok[None, :]
        k = tl.load(kg_ptr + kv_off, mask=kv_mask, other=0.0).to(tl.float32)
        v = tl.load(vg_ptr + kv_off, mask=kv_mask, other=0.0).to(tl.float32)
        s = tl.where(col_ok[None, :], tl.dot(q, tl.trans(k)) * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p, v)
        m_i = m_new
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    tl.store(
        out_ptr + base + rows[:, None] * head_dim + dims[None, :],
        (acc / l_safe[:, None]).to(out_ptr.dtype.element_ty),
        mask=q_mask,
    )
    tl.store(lse_ptr + bh * n_tok + rows, m_i + tl.log(l_safe), mask=row_ok)


@triton.jit
def _gri_bwd_block(q, do, lse, delta, k, v, col_ok, scale):
    """P, dS of one key block (float32): returns (p, ds)."""
    s = tl.dot(q, tl.trans(k)) * scale
    p = tl.where(col_ok[None, :], tl.exp(s - lse[:, None]), 0.0)
    ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None]) * scale
    return p, ds


@triton.jit
def _gri_bwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    kg_ptr,
    vg_ptr,
    do_ptr,
    lse_ptr,
    delta_ptr,
    dq_ptr,
    dk_ptr,
    dv_ptr,
    dkg_ptr,
    dvg_ptr,
    n_heads,
    grid_h,
    grid_w,
    n_win_w,
    n_global,
    head_dim,
    scale,
    blocks_per_window,
    WINDOW: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    win = pid // blocks_per_window
    m0 = (pid % blocks_per_window) * BLOCK_M
    n_tok = grid_h * grid_w
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < head_dim
    rows, row_ok = _window_tokens(win, m0 + tl.arange(0, BLOCK_M), grid_h, grid_w, n_win_w, WINDOW)
    base = bh * n_tok * head_dim
    gbase = bh * n_global * head_dim
    q_off = base + rows[:, None] * head_dim + dims[None, :]
    q_mask = row_ok[:, None] & dim_ok[None, :]
    q = tl.load(q_ptr + q_off, mask=q_mask, other=0.0).to(tl.float32)
    do = tl.load(do_ptr + q_off, mask=q_mask, other=0.0).to(tl.float32)
    lse = tl.load(lse_ptr + bh * n_tok + rows, mask=row_ok, other=float("inf"))
    delta = tl.load(delta_ptr + bh * n_tok + rows, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for n0 in range(0, WINDOW * WINDOW, BLOCK_N):
        cols, col_ok = _window_tokens(
            win, n0 + tl.arange(0, BLOCK_N), grid_h, grid_w, n_win_w, WINDOW
        )
        kv_off = base + cols[:, None] * head_dim + dims[None, :]
        kv_mask = col_ok[:, None] & dim_ok[None, :]
        k = tl.load(k_ptr + kv_off, mask=kv_mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + kv_off, mask=kv_mask, other=0.0).to(tl.float32)
        p, ds = _gri_bwd_block(q, do, lse, delta, k, v, col_ok, scale)
        dq += tl.dot(ds, k)
        tl.atomic_add(dk_ptr + kv_off, tl.dot(tl.trans(ds), q), mask=kv_mask)
        tl.atomic_add(dv_ptr + kv_off, tl.dot(tl.trans(p), do), mask=kv_mask)
    for n0 in range(0, n_global, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < n_global
        kv_off = gbase + cols[:, None] * head_dim + dims[None, :]
        kv_mask = col_ok[:, None] & dim_ok[None, :]
        k = tl.load(kg_ptr + kv_off, mask=kv_mask, other=0.0).to(tl.float32)
        v = tl.load(vg_ptr + kv_off, mask=kv_mask, other=0.0).to(tl.float32)
        p, ds = _gri_bwd_block(q, do, lse, delta, k, v, col_ok, scale)
        dq += tl.dot(ds, k)
        tl.atomic_add(dkg_ptr + kv_off, tl.dot(tl.trans(ds), q), mask=kv_mask)
        tl.atomic_add(dvg_ptr + kv_off, tl.dot(tl.trans(p), do), mask=kv_mask)
    tl.store(dq_ptr + q_off, dq.to(dq_ptr.dtype.element_ty), mask=q_mask)


def _config(head_dim: int, window: int):
    block_d = max(16, triton.next_power_of_2(head_dim))
    cap = 64 if block_d <= 64 else 32
    block_m = max(16, min(cap, triton.next_power_of_2(window * window)))
    return block_m, 32, block_d


def _grid(q, grid_h, grid_w, window, block_m):
    n_win = triton.cdiv(grid_h, window) * triton.cdiv(grid_w, window)
    per_window = triton.cdiv(window * window, block_m)
    return (n_win * per_window, q.shape[0] * q.shape[1]), per_window


def gri_fwd(q, k, v, kg, vg, out, lse, grid_h: int, grid_w: int, window: int, scale: float) -> None:
    """q/k/v/out contiguous [B, H, N, D]; kg/vg contiguous [B, H, G, D]; lse float32 [B, H, N]."""
    block_m, block_n, block_d = _config(q.shape[-1], window)
    grid, per_window = _grid(q, grid_h, grid_w, window, block_m)
    _gri_fwd_kernel[grid](
        q,
        k,
        v,
        kg,
        vg,
        out,
        lse,
        q.shape[1],
        grid_h,
        grid_w,
        triton.cdiv(grid_w, window),
        kg.shape[2],
        q.shape[-1],
        scale,
        per_window,
        WINDOW=window,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
    )


def gri_bwd(
    q,
    k,
    v,
    kg,
    vg,
    dout,
    lse,
    delta,
    dq,
    dk,
    dv,
    dkg,
    dvg,
    grid_h: int,
    grid_w: int,
    window: int,
    scale: float,
) -> None:
    """Gradients of :func:`gri_fwd`; dk/dv/dkg/dvg zero-filled float32 (atomics); all
    contiguous; ``delta`` float32 [B, H, N] = rowsum(dO * O)."""
    block_m, block_n, block_d = _config(q.shape[-1], window)
    grid, per_window = _grid(q, grid_h, grid_w, window, block_m)
    _gri_bwd_kernel[grid](
        q,
        k,
        v,
        kg,
        vg,
        dout,
        lse,
        delta,
        dq,
        dk,
        dv,
        dkg,
        dvg,
        q.shape[1],
        grid_h,
        grid_w,
        triton.cdiv(grid_w, window),
        kg.shape[2],
        q.shape[-1],
        scale,
        per_window,
        WINDOW=window,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
    )
