"""A snapshot fuzzer's loop on kvmlib, then the same VM saved to disk and restored.

The guest reads an input byte the host writes into its memory, scribbles over as many pages as the
byte says, and reports DONE. The harness runs the guest inline (on its own thread, until a port
says stop) to the point where it waits for input and snapshots it there, then for each input:
writes it, runs the guest inline until DONE, and resets to the snapshot, which copies back only
the pages the guest (or the harness) dirtied. The snapshot saved to disk is then restored and run
with the usual vCPU threads. Run it with
``python docs/examples/snapshot_fuzz.py SNAPSHOT_DIR``.
"""

from __future__ import annotations

import struct
import sys
import threading
from pathlib import Path

from kvmlib import (
    GuestAddress,
    GuestMemoryMmap,
    IoManager,
    Kvm,
    KvmVm,
    PioRange,
    StopReason,
    VmConfig,
)
from kvmlib.arch.x86_64.regs import BootState
from kvmlib.exit_handler import EventExitHandler
from kvmlib.snapshot import restore_snapshot, save_snapshot

CODE = GuestAddress(0x10000)
INPUT = GuestAddress(0x30000)     # the host writes the input byte here (+1: "input ready")
SCRATCH = GuestAddress(0x100000)  # the guest scribbles from here, one page per step
READY_PORT, DONE_PORT = 0x10, 0x11

GUEST = bytes([
    0xE6, READY_PORT,                                   # out READY_PORT, al   (waiting for input)
    0x80, 0x3C, 0x25, *struct.pack("<I", INPUT + 1), 0x00,  # wait: cmp byte [INPUT+1], 0
    0x74, 0xF6,                                         # je wait
    0x0F, 0xB6, 0x0C, 0x25, *struct.pack("<I", INPUT),  # movzx ecx, byte [INPUT]
    0x48, 0xC7, 0xC3, *struct.pack("<I", SCRATCH),      # mov rbx, SCRATCH
    0x48, 0x85, 0xC9,                                   # next: test rcx, rcx
    0x74, 0x13,                                         # jz done
    0x48, 0xC7, 0x03, 0xEF, 0xBE, 0xAD, 0xDE,           # mov qword [rbx], 0xdeadbeef
    0x48, 0x81, 0xC3, 0x00, 0x10, 0x00, 0x00,           # add rbx, 0x1000
    0x48, 0xFF, 0xC9,                                   # dec rcx
    0xEB, 0xE8,                                         # jmp next
    0xE6, DONE_PORT,                                    # done: out DONE_PORT, al
    0xFA, 0xF4,                                         # cli; hlt
])


class Ports:
    """READY and DONE: each ends an inline run, and sets an event for the threaded one."""

    def __init__(self) -> None:
        self.ready = threading.Event()
        self.done = threading.Event()
        self.vm: KvmVm | None = None

    def pio_read(self, base: int, offset: int, data: memoryview) -> None:
        data[:] = bytes(len(data))

    def pio_write(self, base: int, offset: int, data: memoryview) -> None:
        (self.ready if base == READY_PORT else self.done).set()
        if self.vm is not None:
            self.vm.stop_inline()  # a no-op unless the guest runs inline


def bus_for(ports: Ports) -> IoManager:
    bus = IoManager()
    bus.register_pio(PioRange(READY_PORT, 1), ports)
    bus.register_pio(PioRange(DONE_PORT, 1), ports)
    return bus


def fuzz(kvm: Kvm, snapshot_dir: Path) -> None:
    ports = Ports()
    with GuestMemoryMmap.from_ranges([(0, 4 << 20)], log_dirty_pages=True) as memory:
        memory.write(CODE, GUEST)
        with KvmVm.new(kvm, VmConfig.from_kvm(kvm, 1), memory, EventExitHandler(),
                       bus_for(ports)) as vm:
            ports.vm = vm
            vm.load_boot_state(BootState.long_mode(CODE))
            # The guest runs on this thread until a port says stop: no vCPU thread, no pause.
            assert vm.run_inline(timeout=10).reason is StopReason.REQUESTED  # READY
            with vm.snapshot() as snap:
                pristine = memory.read(0, 4 << 20)
                for case in (3, 0, 200, 17):
                    memory.write(INPUT, bytes([case, 1]))  # hand the input in
                    result = vm.run_inline(timeout=10)     # until DONE
                    assert result.reason is StopReason.REQUESTED and ports.done.is_set()
                    ports.done.clear()
                    copied = vm.reset_to(snap)
                    assert memory.read(0, 4 << 20) == pristine
                    print(f"input {case:3}: reset copied back {copied} pages")
            save_snapshot(vm, snapshot_dir)  # the VM is back at "waiting for input"

    # A VM rebuilt from the files (here in the same process; any process will do).
    ports = Ports()
    vm, memory = restore_snapshot(kvm, snapshot_dir, EventExitHandler(), bus_for(ports))
    with memory, vm:
        memory.write(INPUT, bytes([5, 1]))
        vm.run()
        finished = ports.done.wait(10)
        vm.pause()
        print(f"restored VM finished input 5: {finished}, "
              f"last page written {memory.read_u64(SCRATCH + 4 * 0x1000):#x}")


if __name__ == "__main__":
    with Kvm() as kvm:
        fuzz(kvm, Path(sys.argv[1]))
