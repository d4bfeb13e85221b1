"""KvmVm / KvmVcpu lifecycle against the real /dev/kvm."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from kvmlib import (
    FailEntry,
    GuestAddress,
    GuestMemoryMmap,
    GuestRegionMmap,
    InternalError,
    Kvm,
    MmioRange,
    Shutdown,
    Unknown,
    VcpuError,
    VmError,
)
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
    RAM_SIZE,
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
    with pytest.raises(VmError, match=r"running; pause\(\) it first"):
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


def test_run_refuses_a_second_start(make_vm: Factory) -> None:
    vm = make_vm(1, {BSP_CODE: SPIN})
    vm.run(BSP_CODE)
    with pytest.raises(VmError, match="running \\(a VM runs once\\)"):
        vm.run(BSP_CODE)
    vm.shutdown()


def test_creating_vcpus_writes_nothing_into_guest_memory(make_vm: Factory) -> None:
    vm = make_vm(4, {})
    memory = vm.guest_memory
    mptable = range(0x9FC00, 0xA0000)  # the MP table is the VM's, written once by new()
    written = [a for a in range(0, RAM_SIZE, 0x1000) if any(memory.read(a, 0x1000))]
    assert all(a // 0x1000 == mptable.start // 0x1000 for a in written), [hex(a) for a in written]


def test_run_at_an_address_writes_the_boot_tables_once_and_starts_there(make_vm: Factory) -> None:
    vm = make_vm(1, {BSP_CODE: SPIN})
    vm.run(BSP_CODE)
    vm.pause()
    regs, sregs = vm.vcpu_regs(0), vm.vcpu_sregs(0)
    assert regs.rip == BSP_CODE and sregs.cs.selector == 0x10 and sregs.cs.l == 1
    assert sregs.cr3 == 0x9000 and vm.guest_memory.read_u64(0x9000) & 1  # PML4[0] present
    vm.shutdown()


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
    kvm_vm = make_vm(1, {BSP_CODE: SPIN})
    # These annotated assignments are where mypy (run on the tests) checks the structural match.
    vm: Vm = kvm_vm
    vcpu: Vcpu = kvm_vm.vcpus[0]
    assert isinstance(vm, Vm) and isinstance(vcpu, Vcpu) and isinstance(vcpu, KvmVcpu)


def test_shutdown_from_a_device_on_a_vcpu_thread(make_vm: Factory) -> None:
    holder: list[KvmVm] = []
    reporter = Reporter(on_write=lambda: holder[0].shutdown())  # noqa: PLW0108 - bound later
    vm = make_vm(2, {BSP_CODE: OUT_THEN_SPIN, AP_CODE: AP_REPORT_AND_HALT}, bus_with(reporter))
    holder.append(vm)
    vm.run(BSP_CODE)
    assert vm.wait(10)  # every vCPU thread ended, the caller's included
    assert vm.vcpu_run_state.state is VmRunState.EXITING
    vm.shutdown()


@pytest.mark.parametrize("bad_exit", [InternalError(1, (2, 3)), FailEntry(0x21, 0), Unknown(99)])
def test_error_exits_end_the_vcpu_with_the_exit_recorded(
        make_vm: Factory, bad_exit: object) -> None:
    vm = make_vm(1, {BSP_CODE: SPIN})
    # Real KVM raises these only on hardware trouble: feed one to the loop instead.
    vm.vcpus[0].feed_exit(bad_exit)  # type: ignore[arg-type]
    vm.run(BSP_CODE)
    with pytest.raises(VcpuError, match=r"vCPU 0 stopped at RIP 0x[0-9a-f]+: ") as raised:
        vm.wait(10)
    assert (raised.value.vcpu_id, raised.value.exit, raised.value.rip) == (0, bad_exit, BSP_CODE)
    if isinstance(bad_exit, InternalError):
        assert "KVM internal error 1 (EMULATION" in str(raised.value)
    assert vm.vcpus[0].exit_reason is None
    assert vm.vcpu_run_state.state is VmRunState.EXITING
    vm.shutdown()  # the error was reported once, by wait()


def test_more_regions_than_memslots_is_refused(kvm: Kvm, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kvm, "check_extension", lambda cap: 2)
    with GuestMemoryMmap.from_ranges([(0, 0x1000), (0x2000, 0x1000), (0x4000, 0x1000)]) as memory, \
            pytest.raises(VmError, match="3 regions but KVM offers only 2"):
        KvmVm.new(kvm, VmConfig.from_kvm(kvm, 1), memory, EventExitHandler(), IoManager())


class MmioRecorder:
    def __init__(self) -> None:
        self.writes: list[tuple[int, bytes]] = []

    def mmio_read(self, base: int, offset: int, data: memoryview) -> None:
        data[:] = bytes(len(data))

    def mmio_write(self, base: int, offset: int, data: memoryview) -> None:
        self.writes.append((base + offset, bytes(data)))


def test_a_read_only_region_turns_guest_writes_into_mmio_exits(kvm: Kvm) -> None:
    rom_base = 0x200000
    # mov rax, rom_base ; mov byte [rax], 0x5a ; jmp $
    code = bytes([0x48, 0xC7, 0xC0, 0x00, 0x00, 0x20, 0x00, 0xC6, 0x00, 0x5A, 0xEB, 0xFE])
    ram = GuestRegionMmap.anonymous(GuestAddress(0), RAM_SIZE)
    rom = GuestRegionMmap.anonymous(GuestAddress(rom_base), 0x1000, read_only=True)
    recorder = MmioRecorder()
    bus = IoManager()
    bus.register_mmio(MmioRange(rom_base, 0x1000), recorder)
    with GuestMemoryMmap.from_regions([ram, rom]) as memory, KvmVm.new(
            kvm, VmConfig.from_kvm(kvm, 1), memory, EventExitHandler(), bus) as vm:
        memory.write(BSP_CODE, code)
        vm.run(BSP_CODE)
        wait_until(lambda: bool(recorder.writes))
        vm.shutdown()
        assert recorder.writes == [(rom_base, b"\x5a")]
        assert memory.read_u8(GuestAddress(rom_base)) == 0


# ---- helpers ------------------------------------------------------------------------------------

def vm_memory(vm: KvmVm) -> Callable[[GuestAddress], int]:
    """A reader of 64-bit values from the VM's guest memory (the memory the factory made)."""
    return vm.guest_memory.read_u64


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def test_an_emulation_failure_names_the_instruction_bytes() -> None:
    from kvmlib.disasm import instruction_bytes
    # What this project's development host reported for Linux's `lock cmpxchg16b [rbp+0x20]`.
    reported = InternalError(1, (1, 0x74204DC70F48F00F, 0x894D0824448B4C66, 0x1000, 0, 0, 0, 0))
    assert instruction_bytes(reported)[:6] == bytes.fromhex("f0480fc74d20")  # type: ignore[index]
    assert instruction_bytes(InternalError(1, (0, 5, 6))) is None  # no bytes flagged
    assert instruction_bytes(InternalError(3, (1, 5, 6))) is None  # not an emulation failure
