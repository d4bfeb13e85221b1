"""The built-in guest of ``python -m kvmlib``: its machine code is its assembly source, and it counts.

Every vCPU prints its id in decimal (ids of two and three digits too), and the boot processor waits
for any number of APs (a 32-bit count in guest memory, not a sign-extended 8-bit immediate).
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from kvmlib import Kvm
from kvmlib.__main__ import (
    AP_MACHINE_CODE,
    AP_SOURCE,
    BSP_CODE,
    BSP_MACHINE_CODE,
    BSP_SOURCE,
    GREETING,
    run_hello,
)

needs_binutils = pytest.mark.skipif(
    shutil.which("as") is None or shutil.which("ld") is None,
    reason="GNU binutils (as, ld) are not installed")


def _expected(num_vcpus: int) -> list[str]:
    return sorted(f"vCPU {i} up" for i in range(1, num_vcpus))


@needs_binutils
def test_the_shipped_machine_code_is_the_assembled_source() -> None:
    from kvmlib.testing import assemble

    assert assemble(BSP_SOURCE, origin=BSP_CODE) == BSP_MACHINE_CODE
    assert assemble(AP_SOURCE, origin=0, bits=16) == AP_MACHINE_CODE


def test_the_greeting_is_the_one_in_the_code() -> None:
    assert BSP_MACHINE_CODE.endswith(GREETING + b"\0")


@pytest.mark.parametrize("num_vcpus", [1, 12, 129])
def test_every_vcpu_prints_its_id_in_decimal(kvm: Kvm, num_vcpus: int) -> None:
    lines = run_hello(num_vcpus).decode("ascii").splitlines()
    assert lines[0] == GREETING.decode().rstrip("\n")
    assert sorted(lines[1:]) == _expected(num_vcpus)


def test_python_dash_m_kvmlib_on_twelve_vcpus(kvm: Kvm) -> None:
    done = subprocess.run([sys.executable, "-m", "kvmlib", "hello", "--vcpus", "12"], capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "Hello from a kvmlib guest!"
    assert sorted(lines[1:]) == _expected(12)
