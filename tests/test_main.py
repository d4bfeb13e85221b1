"""The README's main job: ``python -m kvmlib`` boots its built-in guest through KvmVm."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kvmlib import Kvm
from kvmlib.__main__ import run_hello


@pytest.mark.parametrize("num_vcpus", [1, 2, 4])
def test_the_built_in_guest_prints_from_every_vcpu(kvm: Kvm, num_vcpus: int) -> None:
    lines = run_hello(num_vcpus).decode().splitlines()
    assert lines[0] == "Hello from a kvmlib guest!"
    assert sorted(lines[1:]) == [f"vCPU {i} up" for i in range(1, num_vcpus)]


def test_python_dash_m_kvmlib_runs_on_two_vcpus(kvm: Kvm) -> None:
    done = subprocess.run([sys.executable, "-m", "kvmlib"], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "Hello from a kvmlib guest!\nvCPU 1 up\n"
