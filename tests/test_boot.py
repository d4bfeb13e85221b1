"""Booting the Debian kernel through Vmm: the banner on the serial port, and a busybox shell.

One boot serves both tests (a module fixture): a stock kernel with ``earlyprintk`` and a busybox
initramfs whose /init says it is up and reboots. On hardware KVM the guest reaches the shell and the
reboot (i8042 reset) ends the VM. On a host whose KVM cannot run some instruction the kernel needs
(it reports a KVM internal error), the banner test still passes and the shell test is skipped with
that error as the reason: detected from what KVM did, never from the machine.

These tests are marked ``slow`` (ring-0 guest code is emulated on some hosts: minutes there, seconds
on hardware); run them with ``python -m pytest -m slow``.
"""

from __future__ import annotations

import glob
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest

from kvmlib import InternalError, Kvm, KvmUnavailableError
from kvmlib.vmm import Vmm, VmmConfig, VmmExitReason, VmmResult

from .conftest import REQUIRE_KVM
from .initramfs import SHELL_MARKER, build_initramfs

pytestmark = pytest.mark.slow

#: Hidden from the guest in these tests: instructions some hosts' KVM cannot emulate. Harmless on
#: hardware (the kernel falls back), and configuration, not a special case in the library.
HIDE = ("cx16", "xsave")
CMDLINE = "earlyprintk=serial,ttyS0 console=ttyS0 rdinit=/init reboot=k panic=-1"
BOOT_TIMEOUT = 600.0


def _need(what: str, path: str | None) -> str:
    if path is None:
        reason = f"no {what} here"
        if REQUIRE_KVM:
            pytest.fail(f"KVMLIB_REQUIRE_KVM=1 but {reason} (.ci/run installs it)")
        pytest.skip(reason)
    return path


@attrs.define
class Boot:
    result: VmmResult
    output: bytes
    seconds: float


@pytest.fixture(scope="module")
def boot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Boot]:
    kernel = _need("kernel (/boot/vmlinuz-*)", next(iter(sorted(glob.glob("/boot/vmlinuz-*"))), None))
    busybox = _need("static busybox (busybox-static)",
                    next((p for p in ("/bin/busybox", "/usr/bin/busybox") if os.path.exists(p)), None))
    try:
        kvm = Kvm()
    except KvmUnavailableError as e:  # the same rule as the kvm fixture
        if REQUIRE_KVM:
            pytest.fail(f"KVMLIB_REQUIRE_KVM=1 but KVM is unusable: {e}")
        pytest.skip(f"KVM is unusable here: {e}")
    initrd = tmp_path_factory.mktemp("boot") / "initramfs.cpio"
    initrd.write_bytes(build_initramfs(Path(busybox)))
    output = bytearray()
    lock = threading.Lock()

    def sink(data: bytes) -> None:
        with lock:
            output.extend(data)

    config = VmmConfig(kernel=kernel, initrd=initrd, cmdline=CMDLINE, memory_mib=256,
                       serial_output=sink, hide_cpuid=HIDE)
    started = time.monotonic()
    with kvm:
        result = Vmm(config, kvm).run(timeout=BOOT_TIMEOUT)
    yield Boot(result, bytes(output), time.monotonic() - started)


def test_the_kernel_prints_its_banner_on_the_serial_port(boot: Boot) -> None:
    text = boot.output.decode("latin-1")
    assert "Linux version" in text, (boot.result.describe(), text[-2000:])
    assert boot.result.reason is not VmmExitReason.TIMEOUT, text[-2000:]
    if boot.result.reason is VmmExitReason.ERROR:
        # The VM ended cleanly and says what stopped it, with the place.
        assert boot.result.error is not None and boot.result.error.rip is not None
        assert str(boot.result.error).startswith("vCPU 0 stopped at RIP 0x")


def test_the_busybox_initramfs_shell_comes_up_and_reboot_ends_the_vm(boot: Boot) -> None:
    error = boot.result.error
    if error is not None and isinstance(error.exit, InternalError):
        pytest.skip(f"this host's KVM cannot run the kernel ({boot.seconds:.0f} s in): {error}")
    text = boot.output.decode("latin-1")
    assert SHELL_MARKER in text, (boot.result.describe(), text[-2000:])
    assert boot.result.reason is VmmExitReason.RESET
