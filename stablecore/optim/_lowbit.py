"""Low-bit optimizer states: blockwise quantizers for Adam's first and second moments.

Schemes (``state_bits``):

* 32: fp32 moments. 16: bf16 moments (round to nearest).
* 8: blockwise dynamic quantization, block 256, fp32 absmax per block; m uses the signed
  dynamic-tree map (256 codes), v the unsigned one (bitsandbytes / torchao layout).
* 4: block 128, fp32 absmax per block, two codes per byte (element ``2i`` in the high nibble);
  m uses the signed dynamic map ``create_dynamic_map(True, 3, 4)`` (16 codes, +1 but no -1), v the
  linear map *without zero* ``{1/16, ..., 1}``: the zero-point problem of the 4-bit paper (an
  entry of v rounded to 0 makes ``1/sqrt(v)`` explode) is why v must not have a zero code.
* Which tensors are quantized (:func:`is_quantized`) depends on the *logical shape* only, never
  on sharding or world size: ``numel >= 4096`` and ``ndim >= 2``. Everything else (small
  tensors, 1-D tensors) keeps fp32 states whatever ``state_bits`` says.
* Row-padded blocks: a quantized tensor is viewed as ``[R, L]`` (``R = shape[0]``,
  ``L = numel / R``) and every row is cut into blocks of ``B`` (256 at 8 bits, 128 at 4 bits)
  starting at the row start; the last block of a row is partial when ``L % B != 0`` (its absmax
  is over its real elements only). Codes are stored row-padded: ``R * Lp / per_byte`` uint8
  with ``Lp = ceil(L / B) * B`` (the padding codes are whatever quantizing 0 gives and are
  never read back), absmax ``R * ceil(L / B)`` fp32 (see :func:`row_layout`). When
  ``L % B == 0`` this is exactly the flat blockwise layout of earlier versions (checkpoints stay
  compatible). Why rows: dim-0 sharding (FSDP2) cuts a tensor between rows, and no block ever
  crosses a row, so a sharded run quantizes exactly the blocks the unsharded one does, for any
  world size, with no collective (see :mod:`stablecore.optim._distributed`). A 1-D tensor is a
  column of rows of length 1, so it can be cut anywhere: it stays fp32.
* Element ``e`` of a quantized tensor (row ``r = e // L``, column ``c = e % L``) has code
  index ``r * Lp + c`` (4 bits: byte ``(r * Lp + c) // 2``, even indices in the high nibble)
  and block index ``r * (Lp / B) + c // B``.

The quantizer is *exactly* nearest-code: ``x / absmax`` is computed in fp32 (IEEE division) and the
code is the index of the nearest map entry in exact arithmetic, ties to the lower index. It is
implemented as "count the decision thresholds strictly below ``x / absmax``" where each threshold
is the exact midpoint of two neighbouring codes rounded *down* to fp32; for an fp32 input this
comparison equals the exact one (see :func:`thresholds`). Blocks whose absmax is 0 quantize
every entry as if it were 0. A partial block is zero-padded (zeros never raise an absmax).

Example::

    codes, absmax = quantize_blockwise(torch.randn(5000), "m", 4)  # [2504] uint8, [40] fp32
    x = dequantize_blockwise(codes, absmax, "m", 4, 5000)  # [5000] fp32
    codes, absmax = quantize_blockwise(torch.randn(40, 300), "m", 4, row=300)  # [40*384/2], [120]
    assert is_quantized((40, 300), 4) and not is_quantized((5000,), 4)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch

MIN_QUANT_NUMEL = 4096
BLOCK_SIZES = {8: 256, 4: 128}
STATE_BITS = (32, 16, 8, 4)


def dynamic_map(
    signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8
) -> list[float]:
    """The dynamic-tree ("DE") map of the 8-bit optimizers paper, as a sorted list of floats.

    Each exponent ``i`` contributes the midpoints of a linear split of [0.1, 1] scaled by
    ``10**(i - max_exponent_bits + 1)``; 0 and 1 are appended. Computed in float64.
    """
    data: list[float] = []
    for i in range(max_exponent_bits):
        # the sign bit of the signed map is paid for by halving every exponent's fraction items
        n_items = 2 ** (i + total_bits - max_exponent_bits - (1 if signed else 0))
        bounds = [0.1 + 0.9 * j / n_items for j in range(n_items + 1)]
        means = [(a + b) / 2 for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        scale = 10.0 ** (-(max_exponent_bits - 1) + i)
        data += [scale * m for m in means]
        if signed:
            data += [-scale * m for m in means]
    data += [0.0, 1.0]
    while len(data) < 2**total_bits:  # unsigned maps of fewer bits: pad with zeros like bnb
        data.append(0.0)
    if len(data) != 2**total_bits:
        raise ValueError(f"dynamic map has {len(data)} entries, expected {2**total_bits}")
    return sorted(data)


def linear_map_no_zero(bits: int = 4) -> list[float]:
    """``{(i + 1) / 2**bits}``: the unsigned linear map without zero (lpmm's "power-1")."""
    return [(i + 1) / 2**bits for i in range(2**bits)]


@functools.cache
def _qmap_cpu(kind: str, bits: int) -> torch.Tensor:
    if bits == 8:
        values = dynamic_map(signed=(kind == "m"), max_exponent_bits=7, total_bits=8)
    elif bits == 4:
        values = dynamic_map(True, 3, 4) if kind == "m" else linear_map_no_zero(4)
    else:
        raise ValueError(f"no quantization map for state_bits={bits}; use 8 or 4")
    return torch.tensor(values, dtype=torch.float64).to(torch.float32)


def qmap(kind: str, bits: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The code table (fp32, sorted ascending) for moment ``kind`` ("m" or "v") at ``bits``."""
    if kind not in ("m", "v"):
        raise ValueError(f"kind must be 'm' or 'v', got {kind!r}")
    return _qmap_cpu(kind, bits).to(device)


@functools.cache
def _thresholds_cpu(kind: str, bits: int) -> torch.Tensor:
    q = _qmap_cpu(kind, bits).double()
    mid = (q[:-1] + q[1:]) / 2  # exact: sum of two fp32 values fits a float64
    t = mid.to(torch.float32)
    # round down to fp32 so that "x > t" (x fp32) equals "x > mid" exactly: if mid is not an
    # fp32 value it lies strictly between t and the next float up, and no fp32 x sits in between
    t = torch.where(t.double() > mid, torch.nextafter(t, torch.tensor(-float("inf"))), t)
    return t


def thresholds(kind: str, bits: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Decision thresholds ``[2**bits - 1]`` fp32: code = #{k : x > thresholds[k]}."""
    return _thresholds_cpu(kind, bits).to(device)


def is_quantized(shape: torch.Size | Sequence[int] | int, bits: int) -> bool:
    """Whether a tensor of logical shape ``shape`` gets quantized states at ``bits``.

    True iff ``bits`` is 8 or 4, ``numel >= 4096`` and ``ndim >= 2``: the rule is a function of
    the logical shape alone, so single-process, DDP and FSDP2 runs at any world size quantize the
    same tensors with the same (row-padded) blocks (see the module docstring). An ``int`` is read
    as the 1-D shape ``(numel,)`` (the old signature) and is therefore never quantized.

    Example: ``is_quantized((32000, 2048), 4)`` and ``is_quantized((2048, 5461), 4)`` are True;
    ``is_quantized((8192,), 8)`` (1-D) and ``is_quantized((30, 100), 8)`` (3000 < 4096) are False.
    """
    if isinstance(shape, bool) or not isinstance(shape, (int, torch.Size, tuple, list)):
        raise TypeError(f"is_quantized: shape must be a torch.Size, tuple or int, got {shape!r}")
    dims = (int(shape),) if isinstance(shape, int) else tuple(int(d) for d in shape)
    if bits not in BLOCK_SIZES or len(dims) < 2:
        return False
    return math.prod(dims) >= MIN_QUANT_NUMEL


def row_layout(shape: torch.Size | Sequence[int], bits: int) -> tuple[int, int, int]:
    """``(R, L, Lp)`` of the row-padded layout: rows ``R = shape[0]``, row length
    ``L = prod(shape[1:])`` and padded row length ``Lp = ceil(L / B) * B`` (``B`` the block of
    ``bits``). A 1-D (or 0-d) shape is one row (``R = 1``), the flat layout."""
    dims = tuple(int(d) for d in shape)
    block = BLOCK_SIZES[bits]
    if len(dims) >= 2:
        rows, row = dims[0], math.prod(dims[1:])
    else:
        rows, row = 1, math.prod(dims)
    return rows, row, -(-row // block) * block


def _normalize(x: torch.Tensor, block: int, row: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    n = x.numel()
    row = n if row is None or n == 0 else int(row)
    if n % max(row, 1) != 0:
        raise ValueError(f"row length {row} does not divide numel {n} (shape {tuple(x.shape)})")
    rows = n // row if row > 0 else 0
    padded_row = -(-row // block) * block
    # zero-padding each row to whole blocks: zeros never raise a block's absmax
    grid = torch.zeros(rows, padded_row, dtype=torch.float32, device=x.device)
    grid[:, :row] = x.reshape(rows, row).to(torch.float32)
    blocks = grid.view(-1, block)
    absmax = blocks.abs().amax(dim=1)
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    normed = torch.where(absmax[:, None] > 0, blocks / safe[:, None], torch.zeros_like(blocks))
    return normed, absmax


def codes_of(normed: torch.Tensor, thr: torch.Tensor) -> torch.Tensor:
    """Nearest-code indices (int64) of fp32 values already divided by their block absmax."""
    return torch.searchsorted(thr, normed.contiguous(), right=False)


def pack4(codes: torch.Tensor) -> torch.Tensor:
    """``[2k]`` codes in 0..15 -> ``[k]`` uint8, element ``2i`` in the high nibble."""
    c = codes.to(torch.uint8).view(-1, 2)
    return (c[:, 0] << 4) | c[:, 1]


def unpack4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack4`: ``[k]`` uint8 -> ``[2k]`` int64 codes."""
    hi = (packed >> 4) & 15
    lo = packed & 15
    return torch.stack([hi, lo], dim=1).reshape(-1).to(torch.int64)


def quantize_blockwise(
    x: torch.Tensor, kind: str, bits: int, row: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x`` (any shape, any float dtype) -> (codes uint8, absmax fp32 ``[nblocks]``).

    ``row``: the row length ``L`` of the row-padded layout (``x`` viewed as ``[numel / L, L]``,
    every row padded to ``Lp = ceil(L / B) * B``); None: one row (flat blocks).
    codes: ``[R * Lp]`` for 8 bits, ``[R * Lp // 2]`` (packed) for 4 bits; absmax
    ``[R * Lp / B]``.
    """
    block = BLOCK_SIZES[bits]
    normed, absmax = _normalize(x, block, row)
    codes = codes_of(normed.reshape(-1), thresholds(kind, bits, x.device))
    if bits == 4:
        return pack4(codes), absmax
    return codes.to(torch.uint8), absmax


def dequantize_blockwise(
    codes: torch.Tensor,
    absmax: torch.Tensor,
    kind: str,
    bits: int,
    numel: int,
    row: int | None = None,
) -> torch.Tensor:
    """fp32 ``[numel]`` values of quantized state (``qmap[code] * absmax``); ``row`` as in
    :func:`quantize_blockwise` (padding codes are dropped, never read)."""
    block = BLOCK_SIZES[bits]
    idx = unpack4(codes.reshape(-1)) if bits == 4 else codes.reshape(-1).to(torch.int64)
    q = qmap(kind, bits, codes.device)[idx].view(-1, block)
    vals = (q * absmax.reshape(-1)[:, None]).reshape(-1)
    if row is None or numel == 0:
        return vals[:numel]
    padded_row = -(-int(row) // block) * block
    return vals.view(-1, padded_row)[:, :row].reshape(-1)[:numel]


# ---- state entries in optimizer.state[p] -------------------------------------------------


def moment_keys(name: str) -> tuple[str, str]:
    return f"{name}_codes", f"{name}_absmax"


def _kind(name: str) -> str:
    return "m" if name == "exp_avg" else "v"


def _row_of(shape: torch.Size | Sequence[int]) -> int | None:
    return math.prod(shape[1:]) if len(shape) >= 2 else None


def init_moment(state: dict, name: str, p: torch.Tensor, bits: int) -> None:
    """Create zero state ``name`` for param ``p`` at ``bits``: codes ``[R * Lp / per_byte]``
    uint8 and absmax ``[R * Lp / B]`` fp32 (:func:`row_layout` of ``p.shape``) if
    :func:`is_quantized` (``p.shape``), else a dense fp32 (bf16 at 16 bits) tensor shaped like
    ``p``."""
    if is_quantized(p.shape, bits):
        block = BLOCK_SIZES[bits]
        rows, _, padded_row = row_layout(p.shape, bits)
        kind = _kind(name)
        # zero input quantizes to the code of 0 (m) / the smallest code (v): either way 0 * 0;
        # found on the host (no device sync, works for meta tensors)
        codes, _ = quantize_blockwise(torch.zeros(1), kind, bits)
        ckey, akey = moment_keys(name)
        per_byte = 2 if bits == 4 else 1
        state[ckey] = torch.full(
            (rows * padded_row // per_byte,), int(codes[0]), dtype=torch.uint8, device=p.device
        )
        state[akey] = torch.zeros(rows * padded_row // block, dtype=torch.float32, device=p.device)
    else:
        dtype = torch.bfloat16 if bits == 16 else torch.float32
        state[name] = torch.zeros(p.shape, dtype=dtype, device=p.device)


def load_moment(state: dict, name: str, p: torch.Tensor, bits: int) -> torch.Tensor:
    """The moment ``name`` as an fp32 tensor shaped like ``p``."""
    if name in state:
        return state[name].to(torch.float32)
    ckey, akey = moment_keys(name)
    vals = dequantize_blockwise(
        state[ckey], state[akey], _kind(name), bits, p.numel(), _row_of(p.shape)
    )
    return vals.view(p.shape)


def store_moment(
    state: dict, name: str, value: torch.Tensor, keep: torch.Tensor | None = None
) -> None:
    """Write fp32 ``value`` (shaped like the param: its row length picks the row-padded layout)
    into state ``name``, quantizing if needed.

    ``keep``: 0-d bool tensor; where False the old state stays untouched (no host sync).
    """
    if name in state:
        new = value.to(state[name].dtype)
        state[name].copy_(new if keep is None else torch.where(keep, new, state[name]))
        return
    ckey, akey = moment_keys(name)
    # 4-bit packs a 128-block into 64 bytes, 8-bit a 256-block into 256 bytes
    bits = 4 if state[ckey].numel() == state[akey].numel() * 64 else 8
    codes, absmax = quantize_blockwise(value, _kind(name), bits, _row_of(value.shape))
    if codes.numel() != state[ckey].numel() or absmax.numel() != state[akey].numel():
        raise ValueError(
            f"store_moment({name!r}): a value of shape {tuple(value.shape)} gives {codes.numel()}"
            f" codes / {absmax.numel()} blocks at {bits} bits, the state holds "
            f"{state[ckey].numel()} / {state[akey].numel()}; pass the value shaped like the param"
        )
    codes = codes.view(state[ckey].shape)
    absmax = absmax.view(state[akey].shape)
    if keep is not None:
        codes = torch.where(keep, codes, state[ckey])
        absmax = torch.where(keep, absmax, state[akey])
    state[ckey].copy_(codes)
    state[akey].copy_(absmax)


def state_bytes(state: dict) -> int:
    """Bytes held by the tensors of one parameter's state."""
    return sum(v.numel() * v.element_size() for v in state.values() if isinstance(v, torch.Tensor))
