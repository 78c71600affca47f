"""The ``stablecore`` command: info, demo (writes summary.md and PNGs), bench report."""

from __future__ import annotations

import json
import subprocess
import sys

from stablecore.__main__ import main
from stablecore.bench_report import write_report


def test_info_lists_every_op_and_device():
    out = subprocess.run(
        [sys.executable, "-m", "stablecore", "info"], capture_output=True, text=True, check=True
    ).stdout
    for op in ("stablemax", "log_stablemax", "stablemax_backward"):
        assert f"| {op} " in out
    assert "torch" in out and "| cpu " in out and "| cuda " in out


def test_demo_writes_summary_and_plot(tmp_path, capsys):
    code = main(["demo", "--only", "stablemax", "--quick", "--out", str(tmp_path)])
    assert code == 0
    summary = (tmp_path / "summary.md").read_text()
    assert "StableMax vs softmax" in summary and "| ok " in summary
    assert (tmp_path / "stablemax_collapse.png").stat().st_size > 1000
    assert "first gap with grad_y == 0" in capsys.readouterr().out


def test_demo_rejects_unknown_name(tmp_path):
    import pytest

    with pytest.raises(ValueError, match="unknown demo"):
        main(["demo", "--only", "nope", "--out", str(tmp_path)])


def test_demo_quick_and_full_are_exclusive(tmp_path, capsys):
    import pytest

    from stablecore.demos.runner import run_demos

    with pytest.raises(SystemExit):
        main(["demo", "--quick", "--full", "--out", str(tmp_path)])
    assert "not allowed with argument" in capsys.readouterr().err
    with pytest.raises(ValueError, match="quick or full"):
        run_demos(tmp_path, ["stablemax"], quick=True, full=True)


def test_bench_report_ratios(tmp_path):
    def bench(impl, median, floor=None):
        return {
            "stats": {"median": median},
            "extra_info": {"case": "op [4, 4]", "impl": impl, "median_s": median, "floor_s": floor},
        }

    path = tmp_path / "b.json"
    path.write_text(
        json.dumps({"benchmarks": [bench("stablecore", 0.002, 0.001), bench("peer", 0.004)]})
    )
    md = write_report(path, tmp_path / "b.md").read_text()
    assert "| op [4, 4] | peer | 4 | - | 0.5 | - |" in md
    assert "| op [4, 4] | stablecore | 2 | - | - | 2 |" in md
    assert (tmp_path / "b.png").exists()
