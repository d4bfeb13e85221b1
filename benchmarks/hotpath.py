"""The hot paths: the exit round trip, fast reset, the fuzz loop, restore to the first instruction.

The exit round trip has two baselines. The standalone C program (``kvmbench exit``) runs the same
guest in its own VM; the in-process one (``benchmarks/c/inprocess.c``, built here as a shared
object and called through ctypes) loops on KVM_RUN in C on kvmlib's own vCPU, so the only difference
left is Python's. Fast reset is counted in vCPU-ioctl units: its time over one KVM_SET_REGS measured
in the same run. The fuzz loop runs a ring-3 target (native speed even where ring-0 code is
emulated) that reads an input byte, dirties k pages and reports done, then resets it, in kvmlib
(``run_inline`` + ``reset_to``) and in C doing the same reset with the same ioctls
(``kvmbench fuzz``).
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
import time
from pathlib import Path

from kvmlib import (
    EventExitHandler,
    GuestAddress,
    GuestMemoryMmap,
    IoManager,
    IoOut,
    KvmVm,
    PioRange,
    ResetTimings,
    StopReason,
    VmConfig,
)
from kvmlib.arch.x86_64.regs import BootProtocol, BootState, set_boot_registers, write_boot_tables
from kvmlib.ioctl import kvm_regs
from kvmlib.snapshot import restore_snapshot, save_snapshot

from . import guests
from .common import Context, Settings, dense_memory, to_ring3
from .guests import CODE, DONE_PORT, INPUT_PORT, WORK_PORT
from .runner import Result, progress, run_c

MIB = 1 << 20
FUZZ_MEMORY = 256 * MIB
INPROCESS_SOURCE = Path(__file__).resolve().parent / "c" / "inprocess.c"


# ---- the exit round trip --------------------------------------------------------------------------


def _inprocess_library(tmp: Path) -> ctypes.CDLL:
    lib_path = tmp / "libinprocess.so"
    if not lib_path.exists():
        done = subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-o", str(lib_path),
                               str(INPROCESS_SOURCE)], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"gcc failed to build the in-process baseline:\n{done.stderr}")
    lib = ctypes.CDLL(str(lib_path))
    lib.run_until_port.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_int)
    lib.run_until_port.restype = ctypes.c_long
    return lib


def _exit_vm(ctx: Context, exits: int, bus: IoManager | None = None) -> KvmVm:
    memory = GuestMemoryMmap.from_ranges([(0, 2 * MIB)])
    memory.write(GuestAddress(CODE), guests.exit_loop(exits))
    vm = KvmVm.new(ctx.kvm, VmConfig.from_kvm(ctx.kvm, 1), memory, EventExitHandler(),
                   bus or IoManager(), own_memory=True)
    write_boot_tables(memory, BootProtocol.LONG_MODE)
    set_boot_registers(vm.vcpus[0].vcpu_fd, BootState.long_mode(CODE))
    return vm


def _exit_inprocess_c(ctx: Context, lib: ctypes.CDLL, exits: int) -> float:
    with _exit_vm(ctx, exits) as vm:
        fd = vm.vcpus[0].vcpu_fd
        t0 = time.perf_counter()
        count = int(lib.run_until_port(fd.fd, ctypes.addressof(fd.kvm_run), DONE_PORT))
        elapsed = time.perf_counter() - t0
    if count <= 0:
        raise RuntimeError("the in-process C loop met an unexpected exit")
    return elapsed / count * 1e6


def _exit_raw(ctx: Context, exits: int) -> float:
    with _exit_vm(ctx, exits) as vm:
        run = vm.vcpus[0].vcpu_fd.run
        count = 0
        t0 = time.perf_counter()
        while True:
            exit_ = run()
            if type(exit_) is not IoOut:
                raise RuntimeError(f"unexpected exit {exit_!r}")
            if exit_.port == DONE_PORT:
                break
            count += 1
        elapsed = time.perf_counter() - t0
    return elapsed / count * 1e6


class _Counter:
    """WORK_PORT exits counted; DONE_PORT ends the inline run."""

    def __init__(self) -> None:
        self.count = 0
        self.vm: KvmVm | None = None

    def pio_read(self, base: int, offset: int, data: memoryview) -> None:
        data[0] = 0

    def pio_write(self, base: int, offset: int, data: memoryview) -> None:
        if base == DONE_PORT:
            assert self.vm is not None
            self.vm.stop_inline()
        else:
            self.count += 1


def _exit_full(ctx: Context, exits: int) -> float:
    counter = _Counter()
    bus = IoManager()
    bus.register_pio(PioRange(WORK_PORT, 1), counter)
    bus.register_pio(PioRange(DONE_PORT, 1), counter)
    with _exit_vm(ctx, exits, bus) as vm:
        counter.vm = vm
        t0 = time.perf_counter()
        result = vm.run_inline(timeout=120)
        elapsed = time.perf_counter() - t0
    if result.reason is not StopReason.REQUESTED:
        raise RuntimeError(f"the exit-loop guest stopped: {result}")
    return elapsed / counter.count * 1e6


def case_exit(s: Settings, ctx: Context) -> list[Result]:
    """kvmlib's exit paths against the C loop on the same vCPU, and the two C baselines."""
    raw = Result("exit round trip, raw VcpuFd.run()", "us/exit",
                 target="<= 1.1")
    full = Result("exit round trip, vCPU loop + device", "us/exit",
                  target="<= 1.25")
    baselines = Result("exit round trip, C loop on kvmlib's vCPU", "us/exit",
                       baseline="the standalone C program, its own VM")
    lib = _inprocess_library(ctx.tmp)
    guest = ctx.guest_file("exit", guests.exit_loop(s.exits))
    for _ in range(s.reps):
        inprocess = _exit_inprocess_c(ctx, lib, s.exits)
        raw.kvmlib.add(_exit_raw(ctx, s.exits))
        full.kvmlib.add(_exit_full(ctx, s.exits))
        baselines.kvmlib.add(inprocess)
        standalone = run_c(ctx.exe, "exit", guest)["RESULT"]
        assert raw.c is not None and full.c is not None and baselines.c is not None
        raw.c.add(inprocess)
        full.c.add(inprocess)
        baselines.c.add(standalone)
    return [raw, full, baselines]


