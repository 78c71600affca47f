"""``stablecore demo``: one module per method, each a ``run(ctx) -> DemoResult``.

A demo module defines ``TITLE`` (one line) and ``run(ctx: DemoContext) -> DemoResult``. It writes
its plots into ``ctx.out_dir`` and returns the rows of its results table. ``ctx.quick`` asks for a
smaller run (used by the tests); a default run of a demo should stay within a few CPU minutes.
``ctx.full`` (``stablecore demo --full``) asks for the paper-scale evidence where a demo has one
(more seeds, larger problems, the full schedule); it may take much longer.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

import torch

#: Demo modules in the order ``stablecore demo`` runs them; a name whose module is absent is skipped.
DEMOS = (
    "stablemax",
    "grokking",
    "optimizers",
    "sharpness",
    "colide",
    "minimax",
    "stable_gnn",
    "counterfactual",
    "multimodal",
)


@dataclass
class DemoContext:
    out_dir: Path
    device: torch.device
    quick: bool = False
    seed: int = 0
    full: bool = False


@dataclass
class DemoResult:
    """What one demo shows: a table (list of rows with the same keys), plots, and a paragraph."""

    title: str
    rows: list[dict[str, object]] = field(default_factory=list)
    plots: list[Path] = field(default_factory=list)
    notes: str = ""


def available() -> list[str]:
    """Names of the demos installed in this copy of stablecore, in run order."""
    return [n for n in DEMOS if importlib.util.find_spec(f"stablecore.demos.{n}") is not None]


def load(name: str):
    if name not in DEMOS:
        raise ValueError(f"unknown demo {name!r}; choose from {', '.join(available())}")
    return importlib.import_module(f"stablecore.demos.{name}")
