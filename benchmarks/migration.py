"""Live migration of a 256 MiB guest to another process over a UNIX socket.

Two guests: an idle one (halted) and one dirtying a 4 MiB window continuously (in ring 3, so it
runs at native speed even where ring-0 code is emulated). Guest memory is filled with random bytes
first (all but the first MiB, where the boot tables go), so nearly every page is sent whole, as in
the baseline.

The baseline (the "C" column of the total-time rows) is sending the same 256 MiB once over the
same kind of socket (a default UNIX socket pair), with ``sendall`` from guest memory into
``recv_into`` a fresh mapping in another process, measured twice right before each migration
while the same guest runs, the quicker counting: moving the bytes, with no checksums, no rounds and
no VM to rebuild. (On a 2-core machine the dirtying guest's vCPU keeps one core busy, which slows
the baseline and the migration alike.)

The "raw send + page CRCs" rows show what the stream's checksums cost by themselves: the same send
in frames of the stream's size, each followed by the CRC-32 of each of its pages (zlib, as the
stream's), which the other process checks, against the same baseline. The "no page CRCs" rows
migrate a fresh VM of the same guest with ``page_checksums=False``, against a raw send measured
just before it. Run ``python -m benchmarks.migration receive|sink|check FD`` only through the
case.
"""

from __future__ import annotations

import mmap
import random
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from kvmlib import (
    EventExitHandler,
    GuestAddress,
    GuestMemoryMmap,
    IoManager,
    Kvm,
    KvmVm,
    PioRange,
    VmConfig,
)
from kvmlib.memory import PAGE_SIZE
from kvmlib.migration import MAX_FRAME_PAGES, MigrationStats, _page_crcs, migrate, receive

from .common import to_ring3
from .guests import CODE, DONE_PORT, FIRST_EXIT, WORK_PORT
from .runner import Result, progress

if TYPE_CHECKING:
    from .common import Context, Settings

MIB = 1 << 20
SIZE = 256 * MIB
WINDOW = 16 * MIB
WINDOW_PAGES = 1024  # 4 MiB
ROOT = Path(__file__).resolve().parent.parent
CHILD_TIMEOUT = 120.0
# The downtime goal: budget the final round's sending at half of it, the rest is the pause, the
# VM state and rebuilding the VM on the other side.
MAX_DOWNTIME = 0.005


def dirty_window() -> bytes:
    """Ring 3: report once on WORK_PORT, then add 1 to the first qword of each page of the window,
    round and round."""
    inner = bytes([
        0x48, 0xFF, 0x03,                          # inner: inc qword [rbx]
        0x48, 0x81, 0xC3, 0x00, 0x10, 0x00, 0x00,  # add rbx, 0x1000
        0xFF, 0xC9,                                # dec ecx
    ])
    inner += bytes([0x75, (-(len(inner) + 2)) & 0xFF])  # jnz inner
    outer = bytes([0x48, 0xC7, 0xC3, *struct.pack("<I", WINDOW),  # outer: mov rbx, WINDOW
                   0xB9, *struct.pack("<I", WINDOW_PAGES)]) + inner    # mov ecx, WINDOW_PAGES
    outer += bytes([0xEB, (-(len(outer) + 2)) & 0xFF])  # jmp outer
    return bytes([0xE6, WORK_PORT]) + outer


class _Started:
    """WORK_PORT and DONE_PORT: the guest has started once it reports."""

    def __init__(self) -> None:
        self.seen = threading.Event()

    def pio_read(self, base: int, offset: int, data: memoryview) -> None:
        data[:] = bytes(len(data))

    def pio_write(self, base: int, offset: int, data: memoryview) -> None:
        self.seen.set()


def _bus(device: _Started) -> IoManager:
    bus = IoManager()
    bus.register_pio(PioRange(WORK_PORT, 1), device)
    bus.register_pio(PioRange(DONE_PORT, 1), device)
    return bus


