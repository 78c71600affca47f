"""Pass C of the fused Stable-SPAM step: one program per ``CHUNK`` of any tensor of a bucket.

:func:`_pass_c` reads the tensor's per-step scalars (max|g|, threshold T, AdaGN factor, step
size, bias correction) computed on the device by the finalize step, skips non-finite tensors,
and runs the element-wise update for the bucket's state precision: :func:`_step_plain` (fp32 or
bf16 moments, and tensors that keep fp32 states) or the quantized :func:`_step4` / :func:`_step8`
of :mod:`stablecore.kernels.stable_spam_lowbit`. Chunks run over the *padded* numel of a
quantized tensor (``R * Lp``, the row-padded layout; ``rows``/``prows`` hold ``L``/``Lp``) and
over the numel of the others. Launched by
:func:`stablecore.kernels.stable_spam.fused_stable_spam_step`.
"""

from __future__ import annotations

import triton
import triton.language as tl
from stablecore.kernels.stable_spam_lowbit import _adam, _step4, _step8, _store_param


@triton.jit
def _step_plain(
    pp,
    gp,
    ms,
    vs,
    start,
    n,
    mx,
    thr,
    f,
    beta1,
    omb1,
    beta2,
    omb2,
    eps,
    decay,
    step_size,
    rbc2,
    seed,
    P_DTYPE: tl.constexpr,
    S_DTYPE: tl.constexpr,
    G_DTYPE: tl.constexpr,
    RESET: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    SR: tl.constexpr,
    CHUNK: tl.constexpr,
):
    offs = start + tl.arange(0, CHUNK)
    mask = offs < n
    if RESET:
        m = tl.zeros([CHUNK], tl.float32)
        v = m
    else:
        m = tl.load(ms + offs, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(vs + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gp + offs, mask=mask, other=0.0).to(tl.float32)
    p = tl.load(pp + offs, mask=mask, other=0.0).to(tl.float32)
    m1, v1, p1 = _adam(
        g, m, v, p, mx, thr, f, beta1, omb1, beta2, omb2, eps, decay, step_size, rbc2, MAXIMIZE
    )
    tl.store(ms + offs, m1.to(S_DTYPE), mask=mask)
    tl.store(vs + offs, v1.to(S_DTYPE), mask=mask)
    _store_param(pp, offs, mask, p1, seed, P_DTYPE, SR)


@triton.jit
def _pass_c(
    p_ptrs,
    g_ptrs,
    m_ptrs,
    v_ptrs,
    ma_ptrs,
    va_ptrs,
    quant,
    chunk_tensor,
    chunk_start,
    numels,
    rows,
    prows,
    finite,
    M,
    T,
    coef,
    lr_ptr,
    qm,
    qv,
    tm,
    tv,
    beta1,
    omb1,
    beta2,
    omb2,
    eps,
    wd,
    seed,
    P_DTYPE: tl.constexpr,
    G_DTYPE: tl.constexpr,
    BITS: tl.constexpr,
    RESET: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    SR: tl.constexpr,
    CHUNK: tl.constexpr,
):
    c = tl.program_id(0)
    i = tl.load(chunk_tensor + c)
    if tl.load(finite + i) != 0:  # a non-finite tensor keeps param and state
        start = tl.load(chunk_start + c)
        n = tl.load(numels + i)
        mx = tl.load(M + i)
        thr = tl.load(T + i)
        f = tl.load(coef + 3 * i)
        step_size = tl.load(coef + 3 * i + 1)
        rbc2 = tl.load(coef + 3 * i + 2)
        decay = 1.0 - tl.load(lr_ptr) * wd
        pp = tl.load(p_ptrs + i).to(tl.pointer_type(P_DTYPE))
        gp = tl.load(g_ptrs + i).to(tl.pointer_type(G_DTYPE))
        is_q = tl.load(quant + i) != 0
        if BITS == 16:
            _step_plain(
                pp,
                gp,
                tl.load(m_ptrs + i).to(tl.pointer_type(tl.bfloat16)),
                tl.load(v_ptrs + i).to(tl.pointer_type(tl.bfloat16)),
                start,
                n,
                mx,
                thr,
                f,
                beta1,
                omb1,
                beta2,
                omb2,
                eps,
                decay,
                step_size,
                rbc2,
                seed,
                P_DTYPE,
                tl.bfloat16,
                G_DTYPE,
                RESET,
                MAXIMIZE,
                SR,
                CHUNK,
            )
        elif BITS == 32:
            _step_plain(
                pp,
                gp,
                tl.load(m_ptrs + i).to(tl.pointer_type(tl.float32)),
                tl.load(v_ptrs + i).to(tl.pointer_type(tl.float32)),
                start,
                n,
                mx,
                thr,
                f,
                beta1,
                omb1,
                beta2,
                omb2,
                eps,
                decay,
                step_size,
                rbc2,
                seed,
                P_DTYPE,
                tl.float32,
                G_DTYPE,
                RESET,
                MAXIMIZE,
                SR,
                CHUNK,
            )
        elif is_q:
            mc = tl.load(m_ptrs + i).to(tl.pointer_type(tl.uint8))
            vc = tl.load(v_ptrs + i).to(tl.pointer_type(tl.uint8))
            mab = tl.load(ma_ptrs + i).to(tl.pointer_type(tl.float32))
            vab = tl.load(va_ptrs + i).to(tl.pointer_type(tl.float32))
            row = tl.load(rows + i)
            prow = tl.load(prows + i)
            if BITS == 4:
                _step4(
                    pp,
                    gp,
                    mc,
                    vc,
                    mab,
                    vab,
                    start,
                    n,
                    row,
                    prow,
                    mx,
                    thr,
                    f,
                    beta1,
                    omb1,
                    beta2,
                    omb2,
                    eps,
                    decay,
                    step_size,
                    rbc2,
                    qm,
                    qv,
                    tm,
                    tv,
                    seed,
                    P_DTYPE,
                    G_DTYPE,
                    RESET,
                    MAXIMIZE,
                    SR,
                    CHUNK,
                )
            else:
                _step8(
                    pp,
                    gp,
                    mc,
                    vc,
                    mab,
                    vab,
                    start,
                    n,
                    row,
                    prow,
                    mx,
                    thr,
                    f,
                    beta1,
                    omb1,
                    beta2,
                    omb2,
                    eps,
                    decay,
                    step_size,
                    rbc2,
                    qm,
                    qv,
                    tm,
                    tv,
                    seed,
                    P_DTYPE,
                    G_DTYPE,
                    RESET,
                    MAXIMIZE,
                    SR,
                    CHUNK,
                )
        else:  # tensors that are not quantized (small or 1-D: _lowbit.is_quantized) keep fp32
            _step_plain(
                pp,
                gp,
                tl.load(m_ptrs + i).to(tl.pointer_type(tl.float32)),
                tl.load(v_ptrs + i).to(tl.pointer_type(tl.float32)),
                start,
                n,
                mx,
                thr,
                f,
                beta1,
                omb1,
                beta2,
                omb2,
                eps,
                decay,
                step_size,
                rbc2,
                seed,
                P_DTYPE,
                tl.float32,
                G_DTYPE,
                RESET,
                MAXIMIZE,
                SR,
                CHUNK,
            )
