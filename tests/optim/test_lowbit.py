"""Low-bit state quantizers: maps, nearest-code exactness against a brute-force oracle, packing,
block layout and the small-tensor rule."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stablecore.optim import _lowbit as L
from stablecore.testing import seed_all


def oracle_codes(x: torch.Tensor, kind: str, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Brute force: per block, fp32 x / absmax, then argmin over |n - q| in float64 (first
    index on ties); returns unpacked codes and absmax."""
    block = L.BLOCK_SIZES[bits]
    n = x.numel()
    nb = -(-n // block)
    flat = torch.zeros(nb * block, dtype=torch.float32)
    flat[:n] = x.reshape(-1).float()
    blocks = flat.view(nb, block)
    absmax = blocks.abs().amax(1)
    q = L.qmap(kind, bits).double()
    codes = []
    for b in range(nb):
        normed = (blocks[b] / absmax[b]) if absmax[b] > 0 else torch.zeros(block)
        dist = (normed.double()[:, None] - q[None, :]).abs()
        codes.append(dist.argmin(dim=1))  # argmin returns the first minimum
    return torch.cat(codes), absmax


def test_maps_match_the_notes():
    m4 = [
        -0.8875,
        -0.6625,
        -0.4375,
        -0.2125,
        -0.0775,
        -0.0325,
        -0.0055,
        0.0,
        0.0055,
        0.0325,
        0.0775,
        0.2125,
        0.4375,
        0.6625,
        0.8875,
        1.0,
    ]
    torch.testing.assert_close(L.qmap("m", 4), torch.tensor(m4), rtol=0, atol=1e-7)
    assert torch.equal(L.qmap("v", 4), torch.arange(1, 17, dtype=torch.float32) / 16)
    assert 0.0 not in L.qmap("v", 4).tolist()  # the zero-point fix
    for kind in ("m", "v"):
        q = L.qmap(kind, 8)
        assert q.numel() == 256 and torch.all(q[1:] > q[:-1]) and q[-1] == 1.0
    assert L.qmap("m", 8)[0] < -0.99 and L.qmap("v", 8)[0] == 0.0


@settings(max_examples=25, deadline=None)
@given(
    numel=st.one_of(
        st.sampled_from([1, 2, 127, 128, 129, 255, 256, 257, 4096]), st.integers(1, 3000)
    ),
    kind=st.sampled_from(["m", "v"]),
    bits=st.sampled_from([8, 4]),
    seed=st.integers(0, 2**31 - 1),
    scale=st.sampled_from([1e-6, 1.0, 300.0]),
)
def test_quantizer_is_exactly_nearest_code(numel, kind, bits, seed, scale):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(numel, generator=gen) * scale
    if kind == "v":
        x = x * x  # second moments are non-negative
    codes, absmax = L.quantize_blockwise(x, kind, bits)
    got = L.unpack4(codes) if bits == 4 else codes.long()
    want, want_absmax = oracle_codes(x, kind, bits)
    assert torch.equal(absmax, want_absmax)
    assert torch.equal(got[:numel], want[:numel])


@pytest.mark.parametrize("kind,bits", [("m", 8), ("v", 8), ("m", 4), ("v", 4)])
def test_midpoints_and_ties_go_to_the_lower_code(kind, bits):
    """Inputs at, just below and just above every exact midpoint (the hard cases)."""
    q = L.qmap(kind, bits).double()
    mid = ((q[:-1] + q[1:]) / 2).float()
    vals = torch.cat(
        [
            mid,
            torch.nextafter(mid, torch.tensor(2.0)),
            torch.nextafter(mid, torch.tensor(-2.0)),
            q.float(),
        ]
    )
    vals = vals.clamp(-1, 1)
    x = torch.cat([torch.ones(1), vals])  # absmax 1: normalized values are the inputs
    x = torch.nn.functional.pad(x, (0, -x.numel() % L.BLOCK_SIZES[bits]))
    codes, _ = L.quantize_blockwise(x, kind, bits)
    got = L.unpack4(codes) if bits == 4 else codes.long()
    want, _ = oracle_codes(x, kind, bits)
    assert torch.equal(got, want)


def test_pack_unpack_and_high_nibble_first():
    codes = torch.tensor([1, 2, 15, 0, 7, 9])
    packed = L.pack4(codes)
    assert packed.tolist() == [0x12, 0xF0, 0x79]
    assert torch.equal(L.unpack4(packed), codes)


@pytest.mark.parametrize("bits,rel", [(8, 0.02), (4, 0.2)])
def test_round_trip_error_and_layout(bits, rel):
    seed_all(0)
    x = torch.randn(5000)
    codes, absmax = L.quantize_blockwise(x, "m", bits)
    block = L.BLOCK_SIZES[bits]
    nb = -(-5000 // block)
    assert absmax.shape == (nb,) and absmax.dtype == torch.float32
    assert codes.dtype == torch.uint8 and codes.numel() == nb * block // (2 if bits == 4 else 1)
    y = L.dequantize_blockwise(codes, absmax, "m", bits, 5000)
    err = float((x - y).norm() / x.norm())
    assert err < rel
    # every block's absmax entry is reproduced exactly (the map holds +1)
    blocks = torch.nn.functional.pad(x, (0, nb * block - 5000)).view(nb, block)
    idx = blocks.abs().argmax(1)
    pos = blocks.gather(1, idx[:, None])[:, 0] > 0
    yb = torch.nn.functional.pad(y, (0, nb * block - 5000)).view(nb, block)
    assert torch.equal(yb.gather(1, idx[:, None])[:, 0][pos], absmax[pos])


def test_zero_block_and_second_moment_has_no_zero():
    x = torch.zeros(256)
    x[200:] = torch.rand(56) + 0.5
    codes, absmax = L.quantize_blockwise(x, "v", 4)
    y = L.dequantize_blockwise(codes, absmax, "v", 4, 256)
    assert torch.equal(y[:128], torch.zeros(128))  # an all-zero block stays exactly zero
    assert torch.all(y[128:200] == absmax[1] / 16)  # zeros in a live block -> smallest code


def test_small_tensors_keep_fp32_states():
    assert not L.is_quantized((31, 128), 4) and L.is_quantized((32, 128), 4)  # 3968 / 4096
    assert not L.is_quantized((1000, 1000), 16) and not L.is_quantized((1000, 1000), 32)
    state: dict = {}
    L.init_moment(state, "exp_avg", torch.zeros(15, 256), 8)  # 3840 elements
    assert state["exp_avg"].dtype == torch.float32
    state = {}
    L.init_moment(state, "exp_avg_sq", torch.zeros(32, 128), 4)
    assert state["exp_avg_sq_codes"].numel() == 2048 and state["exp_avg_sq_absmax"].numel() == 32
    v = L.load_moment(state, "exp_avg_sq", torch.zeros(32, 128), 4)
    assert v.shape == (32, 128) and torch.equal(v, torch.zeros(32, 128))


@pytest.mark.parametrize(
    "shape,q",
    [
        ((32000, 2048), True),  # LLaMA embedding
        ((2048, 5504), True),  # 5504 = 43 * 128: whole blocks at 4 bits, padded at 8
        ((2048, 5461), True),  # odd row length (GaLore's LLaMA-1B down projection): padded
        ((8192,), False),  # 1-D: dim-0 sharding may cut it anywhere
        ((4100,), False),
        ((2, 3, 1024), True),  # row = 3 * 1024 elements
        ((4, 3, 500), False),  # 6000 elements, rows of 1500: padded
        ((40, 300), True),
        ((16, 256), True),  # exactly 4096
        ((64, 64), True),  # 4096 elements, rows of 64: one partial block per row
        ((30, 100), False),  # 3000 < 4096
        ((0, 4096), False),
    ],
)
def test_quantization_rule_depends_on_shape(shape, q):
    """Quantized iff numel >= 4096 and ndim >= 2; the states hold R * ceil(L / B) blocks and
    R * Lp codes (row-padded), exactly numel / B blocks when L % B == 0."""
    if shape == (4, 3, 500):
        q = True  # 6000 >= 4096
    assert L.is_quantized(shape, 8) == q and L.is_quantized(torch.Size(shape), 4) == q
    if math.prod(shape) > 2**20:  # the LLaMA shapes: the rule only, no 100 MB allocations
        return
    for bits in (8, 4):
        state: dict = {}
        L.init_moment(state, "exp_avg", torch.zeros(shape), bits)
        assert ("exp_avg_codes" in state) == q, (shape, bits)
        if q:
            n, block = math.prod(shape), L.BLOCK_SIZES[bits]
            row = n // shape[0]
            nbr = -(-row // block)
            assert L.row_layout(shape, bits) == (shape[0], row, nbr * block)
            assert state["exp_avg_absmax"].numel() == shape[0] * nbr
            assert state["exp_avg_codes"].numel() == shape[0] * nbr * block // (8 // bits)
            if row % block == 0:  # the flat layout of earlier versions
                assert state["exp_avg_absmax"].numel() * block == n
        else:
            assert state["exp_avg"].shape == shape and state["exp_avg"].dtype == torch.float32


def oracle_rows(x: torch.Tensor, kind: str, bits: int):
    """Brute force per row block: each row of x [R, L] cut into blocks from its start (last one
    partial), nearest code in float64 of fp32 x / absmax over the real elements; returns the
    codes of the real elements [R, L] and absmax [R, ceil(L / B)]."""
    block = L.BLOCK_SIZES[bits]
    q = L.qmap(kind, bits).double()
    rows, row = x.shape
    codes = torch.empty(rows, row, dtype=torch.int64)
    absmax = torch.empty(rows, -(-row // block))
    for r in range(rows):
        for b in range(absmax.shape[1]):
            seg = x[r, b * block : (b + 1) * block].float()
            a = seg.abs().amax()
            absmax[r, b] = a
            normed = (seg / a) if a > 0 else torch.zeros_like(seg)
            dist = (normed.double()[:, None] - q[None, :]).abs()
            codes[r, b * block : b * block + seg.numel()] = dist.argmin(dim=1)
    return codes, absmax


@pytest.mark.parametrize("bits,shape", [(4, (40, 300)), (8, (33, 500)), (4, (9, 80, 7))])
def test_row_padded_blocks_match_the_oracle(bits, shape):
    """Row-padded quantization is bit-exact nearest code per row block, dequantization drops
    the padding, and splitting the rows (dim-0 shards) gives the same codes and absmax."""
    seed_all(11)
    x = torch.randn(shape) * torch.logspace(-4, 1, shape[0]).view(-1, *[1] * (len(shape) - 1))
    rows, row, prow = L.row_layout(shape, bits)
    assert row % L.BLOCK_SIZES[bits] != 0  # the case the flat rule used to leave in fp32
    for kind in ("m", "v"):
        xi = x.abs() if kind == "v" else x
        codes, absmax = L.quantize_blockwise(xi, kind, bits, row=row)
        want_codes, want_absmax = oracle_rows(xi.reshape(rows, row), kind, bits)
        assert torch.equal(absmax.view(rows, -1), want_absmax)
        got = L.unpack4(codes) if bits == 4 else codes.long()
        assert got.numel() == rows * prow
        assert torch.equal(got.view(rows, prow)[:, :row], want_codes)
        deq = L.dequantize_blockwise(codes, absmax, kind, bits, xi.numel(), row=row)
        want = (
            L.qmap(kind, bits)[want_codes]
            * torch.repeat_interleave(want_absmax, L.BLOCK_SIZES[bits], dim=1)[:, :row]
        )
        assert torch.equal(deq.view(rows, row), want)
        for world in (2, 3, 7):  # dim-0 shards quantize the same blocks
            parts = [L.quantize_blockwise(c, kind, bits, row=row) for c in xi.chunk(world)]
            assert torch.equal(torch.cat([c for c, _ in parts]), codes), (kind, world)
            assert torch.equal(torch.cat([a for _, a in parts]), absmax), (kind, world)
    # state entries round-trip through load/store with the param's shape
    state: dict = {}
    p = torch.zeros(shape)
    L.init_moment(state, "exp_avg", p, bits)
    L.store_moment(state, "exp_avg", x)
    back = L.load_moment(state, "exp_avg", p, bits)
    assert "exp_avg_codes" in state and back.shape == shape
    qx = L.quantize_blockwise(x, "m", bits, row)
    ref = L.dequantize_blockwise(*qx, "m", bits, x.numel(), row)
    assert torch.equal(back.reshape(-1), ref)
    with pytest.raises(ValueError, match="shaped like the param"):
        L.store_moment(state, "exp_avg", x.reshape(-1))  # a flat value would use other blocks


def test_row_rule_keeps_blocks_inside_dim0_shards():
    """Quantizing a [R, L] tensor (L % block == 0) in one piece or as any split into row ranges
    gives the same codes and absmax: the property the FSDP2 path relies on."""
    seed_all(3)
    for bits in (8, 4):
        x = torch.randn(11, 2 * L.BLOCK_SIZES[bits]) * torch.logspace(-3, 2, 11)[:, None]
        whole_c, whole_a = L.quantize_blockwise(x, "m", bits)
        for world in (2, 3, 4, 11):
            parts = [L.quantize_blockwise(c, "m", bits) for c in x.chunk(world)]
            assert torch.equal(torch.cat([c for c, _ in parts]), whole_c), (bits, world)
            assert torch.equal(torch.cat([a for _, a in parts]), whole_a), (bits, world)
        # L % B == 0: the row-padded layout is the flat one (old checkpoints load unchanged)
        row_c, row_a = L.quantize_blockwise(x, "m", bits, row=x.shape[1])
        assert torch.equal(row_c, whole_c) and torch.equal(row_a, whole_a)


def test_is_quantized_accepts_the_old_int_signature_and_rejects_junk():
    assert not L.is_quantized(10**6, 8)  # an int is a 1-D shape
    with pytest.raises(TypeError, match="shape"):
        L.is_quantized(torch.zeros(64, 64), 8)


def test_bad_kind_or_bits_raise():
    with pytest.raises(ValueError, match="kind"):
        L.qmap("w", 4)
    with pytest.raises(ValueError, match="state_bits"):
        L.qmap("m", 3)