def _dense_memory() -> GuestMemoryMmap:
    memory = GuestMemoryMmap.from_ranges([(0, SIZE)], log_dirty_pages=True)
    block = random.Random(3).randbytes(MIB)
    view = memory.regions[0].as_memoryview()
    # The first MiB stays zero: the boot tables there expect zeros around what they set.
    for off in range(MIB, SIZE, MIB):
        view[off:off + MIB] = block
    return memory


class _Child:
    """``python -m benchmarks.migration MODE FD`` at the other end of a UNIX socket pair, ready."""

    def __init__(self, mode: str) -> None:
        self.sock, theirs = socket.socketpair()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "benchmarks.migration", mode, str(theirs.fileno())],
                cwd=ROOT, pass_fds=[theirs.fileno()], stdout=subprocess.PIPE, text=True)
        except BaseException:
            self.sock.close()
            raise
        finally:
            theirs.close()
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "ready":
            self.close()
            raise RuntimeError(f"the benchmark's {mode} process did not start")

    def result(self) -> str:
        out, _ = self.proc.communicate(timeout=CHILD_TIMEOUT)
        if self.proc.returncode != 0:
            raise RuntimeError(f"the benchmark's receiving process failed: {out}")
        return out.strip()

    def close(self) -> None:
        self.sock.close()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate(timeout=CHILD_TIMEOUT)


FRAME = MAX_FRAME_PAGES * PAGE_SIZE


def _raw_send(memory: GuestMemoryMmap, checksummed: bool = False) -> float:
    """One send of the memory to a sink process; ``checksummed``: in frames of the migration
    stream's size, each followed by its pages' CRC-32s, which the sink checks."""
    child = _Child("check" if checksummed else "sink")
    view = memory.regions[0].as_memoryview()
    try:
        t0 = time.perf_counter()
        if checksummed:
            for off in range(0, SIZE, FRAME):
                frame = view[off:off + FRAME]
                table = _page_crcs(frame)
                child.sock.sendall(frame)
                child.sock.sendall(table)
        else:
            child.sock.sendall(view)
        if child.sock.recv(1) != b"k":
            raise RuntimeError("the sink did not confirm")
        elapsed = time.perf_counter() - t0
        child.result()
    finally:
        child.close()
    return elapsed


def _migrate(kvm: Kvm, dirtying: bool, page_checksums: bool = True) -> tuple[MigrationStats, float,
                                                                             float]:
    """Migrate a fresh VM running the idle or the dirtying guest; also time one raw send of its
    memory, and one with page checksums, while that guest runs, just before."""
    started = _Started()
    with _dense_memory() as memory:
        memory.write(GuestAddress(CODE), dirty_window() if dirtying else FIRST_EXIT)
        with KvmVm.new(kvm, VmConfig.from_kvm(kvm, 1), memory, EventExitHandler(),
                       _bus(started)) as vm:
            if dirtying:
                to_ring3(vm, memory)
                vm.run()
            else:
                vm.run(GuestAddress(CODE))
            if not started.seen.wait(60):
                raise RuntimeError("the guest did not start")
            # The quicker of two: where the scheduler puts the sending and receiving processes
            # against the busy vCPU makes single sends vary (by 3x on a 2-core host).
            baseline = min(_raw_send(memory), _raw_send(memory))
            checksummed = _raw_send(memory, checksummed=True)
            child = _Child("receive")
            try:
                stats = migrate(vm, child.sock, max_downtime=MAX_DOWNTIME, timeout=CHILD_TIMEOUT,
                                page_checksums=page_checksums)
                if child.result() != "ok":
                    raise RuntimeError("the receiving process did not run the guest")
            finally:
                child.close()
            vm.shutdown()
    return stats, baseline, checksummed


