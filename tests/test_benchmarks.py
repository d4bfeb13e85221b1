"""The benchmark runner: statistics, table and JSON without KVM, and one real quick case with it.

Never asserts a timing or a ratio: the benchmarks measure, the tests check that they can.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from benchmarks.runner import (
    Result,
    Series,
    chart_panels,
    higher_is_better,
    parse_c_output,
    read_json,
    table,
    table_rows,
    write_json,
    write_png,
)

from kvmlib import Kvm

ROOT = Path(__file__).resolve().parent.parent


def test_c_output_lines_are_grouped_by_key() -> None:
    text = "SAMPLE 1.5\nSAMPLE 2\nPAUSE 0.25\nnoise here\nRESULT x\n"
    assert parse_c_output(text) == {"SAMPLE": [1.5, 2.0], "PAUSE": [0.25]}


def test_a_result_has_medians_a_ratio_and_a_target_verdict() -> None:
    r = Result("exit", "us/exit", Series([10.0, 12.0, 11.0]), Series([8.0, 10.0]), target="<= 1.2")
    assert (r.kvmlib.median, r.c and r.c.median, r.ratio) == (11.0, 9.0, 11.0 / 9.0)
    assert r.met() is False
    own = Result("pause", "ms", Series([0.2]), Series([0.1]), target="<= 10", target_of="kvmlib")
    assert own.met() is True
    alone = Result("import", "ms", Series([80.0]), c=None)
    assert alone.ratio is None and alone.met() is None


def test_the_table_shows_every_case_with_its_target(tmp_path: Path) -> None:
    results = [Result("exit", "us/exit", Series([10.0]), Series([9.0]), target="<= 1.2"),
               Result("import kvmlib", "ms", Series([80.0]), c=None)]
    text = table(results)
    assert "exit" in text and "1.11" in text and "<= 1.2 met" in text
    assert "import kvmlib" in text and "n/a" in text
    path = tmp_path / "r.json"
    write_json(path, results)
    doc = json.loads(path.read_text())
    assert [d["name"] for d in doc] == ["exit", "import kvmlib"]
    assert {"name", "unit", "kvmlib", "c", "ratio"} <= set(doc[0])
    assert doc[1]["c"] is None and doc[1]["ratio"] is None
    assert table(read_json(path)) == text  # a saved run prints as the live one did


SAVED_RUN = ROOT / "docs" / "_static" / "benchmarks.json"


def test_the_chart_splits_cases_by_direction_each_against_its_own_baseline() -> None:
    results = [
        Result("exit", "us/exit", Series([12.0]), Series([9.0]), target="<= 1.2"),
        Result("save", "MB/s", Series([800.0]), Series([700.0])),
        Result("reset", "ms", Series([1.0]), Series([20.0]), baseline="memcpy of all memory"),
        Result("import kvmlib", "ms", Series([80.0]), c=None),
    ]
    panels, alone = chart_panels(results)
    assert [(p.higher_is_better, [c["name"] for c in p.cases]) for p in panels] == [
        (False, ["exit", "reset"]), (True, ["save"])]
    assert "lower is better" in panels[0].title and "higher is better" in panels[1].title
    assert alone == ["import kvmlib"]
    reset = panels[0].cases[1]
    assert (reset["ratio"], reset["baseline"]) == (0.05, "memcpy of all memory")
    assert [higher_is_better(u) for u in ("MB/s", "ops/s", "ms", "us/exit", "MiB", "x")] == [
        True, True, False, False, False, False]
    # Only a panel that has cases is drawn.
    assert [p.higher_is_better for p in chart_panels(results[:1])[0]] == [False]


def test_the_docs_run_names_the_baseline_of_the_cases_compared_with_another_operation() -> None:
    cases = read_json(SAVED_RUN)
    # The rows whose C column is another operation than kvmlib's (the rest do the same in C).
    compared_with_another = ("snapshot", "fast reset, per page", "exit round trip, C loop",
                             "migrate 256 MiB")
    for case in cases:
        other = case["c"] is not None and case["name"].startswith(compared_with_another)
        assert bool(case.get("baseline")) == other, case["name"]
    rows = table_rows(cases)
    assert [r[0] for r in rows] == [c["name"] for c in cases] and all(len(r) == 6 for r in rows)


def test_a_saved_run_is_printed_without_running_anything() -> None:
    done = subprocess.run([sys.executable, "-m", "benchmarks", "--from-json", str(SAVED_RUN)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout == table(read_json(SAVED_RUN)) + "\n"
    assert "drew" not in done.stderr  # no chart without --png


def test_the_chart_is_drawn_from_a_saved_run(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="the chart needs the plot extra")
    png = tmp_path / "chart.png"
    assert write_png(png, read_json(SAVED_RUN), "a saved run")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert write_png(tmp_path / "none.png", [Result("import", "ms", Series([1.0]), c=None)], "") is False


def test_a_quick_real_run_of_the_exit_case_writes_the_json(kvm: Kvm, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--only", "exit",
                           "--json", str(out), "--png", str(tmp_path / "chart.png")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert "exit round trip" in done.stdout and "machine:" in done.stdout
    doc = json.loads(out.read_text())
    assert [d["name"] for d in doc] == [
        "exit round trip, raw VcpuFd.run()",
        "exit round trip, vCPU loop + device",
        "exit round trip, C loop on kvmlib's vCPU"]
    for case in doc:
        assert case["unit"] == "us/exit"
        assert case["kvmlib"] > 0 and case["c"] > 0 and case["ratio"] > 0


def test_the_fuzz_reset_and_restore_cases_run(kvm: Kvm, tmp_path: Path) -> None:
    """The hot-path cases build their C side and guests and finish, with a row per measurement."""
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--only",
                           "fuzz,reset,restore", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=240, check=False)
    assert done.returncode == 0, done.stderr
    names = [d["name"] for d in json.loads(out.read_text())]
    assert sum(n.startswith("fuzz loop") for n in names) == 3
    assert "fast reset, 10 dirty pages of 256 MiB" in names
    assert sum(n.startswith("fast reset phase") for n in names) == 5
    assert sum(n.startswith("restore 256 MiB") for n in names) == 2
