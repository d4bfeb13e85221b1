"""Testing a device model: the guest drives it through port I/O, the test checks both sides."""

from __future__ import annotations

import threading

from kvmlib import IoManager, PioRange
from kvmlib.bus import answer_byte
from kvmlib.testing import assemble
from kvmlib.testing.harness import wait_until
from kvmlib.testing.plugin import VmFactory


class Doubler:
    """The device under test: a write sets its value, a read returns twice the value."""

    def __init__(self) -> None:
        self.value = 0
        self.reads = 0
        self.lock = threading.Lock()

    def pio_write(self, base: int, offset: int, data: memoryview) -> None:
        with self.lock:
            self.value = data[0]

    def pio_read(self, base: int, offset: int, data: memoryview) -> None:
        with self.lock:
            self.reads += 1
            answer_byte(data, (2 * self.value) & 0xFF)


def test_the_guest_reads_twice_what_it_wrote(vm_factory: VmFactory) -> None:
    device = Doubler()
    bus = IoManager()
    bus.register_pio(PioRange(0x300, 1), device)
    vm = vm_factory(assemble("""
        mov dx, 0x300     # not 0x20: the PIC in the kernel owns that port
        mov al, 21
        out dx, al
        in al, dx
        mov rbx, rax      # RBX keeps the answer for the test to read
    spin:
        jmp spin
    """), bus=bus)
    vm.run()
    wait_until(lambda: device.reads == 1, what="the guest's in")
    vm.pause()
    assert vm.vcpu_regs(0).rbx & 0xFF == 42
    vm.shutdown()
