"""Fused multi-tensor ⊥Grad (OrthoGrad): one Triton launch per pass for a whole list of tensors.

For every pair (w, g) of a list, ``g <- scale * (g - (w.g / w.w) w)`` where ``scale`` restores
``|g|`` (renorm). Two passes over the data:

* pass 1, :func:`partial_stats`: one program per CHUNK of ``BLOCK`` elements of any tensor writes
  the chunk's partial ``(w.g, w.w, g.g)`` in float64 to ``partials [C, 3]``. The chunks of a tensor
  are consecutive rows, so a segmented sum gives the per-tensor ``stats [T, 3]``. Those are plain
  sums: a sharded setup (FSDP2, each rank holding a slice of every tensor) sums its local chunks
  and all-reduces the whole ``[T, 3]`` buffer in ONE collective before pass 2.
* pass 2, :func:`apply_`: one program per chunk reads its tensor's three sums, forms the
  projection coefficient and the renorm factor, and rewrites its slice of ``g`` in place.

Why float64 for the sums: ``|g_perp|^2 = g.g - (w.g)^2 / w.w`` cancels when ``g`` is nearly
parallel to ``w``; products of two float32 numbers are exact in float64, so the float64 sums keep
``|g_perp|`` accurate down to angles of ~1e-6 rad (float32 sums lose it near 1e-2 rad). The
kernels stay memory-bound on data-centre GPUs (three float64 FMAs per element).

Tensors are addressed through a table of raw addresses (one int64 per tensor) so a single launch
serves any number of tensors without copying them together. All tensors of one launch share a
dtype pair (the op layer groups by dtype); they must be contiguous.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import triton
import triton.language as tl

#: Elements per program (one chunk). A multiple of 16 keeps every chunk start 16-byte aligned.
BLOCK = 4096
#: ``g`` counts as parallel to ``w`` when ``|g_perp| <= PARALLEL_RTOL * |g|`` (then ``g_perp = 0``):
#: ~100x above float32 rounding of ``g - c w``, so the decision agrees with the reference.
PARALLEL_RTOL = 1e-5

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def _chunk_pointers(
    w_addrs, g_addrs, numels, chunk_tensor, chunk_start,
    W_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    c = tl.program_id(0)
    t = tl.load(chunk_tensor + c)
    start = tl.multiple_of(tl.load(chunk_start + c), BLOCK)
    n = tl.load(numels + t)
    w_addr = tl.load(w_addrs + t)
    g_addr = tl.load(g_addrs + t)
    if ALIGNED:
        # Every address is 16-byte aligned (checked on the host): lets the compiler vectorise.
        w_addr = tl.multiple_of(w_addr, 16)
        g_addr = tl.multiple_of(g_addr, 16)
    offs = start + tl.arange(0, BLOCK).to(tl.int64)
    w_ptrs = w_addr.to(tl.pointer_type(W_DTYPE)) + offs
    g_ptrs = g_addr.to(tl.pointer_type(G_DTYPE)) + offs
    return c, t, w_ptrs, g_ptrs, offs < n


@triton.jit
def _orthogonalize_stats_kernel(
    w_addrs, g_addrs, numels, chunk_tensor, chunk_start, partials,
    W_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    c, _t, w_ptrs, g_ptrs, mask = _chunk_pointers(
        w_addrs, g_addrs, numels, chunk_tensor, chunk_start, W_DTYPE, G_DTYPE, ALIGNED, BLOCK
    )
    w = tl.load(w_ptrs, mask=mask, other=0.0).to(tl.float64)
    g = tl.load(g_ptrs, mask=mask, other=0.0).to(tl.float64)
    base = partials + c.to(tl.int64) * 3
    tl.store(base, tl.sum(w * g, axis=0))
    tl.store(base + 1, tl.sum(w * w, axis=0))
    tl.store(base + 2, tl.sum(g * g, axis=0))


@triton.jit
def _orthogonalize_apply_kernel(
    w_addrs, g_addrs, numels, chunk_tensor, chunk_start, stats,
    W_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
    RENORM: tl.constexpr, PARALLEL_RTOL2: tl.constexpr,
):  # fmt: skip
    _c, t, w_ptrs, g_ptrs, mask = _chunk_pointers(
        w_addrs, g_addrs, numels, chunk_tensor, chunk_start, W_DTYPE, G_DTYPE, ALIGNED, BLOCK
    )
    base = stats + t.to(tl.int64) * 3
    dot = tl.load(base)
    ww = tl.load(base + 1)
    gg = tl.load(base + 2)
    has_w = ww > 0
    coef = tl.where(has_w, dot / tl.where(has_w, ww, 1.0), 0.0)
    gp2 = tl.maximum(gg - coef * dot, 0.0)
    if RENORM:
        scale = tl.where(gp2 > 0, tl.sqrt(gg / tl.where(gp2 > 0, gp2, 1.0)), 1.0)
    else:
        scale = tl.zeros_like(gg) + 1.0
    # g parallel to w: nothing orthogonal is left; return 0 instead of renormalised rounding noise.
    scale = tl.where((gp2 <= PARALLEL_RTOL2 * gg) & (gg > 0), 0.0, scale)
    scale = tl.where(has_w, scale, 1.0)  # w == 0: g is returned unchanged, bit for bit
    w = tl.load(w_ptrs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptrs, mask=mask, other=0.0).to(tl.float32)
    out = (g - coef.to(tl.float32) * w) * scale.to(tl.float32)
    tl.store(g_ptrs, out.to(G_DTYPE), mask=mask)


# ----------------------------------------------------------------------------- host side
_META_CACHE: OrderedDict[tuple, dict[str, torch.Tensor]] = OrderedDict()
_META_CACHE_SIZE = 16


def _metadata(weights: list[torch.Tensor], grads: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Address table and chunk table, cached by (addresses, sizes): equal keys mean equal tables,
    so a reused address is harmless. Built on the host and copied without a sync."""
    device = grads[0].device
    key = (
        str(device),
        tuple((w.data_ptr(), g.data_ptr(), g.numel()) for w, g in zip(weights, grads)),
    )
    hit = _META_CACHE.get(key)
    if hit is not None:
        _META_CACHE.move_to_end(key)
        return hit
    numels = torch.tensor([g.numel() for g in grads], dtype=torch.int64)
    lengths = (numels + BLOCK - 1) // BLOCK
    chunk_tensor = torch.repeat_interleave(torch.arange(len(grads), dtype=torch.int32), lengths)
    first = torch.cumsum(lengths, 0) - lengths
    chunk_index = torch.arange(int(lengths.sum()), dtype=torch.int64)
    chunk_start = (chunk_index - first.repeat_interleave(lengths)) * BLOCK
    host = {
        "w_addrs": torch.tensor([w.data_ptr() for w in weights], dtype=torch.int64),
        "g_addrs": torch.tensor([g.data_ptr() for g in grads], dtype=torch.int64),
        "numels": numels,
        "lengths": lengths,
        "chunk_tensor": chunk_tensor,
        "chunk_start": chunk_start,
    }
    pin = device.type == "cuda"
    meta = {
        k: (v.pin_memory() if pin else v).to(device, non_blocking=True) for k, v in host.items()
    }
    meta["aligned"] = all(t.data_ptr() % 16 == 0 for t in (*weights, *grads))
    meta["n_chunks"] = int(chunk_index.numel())
    _META_CACHE[key] = meta
    if len(_META_CACHE) > _META_CACHE_SIZE:
        _META_CACHE.popitem(last=False)
    return meta


