"""``python -m stablecore.info``: versions, devices, and which backend serves each op and why."""

from __future__ import annotations

import importlib.metadata
import platform
import sys

from stablecore import _backends


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def format_table(rows: list[dict[str, object]]) -> str:
    """A plain-text table (also valid markdown) of rows that share their keys."""
    if not rows:
        return "(no rows)"
    keys = list(rows[0])
    cells = [[str(r.get(k, "")) for k in keys] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    line = lambda values: "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(keys), sep, *(line(c) for c in cells)])


def report() -> str:
    import torch

    import stablecore.ops  # noqa: F401  (registers every op in the table)
    from stablecore.ops._dispatch import backend_rows

    env = _backends.environment()
    versions = {
        "python": platform.python_version(),
        "stablecore": _version("stablecore"),
        "torch": torch.__version__,
        "triton": env.triton_version or "not installed",
        "numpy": _version("numpy"),
    }
    cuda = _backends.cuda_devices()
    lines = ["stablecore environment", ""]
    lines += [f"  {k:<11} {v}" for k, v in versions.items()]
    lines += [
        f"  {'devices':<11} cpu" + "".join(f", cuda:{i} ({n})" for i, n in enumerate(cuda)),
        f"  {'TRITON_INTERPRET':<11} {int(env.triton_interpret)}",
        f"  {'STABLECORE_FORCE_REFERENCE':<11} {int(env.force_reference)}",
        "  compiled extension: "
        + ("loaded" if env.compiled_extension else str(env.compiled_extension_error)),
        "",
        "Backends (the reference serves every device; Triton takes over where listed):",
        format_table(backend_rows()),
    ]
    return "\n".join(lines)


def main() -> int:
    print(report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
