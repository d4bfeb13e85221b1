"""A first guest: assemble it, build the VM, run it, look at what it did."""

from __future__ import annotations

from kvmlib import IoManager, PioRange
from kvmlib.testing import assemble
from kvmlib.testing.harness import wait_until
from kvmlib.testing.plugin import VmFactory

from .devices import Recorder


def test_the_guest_says_hello(vm_factory: VmFactory) -> None:
    device = Recorder()
    bus = IoManager()
    bus.register_pio(PioRange(0x10, 1), device)
    vm = vm_factory(assemble("""
        mov al, 0x41
        out 0x10, al
    spin:
        jmp spin
    """), bus=bus)
    vm.run()                      # vCPU 0 starts at the code, in 64-bit mode
    wait_until(lambda: device.writes.get(0x10) == [0x41], what="the guest's out")
    vm.pause()
    assert vm.vcpu_regs(0).rax & 0xFF == 0x41
    vm.shutdown()                 # vm_factory closes the VM after the test anyway
