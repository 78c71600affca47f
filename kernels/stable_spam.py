"""Fused multi-tensor Stable-SPAM step: three Triton launches per (device, dtype) bucket.

* Pass A (one program per ``CHUNK`` of any tensor): per-chunk ``max|g|`` (NaN -> +inf, so a
  non-finite tensor is flagged) and ``sum g^2``. Per-tensor ``M`` = segment max over chunks.
* Pass B: the clipped sum of squares. A chunk whose max is ``<= T`` re-uses its pass-A sum and
  never re-reads the gradient; only chunks holding clipped entries are re-read.
* Finalize (AdaClip/AdaGN/Adam scalars) is vector math on ``[n]`` tensors on the device
  (:func:`stablecore.optim._multi_tensor.finalize_clip` / ``finalize_norm``), no host sync.
* Pass C (:mod:`stablecore.kernels.stable_spam_update`, quantized-state pieces in
  :mod:`stablecore.kernels.stable_spam_lowbit`): clip + AdaGN scale + Adam + state
  (de)quantization (8-bit block 256 / 4-bit block 128, row-padded blocks, new block absmax in
  registers, binary search over the decision thresholds, nibble packing) + weight decay +
  optional bf16 stochastic rounding of the param.

Tensors are addressed through int64 pointer tables, so one launch covers every tensor of the
bucket. Divisions and square roots are IEEE-rounded (``div_rn``/``sqrt_rn``) so that the
quantization decisions equal the PyTorch reference's.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from stablecore.kernels.stable_spam_update import _pass_c

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
    # pass C walks quantized tensors in the row-padded index space [R, Lp] of _lowbit (blocks
    # start at row starts), the others element by element (L = Lp = numel)
    rows_l, prows_l, numels_c = [], [], []
    for p, q in zip(ps, quant, strict=True):
        if q:
            r, row, prow = _lowbit.row_layout(p.shape, bits)
        else:
            r, row, prow = 1, max(p.numel(), 1), max(p.numel(), 1)
        rows_l.append(row)
        prows_l.append(prow)
        numels_c.append(r * prow if q else p.numel())
    tensor_idx_c, start_c, _, n_c = _tables(tuple(numels_c), device)

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
    _pass_c[(tensor_idx_c.numel(),)](
        mt.pointer_table(ps, device),
        g_ptrs,
        *tables,
        mt.int_table(quant, device),
        tensor_idx_c,
        start_c,
        n_c,
        mt.int_table(rows_l, device, torch.int64),
        mt.int_table(prows_l, device, torch.int64),
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
