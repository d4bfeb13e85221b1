"""VM state, dirty-page tracking and fast reset, within one process, against the real /dev/kvm."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from kvmlib import GuestMemoryMmap, Kvm, SnapshotError, VmError
from kvmlib.arch.x86_64.regs import BootState
from kvmlib.bus import IoManager
from kvmlib.exit_handler import EventExitHandler
from kvmlib.memory import PAGE_SIZE
from kvmlib.state import VmState
from kvmlib.vm import KvmVm, VmConfig

from .snapshot_guests import (
    CODE,
    COUNTER,
    FLAG,
    RAM_SIZE,
    Counter,
    Tape,
    count_to,
    counting,
    counting_bus,
    memory_with,
    scribble,
    wait_for_flag,
)

Factory = Callable[..., tuple[KvmVm, GuestMemoryMmap, Counter]]


@pytest.fixture
def make_vm(kvm: Kvm) -> Iterator[Factory]:
    made: list[tuple[KvmVm, GuestMemoryMmap]] = []

    def make(code: bytes, *, log_dirty_pages: bool = False, tape: Tape | None = None,
             num_vcpus: int = 1) -> tuple[KvmVm, GuestMemoryMmap, Counter]:
        memory = memory_with(code, log_dirty_pages=log_dirty_pages)
        counter = Counter()
        vm = KvmVm.new(kvm, VmConfig.from_kvm(kvm, num_vcpus), memory, EventExitHandler(),
                       counting_bus(counter, tape))
        made.append((vm, memory))
        return vm, memory, counter

    yield make
    for vm, memory in made:
        vm.close()
        memory.close()


def test_state_round_trips_through_its_encoding(make_vm: Factory) -> None:
    vm, _, _ = make_vm(count_to(10), tape=Tape())
    state = vm.save_state()
    assert VmState.from_bytes(state.to_bytes()) == state
    assert state.vcpus[0].rip == 0xFFF0  # the reset vector: KvmVm.run sets the real RIP
    assert [d.kind for d in state.devices] == ["Tape"]


def test_state_cannot_be_saved_while_running(make_vm: Factory) -> None:
    vm, _, counter = make_vm(count_to(1 << 30))
    vm.run(CODE)
    assert counter.wait_count(10)
    with pytest.raises(VmError, match="pause"):
        vm.save_state()
    vm.pause()
    vm.save_state()  # fine now
    vm.shutdown()
    with pytest.raises(VmError, match="stopped"):
        vm.save_state()


def test_a_restored_vm_continues_from_the_paused_count(kvm: Kvm, make_vm: Factory) -> None:
    vm, memory, counter = make_vm(count_to(1 << 30))
    vm.run(CODE)
    assert counter.wait_count(200)
    vm.pause()
    last = counter.values[-1]
    state = vm.save_state()
    with GuestMemoryMmap.from_ranges([(0, RAM_SIZE)]) as copy:
        copy.write(0, memory.read(0, RAM_SIZE))
        vm.shutdown()
        again = Counter()
        with KvmVm.from_state(kvm, state, copy, EventExitHandler(), counting_bus(again)) as restored:
            restored.run()
            assert again.wait_count(50)
            restored.pause()
            assert again.values[:50] == list(range(last + 1, last + 51))
            assert copy.read_u64(COUNTER) in (again.values[-1], again.values[-1] + 1)


def test_a_state_that_does_not_fit_is_refused_before_creating_anything(
        kvm: Kvm, make_vm: Factory) -> None:
    vm, _, _ = make_vm(count_to(10), tape=Tape())
    state = vm.save_state()
    with GuestMemoryMmap.from_ranges([(0, RAM_SIZE // 2)]) as smaller, \
            pytest.raises(SnapshotError, match="memory layout"):
        KvmVm.from_state(kvm, state, smaller, EventExitHandler(), counting_bus(Counter(), Tape()))
    with GuestMemoryMmap.from_ranges([(0, RAM_SIZE)]) as same, \
            pytest.raises(SnapshotError, match="devices"):
        KvmVm.from_state(kvm, state, same, EventExitHandler(), counting_bus(Counter()))


def test_a_corrupted_state_encoding_is_refused() -> None:
    with pytest.raises(SnapshotError, match="JSON"):
        VmState.from_bytes(b"\xff not json")
    with pytest.raises(SnapshotError, match="version"):
        VmState.from_bytes(b'{"version": 99}')
    with pytest.raises(SnapshotError, match="malformed"):
        VmState.from_bytes(b'{"version": 1, "vcpus": []}')


def test_dirty_pages_are_exactly_the_pages_the_guest_wrote(make_vm: Factory) -> None:
    pages = [0x100, 0x101, 0x180, 0x3FF]
    vm, _, counter = make_vm(scribble(pages, 0x5A), log_dirty_pages=True)
    vm.load_boot_state(BootState.long_mode(CODE))
    vm.dirty_pages()  # forget what was written while building the VM and its boot tables
    vm.run()
    assert counter.wait_done()
    vm.pause()
    (bitmap,) = vm.dirty_pages()
    assert bitmap.pages() == pages
    assert len(bitmap) == 4 and 0x180 in bitmap and 0x181 not in bitmap
    assert bitmap.runs() == [(0x100, 2), (0x180, 1), (0x3FF, 1)]
    assert vm.dirty_pages()[0].pages() == []  # reported once


def test_host_writes_count_as_dirty(make_vm: Factory) -> None:
    vm, memory, _ = make_vm(count_to(1), log_dirty_pages=True)
    vm.dirty_pages()
    memory.write(0x200000 - 1, b"x" * (PAGE_SIZE + 2))
    assert vm.dirty_pages()[0].pages() == [0x1FF, 0x200, 0x201]


def test_reset_gives_back_memory_equal_to_the_snapshot(make_vm: Factory) -> None:
    pages = [0x100, 0x102, 0x200, 0x201, 0x3F0]
    # Count to 5, wait for the host's go, scribble over five pages, say DONE.
    vm, memory, counter = make_vm(counting(5) + wait_for_flag() + scribble(pages, 0x77),
                                  log_dirty_pages=True, tape=Tape())
    vm.run(CODE)
    assert counter.wait_count(5)
    vm.pause()
    with vm.snapshot() as snap:
        before = memory.read(0, RAM_SIZE)
        regs = vm.vcpu_regs(0)
        for _ in range(3):  # the fuzzer's loop: hand in the input, run, reset
            memory.write_u8(FLAG, 1)
            vm.resume()
            assert counter.wait_done()
            vm.pause()
            assert memory.read(0, RAM_SIZE) != before
            copied = vm.reset_to(snap)
            assert memory.read(0, RAM_SIZE) == before
            assert copied == len(pages) + 1  # the scribbled pages and FLAG's page
            assert (vm.vcpu_regs(0).rip, vm.vcpu_regs(0).rax) == (regs.rip, regs.rax)
            counter.clear()
    vm.shutdown()


def test_reset_restores_device_state(make_vm: Factory) -> None:
    tape = Tape()
    vm, _, counter = make_vm(count_to(1 << 30), tape=tape)
    vm.run(CODE)
    assert counter.wait_count(5)
    vm.pause()
    tape.last = 7
    snap = vm.snapshot()
    tape.last = 9
    vm.reset_to(snap)
    assert tape.last == 7
    snap.close()


def test_reset_without_dirty_logging_copies_everything(make_vm: Factory) -> None:
    vm, memory, counter = make_vm(count_to(1 << 30))
    vm.run(CODE)
    assert counter.wait_count(5)
    vm.pause()
    with vm.snapshot() as snap:
        memory.write(0x200000, b"junk")
        assert vm.reset_to(snap) == RAM_SIZE // PAGE_SIZE
        assert memory.read(0x200000, 4) == bytes(4)


def test_reset_to_another_vms_snapshot_is_refused(make_vm: Factory) -> None:
    vm1, _, _ = make_vm(count_to(10))
    vm2, _, _ = make_vm(count_to(10), tape=Tape())
    with vm2.snapshot() as snap, pytest.raises(SnapshotError, match="devices"):
        vm1.reset_to(snap)


def test_reset_while_running_is_refused(make_vm: Factory) -> None:
    vm, _, counter = make_vm(count_to(1 << 30))
    snap = vm.snapshot()  # before run is fine
    vm.run(CODE)
    assert counter.wait_count(5)
    with pytest.raises(VmError, match="pause"):
        vm.reset_to(snap)
    snap.close()


def test_two_vcpus_save_and_restore(kvm: Kvm, make_vm: Factory) -> None:
    vm, memory, counter = make_vm(count_to(1 << 30), num_vcpus=2)
    vm.run(CODE)
    assert counter.wait_count(20)
    vm.pause()
    state = vm.save_state()
    assert state.num_vcpus == 2
    assert state.vcpus[1].mp_state != state.vcpus[0].mp_state  # the AP still waits for SIPI
    vm.shutdown()
    with GuestMemoryMmap.from_ranges([(0, RAM_SIZE)]) as copy:
        copy.write(0, memory.read(0, RAM_SIZE))
        with KvmVm.from_state(kvm, state, copy, EventExitHandler(), counting_bus(Counter())) as vm2:
            again = vm2.save_state()
        # Everything but what time moves (TSC, PIT and clock) comes back as it was saved.
        for saved, restored in zip(state.vcpus, again.vcpus, strict=True):
            assert (restored.regs, restored.sregs, restored.mp_state, restored.lapic) == (
                saved.regs, saved.sregs, saved.mp_state, saved.lapic)
        assert (again.pic_master, again.pic_slave, again.ioapic) == (
            state.pic_master, state.pic_slave, state.ioapic)


def test_from_state_refuses_a_bus_without_the_saved_devices(kvm: Kvm, make_vm: Factory) -> None:
    vm, _, _ = make_vm(count_to(10))
    state = vm.save_state()
    with GuestMemoryMmap.from_ranges([(0, RAM_SIZE)]) as copy, \
            pytest.raises(SnapshotError, match="Tape"):
        KvmVm.from_state(kvm, state, copy, EventExitHandler(), counting_bus(Counter(), Tape()))
    assert isinstance(IoManager(), IoManager)


def test_save_state_reads_each_vcpus_mp_state_before_its_registers(
        kvm: Kvm, monkeypatch: pytest.MonkeyPatch) -> None:
    # Reading the MP state lets KVM finish a pending INIT/SIPI, which rewrites the registers: it
    # must come first, or the registers saved would be the ones from before (as Firecracker orders).
    with GuestMemoryMmap.from_ranges([(0, 2 << 20)]) as memory, KvmVm.new(
            kvm, VmConfig.from_kvm(kvm, 1), memory, EventExitHandler(), IoManager()) as vm:
        fd = vm.vcpus[0].vcpu_fd
        calls: list[str] = []

        def recording(name: str) -> Callable[..., object]:
            real = getattr(fd, name)

            def call(*args: object, **kwargs: object) -> object:
                calls.append(name)
                return real(*args, **kwargs)
            return call

        for name in ("get_mp_state", "get_regs", "get_sregs", "get_cpuid2", "get_xsave",
                     "get_lapic", "get_msrs", "get_vcpu_events"):
            monkeypatch.setattr(fd, name, recording(name))
        vm.save_state()
    assert calls[0] == "get_mp_state", calls
