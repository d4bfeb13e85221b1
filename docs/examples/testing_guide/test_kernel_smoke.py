"""A kernel smoke test: boot the kernel given on the command line and wait for its banner."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from kvmlib.vmm import Vmm, VmmConfig

BANNER = re.compile(r"Linux version (\S+)")


def test_the_kernel_prints_its_banner(vmm_factory: Callable[[VmmConfig], Vmm],
                                      kvmlib_kernel: Path, kvmlib_hide_cpuid: tuple[str, ...]) -> None:
    # Skipped unless the suite runs with --kvmlib-kernel PATH (failed with KVMLIB_REQUIRE_KVM=1).
    vmm = vmm_factory(VmmConfig(kernel=kvmlib_kernel, memory_mib=256,
                                hide_cpuid=kvmlib_hide_cpuid,
                                # earlyprintk: the banner comes before the console driver does
                                cmdline="earlyprintk=serial,ttyS0 console=ttyS0 panic=-1"))
    vmm.start()                   # returns with the guest running; the console fills meanwhile
    banner = vmm.console.expect(BANNER, timeout=120)
    assert banner.group(1)        # the kernel's release, e.g. "6.1.0-18-cloud-amd64"
    vmm.vm.pause()                # the booted kernel is a KvmVm like any other
    assert vmm.vm.vcpu_regs(0).rip != 0
    # If an assertion fails, the console output so far is attached to the test's report;
    # vmm_factory stops and closes the Vmm after the test either way.
