"""Element-wise pieces of the fused Stable-SPAM update (pass C) for quantized states.

* :func:`_adam`: clip + AdaGN scale + Adam moments + decoupled weight decay for one block of
  elements, IEEE-rounded divisions and square roots (``div_rn``/``sqrt_rn``) so that the values
  equal the PyTorch reference's and quantization decisions agree.
* :func:`_quantize`: nearest-code index by a branchless binary search over the decision
  thresholds of :func:`stablecore.optim._lowbit.thresholds`.
* :func:`_step4` (block 128, two codes per byte, element ``2i`` in the high nibble) and
  :func:`_step8` (block 256): dequantize m and v, update, new block absmax in registers,
  requantize and store one ``CHUNK`` of a tensor.
* :func:`_store_param`: fp32 -> param dtype, optionally with bf16 stochastic rounding.

Row-padded layout (:mod:`stablecore.optim._lowbit`): the quantized steps walk the *padded*
index ``q`` of a tensor viewed as ``[R, Lp]`` (``n = R * Lp``; ``Lp`` and ``CHUNK`` are
multiples of the block, so blocks never straddle chunks). Padded index
``q`` (row ``r = q // Lp``, column ``c = q % Lp``) is code ``q`` (4 bits: byte ``q // 2``),
block ``q // QB`` and, when ``c < L``, element ``r * L + c``; padding lanes quantize 0.

Called from :func:`stablecore.kernels.stable_spam_update._pass_c`.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _quantize(x, absmax, thr_ptr, NSTEPS: tl.constexpr):
    """Nearest-code index: count of thresholds strictly below x / absmax (branchless search)."""
    safe = tl.where(absmax > 0, absmax, 1.0)
    normed = tl.where(absmax > 0, tl.math.div_rn(x, safe), 0.0)
    idx = tl.zeros(x.shape, dtype=tl.int32)
    for k in tl.static_range(NSTEPS):
        cand = idx + (1 << (NSTEPS - 1 - k))
        t = tl.load(thr_ptr + cand - 1)
        idx = tl.where(normed > t, cand, idx)
    return idx


@triton.jit
def _adam(
    g,
    m,
    v,
    p,
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
    MAXIMIZE: tl.constexpr,
):
    if MAXIMIZE:
        g = -g
    g = tl.where(tl.abs(g) > thr, tl.math.div_rn(g, mx) * thr, g)
    u = g * f
    m1 = m * beta1 + u * omb1
    v1 = v * beta2 + (u * u) * omb2
    denom = tl.sqrt_rn(v1) * rbc2 + eps
    p1 = p * decay - tl.math.div_rn(m1, denom) * step_size
    return m1, v1, p1


@triton.jit
def _store_param(pp, offs, mask, p1, seed, P_DTYPE: tl.constexpr, SR: tl.constexpr):
    if SR:
        bits = p1.to(tl.int32, bitcast=True)
        noise = (tl.randint(seed, offs.to(tl.uint32)) & 0xFFFF).to(tl.int32)
        p1 = ((bits + noise) & -65536).to(tl.float32, bitcast=True)
    tl.store(pp + offs, p1.to(P_DTYPE), mask=mask)


@triton.jit
def _step4(
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
    P_DTYPE: tl.constexpr,
    G_DTYPE: tl.constexpr,
    RESET: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    SR: tl.constexpr,
    CHUNK: tl.constexpr,
):
    QB: tl.constexpr = 128
    HALF: tl.constexpr = CHUNK // 2
    NB: tl.constexpr = CHUNK // QB
    j = tl.arange(0, HALF)
    e = start + 2 * j  # padded index 2j sits in the high nibble of byte j
    live = e < n  # n = R * Lp: whole blocks
    r = e // prow
    col = e - r * prow
    ee = r * row + col  # element of padded index e (Lp is even: e and e + 1 share a row)
    eo = ee + 1
    me = live & (col < row)
    mo = live & (col + 1 < row)
    padded = n
    if RESET:
        m_e = tl.zeros([HALF], tl.float32)
        m_o = m_e
        v_e = m_e
        v_o = m_e
    else:
        mb = tl.load(mc + e // 2, mask=live, other=0).to(tl.int32)
        vb = tl.load(vc + e // 2, mask=live, other=0).to(tl.int32)
        ma = tl.load(mab + e // QB, mask=live, other=0.0)
        va = tl.load(vab + e // QB, mask=live, other=0.0)
        m_e = tl.load(qm + (mb >> 4)) * ma
        m_o = tl.load(qm + (mb & 15)) * ma
        v_e = tl.load(qv + (vb >> 4)) * va
        v_o = tl.load(qv + (vb & 15)) * va
    g_e = tl.load(gp + ee, mask=me, other=0.0).to(tl.float32)
    g_o = tl.load(gp + eo, mask=mo, other=0.0).to(tl.float32)
    p_e = tl.load(pp + ee, mask=me, other=0.0).to(tl.float32)
    p_o = tl.load(pp + eo, mask=mo, other=0.0).to(tl.float32)
    m1e, v1e, p1e = _adam(
        g_e,
        m_e,
        v_e,
        p_e,
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
        MAXIMIZE,
    )
    m1o, v1o, p1o = _adam(
        g_o,
        m_o,
        v_o,
        p_o,
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
        MAXIMIZE,
    )
    # padding of a row's last block quantizes as zero, exactly like the reference's zero padding
    m1e = tl.where(me, m1e, 0.0)
    m1o = tl.where(mo, m1o, 0.0)
    v1e = tl.where(me, v1e, 0.0)
    v1o = tl.where(mo, v1o, 0.0)
    am = tl.max(tl.reshape(tl.maximum(tl.abs(m1e), tl.abs(m1o)), (NB, QB // 2)), axis=1)
    av = tl.max(tl.reshape(tl.maximum(v1e, v1o), (NB, QB // 2)), axis=1)
    am_el = tl.reshape(tl.broadcast_to(tl.reshape(am, (NB, 1)), (NB, QB // 2)), (HALF,))
    av_el = tl.reshape(tl.broadcast_to(tl.reshape(av, (NB, 1)), (NB, QB // 2)), (HALF,))
    cm = (_quantize(m1e, am_el, tm, 4) << 4) | _quantize(m1o, am_el, tm, 4)
    cv = (_quantize(v1e, av_el, tv, 4) << 4) | _quantize(v1o, av_el, tv, 4)
    tl.store(mc + e // 2, cm.to(tl.uint8), mask=live)
    tl.store(vc + e // 2, cv.to(tl.uint8), mask=live)
    bo = start // QB + tl.arange(0, NB)
    bmask = bo * QB < padded
    tl.store(mab + bo, am, mask=bmask)
    tl.store(vab + bo, av, mask=bmask)
    _store_param(pp, ee, me, p1e, seed, P_DTYPE, SR)
    _store_param(pp, eo, mo, p1o, seed, P_DTYPE, SR)


@triton.jit
def _step8(
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
    P_DTYPE: tl.constexpr,
    G_DTYPE: tl.constexpr,
    RESET: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    SR: tl.constexpr,
    CHUNK: tl.constexpr,
):
    QB: tl.constexpr = 256
    NB: tl.constexpr = CHUNK // QB
    offs = start + tl.arange(0, CHUNK)  # padded indices
    live = offs < n  # n = R * Lp: whole blocks
    r = offs // prow
    col = offs - r * prow
    el = r * row + col
    mask = live & (col < row)
    padded = n
    if RESET:
        m = tl.zeros([CHUNK], tl.float32)
        v = m
    else:
        mcode = tl.load(mc + offs, mask=live, other=0).to(tl.int32)
        vcode = tl.load(vc + offs, mask=live, other=0).to(tl.int32)
        m = tl.load(qm + mcode) * tl.load(mab + offs // QB, mask=live, other=0.0)
        v = tl.load(qv + vcode) * tl.load(vab + offs // QB, mask=live, other=0.0)
    g = tl.load(gp + el, mask=mask, other=0.0).to(tl.float32)
    p = tl.load(pp + el, mask=mask, other=0.0).to(tl.float32)
    m1, v1, p1 = _adam(
        g, m, v, p, mx, thr, f, beta1, omb1, beta2, omb2, eps, decay, step_size, rbc2, MAXIMIZE
    )
    m1 = tl.where(mask, m1, 0.0)
    v1 = tl.where(mask, v1, 0.0)
    am = tl.max(tl.reshape(tl.abs(m1), (NB, QB)), axis=1)
    av = tl.max(tl.reshape(v1, (NB, QB)), axis=1)
    am_el = tl.reshape(tl.broadcast_to(tl.reshape(am, (NB, 1)), (NB, QB)), (CHUNK,))
    av_el = tl.reshape(tl.broadcast_to(tl.reshape(av, (NB, 1)), (NB, QB)), (CHUNK,))
    tl.store(mc + offs, _quantize(m1, am_el, tm, 8).to(tl.uint8), mask=live)
    tl.store(vc + offs, _quantize(v1, av_el, tv, 8).to(tl.uint8), mask=live)
    bo = start // QB + tl.arange(0, NB)
    bmask = bo * QB < padded
    tl.store(mab + bo, am, mask=bmask)
    tl.store(vab + bo, av, mask=bmask)
    _store_param(pp, el, mask, p1, seed, P_DTYPE, SR)
