"""Triton kernel: a GEMM with a fused low-rank side path, ``out = X P (+b) + s * ((X∘m) Q) R``.

One kernel serves both directions of LoRA (:mod:`stablecore.ops.lora_linear`):

* forward: ``X = x [M, K]``, ``P = Wᵀ``, ``Q = Aᵀ``, ``R = Bᵀ``, pre-mask ``m`` = the dropout
  mask on the LoRA input; the side output ``mid = d(x) Aᵀ`` (``[M, r]``) is saved for backward;
* backward ``grad_x``: ``X = g [M, N]``, ``P = W``, ``Q = B``, ``R = A``, post-mask = the dropout
  mask (``grad_x = g W + s ((g B) A)∘m``); ``mid = g B`` feeds ``grad_A`` afterwards.

Why one pass: every ``[BLOCK_M, BLOCK_K]`` tile of ``X`` is loaded once and used for both the
``P`` product (the base GEMM) and the ``Q`` product (the rank-``r`` intermediate, ``BLOCK_R``
wide, accumulated in fp32 registers); the intermediate is multiplied by ``R`` in the epilogue,
so there is no second pass over ``X`` and no extra read-modify-write of ``out`` (peft does
both). Each column tile recomputes the intermediate: ``r / BLOCK_N`` extra FLOPs, cheaper than a
second read of ``X`` for the ranks LoRA uses. Transposes are strides, never copies.

Numerics: fp32 accumulation; fp32 inputs use ``input_precision="ieee"`` (no TF32) to match the
reference; for half inputs the fp32 intermediate enters the epilogue product as a hi + lo pair
of half tiles (two small tensor-core products instead of one rounding to half), and so does the
masked LoRA input ``x∘m`` under dropout. Row offsets are int64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

#: Largest LoRA rank the kernel keeps in registers; larger ranks use the reference.
MAX_RANK = 128


@triton.jit
def _lora_linear_fwd_kernel(
    x_ptr, p_ptr, q_ptr, r_ptr, bias_ptr, pre_ptr, post_ptr, out_ptr, mid_ptr,
    M, N, K, R, scaling,
    sxm, sxk, spk, spn, sqk, sqr, srr, srn, som, son, smm, smr, sam, sak, sbm, sbn,
    HAS_BIAS: tl.constexpr, HAS_PRE: tl.constexpr, HAS_POST: tl.constexpr,
    WRITE_MID: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):  # fmt: skip
    # Grouped ordering: GROUP_M row tiles sweep the column tiles together, so the P tiles they
    # share stay in L2.
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = min(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ranks = tl.arange(0, BLOCK_R)
    row_ok = rows < M
    col_ok = cols < N
    rank_ok = ranks < R

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    mid = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        xm = row_ok[:, None] & k_ok[None, :]
        x = tl.load(x_ptr + rows[:, None] * sxm + ks[None, :] * sxk, mask=xm, other=0.0)
        p = tl.load(
            p_ptr + ks[:, None] * spk + cols[None, :] * spn,
            mask=k_ok[:, None] & col_ok[None, :],
            other=0.0,
        )
        q = tl.load(
            q_ptr + ks[:, None] * sqk + ranks[None, :] * sqr,
            mask=k_ok[:, None] & rank_ok[None, :],
            other=0.0,
        )
        if IEEE:
            acc = tl.dot(x, p, acc, input_precision="ieee")
        else:
            acc = tl.dot(x, p, acc)
        if HAS_PRE:
            keep = tl.load(pre_ptr + rows[:, None] * sam + ks[None, :] * sak, mask=xm, other=0.0)
            xd = x.to(tl.float32) * keep.to(tl.float32)
            if IEEE:
                mid = tl.dot(xd, q, mid, input_precision="ieee")
            else:
                # x∘m = hi + lo in the input dtype (one rounding of x∘m costs ~1e-3 relative
                # where base and LoRA terms cancel); the second product is only r wide.
                xd_hi = xd.to(x.dtype)
                mid = tl.dot(xd_hi, q, mid)
                mid = tl.dot((xd - xd_hi.to(tl.float32)).to(x.dtype), q, mid)
        elif IEEE:
            mid = tl.dot(x, q, mid, input_precision="ieee")
        else:
            mid = tl.dot(x, q, mid)

    rr = tl.load(
        r_ptr + ranks[:, None] * srr + cols[None, :] * srn,
        mask=rank_ok[:, None] & col_ok[None, :],
        other=0.0,
    )
    if IEEE:
        side = tl.dot(mid, rr, input_precision="ieee")
    else:
        # mid = hi + lo in the input dtype: two tensor-core products keep mid's fp32 accuracy
        # (one rounding of mid to fp16 costs ~1e-3 relative where base and side cancel).
        hi = mid.to(rr.dtype)
        lo = (mid - hi.to(tl.float32)).to(rr.dtype)
        side = tl.dot(hi, rr)
        side = tl.dot(lo, rr, side)
    out_mask = row_ok[:, None] & col_ok[None, :]
    if HAS_POST:
        keep = tl.load(
            post_ptr + rows[:, None] * sbm + cols[None, :] * sbn, mask=out_mask, other=0.0
        )
        side = side * keep.to(tl.float32)
    acc += scaling * side
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(
        out_ptr + rows[:, None] * som + cols[None, :] * son,
        acc.to(out_ptr.dtype.element_ty),
        mask=out_mask,
    )
    if WRITE_MID:
        if pid_n == 0:
            tl.store(
                mid_ptr + rows[:, None] * smm + ranks[None, :] * smr,
                mid,
                mask=row_ok[:, None] & rank_ok[None, :],
            )


_GPU_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w,
                  num_stages=st)
    for bm, bn, bk, w, st in (
        (128, 128, 32, 4, 4), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 128, 32, 4, 4),
        (128, 64, 32, 4, 4), (64, 64, 32, 4, 4), (32, 64, 32, 4, 4),
    )
]  # fmt: skip
# On a GPU the tile is tuned per (M, N, K, R); the interpreter takes the fixed small tiles below.
_lora_linear_fwd_tuned = triton.autotune(
    configs=_GPU_CONFIGS, key=["M", "N", "K", "R", "HAS_PRE", "HAS_POST"]
)(_lora_linear_fwd_kernel)


def _blocks(m: int, n: int, k: int) -> tuple[int, int, int]:
    # tl.dot needs every tile side >= 16; small problems keep small tiles (the interpreter's
    # cost grows with the tile, and a GPU wastes lanes on padding).
    bm = 64 if m > 32 else (32 if m > 16 else 16)
    bn = 64 if n > 32 else (32 if n > 16 else 16)
    bk = 32 if k > 16 else 16
    return bm, bn, bk


def lora_gemm(
    x: torch.Tensor,
    p: torch.Tensor,
    q: torch.Tensor,
    r: torch.Tensor,
    scaling: float,
    out: torch.Tensor,
    mid: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    pre_mask: torch.Tensor | None = None,
    post_mask: torch.Tensor | None = None,
) -> None:
    """``out = x p (+bias) + scaling * (((x∘pre_mask) q) r)∘post_mask``; ``mid = (x∘pre_mask) q``.

    Shapes: ``x [M, K]``, ``p [K, N]``, ``q [K, R]``, ``r [R, N]``, ``out [M, N]``,
    ``mid [M, R]`` (float32), ``bias [N]``, ``pre_mask [M, K]``, ``post_mask [M, N]``; any
    strides (pass transposed views). ``x``, ``p``, ``q``, ``r`` share one dtype; ``R <= 128``.
    """
    m, k = x.shape
    n = p.shape[1]
    rank = q.shape[1]
    dummy = out  # never read when the matching flag is off
    pre = pre_mask if pre_mask is not None else dummy
    post = post_mask if post_mask is not None else dummy
    mid_t = mid if mid is not None else dummy
    args = (
        x, p, q, r, bias if bias is not None else dummy, pre, post, out, mid_t,
        m, n, k, rank, float(scaling),
        x.stride(0), x.stride(1), p.stride(0), p.stride(1), q.stride(0), q.stride(1),
        r.stride(0), r.stride(1), out.stride(0), out.stride(1),
        mid_t.stride(0), mid_t.stride(1), pre.stride(0), pre.stride(1),
        post.stride(0), post.stride(1),
    )  # fmt: skip
    flags = dict(
        HAS_BIAS=bias is not None, HAS_PRE=pre_mask is not None, HAS_POST=post_mask is not None,
        WRITE_MID=mid is not None, IEEE=x.dtype == torch.float32,
        BLOCK_R=max(16, triton.next_power_of_2(rank)),
    )  # fmt: skip
    if x.is_cuda:

        def grid(meta):
            return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

        _lora_linear_fwd_tuned[grid](*args, **flags)
        return
    bm, bn, bk = _blocks(m, n, k)
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    _lora_linear_fwd_kernel[grid](
        *args, **flags, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=4, num_warps=4
    )
