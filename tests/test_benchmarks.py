"""The benchmark runner: statistics, table and JSON without KVM, and one real quick case with it.

Never asserts a timing or a ratio: the benchmarks measure, the tests check that they can.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from benchmarks.runner import Result, Series, parse_c_output, table, write_json

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


def test_a_quick_real_run_of_the_exit_case_writes_the_json(kvm: Kvm, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--only", "exit",
                           "--json", str(out), "--png", str(tmp_path / "chart.png")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert "exit round trip" in done.stdout and "machine:" in done.stdout
    doc = json.loads(out.read_text())
    assert [d["name"] for d in doc] == [
        "exit round trip, raw VcpuFd.run() vs C on the same vCPU",
        "exit round trip, vCPU loop + device vs C on the same vCPU",
        "exit round trip, C on kvmlib's vCPU vs standalone C"]
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
    assert "fast reset, 10 guest-dirtied pages of 256 MiB" in names
    assert sum(n.startswith("fast reset phase") for n in names) == 5
    assert sum(n.startswith("restore 256 MiB") for n in names) == 2
