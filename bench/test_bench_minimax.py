"""Causal minimax equivalence-class search: the paper's MAG recursion vs brute-force enumeration.

Graph: ``Y`` with two stable chains of length ``k`` and a mutable child (``(k + 1)^2`` classes of
``4^k`` subsets). Full size ``k = 7`` (16384 subsets); smoke (``STABLECORE_BENCH_SMOKE=1``)
``k = 4``. ``extra_info``: subsets, classes, d-separation tests. Pure-Python graph code: CPU only.
The peer is the enumeration every subset needs without the search (the official code's
``simulation/main.py`` path); there is no packaged peer.
"""

from __future__ import annotations

import os
import resource

import pytest

from stablecore.methods.minimax import enumerate_classes, search_classes

SMOKE = os.environ.get("STABLECORE_BENCH_SMOKE") == "1"
K = 4 if SMOKE else 7


def _two_chains(k: int) -> dict[str, list[str]]:
    p = {"E": [], "Y": [], "M": ["Y", "E"]}
    for c in "AB":
        prev = "Y"
        for i in range(1, k + 1):
            p[f"{c}{i}"] = [prev]
            prev = f"{c}{i}"
    return p


@pytest.mark.parametrize("impl", ["search", "enumerate"])
def test_bench_minimax_classes(benchmark, impl):
    graph = _two_chains(K)
    fn = search_classes if impl == "search" else enumerate_classes
    stats: dict = {}
    classes = benchmark.pedantic(lambda: fn(graph, stats=stats), rounds=1, iterations=1)
    benchmark.extra_info.update(
        case=f"equivalence classes, two chains k={K}",
        impl="stablecore" if impl == "search" else "enumeration",
        floor_s=None,
        peak_mem_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        subsets=4**K,
        classes=len(classes),
        dsep_tests=stats["dsep"],
    )
    assert len(classes) == (K + 1) ** 2
