"""Live migration between two processes: a counting guest moves to another process and counts on.

The destination listens on a UNIX socket and receives the VM; the source runs a guest that counts
in RAX and in memory, connects, and migrates it while it counts. The destination resumes the guest
exactly where the source stopped. Run it with ``python docs/examples/migration_example.py``; for
two hosts, listen on a TCP socket instead, nothing else changes.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import struct
import tempfile
import time
from multiprocessing.synchronize import Event

from kvmlib import EventExitHandler, GuestAddress, GuestMemoryMmap, IoManager, Kvm, KvmVm, VmConfig
from kvmlib.migration import migrate, receive

CODE = GuestAddress(0x10000)
COUNTER = GuestAddress(0x30000)
GUEST = bytes([
    0x48, 0xFF, 0xC0,                                     # loop: inc rax
    0x48, 0x89, 0x04, 0x25, *struct.pack("<I", COUNTER),  # mov [COUNTER], rax
    0xEB, 0xF3,                                           # jmp loop
])


def wait_for_count(memory: GuestMemoryMmap, above: int) -> bool:
    deadline = time.monotonic() + 10
    while memory.read_u64(COUNTER) <= above:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)
    return True


def destination(path: str, listening: Event) -> None:
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(path)
        server.listen(1)
        listening.set()
        conn, _ = server.accept()
        with conn, Kvm() as kvm:
            vm, memory = receive(kvm, conn, EventExitHandler(), IoManager())
        with memory, vm:
            start = vm.vcpu_regs(0).rax       # paused exactly where the source stopped
            vm.resume()
            counting = wait_for_count(memory, start + 1000)
            vm.pause()
            print(f"destination: the guest continues from {start}, still counting: {counting}",
                  flush=True)


def source(path: str) -> str:
    with Kvm() as kvm, GuestMemoryMmap.from_ranges([(0, 8 << 20)], log_dirty_pages=True) as memory:
        memory.write(CODE, GUEST)
        with KvmVm.new(kvm, VmConfig.from_kvm(kvm, 1), memory, EventExitHandler(),
                       IoManager()) as vm:
            vm.run(CODE)
            wait_for_count(memory, 0)
            with socket.socket(socket.AF_UNIX) as sock:
                sock.connect(path)
                stats = migrate(vm, sock)         # returns with the source paused
            return (f"source: stopped at {vm.vcpu_regs(0).rax} after {stats.iterations} rounds, "
                    f"{stats.bytes_sent >> 10} KiB sent (zero pages cost a header)")


def main() -> None:
    spawn = multiprocessing.get_context("spawn")  # never fork a process that runs vCPU threads
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "migration.sock")
        listening = spawn.Event()
        # A daemon: should the source fail before connecting, the listener goes when main() does.
        receiver = spawn.Process(target=destination, args=(path, listening), daemon=True)
        receiver.start()
        try:
            if not listening.wait(30):
                raise SystemExit("the destination did not start")
            summary = source(path)
        finally:
            receiver.join(60)
        print(summary)
        if receiver.exitcode != 0:
            raise SystemExit(f"the destination failed (exit code {receiver.exitcode})")


if __name__ == "__main__":
    main()
