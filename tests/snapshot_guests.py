"""Guest programs and devices for the snapshot, dirty-tracking and fast-reset tests.

Every program is 64-bit code started by KvmVm at ``CODE``. With the in-kernel irqchip ``hlt`` never
leaves the kernel, so a guest that is done says so on ``DONE_PORT`` and then halts with interrupts
off; the test pauses the VM from outside, as a harness would.
"""

from __future__ import annotations

import struct
import threading

from kvmlib import GuestAddress, GuestMemoryMmap
from kvmlib.bus import IoManager, PioRange

RAM_SIZE = 4 << 20
CODE = GuestAddress(0x10000)
COUNTER = GuestAddress(0x30000)
SCRIBBLE = GuestAddress(0x100000)   # 1 MiB: the pages the scribbler writes start here
COUNT_PORT = 0x10
DONE_PORT = 0x14
PAGE = 0x1000


def count_to(limit: int) -> bytes:
    """Count in RAX and in memory at COUNTER, report each value on COUNT_PORT, stop at ``limit``."""
    return bytes([
        0x48, 0xC7, 0xC3, *struct.pack("<I", COUNTER),  # mov rbx, COUNTER
        0x48, 0xFF, 0xC0,                               # next: inc rax
        0x48, 0x89, 0x03,                               # mov [rbx], rax
        0xE7, COUNT_PORT,                               # out COUNT_PORT, eax
        0x48, 0x3D, *struct.pack("<I", limit),          # cmp rax, limit
        0x72, 0xF0,                                     # jb next
        0xE6, DONE_PORT,                                # out DONE_PORT, al
        0xFA,                                           # cli
        0xF4,                                           # hlt
        0xEB, 0xFD,                                     # jmp hlt
    ])


FLAG = GuestAddress(COUNTER + 8)  # on COUNTER's page


def counting(limit: int) -> bytes:
    """:func:`count_to` without its ending: falls through once RAX reaches ``limit``."""
    return count_to(limit)[:-6]


def wait_for_flag() -> bytes:
    """Spin until the host writes a non-zero byte at FLAG (a harness handing in its input)."""
    return bytes([
        0x80, 0x3C, 0x25, *struct.pack("<I", FLAG), 0x00,  # spin: cmp byte [FLAG], 0
        0x74, 0xF6,                                        # je spin
    ])


def scribble(pages: list[int], value: int) -> bytes:
    """Write ``value`` (a qword) at the start of each page number (from address 0), then DONE."""
    code = bytearray()
    for page in pages:
        code += bytes([0x48, 0xC7, 0xC3, *struct.pack("<I", page * PAGE)])  # mov rbx, page address
        code += bytes([0x48, 0xC7, 0x03, *struct.pack("<I", value)])        # mov qword [rbx], value
    code += bytes([0xE6, DONE_PORT, 0xFA, 0xF4, 0xEB, 0xFD])  # out DONE_PORT; cli; hlt; jmp hlt
    return bytes(code)


class Counter:
    """COUNT_PORT and DONE_PORT: records the reported counts; tests wait for a count or for done."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.values: list[int] = []
        self.done = False

    def pio_read(self, base: int, offset: int, data: memoryview) -> None:
        data[:] = bytes(len(data))

    def pio_write(self, base: int, offset: int, data: memoryview) -> None:
        with self.cond:
            if base == DONE_PORT:
                self.done = True
            else:
                self.values.append(int.from_bytes(data, "little"))
            self.cond.notify_all()

    def wait_count(self, count: int, timeout: float = 20.0) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: len(self.values) >= count or self.done, timeout)

    def wait_done(self, timeout: float = 20.0) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: self.done, timeout)

    def clear(self) -> None:
        with self.cond:
            self.values.clear()
            self.done = False


class Tape:
    """A device with state: remembers the last byte written to it (checks device save/restore)."""

    def __init__(self) -> None:
        self.last = 0

    def pio_read(self, base: int, offset: int, data: memoryview) -> None:
        data[:] = bytes([self.last]) * len(data)

    def pio_write(self, base: int, offset: int, data: memoryview) -> None:
        self.last = data[0]

    def save_state(self) -> bytes:
        return bytes([self.last])

    def restore_state(self, state: bytes) -> None:
        if len(state) != 1:
            raise ValueError("a Tape state is one byte")
        self.last = state[0]


TAPE_PORT = 0x20


def counting_bus(counter: Counter, tape: Tape | None = None) -> IoManager:
    bus = IoManager()
    bus.register_pio(PioRange(COUNT_PORT, 4), counter)  # the count is a 32-bit out
    bus.register_pio(PioRange(DONE_PORT, 1), counter)
    if tape is not None:
        bus.register_pio(PioRange(TAPE_PORT, 1), tape)
    return bus


def memory_with(code: bytes, *, log_dirty_pages: bool = False) -> GuestMemoryMmap:
    memory = GuestMemoryMmap.from_ranges([(0, RAM_SIZE)], log_dirty_pages=log_dirty_pages)
    memory.write(CODE, code)
    return memory
