"""The cases: each measures kvmlib and the C baseline on the same guest code, interleaved.

A case is a function ``(settings, context) -> list[Result]`` registered in :data:`CASES` under its
name; adding one (e.g. a new snapshot measurement) is writing that function and one line here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from kvmlib import (
    EventExitHandler,
    GuestAddress,
    IoManager,
    KvmVm,
    VmConfig,
)
from kvmlib.snapshot import restore_snapshot, save_snapshot

from . import guests
from .common import MB, Context, Ports, Settings, dense_memory, memory_with, to_ring3
from .guests import CODE
from .hotpath import case_exit, case_fuzz, case_reset, case_restore
from .migration import case_migration
from .runner import Result, progress, run_c

# ---- lifecycle ---------------------------------------------------------------------------------


def _lifecycle_once(ctx: Context, config: VmConfig) -> float:
    t0 = time.perf_counter()
    ports = Ports()
    with memory_with(64 << 20, guests.FIRST_EXIT) as memory, \
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
    with memory_with(2 << 20, guests.ring3_work(iterations // n)) as memory, \
            KvmVm.new(ctx.kvm, VmConfig.from_kvm(ctx.kvm, n), memory, EventExitHandler(),
                      ports.bus()) as vm:
        to_ring3(vm, memory)
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
            with memory_with(2 << 20, guests.RING3_REPORT_AND_SPIN) as memory, \
                    KvmVm.new(ctx.kvm, config, memory, EventExitHandler(), ports.bus()) as vm:
                to_ring3(vm, memory)
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


# ---- snapshots ---------------------------------------------------------------------------------


def case_snapshot(s: Settings, ctx: Context) -> list[Result]:
    size = s.snapshot_mib << 20
    copy = "a file copy (read/write, fsync)"
    save = Result(f"snapshot save, {s.snapshot_mib} MiB", "MB/s", baseline=copy)
    read = Result("snapshot restore, memory read", "MB/s", baseline=copy)
    mapped = Result("snapshot restore, memory mapped CoW", "MB/s", baseline=copy)
    assert save.c is not None and read.c is not None and mapped.c is not None
    with dense_memory(size) as memory, \
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


# ---- import time and memory -----------------------------------------------------------------


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
from benchmarks.common import Ports, memory_with
from benchmarks import guests
kvm = Kvm()
ports = Ports()
memory = memory_with(64 << 20, guests.FIRST_EXIT)
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
    "fuzz": case_fuzz,
    "restore": case_restore,
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
