"""Row-padded low-bit blocks (rows whose length is not a multiple of the block) through every
Stable-SPAM / SPAM backend: fused Triton kernels (interpreter), numba, foreach, eager, and the
state_dict round trip. The quantizer itself is checked against a brute-force oracle in
``test_lowbit.py``; FSDP2 trajectories of such shapes in ``test_distributed.py``."""

from __future__ import annotations

import pytest
import torch

from stablecore import _backends
from stablecore.optim import _lowbit as L
from stablecore.optim._cpu_offload import numba_available
from stablecore.optim.spam import SPAM
from stablecore.optim.stable_spam import StableSPAM
from stablecore.testing import assert_close, seed_all

INTERPRET = _backends.environment().triton_interpret
interpret_only = pytest.mark.skipif(not INTERPRET, reason="needs TRITON_INTERPRET=1")
# [40, 300]: row 300 -> 384 at 4 bits (two whole blocks + 44), 512 at 8 bits (one + 44);
# [33, 500]: row 500 -> 512 at both (4 bits: 3 whole + 116; 8 bits: 1 whole + 244);
# [4100]: 1-D, fp32 states in the same bucket
SHAPES = [(40, 300), (33, 500), (4100,)]
_KW = dict(lr=1e-2, update_proj_gap=4, weight_decay=0.1, total_T=10)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _grads(k: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(500 + k)
    out = []
    for s in SHAPES:
        g = torch.randn(s, generator=gen)
        if k == 1:  # a spike in the partial block of a row: AdaClip + a new absmax there
            g.view(-1)[299 if len(s) == 2 else 0] = 300.0
        out.append(g)
    return out


def _run(backend: str, bits: int, steps: int):
    seed_all(4)
    ps = [torch.nn.Parameter(torch.randn(s)) for s in SHAPES]
    opt = StableSPAM(ps, state_bits=bits, backend=backend, **_KW)
    for k in range(steps):
        for p, g in zip(ps, _grads(k), strict=True):
            p.grad = g
        opt.step()
    return ps, opt


def _check_layout(ps, opt, bits):
    block = L.BLOCK_SIZES[bits]
    for p in ps[:2]:
        st = opt.state[p]
        rows, row, prow = L.row_layout(p.shape, bits)
        assert row % block != 0
        assert st["exp_avg_codes"].numel() == rows * prow // (8 // bits)
        assert st["exp_avg_absmax"].numel() == rows * prow // block
    assert "exp_avg" in opt.state[ps[2]]


def _compare(ref, got):
    (pa, oa), (pb, ob) = ref, got
    for x, y in zip(pa, pb, strict=True):
        assert_close(y, x, dtype=torch.float32)
        sa, sb = oa.state[x], ob.state[y]
        assert set(sa) == set(sb)
        for key, va in sa.items():
            vb = sb[key]
            if va.dtype == torch.uint8:  # identical up to rare one-ulp input flips
                assert float((va != vb).float().mean()) <= 5e-3, key
            elif key == "scalars":
                torch.testing.assert_close(vb, va, rtol=1e-5, atol=1e-6)
            else:
                assert_close(vb, va, dtype=torch.float32)


@pytest.mark.parametrize("bits", [8, 4])
def test_padded_rows_get_quantized_states(bits):
    ps, opt = _run("eager", bits, 1)
    _check_layout(ps, opt, bits)
    # the padding codes of each row's last block are never read: poisoning them changes nothing
    st = opt.state[ps[0]]
    m = L.load_moment(st, "exp_avg", ps[0], bits)
    rows, row, prow = L.row_layout(ps[0].shape, bits)
    per_byte = 8 // bits
    codes = st["exp_avg_codes"].view(rows, prow // per_byte)
    codes[:, -(-row // per_byte) :] = 0x5A  # bytes past the last real element of every row
    assert torch.equal(L.load_moment(st, "exp_avg", ps[0], bits), m)


@pytest.mark.interpret
@interpret_only
@pytest.mark.parametrize("bits", [8, 4])
def test_fused_padded_rows_equal_eager_interpret(bits):
    """The fused kernels walk the row-padded index space: 3 steps (a spike in a partial block,
    weight decay) equal the eager path element-wise, codes and absmax included."""
    ref, got = _run("eager", bits, 3), _run("triton", bits, 3)
    _check_layout(*got, bits)
    _compare(ref, got)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize(
    "backend",
    [
        "foreach",
        pytest.param("cpu", marks=pytest.mark.skipif(not numba_available(), reason="needs numba")),
    ],
)
def test_cpu_backends_padded_rows_equal_eager(backend, bits):
    ref, got = _run("eager", bits, 4), _run(backend, bits, 4)
    _check_layout(*got, bits)
    _compare(ref, got)


@pytest.mark.parametrize("bits", [8, 4])
def test_spam_padded_rows(bits):
    """SPAM shares the layout (eager and foreach paths)."""
    runs = []
    for backend in ("eager", "foreach"):
        seed_all(6)
        ps = [torch.nn.Parameter(torch.randn(s)) for s in SHAPES]
        opt = SPAM(ps, lr=1e-2, state_bits=bits, backend=backend)
        for k in range(3):
            for p, g in zip(ps, _grads(k), strict=True):
                p.grad = g
            opt.step()
        assert "exp_avg_codes" in opt.state[ps[0]] and "exp_avg_codes" in opt.state[ps[1]]
        runs.append((ps, opt))
    for x, y in zip(runs[0][0], runs[1][0], strict=True):
        assert_close(y, x, dtype=torch.float32)


@pytest.mark.parametrize("bits", [8, 4])
def test_state_dict_round_trip_padded_rows(bits):
    """Saving after 2 steps and loading into a fresh optimizer continues exactly like the
    uninterrupted run (codes, absmax and params bit-identical)."""
    ps, opt = _run("eager", bits, 2)
    sd = opt.state_dict()
    ps2 = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    opt2 = StableSPAM(ps2, state_bits=bits, backend="eager", **_KW)
    opt2.load_state_dict(sd)
    for k in (2, 3):
        for p, q, g in zip(ps, ps2, _grads(k), strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        opt2.step()
    for p, q in zip(ps, ps2, strict=True):
        assert torch.equal(p, q)
        for key, v in opt.state[p].items():
            assert torch.equal(opt2.state[q][key], v), key
    _check_layout(ps2, opt2, bits)
