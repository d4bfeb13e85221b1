"""The guest, devices and memory the migration tests (and their child processes) share.

The guest counts in RAX forever, writing each value into one page of a window (value ``v`` goes
to page ``v % WINDOW_PAGES``) and into COUNTER, without ever exiting: it dirties the whole window
continuously while migration copies memory. Memory also holds a block of random bytes the guest
never touches, which must arrive byte-identical.
"""

from __future__ import annotations

import hashlib
import random
import struct
import time

from kvmlib import GuestAddress, GuestMemoryMmap, IoManager, Kvm, KvmVm, PioRange, VmConfig
from kvmlib.exit_handler import EventExitHandler

from .snapshot_guests import Tape

RAM_SIZE = 16 << 20
CODE = GuestAddress(0x10000)
COUNTER = GuestAddress(0x30000)
WINDOW = GuestAddress(0x200000)
WINDOW_PAGES = 256
NOISE = GuestAddress(0x800000)
NOISE_SIZE = 1 << 20
HOST_NOTE = GuestAddress(0xC00000)
TAPE_PORT = 0x20
PAGE = 0x1000


def window_counter() -> bytes:
    """``inc rax; [WINDOW + (rax % WINDOW_PAGES) * PAGE] = rax; [COUNTER] = rax``, forever."""
    body = bytes([
        0x48, 0xFF, 0xC0,                                        # loop: inc rax
        0x48, 0x89, 0xC2,                                        # mov rdx, rax
        0x48, 0x81, 0xE2, *struct.pack("<I", WINDOW_PAGES - 1),  # and rdx, WINDOW_PAGES - 1
        0x48, 0xC1, 0xE2, 0x0C,                                  # shl rdx, 12
        0x48, 0x89, 0x04, 0x13,                                  # mov [rbx + rdx], rax
        0x48, 0x89, 0x04, 0x25, *struct.pack("<I", COUNTER),     # mov [COUNTER], rax
    ])
    jump = bytes([0xEB, (-(len(body) + 2)) & 0xFF])              # jmp loop
    return bytes([0x48, 0xC7, 0xC3, *struct.pack("<I", WINDOW)]) + body + jump  # mov rbx, WINDOW


def noise() -> bytes:
    return random.Random(7).randbytes(NOISE_SIZE)


def tape_bus(tape: Tape) -> IoManager:
    bus = IoManager()
    bus.register_pio(PioRange(TAPE_PORT, 1), tape)
    return bus


def source_memory(size: int = RAM_SIZE, *, log_dirty_pages: bool = True) -> GuestMemoryMmap:
    memory = GuestMemoryMmap.from_ranges([(0, size)], log_dirty_pages=log_dirty_pages)
    memory.write(CODE, window_counter())
    memory.write(NOISE, noise())
    return memory


def window_consistent(memory: GuestMemoryMmap, rax: int) -> bool:
    """Whether the window holds the last WINDOW_PAGES values up to ``rax``, as the guest left them.

    The newest value may not be stored yet (paused between ``inc`` and the store): its page then
    still holds the value one lap older.
    """
    for value in range(max(1, rax - WINDOW_PAGES + 1), rax + 1):
        stored = memory.read_u64(WINDOW + (value % WINDOW_PAGES) * PAGE)
        if stored != value and not (value == rax and stored == max(0, rax - WINDOW_PAGES)):
            return False
    return True


def digest(memory: GuestMemoryMmap) -> str:
    h = hashlib.sha256()
    for region in memory.regions:
        h.update(region.as_memoryview())
    return h.hexdigest()


def wait_counter_above(memory: GuestMemoryMmap, value: int, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if memory.read_u64(COUNTER) > value:
            return True
        time.sleep(0.001)
    return False


class Source:
    """A counting VM with a Tape device, running."""

    def __init__(self, kvm: Kvm, size: int = RAM_SIZE, *, log_dirty_pages: bool = True) -> None:
        self.memory = source_memory(size, log_dirty_pages=log_dirty_pages)
        self.tape = Tape()
        self.tape.last = 0x42
        try:
            self.vm = KvmVm.new(kvm, VmConfig.from_kvm(kvm, 1), self.memory, EventExitHandler(),
                                tape_bus(self.tape))
        except BaseException:
            self.memory.close()
            raise
        self.vm.run(CODE)
        if not wait_counter_above(self.memory, 0):
            self.close()
            raise RuntimeError("the counting guest never started")

    def counter(self) -> int:
        return self.memory.read_u64(COUNTER)

    def close(self) -> None:
        self.vm.close()
        self.memory.close()
