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
    "shape,q8,q4",
    [
        ((32000, 2048), True, True),  # LLaMA embedding
        ((2048, 5504), False, True),  # 5504 = 43 * 128, not a multiple of 256
        ((2048, 5461), False, False),  # odd row length (GaLore's LLaMA-1B down projection)
        ((8192,), False, False),  # 1-D: dim-0 sharding may cut it anywhere
        ((4100,), False, False),
        ((2, 3, 1024), True, True),  # row = 3 * 1024 elements
        ((4, 3, 500), False, False),  # row 1500
        ((16, 256), True, True),  # exactly 4096
        ((64, 64), False, False),  # 4096 elements but rows of 64
        ((0, 4096), False, False),
    ],
)
def test_quantization_rule_depends_on_shape(shape, q8, q4):
    """Quantized iff numel >= 4096, ndim >= 2 and the row length is a multiple of the block:
    then dim-0 sharding never cuts a block, at any world size."""
    assert L.is_quantized(shape, 8) == q8 and L.is_quantized(torch.Size(shape), 4) == q4
    if math.prod(shape) > 2**20:  # the LLaMA shapes: the rule only, no 100 MB allocations
        return
    for bits, want in ((8, q8), (4, q4)):
        state: dict = {}
        L.init_moment(state, "exp_avg", torch.zeros(shape), bits)
        assert ("exp_avg_codes" in state) == want, (shape, bits)
        if want:  # whole blocks, never a padded trailing one; every row a whole number of them
            n, block = math.prod(shape), L.BLOCK_SIZES[bits]
            assert state["exp_avg_absmax"].numel() * block == n
            assert (n // shape[0]) % block == 0
        else:
            assert state["exp_avg"].shape == shape and state["exp_avg"].dtype == torch.float32


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


def test_is_quantized_accepts_the_old_int_signature_and_rejects_junk():
    assert not L.is_quantized(10**6, 8)  # an int is a 1-D shape
    with pytest.raises(TypeError, match="shape"):
        L.is_quantized(torch.zeros(64, 64), 8)


def test_bad_kind_or_bits_raise():
    with pytest.raises(ValueError, match="kind"):
        L.qmap("w", 4)
    with pytest.raises(ValueError, match="state_bits"):
        L.qmap("m", 3)