def _common(weights, grads, meta):
    return dict(
        W_DTYPE=_TL_DTYPES[weights[0].dtype],
        G_DTYPE=_TL_DTYPES[grads[0].dtype],
        ALIGNED=meta["aligned"],
        BLOCK=BLOCK,
    )


def partial_stats(
    weights: list[torch.Tensor], grads: list[torch.Tensor], meta: dict | None = None
) -> torch.Tensor:
    """Pass 1: per-tensor ``(w.g, w.w, g.g)`` as float64 ``[T, 3]`` (one launch + a segmented sum).

    ``weights``/``grads``: equal-length lists of contiguous tensors, one dtype per list, one device.
    The result is a sum over elements, so shards of the same tensors can all-reduce it (SUM).
    """
    meta = meta or _metadata(weights, grads)
    device = grads[0].device
    if meta["n_chunks"] == 0:
        return torch.zeros(len(grads), 3, dtype=torch.float64, device=device)
    partials = torch.empty(meta["n_chunks"], 3, dtype=torch.float64, device=device)
    _orthogonalize_stats_kernel[(meta["n_chunks"],)](
        meta["w_addrs"], meta["g_addrs"], meta["numels"], meta["chunk_tensor"],
        meta["chunk_start"], partials, **_common(weights, grads, meta),
    )  # fmt: skip
    # unsafe=True skips a lengths.sum().item() check, which would sync the host.
    return torch.segment_reduce(partials, "sum", lengths=meta["lengths"], axis=0, unsafe=True)


def apply_(
    weights: list[torch.Tensor],
    grads: list[torch.Tensor],
    stats: torch.Tensor,
    renorm: bool,
    meta: dict | None = None,
) -> None:
    """Pass 2: rewrite every ``g`` in place from its tensor's row of ``stats [T, 3]`` (float64)."""
    meta = meta or _metadata(weights, grads)
    if meta["n_chunks"] == 0:
        return
    _orthogonalize_apply_kernel[(meta["n_chunks"],)](
        meta["w_addrs"], meta["g_addrs"], meta["numels"], meta["chunk_tensor"],
        meta["chunk_start"], stats.contiguous(), RENORM=bool(renorm),
        PARALLEL_RTOL2=PARALLEL_RTOL**2, **_common(weights, grads, meta),
    )  # fmt: skip


def orthogonalize_(weights: list[torch.Tensor], grads: list[torch.Tensor], renorm: bool) -> None:
    """Both passes for one dtype group: 2 Triton launches (+1 segmented sum) for all tensors."""
    meta = _metadata(weights, grads)
    apply_(weights, grads, partial_stats(weights, grads, meta), renorm, meta)
