"""Booting the Debian kernel through Vmm: the banner on the serial port, and a busybox shell.

One boot serves every test (module fixtures): a stock kernel with ``earlyprintk`` and a busybox
initramfs whose /init says it is up and reboots, started with ``Vmm.start()``. The first test drives
the booted kernel from Python: it waits for the banner with ``console.expect``, pauses the VM and
reads the boot vCPU's registers, then lets it run on; the others wait for the guest to end. On
hardware KVM the guest reaches the shell and the reboot (i8042 reset) ends the VM. On a host whose
KVM cannot run some instruction the kernel needs (it reports a KVM internal error), the banner tests
still pass and the shell test is skipped with that error as the reason: detected from what KVM did,
never from the machine.

The tests share the boot in file order (the first pauses the guest while it still runs). They are
marked ``slow`` (ring-0 guest code is emulated on some hosts: minutes there, seconds on hardware);
run them with ``python -m pytest -m slow``.
"""

from __future__ import annotations

import glob
import os
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
CR0_PE, CR0_PG = 1 << 0, 1 << 31
EFER_LMA = 1 << 10


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
    timed_out: bool


@pytest.fixture(scope="module")
def vmm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Vmm]:
    """The Debian kernel with the busybox initramfs, started and running."""
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
    config = VmmConfig(kernel=kernel, initrd=initrd, cmdline=CMDLINE, memory_mib=256,
                       hide_cpuid=HIDE)
    with kvm, Vmm(config, kvm) as booted:
        booted.start()
        yield booted


@pytest.fixture(scope="module")
def boot(vmm: Vmm) -> Boot:
    """How the boot ended (the guest stopped, or was stopped after BOOT_TIMEOUT)."""
    result = vmm.wait(BOOT_TIMEOUT)
    timed_out = result is None
    if result is None:
        result = vmm.stop()
    assert result is not None
    return Boot(result, vmm.console.output, timed_out)


def test_a_booted_kernel_can_be_paused_and_its_registers_read(vmm: Vmm) -> None:
    banner = vmm.console.expect("Linux version", timeout=BOOT_TIMEOUT)
    assert banner.group() == "Linux version"
    vmm.console.expect("\n", timeout=BOOT_TIMEOUT)  # the rest of the banner line
    vmm.vm.pause()
    try:
        regs, sregs = vmm.vm.vcpu_regs(0), vmm.vm.vcpu_sregs(0)
    finally:
        vmm.vm.resume()
    # Past the decompressor: the kernel runs at its virtual address, in long mode with paging.
    assert regs.rip >= 1 << 63, hex(regs.rip)
    assert sregs.cr0 & (CR0_PE | CR0_PG) == CR0_PE | CR0_PG, hex(sregs.cr0)
    assert sregs.efer & EFER_LMA, hex(sregs.efer)
    assert vmm.vm.running


def test_the_kernel_prints_its_banner_on_the_serial_port(boot: Boot) -> None:
    text = boot.output.decode("latin-1")
    assert "Linux version" in text, (boot.result.describe(), text[-2000:])
    assert not boot.timed_out, text[-2000:]
    if boot.result.reason is VmmExitReason.ERROR:
        # The VM ended cleanly and says what stopped it, with the place.
        assert boot.result.error is not None and boot.result.error.rip is not None
        assert str(boot.result.error).startswith("vCPU 0 stopped at RIP 0x")


def test_the_busybox_initramfs_shell_comes_up_and_reboot_ends_the_vm(vmm: Vmm, boot: Boot) -> None:
    error = boot.result.error
    if error is not None and isinstance(error.exit, InternalError):
        pytest.skip(f"this host's KVM cannot run the kernel ({boot.result.seconds:.0f} s in): {error}")
    vmm.console.expect(SHELL_MARKER, timeout=0)  # its message shows the console's last lines
    assert boot.result.reason is VmmExitReason.RESET


def test_the_docs_kernel_smoke_test_passes_with_this_kernel(pytester: pytest.Pytester) -> None:
    # docs/testing.rst's example, run as a harness suite would run it: with --kvmlib-kernel.
    kernel = _need("kernel (/boot/vmlinuz-*)", next(iter(sorted(glob.glob("/boot/vmlinuz-*"))), None))
    example = Path(__file__).resolve().parent.parent / "docs" / "examples" / "testing_guide"
    result = pytester.runpytest(str(example / "test_kernel_smoke.py"), "-p", "no:cacheprovider",
                                "--kvmlib-kernel", kernel, "--kvmlib-hide-cpuid", ",".join(HIDE))
    result.assert_outcomes(passed=1)
