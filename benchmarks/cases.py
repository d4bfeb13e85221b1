"""The cases: each measures kvmlib and the C baseline on the same guest code, interleaved.

A case is a function ``(settings, context) -> list[Result]`` registered in :data:`CASES` under its
name; adding one (e.g. a new snapshot measurement) is writing that function and one line here.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kvmlib import (
    EventExitHandler,
    GuestAddress,
    GuestMemoryMmap,
    IoManager,
    IoOut,
    Kvm,
    KvmVm,
    PioRange,
    VmConfig,
)
from kvmlib.arch.x86_64.regs import (
    BootProtocol,
    BootState,
    set_boot_registers,
    write_boot_tables,
)
from kvmlib.ioctl import KVM_MP_STATE_RUNNABLE, kvm_mp_state, kvm_regs
from kvmlib.snapshot import restore_snapshot, save_snapshot

from . import guests
from .guests import CODE, DONE_PORT, WORK_PORT
from .migration import case_migration
from .runner import Result, progress, run_c

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

    @classmethod
    def quick(cls) -> Settings:
        """Every case, briefly (well under a minute in all)."""
        return cls(reps=3, exits=5_000, lifecycle_cycles=2, scaling_iterations=300_000_000,
                   latency_cycles=3, snapshot_mib=256, snapshot_reps=2, import_reps=3)


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


def _memory(size: int, code: bytes, *, log_dirty_pages: bool = False) -> GuestMemoryMmap:
    memory = GuestMemoryMmap.from_ranges([(0, size)], log_dirty_pages=log_dirty_pages)
    memory.write(GuestAddress(CODE), code)
    return memory


def _to_ring3(vm: KvmVm, memory: GuestMemoryMmap) -> None:
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


# ---- 1. exit round trip ---------------------------------------------------------------------------


def _exit_full_loop(ctx: Context, config: VmConfig, exits: int) -> float:
    ports = Ports()
    with _memory(2 << 20, guests.exit_loop(exits)) as memory, \
            KvmVm.new(ctx.kvm, config, memory, EventExitHandler(), ports.bus()) as vm:
        vm.run(GuestAddress(CODE))
        if not ports.done.wait(120):
            raise RuntimeError("the exit-loop guest did not finish")
        vm.shutdown()
    return (ports.done_at - ports.first) / (ports.count - 1) * 1e6


def _exit_raw_loop(ctx: Context, config: VmConfig, exits: int) -> float:
    with _memory(2 << 20, guests.exit_loop(exits)) as memory, \
            KvmVm.new(ctx.kvm, config, memory, EventExitHandler(), IoManager()) as vm:
        fd = vm.vcpus[0].vcpu_fd
        write_boot_tables(memory, BootProtocol.LONG_MODE)
        set_boot_registers(fd, BootState.long_mode(CODE))
        run = fd.run
        count, first = 0, 0.0
        while True:
            exit_ = run()
            if type(exit_) is not IoOut:
                raise RuntimeError(f"unexpected exit {exit_!r}")
            if exit_.port == DONE_PORT:
                break
            count += 1
            if count == 1:
                first = time.perf_counter()
        return (time.perf_counter() - first) / (count - 1) * 1e6


def case_exit(s: Settings, ctx: Context) -> list[Result]:
    full = Result("exit round trip, full vCPU loop + device", "us/exit", target="<= 1.2")
    raw = Result("exit round trip, raw VcpuFd.run()", "us/exit", target="<= 1.1")
    config = VmConfig.from_kvm(ctx.kvm, 1)
    guest = ctx.guest_file("exit", guests.exit_loop(s.exits))
    for _ in range(s.reps):
        full.kvmlib.add(_exit_full_loop(ctx, config, s.exits))
        raw.kvmlib.add(_exit_raw_loop(ctx, config, s.exits))
        c = run_c(ctx.exe, "exit", guest)["RESULT"]
        assert full.c is not None and raw.c is not None
        full.c.add(c)
        raw.c.add(c)
    return [full, raw]


# ---- 2. lifecycle ---------------------------------------------------------------------------------


def _lifecycle_once(ctx: Context, config: VmConfig) -> float:
    t0 = time.perf_counter()
    ports = Ports()
    with _memory(64 << 20, guests.FIRST_EXIT) as memory, \
            KvmVm.new(ctx.kvm, config, memory, EventExitHandler(), ports.bus()) as vm:
        vm.run(GuestAddress(CODE))
        if not ports.first_seen.wait(60):
            raise RuntimeError("the lifecycle guest never reached its first exit")
        vm.shutdown()
    return (time.perf_counter() - t0) * 1e3


def case_lifecycle(s: Settings, ctx: Context) -> list[Result]:
    results = []
    guest = ctx.guest_file("first_exit", guests.FIRST_EXIT)
    for n in (1, 2):
        r = Result(f"lifecycle, 64 MiB, {n} vCPU{'s' if n > 1 else ''}", "ms/cycle", target="<= 3")
        # Both sides ask the host for its CPUID and MSR lists once, not per cycle.
        config = VmConfig.from_kvm(ctx.kvm, n)
        for _ in range(s.reps):
            r.kvmlib.add(_lifecycle_once(ctx, config) for _ in range(s.lifecycle_cycles))
            assert r.c is not None
            r.c.add(run_c(ctx.exe, "lifecycle", guest, str(n), str(s.lifecycle_cycles))["SAMPLE"])
        results.append(r)
    return results


# ---- 3. vCPU scaling ------------------------------------------------------------------------------


def _scaling_once(ctx: Context, n: int, iterations: int) -> float:
    ports = Ports(dones_expected=n)
    with _memory(2 << 20, guests.ring3_work(iterations // n)) as memory, \
            KvmVm.new(ctx.kvm, VmConfig.from_kvm(ctx.kvm, n), memory, EventExitHandler(),
                      ports.bus()) as vm:
        _to_ring3(vm, memory)
        t0 = time.perf_counter()
        vm.run()
        if not ports.done.wait(300):
            raise RuntimeError("the ring-3 payload did not finish")
        elapsed = ports.done_at - t0
        vm.shutdown()
    return elapsed


def case_scaling(s: Settings, ctx: Context) -> list[Result]:
    one = Result("ring-3 work on 1 vCPU", "s")
    two = Result("same work split over 2 vCPUs", "s")
    ratio = Result("2-vCPU time / 1-vCPU time", "x", target="<= 0.55", target_of="kvmlib")
    assert one.c is not None and two.c is not None and ratio.c is not None
    for _ in range(s.reps):
        k1, k2 = _scaling_once(ctx, 1, s.scaling_iterations), _scaling_once(ctx, 2, s.scaling_iterations)
        c1 = run_c(ctx.exe, "scaling", ctx.guest_file("w1", guests.ring3_work(s.scaling_iterations)),
                   "1")["RESULT"][0]
        c2 = run_c(ctx.exe, "scaling",
                   ctx.guest_file("w2", guests.ring3_work(s.scaling_iterations // 2)), "2")["RESULT"][0]
        one.kvmlib.add(k1)
        two.kvmlib.add(k2)
        ratio.kvmlib.add(k2 / k1)
        one.c.add(c1)
        two.c.add(c2)
        ratio.c.add(c2 / c1)
    return [one, two, ratio]


# ---- 4. pause / resume / shutdown latency --------------------------------------------------------


def case_latency(s: Settings, ctx: Context) -> list[Result]:
    pause = Result("pause a spinning guest", "ms", target="<= 10", target_of="kvmlib")
    resume = Result("resume it", "ms")
    shutdown = Result("shut down a spinning guest", "ms", target="<= 10", target_of="kvmlib")
    guest = ctx.guest_file("spin", guests.RING3_REPORT_AND_SPIN)
    config = VmConfig.from_kvm(ctx.kvm, 1)
    for _ in range(s.reps):
        for _ in range(s.latency_cycles):
            ports = Ports()
            with _memory(2 << 20, guests.RING3_REPORT_AND_SPIN) as memory, \
                    KvmVm.new(ctx.kvm, config, memory, EventExitHandler(), ports.bus()) as vm:
                _to_ring3(vm, memory)
                vm.run()
                ports.first_seen.wait(30)
                time.sleep(0.002)
                t0 = time.perf_counter()
                vm.pause()
                t1 = time.perf_counter()
                vm.resume()
                t2 = time.perf_counter()
                time.sleep(0.002)
                t3 = time.perf_counter()
                vm.shutdown()
                t4 = time.perf_counter()
            pause.kvmlib.add((t1 - t0) * 1e3)
            resume.kvmlib.add((t2 - t1) * 1e3)
            shutdown.kvmlib.add((t4 - t3) * 1e3)
        c = run_c(ctx.exe, "latency", guest, str(s.latency_cycles))
        assert pause.c is not None and resume.c is not None and shutdown.c is not None
        pause.c.add(c["PAUSE"])
        resume.c.add(c["RESUME"])
        shutdown.c.add(c["SHUTDOWN"])
    return [pause, resume, shutdown]


# ---- 5. snapshots ---------------------------------------------------------------------------------


def _dense_memory(size: int, *, log_dirty_pages: bool = False) -> GuestMemoryMmap:
    memory = GuestMemoryMmap.from_ranges([(0, size)], log_dirty_pages=log_dirty_pages)
    block = random.Random(1).randbytes(1 << 20)
    for off in range(0, size, 1 << 20):
        memory.write(off, block)
    return memory


def case_snapshot(s: Settings, ctx: Context) -> list[Result]:
    size = s.snapshot_mib << 20
    save = Result(f"snapshot save, {s.snapshot_mib} MiB", "MB/s")
    read = Result("snapshot restore, memory read", "MB/s")
    mapped = Result("snapshot restore, memory mapped CoW", "MB/s")
    assert save.c is not None and read.c is not None and mapped.c is not None
    with _dense_memory(size) as memory, \
            KvmVm.new(ctx.kvm, VmConfig.from_kvm(ctx.kvm, 1), memory, EventExitHandler(),
                      IoManager()) as vm:
        for i in range(s.snapshot_reps):
            path = ctx.tmp / f"snap{i}"
            t0 = time.perf_counter()
            save_snapshot(vm, path)
            save.kvmlib.add(size / (time.perf_counter() - t0) / MB)
            for mode, result in (("read", read), ("mmap", mapped)):
                t0 = time.perf_counter()
                vm2, memory2 = restore_snapshot(ctx.kvm, path, EventExitHandler(), IoManager(),
                                                mode=mode)  # type: ignore[arg-type]
                result.kvmlib.add(size / (time.perf_counter() - t0) / MB)
                vm2.close()
                memory2.close()
            copy_ms = run_c(ctx.exe, "filecopy", path / "memory.img", ctx.tmp / "copy.img", "1")
            for result in (save, read, mapped):
                assert result.c is not None
                result.c.add(size / (copy_ms["SAMPLE"][0] / 1e3) / MB)
            shutil.rmtree(path)
    return [save, read, mapped]


def case_reset(s: Settings, ctx: Context) -> list[Result]:
    size = 256 << 20
    pages = size // 4096
    rows = {frac: Result(f"fast reset, {frac:g} % of 256 MiB dirtied", "ms",
                         target="<= 0.1" if frac == 1 else None) for frac in (0.1, 1, 10)}
    picker = random.Random(2)
    with _dense_memory(size, log_dirty_pages=True) as memory, \
            KvmVm.new(ctx.kvm, VmConfig.from_kvm(ctx.kvm, 1), memory, EventExitHandler(),
                      IoManager()) as vm, vm.snapshot() as snap:
        for _ in range(s.reps):
            for frac, row in rows.items():
                for page in picker.sample(range(pages), int(pages * frac / 100)):
                    memory.write(page * 4096, b"\xff")
                t0 = time.perf_counter()
                vm.reset_to(snap)
                row.kvmlib.add((time.perf_counter() - t0) * 1e3)
            full = run_c(ctx.exe, "memcpy", "256", "1")["SAMPLE"]
            for row in rows.values():
                assert row.c is not None
                row.c.add(full)
    return list(rows.values())


# ---- 6. import time and memory -----------------------------------------------------------------


_RSS_PROBE = """
import json, os, sys
def rss():
    for line in open('/proc/self/status'):
        if line.startswith('VmRSS:'):
            return int(line.split()[1]) * 1024
