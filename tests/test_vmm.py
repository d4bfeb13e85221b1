"""Vmm and ``kvmlib run`` end to end, with tiny synthetic bzImages (fast, real /dev/kvm).

Each "kernel" is a bzImage whose 64-bit entry code talks to the UART and the i8042 directly, so the
whole path (loader, zero page, boot registers, devices on the bus, irqfd, event loop, console, exit
reasons, terminal handling) runs in well under a second.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from kvmlib import ClosedError, Kvm, KvmError, KvmUnavailableError, KvmVm
from kvmlib.devices import RX_FIFO_SIZE
from kvmlib.vcpu import setup_signal_handler
from kvmlib.vmm import (
    ConsoleEOF,
    ConsoleTimeout,
    Vmm,
    VmmConfig,
    VmmConfigError,
    VmmExitReason,
    VmmStateError,
)

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
    assert missing.returncode == 2 and b"argument --kernel: " in missing.stderr
    assert b"No such file or directory" in missing.stderr
    junk = tmp_path / "junk"
    junk.write_bytes(b"\x7fELF not really")
    bad = cli("--kernel", str(junk))
    assert bad.returncode == 1 and b"kvmlib: error: " in bad.stderr
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


# ---- driving a started guest from Python -------------------------------------------------------

SPIN = bytes([0xEB, 0xFE])  # jmp $
# Echo every byte read from the UART, forever: ECHO_ONE, then jump back to its start.
ECHO_LOOP = ECHO_ONE + bytes([0xEB, (-(len(ECHO_ONE) + 2)) & 0xFF])


def started(tmp_path: Path, code: bytes, **config: object) -> Vmm:
    """A started Vmm running ``code`` (the caller closes it, usually through ``with``)."""
    cfg = VmmConfig(kernel=kernel_file(tmp_path, code), memory_mib=64,
                    **config)  # type: ignore[arg-type]
    vmm = Vmm(cfg)
    try:
        vmm.start()
    except BaseException:
        vmm.close()
        raise
    return vmm


def test_start_returns_with_the_guest_running(kvm: Kvm, tmp_path: Path) -> None:
    out = bytearray()
    with started(tmp_path, put(b"up\n") + SPIN, serial_output=out.extend) as vmm:
        assert vmm.vm.running and vmm.result is None
        assert vmm.console.expect("up\n", timeout=20).group() == "up\n"
        assert vmm.wait(timeout=0) is None  # still running: the spin never ends
        assert vmm.console.output == b"up\n" == bytes(out)  # still delivered to serial_output
        assert vmm.console.text == "up\n"
        result = vmm.stop()
        assert result is not None and result.reason is VmmExitReason.STOPPED
        assert vmm.result is result and vmm.wait(0) is result


def test_expect_takes_str_bytes_and_regexes_and_moves_forward(kvm: Kvm, tmp_path: Path) -> None:
    with started(tmp_path, put(b"alpha 1\nbeta 2\nalpha 3\n[x] 4\n") + SPIN) as vmm:
        console = vmm.console
        first = console.expect("alpha", timeout=20)
        assert (first.group(), first.string[:first.start()]) == ("alpha", "")
        beta = console.expect(re.compile(rb"beta (\d)"), timeout=20)
        assert beta.group(1) == b"2" and beta.string.startswith(b" 1\n")
        # The first "alpha" is consumed: the next match is the second one.
        assert console.expect(re.compile(r"alpha (\d)"), timeout=20).group(1) == "3"
        # A str or bytes pattern is literal, not a regular expression.
        assert console.expect(b"[x]", timeout=20).group() == b"[x]"
        with pytest.raises(ConsoleTimeout):
            console.expect("alpha", timeout=0)


def test_a_str_pattern_sees_utf8_text_and_consumes_exact_bytes(kvm: Kvm, tmp_path: Path) -> None:
    with started(tmp_path, put("prêt → ok".encode() + b"\xff!\n") + SPIN) as vmm:
        arrow = vmm.console.expect("→", timeout=20)
        assert arrow.string[:arrow.end()] == "prêt →"
        # The next search starts right after the arrow's three bytes; 0xff is not UTF-8.
        assert vmm.console.expect(b"\xff!\n", timeout=20).string == b" ok\xff!\n"
        assert vmm.console.text == "prêt → ok\ufffd!\n"


def test_an_expect_timeout_shows_the_pattern_and_the_last_lines(kvm: Kvm, tmp_path: Path) -> None:
    lines = b"".join(b"line %d\n" % i for i in range(30))
    with started(tmp_path, put(lines) + SPIN) as vmm:
        vmm.console.expect("line 29\n", timeout=20)
        with pytest.raises(ConsoleTimeout) as caught:
            vmm.console.expect("login:", timeout=0.2)
    message = str(caught.value)
    assert "'login:'" in message and "within 0.2 s" in message
    assert "line 29" in message and "line 18" in message and "line 17" not in message
    assert caught.value.pattern == "login:" and caught.value.tail.endswith("line 29")
    assert isinstance(caught.value, KvmError)


def test_expect_raises_at_once_when_the_guest_stops_while_it_waits(kvm: Kvm,
                                                                   tmp_path: Path) -> None:
    with started(tmp_path, put(b"> ") + ECHO_ONE + put(b"\nbye\n") + RESET) as vmm:
        vmm.console.expect("> ", timeout=20)
        vmm.console.send("q")  # the guest echoes it, says bye and resets: expect is waiting
        # A long timeout: EOF rather than ConsoleTimeout shows it did not wait for it.
        with pytest.raises(ConsoleEOF) as caught:
            vmm.console.expect("login:", timeout=600)
        assert "reset by the guest" in str(caught.value) and "bye" in str(caught.value)
        # What the guest printed before it stopped can still be expected.
        bye = vmm.console.expect("bye", timeout=0)
        assert bye.string[:bye.start()] == "q\n"  # a failed expect consumes nothing
        result = vmm.wait(timeout=20)
        assert result is not None and result.reason is VmmExitReason.RESET
        with pytest.raises(ConsoleEOF, match="cannot send"):
            vmm.console.send("late")
        # The VM is stopped but still open: its registers can be read.
        assert vmm.vm.vcpu_regs(0).rip != 0


def test_expect_raises_when_the_vm_is_closed_while_it_waits(kvm: Kvm, tmp_path: Path) -> None:
    vmm = started(tmp_path, put(b"spinning\n") + SPIN)
    vmm.console.expect("spinning", timeout=20)
    raised: list[BaseException] = []

    def waiter() -> None:
        try:
            vmm.console.expect("never", timeout=600)
        except BaseException as e:
            raised.append(e)
    thread = threading.Thread(target=waiter)
    thread.start()
    vmm.close()
    thread.join(30)
    assert not thread.is_alive()
    assert len(raised) == 1 and isinstance(raised[0], ConsoleEOF)
    assert "stopped by the host" in str(raised[0]) or "closed" in str(raised[0])


def test_send_reaches_the_guest_even_past_the_uart_fifo(kvm: Kvm, tmp_path: Path) -> None:
    with started(tmp_path, put(b"> ") + ECHO_LOOP) as vmm:
        vmm.console.expect("> ", timeout=20)
        vmm.console.send("k")
        assert vmm.console.expect("k", timeout=20).string == "k"
        # More than the receive FIFO holds: the rest is fed as the guest reads.
        data = bytes(range(32, 127)) * 3
        assert len(data) > RX_FIFO_SIZE
        vmm.console.send(data)
        assert vmm.console.expect(data, timeout=20).string == data


def test_a_paused_guest_shows_its_registers(kvm: Kvm, tmp_path: Path) -> None:
    prefix = put(b"spin\n")
    with started(tmp_path, prefix + SPIN) as vmm:
        vmm.console.expect("spin\n", timeout=20)
        vmm.vm.pause()
        assert vmm.vm.vcpu_regs(0).rip == vmm.kernel.entry + len(prefix)  # at the jmp $
        assert vmm.vm.vcpu_sregs(0).cr0 & 0x80000001 == 0x80000001  # PE | PG: long mode
        vmm.vm.resume()
        assert vmm.vm.running


def test_snapshot_and_reset_to_on_a_started_vmm(kvm: Kvm, tmp_path: Path) -> None:
    with started(tmp_path, put(b"> ") + ECHO_ONE + put(b" done\n") + SPIN) as vmm:
        vmm.console.expect("> ", timeout=20)
        vmm.vm.pause()
        waiting = vmm.vm.snapshot()  # the guest polls the UART for its one byte
        vmm.vm.resume()
        vmm.console.send("a")
        vmm.console.expect("a done\n", timeout=20)
        vmm.vm.pause()
        vmm.vm.reset_to(waiting)
        vmm.vm.resume()
        vmm.console.send("b")  # read again: the guest is back where it waited
        vmm.console.expect("b done\n", timeout=20)
    assert vmm.console.output == b"> a done\nb done\n"


def test_the_vm_is_there_only_between_start_and_close(kvm: Kvm, tmp_path: Path) -> None:
    cfg = VmmConfig(kernel=kernel_file(tmp_path, put(b"hi\n") + SPIN), memory_mib=64)
    vmm = Vmm(cfg)
    with pytest.raises(VmmStateError, match=r"call start\(\) first"):
        _ = vmm.vm
    with pytest.raises(VmmStateError):
        vmm.wait(0)
    assert vmm.stop() is None and vmm.result is None
    vmm.start()
    vmm.start()  # again: nothing more happens
    with pytest.raises(VmmStateError, match=r"run\(\)"):
        vmm.run(timeout=1)
    assert isinstance(vmm.vm, KvmVm)
    vmm.close()
    vmm.close()
    with pytest.raises(ClosedError):
        _ = vmm.vm
    with pytest.raises(ClosedError):
        vmm.start()
    assert vmm.result is not None and vmm.result.reason is VmmExitReason.STOPPED


def test_stop_close_and_wait_from_many_threads(kvm: Kvm, tmp_path: Path) -> None:
    with started(tmp_path, put(b"x") + SPIN) as vmm:
        vmm.console.expect("x", timeout=20)
        results: list[object] = []
        lock = threading.Lock()

        def call(method: str) -> None:
            value = getattr(vmm, method)() if method != "wait" else vmm.wait(20)
            with lock:
                results.append(value)
        threads = [threading.Thread(target=call, args=(m,))
                   for m in ("stop", "wait", "stop", "close", "wait", "close")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not any(t.is_alive() for t in threads)
    result = vmm.result
    assert result is not None and result.reason is VmmExitReason.STOPPED
    assert sorted(map(repr, results)) == sorted(map(repr, [result, result, result, result,
                                                           None, None]))


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_the_context_manager_releases_threads_and_fds(tmp_path: Path) -> None:
    kernel = kernel_file(tmp_path, put(b"ready\n") + SPIN)

    def boot_once() -> None:
        with Vmm(VmmConfig(kernel=kernel, memory_mib=64)) as vmm:
            vmm.start()
            vmm.console.expect("ready", timeout=20)
    try:
        boot_once()  # anything set up once per process (the kick signal handler) is set up here
    except KvmUnavailableError as e:
        pytest.skip(f"KVM is unusable here: {e}")
    fds, threads = _open_fds(), set(threading.enumerate())
    boot_once()
    assert _open_fds() == fds
    assert set(threading.enumerate()) == threads


def test_a_guest_failure_is_the_result(kvm: Kvm, tmp_path: Path) -> None:
    with started(tmp_path, put(b"oops\n") + bytes([0x0F, 0x0B])) as vmm:  # ud2 with no IDT
        with pytest.raises(ConsoleEOF, match="triple fault"):
            vmm.console.expect("never", timeout=600)
        result = vmm.wait(20)
        assert result is not None and result.reason is VmmExitReason.TRIPLE_FAULT


def test_start_leaves_a_terminal_as_it_is_and_reads_it(kvm: Kvm, tmp_path: Path) -> None:
    import pty
    import termios
    master, slave = pty.openpty()
    try:
        before = termios.tcgetattr(slave)
        with started(tmp_path, put(b"> ") + ECHO_ONE + put(b"\n") + SPIN, serial_input=slave) as vmm:
            vmm.console.expect("> ", timeout=20)
            assert termios.tcgetattr(slave) == before  # not raw: start() does not take it
            os.write(master, b"t\n")  # a line, as a cooked terminal delivers it
            vmm.console.expect("t\n", timeout=20)
        assert termios.tcgetattr(slave) == before
    finally:
        os.close(master)
        os.close(slave)


def test_serial_output_can_answer_and_stop_the_guest_from_its_vcpu_thread(kvm: Kvm,
                                                                          tmp_path: Path) -> None:
    seen: list[object] = []
    holder: list[Vmm] = []

    def output(data: bytes) -> None:
        vmm = holder[0]
        if data == b"?":
            vmm.console.send("y")  # an auto-responder
        elif data == b"!":
            seen.append(vmm.stop())  # only asks: this thread is the one to be joined
            try:
                vmm.close()
            except VmmStateError as e:
                seen.append(e)
    cfg = VmmConfig(kernel=kernel_file(tmp_path, put(b"?") + ECHO_ONE + put(b"!") + SPIN),
                    serial_output=output, memory_mib=64)
    with Vmm(cfg) as vmm:
        holder.append(vmm)
        vmm.start()
        result = vmm.wait(20)
        assert result is not None and result.reason is VmmExitReason.STOPPED
        assert vmm.console.output == b"?y!"
    assert seen[0] is None and isinstance(seen[1], VmmStateError)


# ---- what the command line reads from a Vmm ------------------------------------------------------

def test_exit_count_counts_the_guests_exits(kvm: Kvm, tmp_path: Path) -> None:
    cfg = VmmConfig(kernel=kernel_file(tmp_path, put(b"x") + ECHO_LOOP), memory_mib=64)
    vmm = Vmm(cfg)
    assert vmm.exit_count() is None  # no VM yet
    with vmm:
        vmm.start()
        vmm.console.expect("x", timeout=20)
        first = vmm.exit_count()
        if first is None:
            pytest.skip("this host's KVM has no binary statistics (Linux 5.14+)")
        vmm.console.send("abc")  # each byte: port exits, and so KVM exits
        vmm.console.expect("abc", timeout=20)
        later = vmm.exit_count()
        assert later is not None and later > first > 0
    assert vmm.exit_count() is None  # closed


def test_forced_cpuid_lists_the_hidden_flags_the_guest_still_sees(
        kvm: Kvm, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from kvmlib.arch.x86_64.cpuid import entries_from_kvm_cpuid2
    from kvmlib.arch.x86_64.cpuid_features import feature_bit

    cfg = VmmConfig(kernel=kernel_file(tmp_path, SPIN), memory_mib=64, num_vcpus=2,
                    hide_cpuid=("xsave", "cx16", "avx"))
    with caplog.at_level("WARNING", logger="kvmlib.vmm"), Vmm(cfg) as vmm:
        assert vmm.forced_cpuid == ()
        vmm.start()
        vmm.vm.pause()  # a vCPU inside KVM_RUN holds the lock KVM_GET_CPUID2 needs
        visible = set()
        for vcpu in vmm.vm.vcpus:
            for entry in entries_from_kvm_cpuid2(vcpu.vcpu_fd.get_cpuid2()):
                for name in cfg.hide_cpuid:
                    where = feature_bit(name)
                    if (entry.function, entry.index) == (where.leaf, where.subleaf) and \
                            getattr(entry, where.register) >> where.bit & 1:
                        visible.add(name)
        assert set(vmm.forced_cpuid) == visible
        assert "cx16" not in visible  # honoured everywhere kvmlib has run
    warned = {r.args[0] for r in caplog.records if "forces it on" in r.getMessage()}  # type: ignore[index]
    assert warned == visible


def test_a_stop_from_a_signal_handler_ends_run(kvm: Kvm, tmp_path: Path) -> None:
    import signal

    cfg = VmmConfig(kernel=kernel_file(tmp_path, put(b"x") + SPIN), memory_mib=64)
    vmm = Vmm(cfg)
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: vmm._stop_from_signal())
    timer = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGUSR1))
    try:
        timer.start()
        result = vmm.run(timeout=60)
    finally:
        timer.cancel()
        signal.signal(signal.SIGUSR1, previous)
    assert result.reason is VmmExitReason.STOPPED
    vmm._stop_from_signal()  # after close: nothing to wake, nothing written to a closed fd


def test_a_signal_before_the_loop_stops_the_guest_at_once(kvm: Kvm, tmp_path: Path) -> None:
    vmm = Vmm(VmmConfig(kernel=kernel_file(tmp_path, SPIN), memory_mib=64))
    vmm._stop_from_signal()  # as if it came while the kernel was being loaded
    assert vmm.run(timeout=60).reason is VmmExitReason.STOPPED