# ---- the fuzz loop and fast reset -----------------------------------------------------------------


class _Target:
    """The input port (``input``), and a write that ends the inline run: the fuzz target's DONE,
    the restored guest's first exit."""

    def __init__(self) -> None:
        self.input = 0
        self.vm: KvmVm | None = None

    def pio_read(self, base: int, offset: int, data: memoryview) -> None:
        data[0] = self.input

    def pio_write(self, base: int, offset: int, data: memoryview) -> None:
        assert self.vm is not None
        self.vm.stop_inline()


def _fuzz_vm(ctx: Context, pages: int) -> tuple[KvmVm, _Target]:
    target = _Target()
    bus = IoManager()
    bus.register_pio(PioRange(INPUT_PORT, 1), target)
    bus.register_pio(PioRange(DONE_PORT, 1), target)
    memory = GuestMemoryMmap.from_ranges([(0, FUZZ_MEMORY)], log_dirty_pages=True)
    memory.write(GuestAddress(CODE), guests.fuzz_target(pages))
    vm = KvmVm.new(ctx.kvm, VmConfig.from_kvm(ctx.kvm, 1), memory, EventExitHandler(), bus,
                   own_memory=True)
    to_ring3(vm, memory)
    target.vm = vm
    return vm, target


def _set_regs_unit(vm: KvmVm) -> float:
    """The cost of one KVM_SET_REGS here and now, in µs (the best of 200)."""
    fd = vm.vcpus[0].vcpu_fd
    regs = kvm_regs()
    best = float("inf")
    for _ in range(200):
        t0 = time.perf_counter()
        fd.set_regs(regs)
        best = min(best, time.perf_counter() - t0)
    return best * 1e6


def _fuzz(ctx: Context, pages: int, iterations: int) -> tuple[float, float, ResetTimings, float]:
    """Executions per second, µs per reset, the reset's phases and the KVM_SET_REGS unit (µs)."""
    vm, target = _fuzz_vm(ctx, pages)
    with vm:
        snapshot = vm.snapshot()
        timings = ResetTimings()
        in_reset = 0.0
        t0 = time.perf_counter()
        for i in range(iterations):
            target.input = i & 0xFF
            if vm.run_inline(timeout=60).reason is not StopReason.REQUESTED:
                raise RuntimeError("the fuzz target did not report done")
            r0 = time.perf_counter()
            vm.reset_to(snapshot, timings=timings)
            in_reset += time.perf_counter() - r0
        elapsed = time.perf_counter() - t0
        unit = _set_regs_unit(vm)
        snapshot.close()
    return iterations / elapsed, in_reset / iterations * 1e6, timings, unit


