"""Vmm and ``kvmlib run`` end to end, with tiny synthetic bzImages (fast, real /dev/kvm).

Each "kernel" is a bzImage whose 64-bit entry code talks to the UART and the i8042 directly, so the
whole path (loader, zero page, boot registers, devices on the bus, irqfd, event loop, console, exit
reasons, terminal handling) runs in well under a second.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from kvmlib import Kvm
from kvmlib.vcpu import setup_signal_handler
from kvmlib.vmm import Vmm, VmmConfig, VmmConfigError, VmmExitReason

from .loader_images import bzimage

ROOT = Path(__file__).resolve().parent.parent


def put(text: bytes) -> bytes:
    """mov dx, 0x3f8; then mov al, c; out dx, al for each byte."""
    return bytes([0x66, 0xBA, 0xF8, 0x03]) + b"".join(bytes([0xB0, c, 0xEE]) for c in text)


RESET = bytes([0xB0, 0xFE, 0xE6, 0x64, 0xEB, 0xFE])  # mov al, 0xfe; out 0x64, al; jmp $
ECHO_ONE = bytes([
    0x66, 0xBA, 0xFD, 0x03,  # mov dx, 0x3fd (LSR)
    0xEC,                    # wait: in al, dx
    0xA8, 0x01,              # test al, DR
    0x74, 0xFB,              # jz wait
    0x66, 0xBA, 0xF8, 0x03,  # mov dx, 0x3f8
    0xEC,                    # in al, dx
    0xEE,                    # out dx, al   (echo it)
])
ZERO_PAGE_SIGNATURE = bytes([
    # The boot protocol hands RSI = the zero page: print its "HdrS" magic (offset 0x202).
    0x66, 0xBA, 0xF8, 0x03,              # mov dx, 0x3f8
    0x8A, 0x86, 0x02, 0x02, 0x00, 0x00,  # mov al, [rsi + 0x202]
    0xEE,                                # out dx, al
    0x8A, 0x86, 0x03, 0x02, 0x00, 0x00,  # mov al, [rsi + 0x203]
    0xEE,                                # out dx, al
])


def kernel_file(tmp_path: Path, code: bytes) -> Path:
    path = tmp_path / "bzImage"
    path.write_bytes(bzimage(b"\0" * 0x200 + code))
    return path


def run(tmp_path: Path, code: bytes, **config: object) -> tuple[VmmExitReason, bytes, object]:
    out = bytearray()
    cfg = VmmConfig(kernel=kernel_file(tmp_path, code), serial_output=out.extend, memory_mib=64,
                    **config)  # type: ignore[arg-type]
    result = Vmm(cfg).run(timeout=20)
    return result.reason, bytes(out), result


def test_a_kernel_prints_on_the_console_and_its_reset_ends_the_vm(kvm: Kvm, tmp_path: Path) -> None:
    reason, out, _ = run(tmp_path, put(b"Linux version 0.0 (synthetic)\n") + RESET)
    assert (reason, out) == (VmmExitReason.RESET, b"Linux version 0.0 (synthetic)\n")


def test_the_kernel_is_entered_with_rsi_on_the_zero_page(kvm: Kvm, tmp_path: Path) -> None:
    _, out, _ = run(tmp_path, ZERO_PAGE_SIGNATURE + RESET)
    assert out == b"Hd"


def test_console_input_reaches_the_guest(kvm: Kvm, tmp_path: Path) -> None:
    read_fd, write_fd = os.pipe()
    os.write(write_fd, b"k")
    try:
        reason, out, _ = run(tmp_path, put(b"> ") + ECHO_ONE + RESET, serial_input=read_fd)
    finally:
        os.close(read_fd)
        os.close(write_fd)
    assert (reason, out) == (VmmExitReason.RESET, b"> k")


def test_a_triple_fault_ends_the_vm(kvm: Kvm, tmp_path: Path) -> None:
    reason, _, _ = run(tmp_path, bytes([0x0F, 0x0B]))  # ud2 with no IDT
    assert reason is VmmExitReason.TRIPLE_FAULT


def test_a_spinning_guest_is_stopped_at_the_timeout(kvm: Kvm, tmp_path: Path) -> None:
    out = bytearray()
    cfg = VmmConfig(kernel=kernel_file(tmp_path, bytes([0xEB, 0xFE])), serial_output=out.extend,
                    memory_mib=64)
    result = Vmm(cfg).run(timeout=0.3)
    assert result.reason is VmmExitReason.TIMEOUT and result.seconds >= 0.3


def test_two_vcpus_boot_and_reset(kvm: Kvm, tmp_path: Path) -> None:
    reason, out, _ = run(tmp_path, put(b"ok\n") + RESET, num_vcpus=2)
    assert (reason, out) == (VmmExitReason.RESET, b"ok\n")


def test_config_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(VmmConfigError, match=r"kernel .* is not a file"):
        VmmConfig(kernel=tmp_path / "missing")
    kernel = kernel_file(tmp_path, RESET)
    with pytest.raises(VmmConfigError, match="memory_mib must be in 16"):
        VmmConfig(kernel=kernel, memory_mib=1)
    with pytest.raises(VmmConfigError, match="num_vcpus"):
        VmmConfig(kernel=kernel, num_vcpus=0)
    with pytest.raises(VmmConfigError, match="/proc/cpuinfo"):
        VmmConfig(kernel=kernel, hide_cpuid="cx16,warp_drive")
    assert VmmConfig(kernel=kernel, hide_cpuid="CX16, xsave").hide_cpuid == ("cx16", "xsave")


def cli(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "kvmlib", "run", *args], input=stdin, cwd=ROOT,
                          capture_output=True, timeout=60, check=False)


def test_the_command_line_boots_a_kernel(kvm: Kvm, tmp_path: Path) -> None:
    kernel = kernel_file(tmp_path, put(b"booted\n") + ECHO_ONE + RESET)
    done = cli("--kernel", str(kernel), "--memory", "64", "--hide-cpuid", "cx16", stdin=b"q")
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"booted\nq"
    assert b"guest stopped after" in done.stderr and b"reset by the guest" in done.stderr


def test_the_command_line_reports_errors_a_person_can_act_on(tmp_path: Path) -> None:
    missing = cli("--kernel", str(tmp_path / "nope"))
    assert missing.returncode == 1 and b"is not a file" in missing.stderr
    junk = tmp_path / "junk"
    junk.write_bytes(b"\x7fELF not really")
    bad = cli("--kernel", str(junk))
    assert bad.returncode == 1 and b"error:" in bad.stderr
    flag = cli("--kernel", str(junk), "--hide-cpuid", "warp_drive")
    assert flag.returncode == 2 and b"unknown CPU feature 'warp_drive'" in flag.stderr


def test_the_command_line_explains_every_flag() -> None:
    helped = cli("--help")
    assert helped.returncode == 0
    for flag in (b"--kernel", b"--initrd", b"--cmdline", b"--memory", b"--vcpus", b"--hide-cpuid",
                 b"Ctrl-A"):
        assert flag in helped.stdout


def test_a_terminal_is_raw_while_running_and_restored_after(kvm: Kvm, tmp_path: Path) -> None:
    import pty
    import termios
    master, slave = pty.openpty()
    try:
        before = termios.tcgetattr(slave)
        seen: list[list[Any]] = []

        def output(data: bytes) -> None:
            seen.append(termios.tcgetattr(slave))
        cfg = VmmConfig(kernel=kernel_file(tmp_path, put(b".") + RESET), serial_input=slave,
                        serial_output=output, memory_mib=64)
        assert Vmm(cfg).run(timeout=20).reason is VmmExitReason.RESET
        assert seen and not seen[0][3] & termios.ECHO  # raw while the guest ran
        assert termios.tcgetattr(slave) == before
        # And after the guest fails (a triple fault) too.
        broken = VmmConfig(kernel=kernel_file(tmp_path, bytes([0x0F, 0x0B])), serial_input=slave,
                           memory_mib=64)
        Vmm(broken).run(timeout=20)
        assert termios.tcgetattr(slave) == before
    finally:
        os.close(master)
        os.close(slave)


def test_ctrl_a_x_on_a_terminal_stops_the_vm(kvm: Kvm, tmp_path: Path) -> None:
    import pty
    import termios
    import threading
    master, slave = pty.openpty()
    try:
        cfg = VmmConfig(kernel=kernel_file(tmp_path, bytes([0xEB, 0xFE])), serial_input=slave,
                        memory_mib=64)
        results: list[VmmExitReason] = []
        setup_signal_handler()  # Vmm.run is about to run outside the main thread
        runner = threading.Thread(target=lambda: results.append(Vmm(cfg).run(timeout=20).reason))
        runner.start()
        # Type the escape once the console is in raw mode, as a person at the terminal would.
        deadline = time.monotonic() + 10
        while termios.tcgetattr(slave)[3] & termios.ICANON and time.monotonic() < deadline:
            time.sleep(0.005)
        os.write(master, b"\x01x")
        runner.join(30)
        assert results == [VmmExitReason.STOPPED]
    finally:
        os.close(master)
        os.close(slave)


@pytest.mark.parametrize("source", ["/dev/null", "file"])
def test_input_that_cannot_be_polled_is_read_to_its_end(kvm: Kvm, tmp_path: Path, source: str) -> None:
    path = Path(source) if source == "/dev/null" else tmp_path / "input"
    if source == "file":
        path.write_bytes(b"z")
    fd = os.open(path, os.O_RDONLY)
    try:
        code = put(b"> ") + (ECHO_ONE if source == "file" else b"") + RESET
        reason, out, _ = run(tmp_path, code, serial_input=fd)
    finally:
        os.close(fd)
    assert (reason, out) == (VmmExitReason.RESET, b"> z" if source == "file" else b"> ")
