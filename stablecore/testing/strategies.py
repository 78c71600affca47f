"""Hypothesis strategies for shapes, dtypes and tensors (``pip install stablecore[dev]``)."""

from __future__ import annotations

import torch
from hypothesis import strategies as st

#: dtypes that the Triton interpreter computes exactly (bf16 arithmetic is GPU-tier only).
INTERPRET_DTYPES = (torch.float32, torch.float16)
GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def float_dtypes(dtypes=INTERPRET_DTYPES) -> st.SearchStrategy[torch.dtype]:
    return st.sampled_from(list(dtypes))


def row_lengths(block: int = 1024, max_blocks: int = 3) -> st.SearchStrategy[int]:
    """Row lengths that stress a blocked kernel: 1, odd sizes, and block boundaries +-1."""
    edges = [n for k in range(1, max_blocks + 1) for n in (k * block - 1, k * block, k * block + 1)]
    return st.one_of(st.sampled_from([1, 2, 3, *edges]), st.integers(1, max_blocks * block + 7))


def shapes(
    min_dims: int = 1, max_dims: int = 3, min_side: int = 1, max_side: int = 9
) -> st.SearchStrategy[tuple[int, ...]]:
    return st.lists(st.integers(min_side, max_side), min_size=min_dims, max_size=max_dims).map(
        tuple
    )


@st.composite
def tensors(draw, shape, dtype=torch.float32, scale: float | None = None, device="cpu"):
    """A random tensor (never all zeros) with a drawn seed and magnitude."""
    seed = draw(st.integers(0, 2**31 - 1))
    scale = scale if scale is not None else draw(st.sampled_from([0.1, 1.0, 10.0, 300.0]))
    gen = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=gen, dtype=torch.float64) * scale
    return t.to(dtype=dtype, device=device)
