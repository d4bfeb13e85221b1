"""The lifecycle is logged through the ``kvmlib`` loggers, and nothing configures logging."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

from kvmlib import Kvm
from kvmlib.snapshot import restore_snapshot, save_snapshot
from kvmlib.testing import make_vm

from .concurrency import bounded

# out 0x80, al (no device there) twice, out 0x81, al, then ud2 with an empty IDT: a triple fault
# (shutdown) stops the guest.
UNCLAIMED_THEN_STOP = bytes([0xE6, 0x80, 0xE6, 0x80, 0xE6, 0x81, 0x0F, 0x0B])
SPIN = bytes([0xEB, 0xFE])


def messages(caplog: pytest.LogCaptureFixture) -> list[tuple[str, int, str]]:
    return [(r.name, r.levelno, r.getMessage()) for r in caplog.records
            if r.name.startswith("kvmlib")]


def test_a_vm_logs_its_lifecycle(kvm: Kvm, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="kvmlib")
    with make_vm(kvm, SPIN, log_dirty_pages=True) as vm:
        snapshot = vm.snapshot()
        vm.run()
        bounded(vm.pause)
        vm.resume()
        bounded(vm.pause)
        vm.reset_to(snapshot)
        bounded(vm.shutdown)
        snapshot.close()
    logged = messages(caplog)
    text = [m for _, _, m in logged]
    assert ("kvmlib.vm", logging.INFO,
            "VM created: 1 vCPU(s), 2 MiB of guest memory in 1 slot(s)") in logged
    assert any(m.startswith("memory slot 0: guest 0x0-0x1fffff at host 0x") and
               m.endswith(", logging dirty pages") for m in text)
    assert ("kvmlib.lifecycle", logging.INFO, "VM running: 1 vCPU thread(s) started") in logged
    assert text.count("VM paused: every vCPU parked") == 2
    assert "VM resumed" in text
    assert any(m.startswith("reset to a snapshot: ") for m in text)
    assert "vCPU 0 thread ended: the VM is stopping" in text
    assert ("kvmlib.lifecycle", logging.INFO, "VM shut down: 1 vCPU thread(s) joined") in logged
    # In the order they happened.
    order = [text.index(m) for m in ("VM running: 1 vCPU thread(s) started", "VM resumed",
                                      "VM shut down: 1 vCPU thread(s) joined")]
    assert order == sorted(order)


def test_the_first_unclaimed_access_per_port_and_the_guest_stop_are_logged(
        kvm: Kvm, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="kvmlib")
    with make_vm(kvm, UNCLAIMED_THEN_STOP) as vm:
        vm.run()
        assert bounded(lambda: vm.wait(10))
    text = [m for _, _, m in messages(caplog)]
    unclaimed = [m for m in text if m.startswith("no device at port")]
    assert unclaimed == [
        "no device at port 0x80: the guest's write is dropped (logged once per port)",
        "no device at port 0x81: the guest's write is dropped (logged once per port)"]
    assert "vCPU 0 thread ended: the guest stopped (Shutdown())" in text


def test_snapshots_saved_and_restored_are_logged(kvm: Kvm, tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="kvmlib")
    with make_vm(kvm, SPIN) as vm:
        save_snapshot(vm, tmp_path / "snap")
    vm2, memory = restore_snapshot(kvm, tmp_path / "snap", vm.exit_handler, vm.bus)
    vm2.close()
    memory.close()
    text = [m for _, _, m in messages(caplog)]
    assert f"full snapshot saved to {tmp_path / 'snap'}" in text
    assert f"VM restored from the snapshot {tmp_path / 'snap'} (memory by read, verified)" in text
    assert "VM restored from a saved state: 1 vCPU(s), 2 MiB of guest memory in 1 slot(s)" in text


def test_importing_and_using_kvmlib_configures_no_logging() -> None:
    script = ("import logging, kvmlib\n"
              "from kvmlib.testing import make_vm\n"
              "root = logging.getLogger()\n"
              "with make_vm(kvmlib.Kvm(), b'\\xf4') as vm: pass\n"
              "print(len(root.handlers), root.level, logging.getLogger('kvmlib').handlers)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["0", "30", "[]"]
    assert done.stderr == ""  # INFO records go nowhere unless the application says so
