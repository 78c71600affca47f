"""Epilogue of multi-stream cross-attention with SpeedUpNet normalisation.

The main kernel (:mod:`.multi_cross_attention`) writes, in one pass over q, an fp32 accumulator
(plain streams times their weights, plus ``w_i * beta_i`` where stream ``i`` has keys), the raw
outputs ``Z_i`` of the normalised streams and partial sums of squares per (batch, head, query
block). Once those are folded to per-sample sums [N+1, B] (a torch sum), this kernel forms
``out = acc + sum_i (||Z_0|| / max(||Z_i||, eps)) * (w_i gamma_i) * Z_i`` and casts to the
output dtype: one read of acc and of each Z_i, one write.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .multi_cross_attention import _blocks


@triton.jit
def _mca_norm_epilogue_kernel(
    acc_ptr,
    z_ptr,
    sumsq_ptr,
    gamma_ptr,
    out_ptr,
    batch,
    n_heads,
    q_len,
    head_dim,
    eps,
    stride_ob,
    stride_oh,
    stride_ol,
    NUM_NORM: tl.constexpr,
    PER_SAMPLE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    # out = acc + sum_i r_i * (w_i gamma_i) * Z_i, with r_i = ||Z_0|| / max(||Z_i||, eps) from the
    # per-sample sums of squares [N+1, B] (summed over the batch unless PER_SAMPLE). acc and the
    # Z_i buffers are contiguous fp32 [B, H, L, D]; each program folds the (tiny) sums itself.
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // n_heads
    h = bh % n_heads
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < head_dim
    mask = (rows < q_len)[:, None] & dim_ok[None, :]
    off = (bh * q_len + rows[:, None]) * head_dim + dims[None, :]
    res = tl.load(acc_ptr + off, mask=mask, other=0.0)
    bs = tl.arange(0, BLOCK_B)
    b_ok = bs < batch
    if PER_SAMPLE:
        n0 = tl.sqrt(tl.load(sumsq_ptr + b))
    else:
        n0 = tl.sqrt(tl.sum(tl.load(sumsq_ptr + bs, mask=b_ok, other=0.0), axis=0))
    for i in tl.static_range(NUM_NORM):
        if PER_SAMPLE:
            n_i = tl.sqrt(tl.load(sumsq_ptr + (i + 1) * batch + b))
        else:
            n_i = tl.sqrt(tl.sum(tl.load(sumsq_ptr + (i + 1) * batch + bs, mask=b_ok, other=0.0)))
        ratio = n0 / tl.maximum(n_i, eps)
        gamma = tl.load(gamma_ptr + (i * n_heads + h) * head_dim + dims, mask=dim_ok, other=0.0)
        z_off = ((i * batch * n_heads + bh) * q_len + rows[:, None]) * head_dim + dims[None, :]
        z = tl.load(z_ptr + z_off, mask=mask, other=0.0)
        res += (ratio * gamma)[None, :] * z
    tl.store(
        out_ptr + b * stride_ob + h * stride_oh + rows[:, None] * stride_ol + dims[None, :],
        res.to(out_ptr.dtype.element_ty),
        mask=mask,
    )


def mca_norm_epilogue(acc, z, sumsq, gamma, out, eps: float, per_sample: bool) -> None:
    """out [B, H, L, D] = acc + sum_i r_i * gamma[i] * z[i] (see the kernel); acc, z contiguous
    fp32; sumsq fp32 [N+1, B]; gamma fp32 [N, H, D] (already times the stream weights)."""
    batch, heads, q_len, head_dim = out.shape
    block_m, _, block_d = _blocks(head_dim)
    grid = (triton.cdiv(q_len, block_m), batch * heads)
    _mca_norm_epilogue_kernel[grid](
        acc,
        z,
        sumsq,
        gamma,
        out,
        batch,
        heads,
        q_len,
        head_dim,
        eps,
        out.stride(0),
        out.stride(1),
        out.stride(2),
        NUM_NORM=z.shape[0],
        PER_SAMPLE=per_sample,
        BLOCK_M=block_m,
        BLOCK_D=block_d,
        BLOCK_B=max(2, triton.next_power_of_2(batch)),
    )
