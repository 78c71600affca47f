"""Fused multi-tensor Stable-SPAM step: three Triton launches per (device, dtype) bucket.

* Pass A (one program per ``CHUNK`` of any tensor): per-chunk ``max|g|`` (NaN -> +inf, so a
  non-finite tensor is flagged) and ``sum g^2``. Per-tensor ``M`` = segment max over chunks.
* Pass B: the clipped sum of squares. A chunk whose max is ``<= T`` re-uses its pass-A sum and
  never re-reads the gradient; only chunks holding clipped entries are re-read.
* Finalize (AdaClip/AdaGN/Adam scalars) is vector math on ``[n]`` tensors on the device
  (:func:`stablecore.optim._multi_tensor.finalize_clip` / ``finalize_norm``), no host sync.
* Pass C: clip + AdaGN scale + Adam + state (de)quantization (8-bit block 256 / 4-bit block
  128, new block absmax in registers, binary search over the decision thresholds, nibble
  packing) + weight decay + optional bf16 stochastic rounding of the param.

Tensors are addressed through int64 pointer tables, so one launch covers every tensor of the
bucket. Divisions and square roots are IEEE-rounded (``div_rn``/``sqrt_rn``) so that the
quantization decisions equal the PyTorch reference's.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from stablecore.optim import _lowbit
from stablecore.optim import _multi_tensor as mt

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16)


@triton.jit
def _pass_a(
    g_ptrs,
    chunk_tensor,
    chunk_start,
    numels,
    chunk_max,
    chunk_ss,
    G_DTYPE: tl.constexpr,
    CHUNK: tl.constexpr,
):
    c = tl.program_id(0)
    i = tl.load(chunk_tensor + c)
    start = tl.load(chunk_start + c)
    n = tl.load(numels + i)
    gp = tl.load(g_ptrs + i).to(tl.pointer_type(G_DTYPE))
    offs = start + tl.arange(0, CHUNK)
    g = tl.load(gp + offs, mask=offs < n, other=0.0).to(tl.float32)
    a = tl.abs(g)
    a = tl.where(a == a, a, float("inf"))  # NaN must not vanish in max
    tl.store(chunk_max + c, tl.max(a, axis=0))
    tl.store(chunk_ss + c, tl.sum(g * g, axis=0))


@triton.jit
def _pass_b(
    g_ptrs,
    chunk_tensor,
    chunk_start,
    numels,
    chunk_max,
    chunk_ss,
    M,
    T,
    out_ss,
    G_DTYPE: tl.constexpr,
    CHUNK: tl.constexpr,
):
    c = tl.program_id(0)
    i = tl.load(chunk_tensor + c)
    thr = tl.load(T + i)
    ss = tl.load(chunk_ss + c)
    if tl.load(chunk_max + c) > thr:  # only chunks with clipped entries re-read g
        start = tl.load(chunk_start + c)
        n = tl.load(numels + i)
        mx = tl.load(M + i)
        gp = tl.load(g_ptrs + i).to(tl.pointer_type(G_DTYPE))
        offs = start + tl.arange(0, CHUNK)
        g = tl.load(gp + offs, mask=offs < n, other=0.0).to(tl.float32)
        g = tl.where(tl.abs(g) > thr, tl.math.div_rn(g, mx) * thr, g)
        ss = tl.sum(g * g, axis=0)
    tl.store(out_ss + c, ss)


@triton.jit
def _segment_reduce(vals, first, out, IS_MAX: tl.constexpr, BLOCK: tl.constexpr):
    """Per-tensor max / sum of per-chunk partials, in a fixed order (deterministic)."""
    i = tl.program_id(0)
    lo = tl.load(first + i)
    hi = tl.load(first + i + 1)
    acc = tl.zeros([BLOCK], tl.float32)  # max partials are |g| maxima, >= 0
    for s in range(lo, hi, BLOCK):
        o = s + tl.arange(0, BLOCK)
        x = tl.load(vals + o, mask=o < hi, other=0.0)
        if IS_MAX:
            acc = tl.maximum(acc, x)
        else:
            acc += x
    if IS_MAX:
        tl.store(out + i, tl.max(acc, axis=0))
    else:
        tl.store(out + i, tl.sum(acc, axis=0))


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
    e = start + 2 * j  # element 2j sits in the high nibble of byte j
    o = e + 1
    me = e < n
    mo = o < n
    padded = ((n + QB - 1) // QB) * QB
    live = e < padded
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
    g_e = tl.load(gp + e, mask=me, other=0.0).to(tl.float32)
    g_o = tl.load(gp + o, mask=mo, other=0.0).to(tl.float32)
    p_e = tl.load(pp + e, mask=me, other=0.0).to(tl.float32)
    p_o = tl.load(pp + o, mask=mo, other=0.0).to(tl.float32)
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
    # padding of the last block quantizes as zero, exactly like the reference's zero padding
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
    _store_param(pp, e, me, p1e, seed, P_DTYPE, SR)
    _store_param(pp, o, mo, p1o, seed, P_DTYPE, SR)


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
    offs = start + tl.arange(0, CHUNK)
    mask = offs < n
    padded = ((n + QB - 1) // QB) * QB
    live = offs < padded
    if RESET:
        m = tl.zeros([CHUNK], tl.float32)
        v = m
    else:
        mcode = tl.load(mc + offs, mask=live, other=0).to(tl.int32)
        vcode = tl.load(vc + offs, mask=live, other=0).to(tl.int32)
        m = tl.load(qm + mcode) * tl.load(mab + offs // QB, mask=live, other=0.0)
        v = tl.load(qv + vcode) * tl.load(vab + offs // QB, mask=live, other=0.0)
    g = tl.load(gp + offs, mask=mask, other=0.0).to(tl.float32)
    p = tl.load(pp + offs, mask=mask, other=0.0).to(tl.float32)
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
    _store_param(pp, offs, mask, p1, seed, P_DTYPE, SR)


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
        else:  # tensors under 4096 elements keep fp32 states
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


_TABLES: dict[tuple, tuple] = {}


def _tables(numels: tuple[int, ...], device: torch.device):
    key = (numels, device)
    if key not in _TABLES:
        if len(_TABLES) > 32:
            _TABLES.clear()
        tensor_idx, start, first = mt.chunk_table(numels, device)
        n = torch.tensor(numels, dtype=torch.int64).to(device)
        _TABLES[key] = (tensor_idx, start, first, n)
    return _TABLES[key]


def _segment(vals: torch.Tensor, first: torch.Tensor, is_max: bool) -> torch.Tensor:
    out = torch.empty(first.numel() - 1, dtype=torch.float32, device=vals.device)
    _segment_reduce[(out.numel(),)](vals, first, out, IS_MAX=is_max, BLOCK=256)
    return out


def fused_stable_spam_step(ps, gs, states, hp: mt.StepHyper) -> torch.Tensor:
    """Clean-mode Stable-SPAM step of one (device, dtype) bucket; returns ``finite: [n]``.

    ``ps``: params (fp32 or bf16, contiguous), ``gs``: their grads, ``states``: state dicts in
    the layout of :mod:`stablecore.optim._lowbit` (``scalars`` + moments).
    """
    device = ps[0].device
    for p, g in zip(ps, gs, strict=True):
        if p.dtype not in SUPPORTED_DTYPES or g.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"fused Stable-SPAM supports fp32/bf16, got {p.dtype}/{g.dtype}")
        if not (p.is_contiguous() and g.is_contiguous()):
            raise ValueError(f"fused Stable-SPAM needs contiguous tensors (shape {tuple(p.shape)})")
    numels = tuple(p.numel() for p in ps)
    tensor_idx, start, first, n_t = _tables(numels, device)
    n_chunks = tensor_idx.numel()
    g_ptrs = mt.pointer_table(gs, device)
    pdt, gdt = _TL_DTYPES[ps[0].dtype], _TL_DTYPES[gs[0].dtype]
    chunk_max = torch.empty(n_chunks, dtype=torch.float32, device=device)
    chunk_ss = torch.empty_like(chunk_max)
    grid = (n_chunks,)
    _pass_a[grid](g_ptrs, tensor_idx, start, n_t, chunk_max, chunk_ss, G_DTYPE=gdt, CHUNK=mt.CHUNK)
    M = _segment(chunk_max, first, True)
    if hp.reduce_max is not None:
        M = hp.reduce_max(M)
    finite = torch.isfinite(M)
    scalars = [st["scalars"] for st in states]
    S = torch.stack(scalars)
    clip_state, T = mt.finalize_clip(S, M, hp)
    T = T.contiguous()
    chunk_ss2 = torch.empty_like(chunk_ss)
    _pass_b[grid](
        g_ptrs,
        tensor_idx,
        start,
        n_t,
        chunk_max,
        chunk_ss,
        M,
        T,
        chunk_ss2,
        G_DTYPE=gdt,
        CHUNK=mt.CHUNK,
    )
    ss = _segment(chunk_ss2, first, False)
    if hp.reduce_sum is not None:
        ss = hp.reduce_sum(ss)
    S_new, coef = mt.finalize_norm(S, clip_state, ss, hp)
    S_new = torch.where(finite[:, None], S_new, S)
    bits = hp.state_bits
    quant = [("exp_avg_codes" in st) for st in states]

    def moment(st, name):
        return st[name + "_codes"] if name + "_codes" in st else st[name]

    def absmax(st, name):
        return st.get(name + "_absmax")

    tables = [
        mt.pointer_table([moment(st, nm) for st in states], device)
        for nm in ("exp_avg", "exp_avg_sq")
    ] + [
        mt.pointer_table([absmax(st, nm) for st in states], device)
        for nm in ("exp_avg", "exp_avg_sq")
    ]
    q_bits = bits if bits in (8, 4) else 4  # maps are unused unless some tensor is quantized
    qm, qv = _lowbit.qmap("m", q_bits, device), _lowbit.qmap("v", q_bits, device)
    tm, tv = _lowbit.thresholds("m", q_bits, device), _lowbit.thresholds("v", q_bits, device)
    seed = int(torch.randint(0, 2**31 - 1, (1,)).item()) if hp.stochastic_rounding else 0
    _pass_c[grid](
        mt.pointer_table(ps, device),
        g_ptrs,
        *tables,
        mt.int_table(quant, device),
        tensor_idx,
        start,
        n_t,
        finite.to(torch.int8),
        M,
        T,
        coef.contiguous(),
        hp.lr.reshape(1),
        qm,
        qv,
        tm,
        tv,
        float(hp.beta1),  # float(): an int hyperparameter must not become an int kernel arg
        1.0 - hp.beta1,
        float(hp.beta2),
        1.0 - hp.beta2,
        float(hp.eps),
        float(hp.weight_decay),
        seed,
        P_DTYPE=pdt,
        G_DTYPE=gdt,
        BITS=bits,
        RESET=hp.reset,
        MAXIMIZE=hp.maximize,
        SR=hp.stochastic_rounding and ps[0].dtype == torch.bfloat16,
        CHUNK=mt.CHUNK,
    )
    torch._foreach_copy_(scalars, list(S_new.unbind(0)))
    return finite