def case_fuzz(s: Settings, ctx: Context) -> list[Result]:
    """Executions per second of the fuzz loop, kvmlib against C, for 1, 16 and 256 dirty pages."""
    rows = []
    for pages in (1, 16, 256):
        # Larger dirty sets take longer per execution: fewer of them give as steady a median.
        iterations = max(40, s.fuzz_iterations * 16 // max(pages, 16))
        row = Result(f"fuzz loop, ring-3 target dirtying {pages} page{'s' * (pages > 1)}",
                     "execs/s", target=">= 0.8")
        guest = ctx.guest_file(f"fuzz{pages}", guests.fuzz_target(pages))
        for _ in range(s.reps):
            row.kvmlib.add(_fuzz(ctx, pages, iterations)[0])
            assert row.c is not None
            row.c.add(run_c(ctx.exe, "fuzz", guest, str(iterations))["EXECS"])
        rows.append(row)
    return rows


def case_reset(s: Settings, ctx: Context) -> list[Result]:
    """Fast reset in KVM_SET_REGS units, its phases, and the per-page cost of larger dirty sets."""
    units = Result("fast reset, 10 dirty pages of 256 MiB", "SET_REGS units",
                   target="<= 12", target_of="kvmlib")
    phases = {name: Result(f"fast reset phase: {name} (10 pages)", "us", c=None)
              for name in ("harvest", "copy", "in-kernel devices", "vCPU", "bus devices")}
    per_page = Result("fast reset, per page at 1024 dirty pages", "us/page",
                      baseline="memcpy of all 256 MiB, per page")
    iterations = s.fuzz_iterations
    guest = ctx.guest_file("fuzz10", guests.fuzz_target(10))
    for _ in range(s.reps):
        _, reset_us, timings, unit = _fuzz(ctx, 10, iterations)
        units.kvmlib.add(reset_us / unit)
        n = timings.resets
        for name, value in zip(phases, (timings.harvest, timings.copy, timings.in_kernel,
                                        timings.vcpus, timings.devices), strict=True):
            phases[name].kvmlib.add(value / n * 1e6)
        c = run_c(ctx.exe, "fuzz", guest, str(iterations))
        assert units.c is not None
        units.c.add(c["RESET"][0] / c["SETREGS"][0])
        _, big_us, _, _ = _fuzz(ctx, 1024, max(20, iterations // 8))
        per_page.kvmlib.add((big_us - reset_us) / (1024 - 10))
        assert per_page.c is not None
        per_page.c.add(run_c(ctx.exe, "memcpy", "256", "1")["SAMPLE"][0] * 1e3 / (256 * MIB // 4096))
    return [units, *phases.values(), per_page]


# ---- restore from disk to the first guest instruction ---------------------------------------------


def case_restore(s: Settings, ctx: Context) -> list[Result]:
    """A 256 MiB snapshot restored and run to its first guest instruction (an exit), by mode."""
    read = Result("restore 256 MiB to the first instruction, read (verified)", "ms", c=None)
    mapped = Result("restore 256 MiB to the first instruction, mmap CoW (state verified)", "ms",
                    c=None, target="<= 5", target_of="kvmlib")
    path = ctx.tmp / "restore-snapshot"
    with dense_memory(256 * MIB) as memory:
        memory.write(GuestAddress(CODE), guests.FIRST_EXIT)
        bus = IoManager()
        bus.register_pio(PioRange(WORK_PORT, 1), _Target())
        with KvmVm.new(ctx.kvm, VmConfig.from_kvm(ctx.kvm, 1), memory, EventExitHandler(),
                       bus) as vm:
            write_boot_tables(memory, BootProtocol.LONG_MODE)
            vm.load_boot_state(BootState.long_mode(CODE))
            save_snapshot(vm, path)
    for _ in range(s.snapshot_reps):
        for mode, verify, row in (("read", True, read), ("mmap", False, mapped)):
            device = _Target()
            bus = IoManager()
            bus.register_pio(PioRange(WORK_PORT, 1), device)
            t0 = time.perf_counter()
            vm2, memory2 = restore_snapshot(ctx.kvm, path, EventExitHandler(), bus,
                                            mode=mode, verify=verify)  # type: ignore[arg-type]
            device.vm = vm2
            result = vm2.run_inline(timeout=60)
            row.kvmlib.add((time.perf_counter() - t0) * 1e3)
            vm2.close()
            memory2.close()
            if result.reason is not StopReason.REQUESTED:
                raise RuntimeError(f"the restored guest did not reach its first exit: {result}")
    shutil.rmtree(path)
    progress("benchmarks: restore: the mmap row skips the memory checksum (it would read every "
             "page); the read row checks it")
    return [read, mapped]


__all__ = ["case_exit", "case_fuzz", "case_reset", "case_restore"]
