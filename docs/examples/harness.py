"""A test harness on kvmlib: count guest heartbeats, stop the VM when a vCPU ends or on demand.

Run it with ``python docs/examples/harness.py``.
"""

from __future__ import annotations

import threading

from kvmlib import (
    ExitHandler,
    GuestAddress,
    GuestMemoryMmap,
    IoManager,
    Kvm,
    KvmVm,
    PioRange,
    VmConfig,
)

CODE = GuestAddress(0x10000)
COUNTER = GuestAddress(0x30000)
HEARTBEAT_PORT = 0x80

# 64-bit guest: count in memory forever, and every 4096 counts write a heartbeat to a port.
GUEST = bytes([
    0x48, 0xC7, 0xC3, 0x00, 0x00, 0x03, 0x00,  # mov rbx, COUNTER
    0x48, 0xFF, 0x03,                          # next: inc qword [rbx]
    0xF7, 0x03, 0xFF, 0x0F, 0x00, 0x00,        # test dword [rbx], 0xfff
    0x75, 0xF5,                                # jnz next
    0xE6, HEARTBEAT_PORT,                      # out HEARTBEAT_PORT, al
    0xEB, 0xF1,                                # jmp next
])


class StopWhenDone(ExitHandler):
    """An exit handler a harness writes itself: it wakes the harness when any vCPU ends."""

    def __init__(self) -> None:
        self.ended = threading.Event()

    def kick(self) -> None:
        self.ended.set()


class Heartbeat:
    """A port device: counts heartbeats and lets the harness wait for a number of them."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.beats = 0

    def pio_read(self, base: int, offset: int, data: memoryview) -> None:
        data[:] = bytes(len(data))

    def pio_write(self, base: int, offset: int, data: memoryview) -> None:
        with self.cond:
            self.beats += 1
            self.cond.notify_all()

    def wait_for(self, beats: int, timeout: float) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: self.beats >= beats, timeout)


def main() -> int:
    """Run the guest until it has beaten 5 times, pause it to inspect it, then shut it down."""
    heartbeat = Heartbeat()
    bus = IoManager()
    bus.register_pio(PioRange(HEARTBEAT_PORT, 1), heartbeat)
    handler = StopWhenDone()
    with Kvm() as kvm, GuestMemoryMmap.from_ranges([(GuestAddress(0), 2 << 20)]) as memory, \
            KvmVm.new(kvm, VmConfig.from_kvm(kvm, 1), memory, handler, bus) as vm:
        memory.write(CODE, GUEST)
        vm.run(CODE)                       # one thread per vCPU; returns at once
        if not heartbeat.wait_for(5, timeout=30):
            raise SystemExit("no heartbeat")
        vm.pause()                         # every vCPU parked: state can be read
        count = memory.read_u64(COUNTER)
        rip = vm.vcpu_regs(0).rip
        vm.resume()                        # continues exactly where it stopped
        vm.shutdown()                      # kicks and joins every vCPU thread
    # Every vCPU thread kicks the handler as it ends, shutdown included.
    print(f"{heartbeat.beats} heartbeats; paused at count {count}, rip {rip:#x}; "
          f"exit handler kicked: {handler.ended.is_set()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
