"""The synchronous loop (run_inline) and fast reset with staged registers, on the real /dev/kvm."""

from __future__ import annotations

import threading

import pytest

from kvmlib import (
    IoManager,
    Kvm,
    KvmVm,
    LifecycleState,
    PioRange,
    ResetTimings,
    Shutdown,
    StopReason,
    VmError,
)
from kvmlib.arch.x86_64.regs import BootState
from kvmlib.ioctl import KVM_MP_STATE_RUNNABLE, kvm_mp_state, kvm_sregs
from kvmlib.lifecycle import Watchdog
from kvmlib.testing import make_vm

from .concurrency import DEADLINE, bounded

# Counts in RAX, reports the count's low byte on port 0x10 each turn, forever:
#   next: inc rax ; out 0x10, al ; jmp next
COUNTER = bytes([0x48, 0xFF, 0xC0, 0xE6, 0x10, 0xEB, 0xF9])
SPIN = bytes([0xEB, 0xFE])  # jmp $: no exit, ever
TRIPLE_FAULT = bytes([0x0F, 0x0B])  # ud2 with an empty IDT: #UD, #GP, #DF, shutdown


class StopAfter:
    """A port device that asks the VM to stop running inline after ``limit`` writes."""

    def __init__(self, limit: int, fail: bool = False) -> None:
        self.limit = limit
        self.fail = fail
        self.values: list[int] = []
        self.vm: KvmVm | None = None

    def pio_read(self, base: int, offset: int, data: memoryview) -> None:
        data[:] = bytes(len(data))

    def pio_write(self, base: int, offset: int, data: memoryview) -> None:
        if self.fail:
            raise RuntimeError("device on fire")
        self.values.append(data[0])
        if len(self.values) >= self.limit and self.vm is not None:
            self.vm.stop_inline()


def counter_vm(kvm: Kvm, device: StopAfter, **more: object) -> KvmVm:
    bus = IoManager()
    bus.register_pio(PioRange(0x10, 1), device)
    vm = make_vm(kvm, COUNTER, bus=bus, **more)  # type: ignore[arg-type]
    device.vm = vm
    return vm


def test_a_device_stops_the_run_and_reset_replays_it_exactly(kvm: Kvm) -> None:
    device = StopAfter(5)
    with counter_vm(kvm, device, log_dirty_pages=True) as vm:
        snapshot = vm.snapshot()
        first = vm.run_inline(timeout=DEADLINE)
        assert first.reason is StopReason.REQUESTED and first.exit is None
        assert device.values == [1, 2, 3, 4, 5]
        assert vm.lifecycle is LifecycleState.CREATED  # an inline run leaves the VM as it was
        for _ in range(3):  # the fuzzer's loop: reset, run again, the same execution
            device.values.clear()
            vm.reset_to(snapshot)
            assert vm.vcpu_regs(0).rax == 0  # staged registers are visible before the next run
            assert vm.run_inline(timeout=DEADLINE).reason is StopReason.REQUESTED
            assert device.values == [1, 2, 3, 4, 5]
        snapshot.close()


def test_a_stop_from_the_running_thread_needs_no_kick_and_loses_no_instruction(
        kvm: Kvm) -> None:
    device = StopAfter(3)
    with counter_vm(kvm, device) as vm:
        vcpu = vm.vcpus[0]
        kicks: list[int] = []
        kick = vcpu.kick

        def counted() -> None:
            kicks.append(1)
            kick()

        vcpu.kick = counted  # type: ignore[method-assign]
        assert vm.run_inline(timeout=DEADLINE).reason is StopReason.REQUESTED
        device.limit = 6
        # The next run starts right after the stopping OUT: nothing skipped, nothing repeated.
        assert vm.run_inline(timeout=DEADLINE).reason is StopReason.REQUESTED
        assert device.values == [1, 2, 3, 4, 5, 6]
        assert kicks == []  # no signal sent to ourselves


def test_a_watchdog_armed_again_and_again_still_fires_on_time() -> None:
    fired = threading.Event()
    watchdog = Watchdog("test-watchdog")
    try:
        for _ in range(100):  # what a fuzz loop does: the far deadline never wakes the thread
            watchdog.arm(3600, fired.set)
            watchdog.disarm()
        watchdog.arm(3600, fired.set)
        watchdog.arm(0.01, fired.set)  # an earlier deadline does wake it
        assert fired.wait(DEADLINE)
        fired.clear()
        watchdog.arm(0.01, fired.set)
        watchdog.disarm()
        watchdog.arm(0.02, fired.set)
        assert fired.wait(DEADLINE)
        fired.clear()
        watchdog.arm(0.01, fired.set)
        watchdog.disarm()  # a disarmed action never runs
        assert not fired.wait(0.1)
    finally:
        watchdog.close()


def test_a_timeout_stops_a_guest_that_never_exits(kvm: Kvm) -> None:
    with make_vm(kvm, SPIN) as vm:
        result = bounded(lambda: vm.run_inline(timeout=0.05))
        assert result.reason is StopReason.TIMEOUT
        # A timeout belongs to its run: the next run is not cut short by a stale one.
        assert bounded(lambda: vm.run_inline(timeout=0.05)) == result


def test_a_guest_that_stops_ends_the_run_not_the_vm(kvm: Kvm) -> None:
    with make_vm(kvm, TRIPLE_FAULT, log_dirty_pages=True) as vm:
        snapshot = vm.snapshot()
        result = vm.run_inline(timeout=DEADLINE)
        assert result.reason is StopReason.GUEST_STOPPED and result.exit == Shutdown()
        assert vm.lifecycle is LifecycleState.CREATED
        vm.reset_to(snapshot)
        assert vm.run_inline(timeout=DEADLINE).reason is StopReason.GUEST_STOPPED
        snapshot.close()


