"""The snapshot-per-test recipe: prepare a guest once per session, give each test a fresh copy."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from kvmlib import IoManager, Kvm, KvmVm, PioRange, VmSnapshot
from kvmlib.testing import assemble, make_vm
from kvmlib.testing.harness import wait_until

from .devices import Recorder

# A guest that sets itself up (here: a counter in RBX), reports "ready" on port 0x10, then adds
# whatever byte the test gives it on port 0x11 to the counter, and reports the sum.
PREPARED_GUEST = """
    mov rbx, 1000
    mov al, 1
    out 0x10, al        # ready
next:
    in al, 0x11         # the test's input
    movzx rcx, al
    add rbx, rcx
    mov rax, rbx
    out 0x12, al        # the low byte of the sum
    jmp next
"""


@pytest.fixture(scope="session")
def prepared(kvm_session: Kvm) -> Iterator[tuple[KvmVm, Recorder, VmSnapshot]]:
    """The guest, run once up to "ready" and paused there, with a snapshot of that moment."""
    device = Recorder()
    bus = IoManager()
    for port in (0x10, 0x11, 0x12):
        bus.register_pio(PioRange(port, 1), device)
    vm = make_vm(kvm_session, assemble(PREPARED_GUEST), bus=bus)
    try:
        vm.run()
        wait_until(lambda: 0x10 in device.writes, what="the guest reporting ready")
        vm.pause()
        snapshot = vm.snapshot()
        yield vm, device, snapshot
        snapshot.close()
    finally:
        vm.close()


@pytest.fixture
def fresh(prepared: tuple[KvmVm, Recorder, VmSnapshot]) -> Iterator[tuple[KvmVm, Recorder]]:
    """The prepared guest, reset to its snapshot: every test starts from the same "ready"."""
    vm, device, snapshot = prepared
    vm.pause()
    vm.reset_to(snapshot)
    device.clear()
    yield vm, device
    vm.pause()
