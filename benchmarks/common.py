"""What every benchmark case shares: settings, context, the port device and guest memory setups."""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from kvmlib import (
    GuestAddress,
    GuestMemoryMmap,
    IoManager,
    Kvm,
    KvmVm,
    PioRange,
)
from kvmlib.arch.x86_64.regs import (
    BootProtocol,
    BootState,
    set_boot_registers,
    write_boot_tables,
)
from kvmlib.ioctl import KVM_MP_STATE_RUNNABLE, kvm_mp_state, kvm_regs

from .guests import CODE, DONE_PORT, WORK_PORT

MB = 1_000_000


@dataclass(frozen=True)
class Settings:
    """How long each case runs: the full run, or ``--quick``."""

    reps: int = 7
    exits: int = 20_000
    lifecycle_cycles: int = 3
    scaling_iterations: int = 1_500_000_000
    latency_cycles: int = 5
    snapshot_mib: int = 256
    snapshot_reps: int = 5
    import_reps: int = 7
    fuzz_iterations: int = 1000

    @classmethod
    def quick(cls) -> Settings:
        """Every case, briefly (well under a minute in all)."""
        return cls(reps=3, exits=5_000, lifecycle_cycles=2, scaling_iterations=300_000_000,
                   latency_cycles=3, snapshot_mib=256, snapshot_reps=2, import_reps=3,
                   fuzz_iterations=200)


@dataclass
class Context:
    """What the cases share: the C executable, a scratch directory, an open /dev/kvm."""

    exe: Path
    tmp: Path
    kvm: Kvm

    def guest_file(self, name: str, code: bytes) -> Path:
        path = self.tmp / f"{name}.bin"
        path.write_bytes(code)
        return path


class Ports:
    """WORK_PORT and DONE_PORT: counts, and the times of the first work exit and the last DONE."""

    def __init__(self, dones_expected: int = 1) -> None:
        self.lock = threading.Lock()
        self.count = 0
        self.dones = 0
        self.dones_expected = dones_expected
        self.first = 0.0
        self.done_at = 0.0
        self.first_seen = threading.Event()
        self.done = threading.Event()

    def pio_read(self, base: int, offset: int, data: memoryview) -> None:
        data[:] = bytes(len(data))

    def pio_write(self, base: int, offset: int, data: memoryview) -> None:
        if base == DONE_PORT:
            with self.lock:
                self.dones += 1
                finished = self.dones >= self.dones_expected
            if finished:
                self.done_at = time.perf_counter()
                self.done.set()
            return
        self.count += 1
        if self.count == 1:
            self.first = time.perf_counter()
            self.first_seen.set()

    def bus(self) -> IoManager:
        bus = IoManager()
        bus.register_pio(PioRange(WORK_PORT, 1), self)
        bus.register_pio(PioRange(DONE_PORT, 1), self)
        return bus


def memory_with(size: int, code: bytes, *, log_dirty_pages: bool = False) -> GuestMemoryMmap:
    memory = GuestMemoryMmap.from_ranges([(0, size)], log_dirty_pages=log_dirty_pages)
    memory.write(GuestAddress(CODE), code)
    return memory


def to_ring3(vm: KvmVm, memory: GuestMemoryMmap) -> None:
    """Every vCPU runnable at CODE in ring 3 with IOPL 3, on user-accessible identity tables."""
    user = 0x4
    write_boot_tables(memory, BootProtocol.LONG_MODE)
    memory.write_u64(0x9000, 0xA000 | 0x23 | user)
    memory.write_u64(0xA000, 0xB000 | 0x23 | user)
    for i in range(512):
        memory.write_u64(0xB000 + 8 * i, (i << 21) | 0xE3 | user)
    for vcpu in vm.vcpus:
        fd = vcpu.vcpu_fd
        set_boot_registers(fd, BootState.long_mode(CODE))
        sregs = fd.get_sregs()
        for seg in (sregs.cs, sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss):
            seg.dpl = 3
            seg.selector |= 3
        fd.set_sregs(sregs)
        regs = kvm_regs()
        regs.rip, regs.rflags, regs.rsp = CODE, 0x3002, 0x8FF0
        fd.set_regs(regs)
        fd.set_mp_state(kvm_mp_state(KVM_MP_STATE_RUNNABLE))


def dense_memory(size: int, *, log_dirty_pages: bool = False) -> GuestMemoryMmap:
    memory = GuestMemoryMmap.from_ranges([(0, size)], log_dirty_pages=log_dirty_pages)
    block = random.Random(1).randbytes(1 << 20)
    for off in range(0, size, 1 << 20):
        memory.write(off, block)
    return memory


__all__ = ["MB", "Context", "Ports", "Settings", "dense_memory", "memory_with", "to_ring3"]
