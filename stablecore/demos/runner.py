"""Runs the demos, prints their tables, and writes ``summary.md`` and the plots."""

from __future__ import annotations

import time
import traceback
from pathlib import Path

import torch

from stablecore import demos
from stablecore.demos import DemoContext, DemoResult
from stablecore.info import format_table


def best_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def run_demos(
    out_dir: str | Path = "stablecore-demo",
    only: list[str] | None = None,
    quick: bool = False,
    device: str | torch.device | None = None,
    seed: int = 0,
    echo=print,
    full: bool = False,
) -> tuple[list[tuple[str, DemoResult | None, float, str]], Path]:
    """Run the selected demos; returns ``([(name, result or None, seconds, error)], summary)``.

    ``full`` asks each demo for its paper-scale evidence (slow); it cannot be combined with ``quick``.
    """
    if quick and full:
        raise ValueError("choose quick or full, not both")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(device) if device is not None else best_device()
    names = only or demos.available()
    unknown = [n for n in names if n not in demos.available()]
    if unknown:
        raise ValueError(f"unknown demo(s) {unknown}; available: {demos.available()}")
    outcomes = []
    for i, name in enumerate(names, 1):
        echo(f"\n[{i}/{len(names)}] {name} on {device} ...")
        start = time.perf_counter()
        try:
            torch.manual_seed(seed)
            module = demos.load(name)
            ctx = DemoContext(out_dir, device, quick=quick, seed=seed, full=full)
            result, error = module.run(ctx), ""
        except Exception as exc:  # one failing demo must not hide the others' results
            result, error = None, f"{type(exc).__name__}: {exc}"
            echo(traceback.format_exc())
        seconds = time.perf_counter() - start
        outcomes.append((name, result, seconds, error))
        if result is not None:
            echo(f"{result.title}  ({seconds:.1f} s)")
            echo(format_table(result.rows))
        else:
            echo(f"FAILED ({seconds:.1f} s): {error}")
    summary = out_dir / "summary.md"
    mode = "quick" if quick else "full-scale" if full else "default"
    summary.write_text(_summary_markdown(outcomes, device, mode))
    echo(f"\nwrote {summary}")
    return outcomes, summary


def _summary_markdown(outcomes, device: torch.device, mode: str) -> str:
    overview = [
        {
            "demo": name,
            "status": "ok" if result is not None else f"failed: {error}",
            "seconds": f"{seconds:.1f}",
        }
        for name, result, seconds, error in outcomes
    ]
    parts = [
        "# stablecore demo",
        "",
        f"Device: `{device}`; torch {torch.__version__}; {mode} run.",
        "",
        format_table(overview),
    ]
    for name, result, seconds, _ in outcomes:
        if result is None:
            continue
        parts += ["", f"## {result.title}", "", f"`{name}`, {seconds:.1f} s", ""]
        parts += [format_table(result.rows), ""]
        parts += [f"![{p.name}]({p.name})" for p in result.plots]
        if result.notes:
            parts += ["", result.notes]
    return "\n".join(parts) + "\n"
