"""Guest programs and devices for the KvmVm lifecycle tests.

KvmVm starts every vCPU in 64-bit mode at the address given to ``run``. With the irqchip in the
kernel, vCPUs other than 0 wait for INIT/SIPI as on real hardware, so the multi-vCPU guest wakes them
itself through the x2APIC ICR; they start in real mode at ``AP_CODE``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from kvmlib import GuestAddress, GuestMemoryMmap
from kvmlib.bus import IoManager, PioRange

RAM_SIZE = 2 << 20
BSP_CODE = GuestAddress(0x10000)
AP_CODE = GuestAddress(0x20000)  # SIPI vector 0x20
COUNTER = GuestAddress(0x30000)
REPORT_PORT = 0x10

REPORT_AND_WAKE_APS = bytes([
    0xB9, 0x1B, 0x00, 0x00, 0x00,  # mov ecx, IA32_APIC_BASE
    0x0F, 0x32,                    # rdmsr
    0x0D, 0x00, 0x0C, 0x00, 0x00,  # or eax, EN | EXTD        (x2APIC mode)
    0x0F, 0x30,                    # wrmsr
    0xB9, 0x30, 0x08, 0x00, 0x00,  # mov ecx, x2APIC ICR
    0x31, 0xD2,                    # xor edx, edx
    0xB8, 0x00, 0x45, 0x0C, 0x00,  # mov eax, INIT, all excluding self
    0x0F, 0x30,                    # wrmsr
    0xB8, 0x20, 0x46, 0x0C, 0x00,  # mov eax, SIPI vector 0x20, all excluding self
    0x0F, 0x30,                    # wrmsr
    0xB0, 0x00,                    # mov al, 0
    0xE6, REPORT_PORT,             # out REPORT_PORT, al
    0xEB, 0xFE,                    # jmp $
])

AP_REPORT_AND_HALT = bytes([       # 16-bit real mode
    0xB0, 0x01,                    # mov al, 1
    0xE6, REPORT_PORT,             # out REPORT_PORT, al
    0xFA,                          # cli
    0xF4,                          # hlt
    0xEB, 0xFD,                    # jmp hlt
])

SPIN = bytes([0xEB, 0xFE])         # jmp $   (no exit, ever)

COUNT_FOREVER = bytes([
    0x48, 0xC7, 0xC3, 0x00, 0x00, 0x03, 0x00,  # mov rbx, COUNTER
    0x48, 0xFF, 0x03,                          # next: inc qword [rbx]
    0xEB, 0xFB,                                # jmp next
])

TRIPLE_FAULT = bytes([0x0F, 0x0B])  # ud2 with an empty IDT: #UD, #GP, #DF, shutdown

OUT_THEN_SPIN = bytes([0xE6, REPORT_PORT, 0xEB, 0xFE])  # out REPORT_PORT, al ; jmp $


class Reporter:
    """A port device that records which vCPU thread wrote what, and lets a test wait for it."""

    def __init__(self, on_write: Callable[[], None] | None = None) -> None:
        self.cond = threading.Condition()
        self.writes: list[tuple[str, int]] = []
        self.threads_at_first_write: set[str] | None = None
        self.on_write = on_write

    def pio_read(self, base: int, offset: int, data: memoryview) -> None:
        data[:] = bytes(len(data))

    def pio_write(self, base: int, offset: int, data: memoryview) -> None:
        with self.cond:
            if self.threads_at_first_write is None:
                self.threads_at_first_write = {t.name for t in threading.enumerate()}
            self.writes.append((threading.current_thread().name, data[0]))
            self.cond.notify_all()
        if self.on_write is not None:
            self.on_write()

    def wait_for_writers(self, count: int, timeout: float = 10.0) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: len({w for w, _ in self.writes}) >= count, timeout)


def memory_with(programs: dict[GuestAddress, bytes]) -> GuestMemoryMmap:
    memory = GuestMemoryMmap.from_ranges([(GuestAddress(0), RAM_SIZE)])
    for addr, code in programs.items():
        memory.write(addr, code)
    return memory


def bus_with(device: object) -> IoManager:
    bus = IoManager()
    bus.register_pio(PioRange(REPORT_PORT, 1), device)  # type: ignore[arg-type]
    return bus