before = rss()
import threading
from kvmlib import EventExitHandler, GuestMemoryMmap, IoManager, Kvm, KvmVm, VmConfig, PioRange
sys.path.insert(0, sys.argv[1])
from benchmarks.cases import Ports, _memory
from benchmarks import guests
kvm = Kvm()
ports = Ports()
memory = _memory(64 << 20, guests.FIRST_EXIT)
vm = KvmVm.new(kvm, VmConfig.from_kvm(kvm, 1), memory, EventExitHandler(), ports.bus())
vm.run(guests.CODE)
ports.first_seen.wait(30)
vm.pause()  # idle: parked, the guest halted
start = memory.regions[0].host_address
guest = 0
lines = open('/proc/self/smaps').read().splitlines()
for i, line in enumerate(lines):
    if '-' in line.split()[0] and int(line.split('-')[0], 16) == start:
        for detail in lines[i + 1:]:
            if detail.startswith('Rss:'):
                guest = int(detail.split()[1]) * 1024
                break
        break
print(json.dumps({"before": before, "after": rss(), "guest": guest}))
vm.shutdown()
"""


def case_footprint(s: Settings, ctx: Context) -> list[Result]:
    imp = Result("import kvmlib", "ms", c=None)
    rss = Result("resident memory of one idle VM beyond the guest's", "MiB", c=None)
    root = str(Path(__file__).resolve().parent.parent)
    for _ in range(s.import_reps):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        t1 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import kvmlib"], check=True)
        t2 = time.perf_counter()
        imp.kvmlib.add(((t2 - t1) - (t1 - t0)) * 1e3)
    for _ in range(min(s.reps, 3)):
        out = subprocess.run([sys.executable, "-c", _RSS_PROBE, root], capture_output=True,
                             text=True, check=True, env={**os.environ, "PYTHONPATH": root})
        doc = json.loads(out.stdout)
        rss.kvmlib.add((doc["after"] - doc["before"] - doc["guest"]) / (1 << 20))
    return [imp, rss]


CaseFn = Callable[[Settings, Context], list[Result]]

#: Every case by name, in the order they run and print.
CASES: dict[str, CaseFn] = {
    "exit": case_exit,
    "lifecycle": case_lifecycle,
    "scaling": case_scaling,
    "latency": case_latency,
    "snapshot": case_snapshot,
    "reset": case_reset,
    "footprint": case_footprint,
    "migration": case_migration,
}


def run_cases(names: list[str], s: Settings, ctx: Context) -> list[Result]:
    """Run the named cases in :data:`CASES` order."""
    results: list[Result] = []
    for name, fn in CASES.items():
        if name in names:
            progress(f"benchmarks: {name} ...")
            t0 = time.monotonic()
            results.extend(fn(s, ctx))
            progress(f"benchmarks: {name} done in {time.monotonic() - t0:.1f} s")
    return results


__all__ = ["CASES", "Context", "Settings", "run_cases"]
