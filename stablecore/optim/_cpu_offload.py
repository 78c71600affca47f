"""Fast CPU path of the Stable-SPAM step (optimizer states offloaded to the CPU).

With numba installed (``pip install stablecore[cpu]``) the three passes run as multithreaded
numba kernels (``prange`` over chunks / quantization blocks) on CPU tensors in place, for
fp32 or bf16 params and every state precision; the scalar finalize is the shared torch code of
:mod:`stablecore.optim._multi_tensor`. Without numba, :func:`cpu_stable_spam_step` falls back to
the eager reference. The arithmetic is the reference's, in the same order (no fast-math), so the
two agree to the reduction order.

Example::

    opt = StableSPAM(params_on_cpu, state_bits=8, backend="cpu")
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from stablecore.optim import _lowbit
from stablecore.optim import _multi_tensor as mt


@functools.cache
def numba_available() -> bool:
    try:
        import numba  # noqa: F401
    except Exception:
        return False
    return True


if numba_available():
    import numba as nb
    from numba import prange

    # numba's default threading layer on Linux is OpenMP, whose idle workers spin-wait after
    # every parallel region and then compete with torch's own thread pool: torch ops after a
    # numba step ran 7-30x slower (measured, 1 torch thread). The workqueue layer's workers
    # sleep. Only applied when nobody chose a layer (NUMBA_THREADING_LAYER unset, config
    # untouched) and only takes effect if no parallel numba code has run in this process yet.
    if nb.config.THREADING_LAYER == "default":
        nb.config.THREADING_LAYER = "workqueue"

    jit = functools.partial(nb.njit, parallel=True, cache=True, fastmath=False)
    ijit = functools.partial(nb.njit, inline="always", cache=True, fastmath=False)

    @jit
    def pass_a(g, chunk, cmax, css):
        nchunks = cmax.shape[0]
        for c in prange(nchunks):
            mx = np.float32(0.0)
            ss = np.float32(0.0)
            for j in range(c * chunk, min((c + 1) * chunk, g.shape[0])):
                a = abs(g[j])
                if a != a:
                    a = np.float32(np.inf)
                mx = max(mx, a)
                ss += g[j] * g[j]
            cmax[c] = mx
            css[c] = ss

    @jit
    def pass_b(g, chunk, cmax, css, M, T, out):
        for c in prange(cmax.shape[0]):
            if cmax[c] > T:
                ss = np.float32(0.0)
                for j in range(c * chunk, min((c + 1) * chunk, g.shape[0])):
                    x = g[j]
                    if abs(x) > T:
                        x = x / M * T
                    ss += x * x
                out[c] = ss
            else:
                out[c] = css[c]

    @ijit
    def adam(g, m, v, p, M, T, f, b1, omb1, b2, omb2, eps, decay, step_size, rbc2):
        if abs(g) > T:
            g = g / M * T
        u = g * f
        m1 = m * b1 + u * omb1
        v1 = v * b2 + (u * u) * omb2
        denom = np.sqrt(v1) * rbc2 + eps
        return m1, v1, p * decay - (m1 / denom) * step_size

    @ijit
    def quantize(x, absmax, thr, nsteps):
        normed = x / absmax if absmax > 0 else np.float32(0.0)
        idx = 0
        for k in range(nsteps):
            cand = idx + (1 << (nsteps - 1 - k))
            if normed > thr[cand - 1]:
                idx = cand
        return idx

    @jit
    def pass_c_plain(
        p32, g, m, v, chunk, reset, M, T, f, b1, omb1, b2, omb2, eps, decay, step_size, rbc2
    ):
        # fp32 states: no per-element branch on the state layout, so LLVM can vectorize
        n = g.shape[0]
        for c in prange((n + chunk - 1) // chunk):
            for j in range(c * chunk, min((c + 1) * chunk, n)):
                m0 = np.float32(0.0) if reset else m[j]
                v0 = np.float32(0.0) if reset else v[j]
                m1, v1, p1 = adam(
                    g[j], m0, v0, p32[j], M, T, f, b1, omb1, b2, omb2, eps, decay, step_size, rbc2
                )
                p32[j] = p1
                m[j] = m1
                v[j] = v1

    @jit
    def pass_c(
        p32,
        g,
        m,
        v,
        mc,
        vc,
        ma,
        va,
        qm,
        qv,
        tm,
        tv,
        bits,
        block,
        row,
        prow,
        reset,
        M,
        T,
        f,
        b1,
        omb1,
        b2,
        omb2,
        eps,
        decay,
        step_size,
        rbc2,
    ):
        # row-padded blocks (see _lowbit): rows of `row` elements, each padded to `prow` (a
        # multiple of `block`); block `blk` of row r covers elements [r*row + c0, r*row + c1)
        # and codes [r*prow + c0, r*prow + c0 + block); `ofs` maps element -> code index
        n = g.shape[0]
        nrows = n // row if row > 0 else 0
        bpr = prow // block
        nblocks = nrows * bpr
        nsteps = 4 if bits == 4 else 8
        quant = mc.shape[0] > 0
        for blk in prange(nblocks):
            r = blk // bpr
            c0 = (blk % bpr) * block
            lo = r * row + c0
            hi = r * row + min(c0 + block, row)
            ofs = r * (prow - row)
            mb = np.zeros(block, dtype=np.float32)
            vb = np.zeros(block, dtype=np.float32)
            amax_m = np.float32(0.0)
            amax_v = np.float32(0.0)
            for j in range(lo, hi):
                m0 = np.float32(0.0)
                v0 = np.float32(0.0)
                if not reset:
                    if quant:
                        q = j + ofs
                        if bits == 4:
                            bm = np.int64(mc[q // 2])
                            bv = np.int64(vc[q // 2])
                            cm = (bm >> 4) if q % 2 == 0 else (bm & 15)
                            cv = (bv >> 4) if q % 2 == 0 else (bv & 15)
                        else:
                            cm = np.int64(mc[q])
                            cv = np.int64(vc[q])
                        m0 = qm[cm] * ma[blk]
                        v0 = qv[cv] * va[blk]
                    else:
                        m0 = m[j]
                        v0 = v[j]
                m1, v1, p1 = adam(
                    g[j], m0, v0, p32[j], M, T, f, b1, omb1, b2, omb2, eps, decay, step_size, rbc2
                )
                p32[j] = p1
                if quant:
                    mb[j - lo] = m1
                    vb[j - lo] = v1
                    amax_m = max(amax_m, abs(m1))
                    amax_v = max(amax_v, v1)
                else:
                    m[j] = m1
                    v[j] = v1
            if quant:
                ma[blk] = amax_m
                va[blk] = amax_v
                for jj in range(0, block, 2 if bits == 4 else 1):
                    if bits == 4:
                        hm = quantize(mb[jj], amax_m, tm, nsteps)
                        lm = quantize(mb[jj + 1], amax_m, tm, nsteps)
                        hv = quantize(vb[jj], amax_v, tv, nsteps)
                        lv = quantize(vb[jj + 1], amax_v, tv, nsteps)
                        mc[(lo + ofs + jj) // 2] = np.uint8((hm << 4) | lm)
                        vc[(lo + ofs + jj) // 2] = np.uint8((hv << 4) | lv)
                    else:
                        mc[lo + ofs + jj] = np.uint8(quantize(mb[jj], amax_m, tm, nsteps))
                        vc[lo + ofs + jj] = np.uint8(quantize(vb[jj], amax_v, tv, nsteps))


_EMPTY_F = np.zeros(0, dtype=np.float32)
_EMPTY_U8 = np.zeros(0, dtype=np.uint8)


def _np(t: torch.Tensor | None, empty):
    return empty if t is None else t.detach().numpy()


def cpu_stable_spam_step(ps, gs, states, hp: mt.StepHyper) -> torch.Tensor:
    """Clean-mode Stable-SPAM step of one CPU bucket (numba, or the eager reference)."""
    from stablecore.optim.stable_spam import eager_stable_spam_step

    supported = all(
        p.device.type == "cpu" and p.is_contiguous() and p.dtype in (torch.float32, torch.bfloat16)
        for p in ps
    )
    if not numba_available() or not supported or hp.stochastic_rounding:
        return eager_stable_spam_step(ps, gs, states, hp)
    chunk = mt.CHUNK
    g32 = [
        ((-g) if hp.maximize else g).detach().to(torch.float32).contiguous().reshape(-1) for g in gs
    ]
    gnp = [g.numpy() for g in g32]
    stats = []
    for g in gnp:
        nch = -(-g.shape[0] // chunk)
        cmax = np.empty(nch, dtype=np.float32)
        css = np.empty(nch, dtype=np.float32)
        pass_a(g, chunk, cmax, css)
        stats.append((cmax, css))
    M = torch.tensor([float(c.max()) for c, _ in stats], dtype=torch.float32)
    if hp.reduce_max is not None:
        M = hp.reduce_max(M)
    finite = torch.isfinite(M)
    S = torch.stack([st["scalars"] for st in states])
    clip_state, T = mt.finalize_clip(S, M, hp)
    ss_list = []
    Mn, Tn = M.numpy(), T.numpy()  # index numpy, not torch, in the per-tensor loops
    for i, g in enumerate(gnp):
        cmax, css = stats[i]
        out = np.empty_like(css)
        pass_b(g, chunk, cmax, css, Mn[i], Tn[i], out)
        ss_list.append(float(out.sum()))
    ss = torch.tensor(ss_list, dtype=torch.float32)
    if hp.reduce_sum is not None:
        ss = hp.reduce_sum(ss)
    S_new, coef = mt.finalize_norm(S, clip_state, ss, hp)
    S_new = torch.where(finite[:, None], S_new, S)
    bits = hp.state_bits
    qb = bits if bits in (8, 4) else 4
    qm, qv = _lowbit.qmap("m", qb).numpy(), _lowbit.qmap("v", qb).numpy()
    tm, tv = _lowbit.thresholds("m", qb).numpy(), _lowbit.thresholds("v", qb).numpy()
    decay = np.float32(1.0) - np.float32(float(hp.lr)) * np.float32(hp.weight_decay)
    coefn, finiten = coef.numpy(), finite.numpy()
    hyper = (
        np.float32(hp.beta1),
        np.float32(1.0 - hp.beta1),
        np.float32(hp.beta2),
        np.float32(1.0 - hp.beta2),
        np.float32(hp.eps),
        decay,
    )
    for i, (p, st) in enumerate(zip(ps, states, strict=True)):
        if not finiten[i]:
            continue
        # bf16 params / bf16 states go through fp32 copies: torch's casts round exactly as
        # the reference does
        p32 = p.detach().view(-1) if p.dtype == torch.float32 else p.detach().view(-1).float()
        quant = "exp_avg_codes" in st
        m = v = None
        if not quant:
            m, v = st["exp_avg"].view(-1), st["exp_avg_sq"].view(-1)
            if m.dtype != torch.float32:
                m, v = m.float(), v.float()
        block = _lowbit.BLOCK_SIZES[bits] if quant else mt.CHUNK
        if quant:  # the row-padded layout of _lowbit (a 1-D local view never holds codes)
            _, row, prow = _lowbit.row_layout(p.shape, bits)
        if not quant:
            pass_c_plain(
                p32.numpy(),
                gnp[i],
                m.numpy(),
                v.numpy(),
                mt.CHUNK,
                hp.reset,
                Mn[i],
                Tn[i],
                coefn[i, 0],
                *hyper,
                coefn[i, 1],
                coefn[i, 2],
            )
        else:
            pass_c(
                p32.numpy(),
                gnp[i],
                _np(m, _EMPTY_F),
                _np(v, _EMPTY_F),
                _np(st.get("exp_avg_codes"), _EMPTY_U8),
                _np(st.get("exp_avg_sq_codes"), _EMPTY_U8),
                _np(st.get("exp_avg_absmax"), _EMPTY_F),
                _np(st.get("exp_avg_sq_absmax"), _EMPTY_F),
                qm,
                qv,
                tm,
                tv,
                bits,
                block,
                row,
                prow,
                hp.reset,
                Mn[i],
                Tn[i],
                coefn[i, 0],
                *hyper,
                coefn[i, 1],
                coefn[i, 2],
            )
        if p.dtype != torch.float32:
            p.detach().view(-1).copy_(p32)
        if m is not None and st["exp_avg"].dtype != torch.float32:
            st["exp_avg"].view(-1).copy_(m)
            st["exp_avg_sq"].view(-1).copy_(v)
    torch._foreach_copy_([st["scalars"] for st in states], list(S_new.unbind(0)))
    return finite