def case_migration(s: Settings, ctx: Context) -> list[Result]:
    rows: list[Result] = []
    by_guest: dict[bool, tuple[Result, ...]] = {}
    for dirtying in (False, True):
        what = "guest dirtying 4 MiB" if dirtying else "idle guest"
        total = Result(f"migrate 256 MiB, {what}: total", "ms", target="<= 1.5",
                       baseline="one raw socket send of the 256 MiB")
        down = Result(f"migrate 256 MiB, {what}: downtime", "ms", c=None,
                      target="<= 10" if dirtying else None, target_of="kvmlib")
        rounds = Result(f"migrate 256 MiB, {what}: rounds", "rounds", c=None)
        sent = Result(f"migrate 256 MiB, {what}: sent", "MiB", c=None)
        floor = Result(f"migrate 256 MiB, {what}: raw send + page CRCs", "ms",
                       baseline="one raw socket send of the 256 MiB")
        unchecked = Result(f"migrate 256 MiB, {what}: total, no page CRCs", "ms", target="<= 1.5",
                           baseline="one raw socket send of the 256 MiB")
        by_guest[dirtying] = (total, down, rounds, sent, floor, unchecked)
        rows += [total, down, rounds, sent, floor, unchecked]
    for rep in range(s.reps):
        for dirtying, (total, down, rounds, sent, floor, unchecked) in by_guest.items():
            bare, bare_baseline, _ = _migrate(ctx.kvm, dirtying, page_checksums=False)
            assert unchecked.c is not None
            unchecked.kvmlib.add(bare.total_time * 1e3)
            unchecked.c.add(bare_baseline * 1e3)
            stats, baseline, checksummed = _migrate(ctx.kvm, dirtying)
            assert total.c is not None and floor.c is not None
            total.kvmlib.add(stats.total_time * 1e3)
            total.c.add(baseline * 1e3)
            floor.kvmlib.add(checksummed * 1e3)
            floor.c.add(baseline * 1e3)
            down.kvmlib.add(stats.downtime * 1e3)
            rounds.kvmlib.add(stats.iterations)
            sent.kvmlib.add(stats.bytes_sent / MIB)
            progress(f"  rep {rep}, {'dirtying' if dirtying else 'idle'} guest: migrated in "
                     f"{stats.total_time * 1e3:.0f} ms (one raw send: {baseline * 1e3:.0f} ms, with "
                     f"page CRCs: {checksummed * 1e3:.0f} ms; without page CRCs: "
                     f"{bare.total_time * 1e3:.0f} ms), "
                     f"downtime {stats.downtime * 1e3:.1f} ms, pages per round {stats.pages_per_round}")
    return rows


# ---- the receiving processes ---------------------------------------------------------------------


def _sink(sock: socket.socket) -> None:
    with mmap.mmap(-1, SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS) as dest:
        view = memoryview(dest)
        print("ready", flush=True)
        got = 0
        while got < SIZE:
            n = sock.recv_into(view[got:got + MIB])
            if n == 0:
                raise SystemExit("the sender hung up early")
            got += n
        view.release()
    sock.sendall(b"k")


def _check(sock: socket.socket) -> None:
    with mmap.mmap(-1, SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS) as dest:
        view = memoryview(dest)
        table = bytearray(MAX_FRAME_PAGES * 4)
        torn = 0
        print("ready", flush=True)
        for off in range(0, SIZE, FRAME):
            frame = view[off:off + FRAME]
            for part in (frame, memoryview(table)):
                got = 0
                while got < len(part):
                    n = sock.recv_into(part[got:])
                    if n == 0:
                        raise SystemExit("the sender hung up early")
                    got += n
            if _page_crcs(frame) != table:
                # The dirtying guest writes its window while it is sent (a migration sends such
                # pages again); anything else is a fault of the benchmark.
                if not WINDOW <= off < WINDOW + WINDOW_PAGES * PAGE_SIZE:
                    raise SystemExit(f"a page at {off:#x} fails its checksum")
                torn += 1
            frame.release()
        view.release()
    sock.sendall(b"k")


def _receive(sock: socket.socket) -> None:
    started = _Started()
    with Kvm() as kvm:
        print("ready", flush=True)
        vm, memory = receive(kvm, sock, EventExitHandler(), _bus(started), timeout=CHILD_TIMEOUT)
        with memory, vm:
            vm.resume()
            time.sleep(0.01)
            vm.shutdown()
    print("ok")


def main(mode: str, fd: int) -> None:
    with socket.socket(fileno=fd) as sock:
        if mode == "sink":
            _sink(sock)
        elif mode == "check":
            _check(sock)
        else:
            _receive(sock)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
