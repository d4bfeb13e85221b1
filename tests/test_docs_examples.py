"""The programs the docs show really run."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from kvmlib import Kvm

from .loader_images import bzimage

EXAMPLES = Path(__file__).resolve().parent.parent / "docs" / "examples"


def test_the_exit_handler_harness_runs_to_completion(kvm: Kvm) -> None:
    done = subprocess.run([sys.executable, str(EXAMPLES / "harness.py")], capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert re.fullmatch(r"\d+ heartbeats; paused at count \d+, rip 0x100[01][0-9a-f]; "
                        r"exit handler kicked: True\n", done.stdout), done.stdout


def test_the_snapshot_fuzzer_example_resets_and_restores(kvm: Kvm, tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(EXAMPLES / "snapshot_fuzz.py"), str(tmp_path / "s")],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout == (
        "input   3: reset copied back 4 pages\n"
        "input   0: reset copied back 1 pages\n"
        "input 200: reset copied back 201 pages\n"
        "input  17: reset copied back 18 pages\n"
        "restored VM finished input 5: True, last page written 0xffffffffdeadbeef\n")


def test_the_testing_guide_examples_pass_as_a_harness_suite(kvm: Kvm,
                                                            pytester: pytest.Pytester) -> None:
    # What docs/testing.rst shows is a real pytest suite: run it as its readers would.
    result = pytester.runpytest(str(EXAMPLES / "testing_guide"), "-p", "no:cacheprovider")
    result.assert_outcomes(passed=5, skipped=1)  # the kernel smoke test: no --kvmlib-kernel


def test_the_kernel_smoke_test_example_boots_a_kernel(kvm: Kvm, pytester: pytest.Pytester,
                                                       tmp_path: Path) -> None:
    # A synthetic bzImage that prints a banner and spins stands in for a real kernel here; the
    # slow suite boots the Debian kernel the same way (tests/test_boot.py).
    kernel = tmp_path / "bzImage"
    banner = b"Linux version 0.0-synthetic (kvmlib tests)\n"
    code = bytes([0x66, 0xBA, 0xF8, 0x03]) + b"".join(bytes([0xB0, c, 0xEE]) for c in banner)
    kernel.write_bytes(bzimage(b"\0" * 0x200 + code + bytes([0xEB, 0xFE])))
    result = pytester.runpytest(str(EXAMPLES / "testing_guide" / "test_kernel_smoke.py"),
                                "-p", "no:cacheprovider", "--kvmlib-kernel", str(kernel))
    result.assert_outcomes(passed=1)
