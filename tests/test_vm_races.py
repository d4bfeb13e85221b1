"""The lifecycle under concurrent callers, on the real /dev/kvm: no call hangs, nothing leaks.

Each test here reproduces a way the lifecycle used to break (a hang, a deadlock, a guest reaching
freed memory); every call that could hang runs with a deadline (see tests/concurrency.py).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator

import pytest

from kvmlib import ClosedError, GuestAddress, GuestMemoryMmap, Kvm, VmError
from kvmlib.bus import IoManager
from kvmlib.exit_handler import EventExitHandler
from kvmlib.runstate import LifecycleState
from kvmlib.vm import KvmVm, VmConfig

from .concurrency import DEADLINE, bounded, together
from .vm_guests import (
    AP_CODE,
    AP_REPORT_AND_HALT,
    BSP_CODE,
    COUNTER,
    OUT_THEN_SPIN,
    REPORT_AND_WAKE_APS,
    SPIN,
    Reporter,
    bus_with,
    memory_with,
)

S = LifecycleState

COUNT_IN_RAX = bytes([
    0x48, 0xC7, 0xC3, 0x00, 0x00, 0x03, 0x00,  # mov rbx, COUNTER
    0x48, 0xFF, 0xC0,                          # next: inc rax
    0x48, 0x89, 0x03,                          # mov [rbx], rax
    0xEB, 0xF8,                                # jmp next
])

Factory = Callable[..., KvmVm]


@pytest.fixture
def make_vm(kvm: Kvm) -> Iterator[Factory]:
    owned: list[tuple[KvmVm, GuestMemoryMmap]] = []

    def make(num_vcpus: int, programs: dict[GuestAddress, bytes],
             bus: IoManager | None = None) -> KvmVm:
        memory = memory_with(programs)
        vm = KvmVm.new(kvm, VmConfig.from_kvm(kvm, num_vcpus), memory, EventExitHandler(),
                       bus or IoManager())
        owned.append((vm, memory))
        return vm

    yield make
    for vm, memory in owned:
        try:
            bounded(vm.close, what="close")
        finally:
            memory.close()


def test_pause_resume_from_three_threads_and_shutdown_from_a_fourth(make_vm: Factory) -> None:
    # Before: pause()/resume() checked, then wrote the run state outside shutdown()'s lock and
    # overwrote its EXITING, so shutdown() never returned (10 of 10 runs).
    for trial in range(25):
        vm = make_vm(2, {BSP_CODE: SPIN})
        vm.run(BSP_CODE)
        stop = threading.Event()

        def churn(vm: KvmVm = vm, stop: threading.Event = stop) -> None:
            while not stop.is_set():
                try:
                    vm.pause()
                    vm.resume()
                except VmError:
                    if not vm.running:
                        return

        def stopper(vm: KvmVm = vm, stop: threading.Event = stop, trial: int = trial) -> None:
            for _ in range(trial * 3):  # land the shutdown at varying points of the churn
                vm.vcpu_run_state.wait_until(lambda _s: False, 0.0005)
            vm.shutdown()
            stop.set()

        outcomes = together([churn, churn, churn, stopper])
        assert [o.error for o in outcomes] == [None] * 4
        assert vm.lifecycle is S.STOPPED
        vm.close()
    assert not any(t.name.startswith("vcpu_") for t in threading.enumerate())


def test_pause_racing_resume_never_hangs(make_vm: Factory) -> None:
    # Before: pause() waited for "parked >= alive" forever once a resume slipped in.
    vm = make_vm(2, {BSP_CODE: SPIN})
    vm.run(BSP_CODE)
    for _ in range(100):
        for outcome in together([vm.pause, vm.resume]):
            assert outcome.error is None or isinstance(outcome.error, VmError), outcome.error
        assert vm.lifecycle in (S.RUNNING, S.PAUSED)
    bounded(vm.shutdown)


@pytest.mark.parametrize("trial", range(5))
def test_two_devices_calling_shutdown_do_not_deadlock(make_vm: Factory, trial: int) -> None:
    # Before: each vCPU thread joined the other (4 of 5 runs deadlocked).
    holder: list[KvmVm] = []
    reporter = Reporter(on_write=lambda: holder[0].shutdown())  # noqa: PLW0108 - bound below
    vm = make_vm(2, {BSP_CODE: REPORT_AND_WAKE_APS, AP_CODE: AP_REPORT_AND_HALT},
                 bus_with(reporter))
    holder.append(vm)
    vm.run(BSP_CODE)
    assert bounded(lambda: vm.wait(DEADLINE)), "the vCPU threads did not end"
    assert vm.lifecycle is S.STOPPED
    assert not vm.errors


def test_a_device_calling_pause_gets_an_error_and_the_guest_runs_on(make_vm: Factory) -> None:
    # Before: the vCPU thread blocked forever in its own pause().
    holder: list[KvmVm] = []
    seen: list[BaseException] = []
    wrote = threading.Event()

    def device_pauses() -> None:
        try:
            holder[0].pause()
        except VmError as e:
            seen.append(e)
        wrote.set()

    vm = make_vm(1, {BSP_CODE: OUT_THEN_SPIN}, bus_with(Reporter(on_write=device_pauses)))
    holder.append(vm)
    vm.run(BSP_CODE)
    assert wrote.wait(DEADLINE)
    assert "vCPU thread" in str(seen[0])
    assert vm.lifecycle is S.RUNNING
    bounded(vm.pause)  # from the owner's thread it works
    assert vm.vcpu_regs(0).rip == BSP_CODE + 2  # spinning on the jmp after the out
    bounded(vm.shutdown)
    assert not vm.errors


def _mapped(address: int) -> bool:
    with open("/proc/self/maps") as maps:
        for line in maps:
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            if lo <= address < hi:
                return True
    return False


def test_memory_closed_under_a_running_vm_stays_mapped_until_the_vm_closes(kvm: Kvm) -> None:
    # Before: close() unmapped at once; the host reused the address while the guest wrote to it.
    memory = memory_with({BSP_CODE: COUNT_IN_RAX})
    host = memory.host_address(COUNTER)
    vm = KvmVm.new(kvm, VmConfig.from_kvm(kvm, 1), memory, EventExitHandler(), IoManager())
    try:
        vm.run(BSP_CODE)
        memory.close()
        with pytest.raises(ClosedError):
            memory.read_u64(COUNTER)
        assert _mapped(host)
        bounded(vm.pause)
        first = vm.vcpu_regs(0).rax
        for _ in range(500):  # the guest still runs on its own memory: its count goes on
            vm.resume()
            vm.vcpu_run_state.wait_until(lambda _s: False, 0.01)
            bounded(vm.pause)
            if vm.vcpu_regs(0).rax > first:
                break
        assert vm.vcpu_regs(0).rax > first
        vm.resume()
    finally:
        bounded(vm.close)
    assert not _mapped(host)


def test_memory_closed_before_the_vm_is_refused(kvm: Kvm) -> None:
    memory = memory_with({})
    memory.close()
    with pytest.raises(ClosedError, match="closed"):
        KvmVm.new(kvm, VmConfig.from_kvm(kvm, 1), memory, EventExitHandler(), IoManager())


def test_every_lifecycle_call_from_every_state_returns_or_raises(make_vm: Factory) -> None:
    vm = make_vm(1, {BSP_CODE: SPIN})
    calls: dict[str, Callable[[], object]] = {
        "pause": vm.pause, "resume": vm.resume, "wait": lambda: vm.wait(0),
        "regs": lambda: vm.vcpu_regs(0), "save": vm.save_state, "dirty": vm.dirty_pages,
        "shutdown": vm.shutdown,
    }

    def try_all() -> None:
        for name, call in calls.items():
            if name == "shutdown":
                continue
            try:
                bounded(call, what=name)
            except VmError:
                pass

    try_all()  # created
    vm.run(BSP_CODE)
    try_all()  # running (or paused, after the pause above)
    bounded(vm.pause)
    try_all()  # paused
    bounded(vm.shutdown)
    try_all()  # stopped
    bounded(vm.close)
    for name, call in calls.items():
        if name == "shutdown":
            call()
            continue
        with pytest.raises(ClosedError):
            call()


def _census() -> tuple[int, int, int]:
    """Open fds, threads, and the kvm_run pages mapped (the mappings a VM makes with a name).

    Guest memory is anonymous, like the allocator's arenas; it is checked by address instead.
    """
    with open("/proc/self/maps") as maps:
        kvm_maps = sum("kvm" in line for line in maps)
    return len(os.listdir("/proc/self/fd")), threading.active_count(), kvm_maps


def test_300_lifecycles_leak_no_fd_thread_or_mapping(kvm: Kvm) -> None:
    def cycle() -> int:
        with memory_with({BSP_CODE: SPIN}) as memory, KvmVm.new(
                kvm, VmConfig.from_kvm(kvm, 2), memory, EventExitHandler(), IoManager()) as vm:
            vm.run(BSP_CODE)
            vm.pause(timeout=DEADLINE)
            vm.resume()
            vm.shutdown()
            return memory.host_address(0)

    for _ in range(3):
        cycle()  # warm up lazily created resources
    before = _census()
    with memory_with({}) as memory, KvmVm.new(kvm, VmConfig.from_kvm(kvm, 2), memory,
                                              EventExitHandler(), IoManager()):
        fds, _, kvm_maps = _census()
        # The census sees what a VM holds: 2 vCPU fds and their kvm_run pages, the VM fd.
        assert fds >= before[0] + 3 and kvm_maps >= before[2] + 2
    for _ in range(300):
        assert not _mapped(cycle()), "guest memory is still mapped after close"
    assert _census() == before
