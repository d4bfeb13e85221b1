"""KvmVm / KvmVcpu lifecycle against the real /dev/kvm."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from kvmlib import GuestAddress, GuestMemoryMmap, Kvm, Shutdown, VcpuError, VmError
from kvmlib.bus import IoManager
from kvmlib.exit_handler import EventExitHandler, ExitHandler
from kvmlib.vcpu import KvmVcpu, Vcpu, VcpuConfig, VcpuConfigList, VmRunState
from kvmlib.vm import KvmVm, Vm, VmConfig

from .vm_guests import (
    AP_CODE,
    AP_REPORT_AND_HALT,
    BSP_CODE,
    COUNT_FOREVER,
    COUNTER,
    OUT_THEN_SPIN,
    REPORT_AND_WAKE_APS,
    SPIN,
    TRIPLE_FAULT,
    Reporter,
    bus_with,
    memory_with,
)

Factory = Callable[..., KvmVm]


@pytest.fixture
def make_vm(kvm: Kvm) -> Iterator[Factory]:
    """Build VMs that are closed (and their memory unmapped) at the end of the test."""
    owned: list[tuple[KvmVm, GuestMemoryMmap]] = []

    def make(num_vcpus: int, programs: dict[GuestAddress, bytes], bus: IoManager | None = None,
             handler: ExitHandler | None = None) -> KvmVm:
        memory = memory_with(programs)
        vm = KvmVm.new(kvm, VmConfig.from_kvm(kvm, num_vcpus), memory,
                       handler or EventExitHandler(), bus or IoManager())
        owned.append((vm, memory))
        return vm

    yield make
    for vm, memory in owned:
        try:
            vm.close()
        finally:
            memory.close()


@pytest.mark.parametrize("num_vcpus", [1, 2, 4])
def test_every_vcpu_runs_in_its_own_named_thread(make_vm: Factory, num_vcpus: int) -> None:
    reporter = Reporter()
    vm = make_vm(num_vcpus, {BSP_CODE: REPORT_AND_WAKE_APS, AP_CODE: AP_REPORT_AND_HALT},
                 bus_with(reporter))
    vm.run(BSP_CODE)
    assert reporter.wait_for_writers(num_vcpus)
    vm.shutdown()
    assert sorted(set(reporter.writes)) == [("vcpu_0", 0)] + [
        (f"vcpu_{i}", 1) for i in range(1, num_vcpus)]
    assert not any(t.name.startswith("vcpu_") for t in threading.enumerate())


def test_no_vcpu_enters_kvm_run_before_every_thread_exists(
        make_vm: Factory, monkeypatch: pytest.MonkeyPatch) -> None:
    reporter = Reporter()
    vm = make_vm(2, {BSP_CODE: OUT_THEN_SPIN, AP_CODE: AP_REPORT_AND_HALT}, bus_with(reporter))
    start = threading.Thread.start

    def late_start(thread: threading.Thread) -> None:
        if thread.name == "vcpu_1":
            time.sleep(0.3)  # without the barrier, vcpu_0 would have exited by now
        start(thread)

    monkeypatch.setattr(threading.Thread, "start", late_start)
    vm.run(BSP_CODE)
    assert reporter.wait_for_writers(1)
    vm.shutdown()
    assert reporter.threads_at_first_write is not None
    assert {"vcpu_0", "vcpu_1"} <= reporter.threads_at_first_write


def test_run_returns_at_once_and_shutdown_stops_a_spinning_guest(make_vm: Factory) -> None:
    vm = make_vm(2, {BSP_CODE: SPIN})
    vm.run(BSP_CODE)
    assert vm.running
    done = threading.Event()

    def stop() -> None:
        vm.shutdown()
        done.set()

    stopper = threading.Thread(target=stop)
    stopper.start()
    assert done.wait(1.0), "shutdown did not return within a second"
    stopper.join()
    assert vm.vcpu_run_state.state is VmRunState.EXITING
    vm.shutdown()  # idempotent


def test_pause_freezes_the_guest_and_resume_continues_it(make_vm: Factory) -> None:
    vm = make_vm(1, {BSP_CODE: COUNT_FOREVER})
    memory_read = vm_memory(vm)
    vm.run(BSP_CODE)
    wait_until(lambda: memory_read(COUNTER) > 1000)
    vm.pause()
    assert vm.paused and vm.vcpu_run_state.parked == 1
    frozen = memory_read(COUNTER)
    time.sleep(0.2)
    assert memory_read(COUNTER) == frozen
    regs = vm.vcpu_regs(0)
    assert BSP_CODE + 7 <= regs.rip <= BSP_CODE + len(COUNT_FOREVER)
    assert regs.rbx == COUNTER
    vm.resume()
    wait_until(lambda: memory_read(COUNTER) > frozen + 1000)
    vm.shutdown()


def test_registers_cannot_be_read_while_running(make_vm: Factory) -> None:
    vm = make_vm(1, {BSP_CODE: SPIN})
    vm.run(BSP_CODE)
    with pytest.raises(VmError, match="paused"):
        vm.vcpu_regs(0)
    vm.shutdown()


def test_a_triple_fault_ends_the_vcpu_with_shutdown_and_kicks_the_handler(
        make_vm: Factory) -> None:
    handler = EventExitHandler()
    vm = make_vm(1, {BSP_CODE: TRIPLE_FAULT}, handler=handler)
    vm.run(BSP_CODE)
    assert handler.wait(10)
    assert not handler.keep_running
    assert vm.wait(10)
    assert vm.vcpus[0].exit_reason == Shutdown()
    assert vm.vcpu_run_state.state is VmRunState.EXITING
    vm.shutdown()


class Exploding:
    def pio_read(self, base: int, offset: int, data: memoryview) -> None:
        raise AssertionError("not read")

    def pio_write(self, base: int, offset: int, data: memoryview) -> None:
        raise RuntimeError("device on fire")


def test_an_exception_in_a_device_is_raised_by_shutdown(make_vm: Factory) -> None:
    handler = EventExitHandler()
    vm = make_vm(1, {BSP_CODE: OUT_THEN_SPIN}, bus_with(Exploding()), handler)
    vm.run(BSP_CODE)
    assert handler.wait(10)
    with pytest.raises(VcpuError, match="device on fire") as info:
        vm.shutdown()
    assert isinstance(info.value.__cause__, RuntimeError)
    assert [vid for vid, _ in vm.errors] == [0]
    vm.shutdown()  # reported once; later calls are quiet


def test_run_refuses_a_second_start_and_a_missing_vcpu(kvm: Kvm, make_vm: Factory) -> None:
    vm = make_vm(1, {BSP_CODE: SPIN})
    vm.run(BSP_CODE)
    with pytest.raises(VmError, match="started"):
        vm.run(BSP_CODE)
    vm.shutdown()
    with memory_with({}) as memory:
        config = VmConfig.from_kvm(kvm, 2)
        bare = KvmVm.create_vm(kvm, config, EventExitHandler(), memory)
        with bare, pytest.raises(VmError, match="0 vCPUs were created"):
            bare.run()


def test_configuration_is_validated() -> None:
    with pytest.raises(VmError, match="at least one"):
        VcpuConfigList([])
    one = VcpuConfigList([VcpuConfig(0, (), ())])
    with pytest.raises(VmError, match=r"1\.\.254"):
        VmConfig(255, one)
    with pytest.raises(VmError, match=r"1\.\.254"):
        VmConfig(0, one)
    with pytest.raises(VmError, match=r"ids must be 0\.\.1"):
        VcpuConfigList([VcpuConfig(1, (), ()), VcpuConfig(0, (), ())])


def test_num_vcpus_and_vcpu_configs_must_agree(kvm: Kvm) -> None:
    with pytest.raises(VmError, match=r"1\.\.254"):
        VcpuConfigList.from_kvm(kvm, 0)
    with pytest.raises(VmError, match="configures 2"):
        VmConfig(3, VcpuConfigList.from_kvm(kvm, 2))


def test_create_run_shutdown_cycles_leak_no_fd_and_no_thread(kvm: Kvm) -> None:
    def cycle() -> None:
        with memory_with({BSP_CODE: SPIN}) as memory, KvmVm.new(
                kvm, VmConfig.from_kvm(kvm, 2), memory, EventExitHandler(), IoManager()) as vm:
            vm.run(BSP_CODE)
            vm.shutdown()

    cycle()  # warm up lazily opened resources
    fds, threads = len(os.listdir("/proc/self/fd")), threading.active_count()
    for _ in range(100):
        cycle()
    assert len(os.listdir("/proc/self/fd")) == fds
    assert threading.active_count() == threads


def test_kvm_types_satisfy_the_protocols(make_vm: Factory) -> None:
    vm: Vm = make_vm(1, {BSP_CODE: SPIN})  # mypy checks the structural match here
    vcpu: Vcpu = vm.vcpus[0]  # type: ignore[attr-defined]
    assert isinstance(vm, Vm) and isinstance(vcpu, Vcpu) and isinstance(vcpu, KvmVcpu)


# ---- helpers ------------------------------------------------------------------------------------

def vm_memory(vm: KvmVm) -> Callable[[GuestAddress], int]:
    """A reader of 64-bit values from the VM's guest memory (the memory the factory made)."""
    return vm.guest_memory.read_u64


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)
