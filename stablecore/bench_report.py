"""Turn a pytest-benchmark JSON (from ``bench/``) into a markdown table of ratios and a plot.

For each case the stablecore row is compared with every peer of the same case
(ours / peer: below 1 is faster) and with the floor (ours / floor: 1 is the hardware limit).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path


def load_cases(path: Path) -> dict[str, dict[str, dict]]:
    """{case: {impl: {"median_s", "floor_s", "peak_mem_bytes"}}} from a benchmark JSON."""
    data = json.loads(Path(path).read_text())
    cases: dict[str, dict[str, dict]] = defaultdict(dict)
    for bench in data.get("benchmarks", []):
        info = bench.get("extra_info", {})
        if "case" not in info or "impl" not in info:
            continue
        median = info.get("median_s") or bench.get("stats", {}).get("median")
        cases[info["case"]][info["impl"]] = {
            "median_s": median,
            "floor_s": info.get("floor_s"),
            "peak_mem_bytes": info.get("peak_mem_bytes"),
        }
    return cases


def _fmt(x: float | None, unit: str = "") -> str:
    return "-" if x is None else f"{x:.3g}{unit}"


def write_report(json_path: Path, md_path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(Path(json_path).read_text())
    machine = data.get("machine_info", {})
    commit = data.get("commit_info", {}).get("id", "unknown")
    cases = load_cases(json_path)
    lines = [
        f"# Benchmarks ({machine.get('cpu', {}).get('brand_raw', '')})",
        "",
        f"git {commit[:12]}; medians; ratios below 1 mean stablecore is faster.",
        "",
        "| case | impl | median ms | peak MB | ours / this | ours / floor |",
        "|---|---|---|---|---|---|",
    ]
    ratios = []
    for case, impls in cases.items():
        ours = impls.get("stablecore", {}).get("median_s")
        floor = impls.get("stablecore", {}).get("floor_s")
        for impl, row in impls.items():
            t = row["median_s"]
            vs = ours / t if ours and t and impl != "stablecore" else None
            of = ours / floor if ours and floor and impl == "stablecore" else None
            mem = row["peak_mem_bytes"] / 1e6 if row["peak_mem_bytes"] is not None else None
            lines.append(
                f"| {case} | {impl} | {_fmt(t and t * 1e3)} | {_fmt(mem)} | {_fmt(vs)} | {_fmt(of)} |"
            )
            if vs is not None:
                ratios.append((f"{case}\nvs {impl}", vs))
    md_path = Path(md_path)
    md_path.write_text("\n".join(lines) + "\n")
    if ratios:
        fig, ax = plt.subplots(figsize=(8, 0.45 * len(ratios) + 1.2))
        labels, values = zip(*ratios)
        ax.barh(
            range(len(values)), values, color=["tab:green" if v < 1 else "tab:red" for v in values]
        )
        ax.axvline(1.0, color="black", lw=0.8)
        ax.set_yticks(range(len(values)), labels, fontsize=7)
        ax.set_xlabel("time ours / peer (below 1: stablecore faster)")
        fig.tight_layout()
        fig.savefig(md_path.with_suffix(".png"), dpi=110)
        plt.close(fig)
    return md_path
