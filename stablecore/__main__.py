"""The ``stablecore`` command: ``info``, ``demo``, ``bench``."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stablecore", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, devices, and the backend serving each op")

    demo = sub.add_parser("demo", help="run every method demo; write plots and summary.md")
    demo.add_argument("--out", default="stablecore-demo", help="output folder")
    demo.add_argument("--only", default=None, help="comma-separated demo names")
    mode = demo.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="tiny runs (seconds each)")
    mode.add_argument(
        "--full", action="store_true", help="paper-scale evidence where a demo has it (slow)"
    )
    demo.add_argument("--device", default=None, help="torch device (default: cuda if present)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--list", action="store_true", help="list the demos and exit")

    bench = sub.add_parser("bench", help="run the benchmarks (pytest-benchmark) and report")
    bench.add_argument("--smoke", action="store_true", help="tiny sizes, runs on CPU")
    bench.add_argument("--json", default="bench-results.json", help="benchmark JSON output")
    bench.add_argument("--report", default=None, help="only turn an existing JSON into a report")
    bench.add_argument("--bench-dir", default="bench", help="folder with the bench suites")
    bench.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "info":
        from stablecore.info import main as info_main

        return info_main()
    if args.command == "demo":
        from stablecore import demos
        from stablecore.demos.runner import run_demos

        if args.list:
            print("\n".join(demos.available()))
            return 0
        only = [n.strip() for n in args.only.split(",") if n.strip()] if args.only else None
        outcomes, _ = run_demos(args.out, only, args.quick, args.device, args.seed, full=args.full)
        return 0 if all(result is not None for _, result, _, _ in outcomes) else 1
    if args.command == "bench":
        from stablecore.bench_report import write_report

        if args.report is None:
            env = dict(os.environ, STABLECORE_BENCH_SMOKE="1" if args.smoke else "0")
            cmd = [
                sys.executable,
                "-m",
                "pytest",
                args.bench_dir,
                "-q",
                "-p",
                "no:cacheprovider",
                f"--benchmark-json={args.json}",
                *args.pytest_args,
            ]
            code = subprocess.call(cmd, env=env)
            if code != 0:
                return code
        source = Path(args.report or args.json)
        md = write_report(source, source.with_suffix(".md"))
        print(f"wrote {md} and its plot")
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