def test_a_device_exception_is_raised_by_the_run(kvm: Kvm) -> None:
    with counter_vm(kvm, StopAfter(1, fail=True)) as vm, \
            pytest.raises(RuntimeError, match="device on fire"):
        vm.run_inline(timeout=DEADLINE)


def test_other_threads_are_refused_while_the_guest_runs_inline_and_shutdown_stops_it(
        kvm: Kvm) -> None:
    with make_vm(kvm, SPIN) as vm:
        started = threading.Event()
        outcome: list[object] = []

        def run() -> None:
            started.set()
            outcome.append(vm.run_inline())

        runner = threading.Thread(target=run)
        runner.start()
        assert started.wait(DEADLINE)
        vm.vcpu_run_state.wait_until(lambda _s: vm._inline is not None, DEADLINE)
        with pytest.raises(VmError, match="running inline on another thread"):
            vm.save_state()
        with pytest.raises(VmError, match="running inline on another thread"):
            vm.run()
        bounded(vm.shutdown)  # stops the inline run too
        runner.join(DEADLINE)
        assert not runner.is_alive()
        assert outcome[0].reason is StopReason.VM_STOPPING  # type: ignore[attr-defined]


def test_run_inline_is_refused_while_the_vcpu_threads_run(kvm: Kvm) -> None:
    with make_vm(kvm, SPIN) as vm:
        vm.run()
        with pytest.raises(VmError, match="running; pause"):
            vm.run_inline()
        bounded(vm.pause)
        result = vm.run_inline(timeout=0.05)  # allowed while paused: the threads stay parked
        assert result.reason is StopReason.TIMEOUT
        bounded(vm.shutdown)


def test_reset_reports_where_its_time_went(kvm: Kvm) -> None:
    device = StopAfter(3)
    with counter_vm(kvm, device, log_dirty_pages=True) as vm:
        snapshot = vm.snapshot()
        timings = ResetTimings()
        for _ in range(3):
            vm.run_inline(timeout=DEADLINE)
            vm.reset_to(snapshot, timings=timings)
        assert timings.resets == 3
        phases = (timings.harvest, timings.copy, timings.in_kernel, timings.vcpus,
                  timings.devices)
        assert all(p >= 0 for p in phases) and timings.total == pytest.approx(sum(phases))
        assert timings.vcpus > 0 and timings.in_kernel > 0
        snapshot.close()


# Switches the LAPIC to x2APIC mode, then reports on port 0x10 and spins:
#   mov ecx, IA32_APIC_BASE ; rdmsr ; or eax, EN | EXTD ; wrmsr ; out 0x10, al ; jmp $
X2APIC_THEN_REPORT = bytes([0xB9, 0x1B, 0x00, 0x00, 0x00, 0x0F, 0x32, 0x0D, 0x00, 0x0C, 0x00, 0x00,
                            0x0F, 0x30, 0xE6, 0x10, 0xEB, 0xFE])
APIC_ID = 0x20


def test_a_reset_across_an_apic_mode_switch_restores_the_lapic_in_its_own_mode(kvm: Kvm) -> None:
    # The LAPIC state is read in the format of the current APIC mode: after the guest moved to
    # x2APIC, the reset must give the APIC base back before the LAPIC, or the ID would be garbled.
    bus = IoManager()
    device = StopAfter(1)
    bus.register_pio(PioRange(0x10, 1), device)
    with make_vm(kvm, X2APIC_THEN_REPORT, bus=bus, num_vcpus=2) as vm:
        device.vm = vm
        # vCPU 1, whose APIC ID (1) reads differently in the two modes (1 << 24 in xAPIC's).
        vm.load_boot_state(BootState.long_mode(0x10000), vcpu=1)
        vm.vcpus[1].vcpu_fd.set_mp_state(kvm_mp_state(KVM_MP_STATE_RUNNABLE))
        snapshot = vm.snapshot()
        saved = snapshot.state.vcpus[1]
        assert vm.run_inline(vcpu=1, timeout=DEADLINE).reason is StopReason.REQUESTED
        assert vm.vcpu_sregs(1).apic_base & 0x400  # x2APIC now
        vm.reset_to(snapshot)
        assert vm.vcpu_sregs(1).apic_base == kvm_sregs.from_buffer_copy(saved.sregs).apic_base
        lapic = bytes(vm.vcpus[1].vcpu_fd.get_lapic())
        assert lapic[APIC_ID:APIC_ID + 4] == saved.lapic[APIC_ID:APIC_ID + 4] == bytes([0, 0, 0, 1])
        snapshot.close()


def test_the_vcpu_statistics_fd_counts_the_exits_while_the_vcpu_lives(kvm: Kvm) -> None:
    from kvmlib._kvm_stats import VcpuCounters

    device = StopAfter(20)
    with counter_vm(kvm, device) as vm:
        counters = VcpuCounters(v.vcpu_fd for v in vm.vcpus)
        if not counters.available:
            pytest.skip("this kernel has no binary statistics (KVM_GET_STATS_FD, Linux 5.14+)")
        before = counters.read()
        assert before is not None
        assert vm.run_inline(timeout=DEADLINE).reason is StopReason.REQUESTED
        after = counters.read()
        assert after is not None and after - before >= 20  # one exit per port write at least
        counters.close()
        assert counters.read() is None and not counters.available
        counters.close()
