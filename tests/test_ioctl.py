"""The fd wrappers against the real /dev/kvm: one behaviour per test."""

from __future__ import annotations

import ctypes
import os

import pytest

from kvmlib import (
    Cap,
    GuestAddress,
    GuestMemoryMmap,
    GuestRegionMmap,
    Intr,
    Kvm,
    KvmError,
    KvmUnavailableError,
)
from kvmlib import ioctl as k

from .guest import RAM_SIZE, new_vm, real_mode_vcpu

MSR_IA32_TSC = 0x10
MSR_IA32_SYSENTER_CS = 0x174


def test_missing_device_raises_unavailable_with_advice(tmp_path: object) -> None:
    with pytest.raises(KvmUnavailableError, match="modprobe"):
        Kvm("/nonexistent/kvm")


def test_unavailable_is_a_kvm_error() -> None:
    assert issubclass(KvmUnavailableError, KvmError)


def test_api_version_and_capabilities(kvm: Kvm) -> None:
    assert kvm.get_api_version() == 12
    assert kvm.check_extension(Cap.KVM_CAP_USER_MEMORY) > 0
    assert kvm.check_extension(Cap.KVM_CAP_NR_MEMSLOTS) >= 32
    assert kvm.vcpu_mmap_size >= ctypes.sizeof(k.kvm_run)


def test_device_is_opened_close_on_exec(kvm: Kvm) -> None:
    import fcntl

    assert fcntl.fcntl(kvm.fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC


def test_supported_cpuid_has_the_basic_leaves(kvm: Kvm) -> None:
    cpuid = kvm.get_supported_cpuid()
    functions = {cpuid.entries[i].function for i in range(cpuid.nent)}
    assert 0 in functions and 1 in functions and 0x80000000 in functions


def test_msr_index_list_contains_the_tsc(kvm: Kvm) -> None:
    assert MSR_IA32_TSC in kvm.get_msr_index_list()


def test_vcpu_register_round_trips(kvm: Kvm) -> None:
    with kvm.create_vm() as vm, vm.create_vcpu(0) as vcpu:
        regs = vcpu.get_regs()
        regs.rax, regs.r15 = 0x1122334455667788, 42
        vcpu.set_regs(regs)
        back = vcpu.get_regs()
        assert (back.rax, back.r15) == (0x1122334455667788, 42)

        vcpu.set_msrs({MSR_IA32_SYSENTER_CS: 0x10})
        assert vcpu.get_msrs([MSR_IA32_SYSENTER_CS]) == {MSR_IA32_SYSENTER_CS: 0x10}

        cpuid = kvm.get_supported_cpuid()
        vcpu.set_cpuid2(cpuid)
        # Kernels differ in what KVM_GET_CPUID2 gives back (some drop leaves above the maximum
        # basic leaf, some report runtime-adjusted feature bits), so check the stable part: the
        # leaves come from what was set and the vendor leaf is unchanged.
        given = {(e.function, e.index): e for e in cpuid.entries[:cpuid.nent]}
        back_cpuid = vcpu.get_cpuid2()
        returned = {(e.function, e.index): e for e in back_cpuid.entries[:back_cpuid.nent]}
        assert set(returned) <= set(given) and (1, 0) in returned
        vendor = [(e.eax, e.ebx, e.ecx, e.edx) for e in (given[0, 0], returned[0, 0])]
        assert vendor[0] == vendor[1]

        fpu = vcpu.get_fpu()
        fpu.fcw = 0x37F
        vcpu.set_fpu(fpu)
        assert vcpu.get_fpu().fcw == 0x37F

        for getter, setter in [
            (vcpu.get_sregs, vcpu.set_sregs), (vcpu.get_xsave, vcpu.set_xsave),
            (vcpu.get_xcrs, vcpu.set_xcrs), (vcpu.get_debugregs, vcpu.set_debugregs),
            (vcpu.get_vcpu_events, vcpu.set_vcpu_events), (vcpu.get_mp_state, vcpu.set_mp_state),
        ]:
            setter(getter())  # type: ignore[operator]


def test_unknown_msr_is_reported_by_index(kvm: Kvm) -> None:
    with kvm.create_vm() as vm, vm.create_vcpu(0) as vcpu, pytest.raises(KvmError, match="0xdead"):
        vcpu.set_msrs({0xDEAD: 1})


def test_irqchip_pit_and_clock_state_round_trip(kvm: Kvm) -> None:
    with kvm.create_vm() as vm:
        vm.set_tss_address(0xFFFBD000)
        vm.set_identity_map_address(0xFFFBC000)
        vm.create_irqchip()
        vm.create_pit2()
        with vm.create_vcpu(0) as vcpu:
            lapic = vcpu.get_lapic()
            vcpu.set_lapic(lapic)
        ioapic = vm.get_irqchip(k.KVM_IRQCHIP_IOAPIC)
        assert ioapic.chip.ioapic.base_address == 0xFEC00000
        vm.set_irqchip(ioapic)
        pit = vm.get_pit2()
        vm.set_pit2(pit)
        clock = vm.get_clock()
        vm.set_clock(k.kvm_clock_data(clock=clock.clock))
        vm.irq_line(4, 1)
        vm.irq_line(4, 0)


def test_irqfd_and_ioeventfd_register_and_unregister(kvm: Kvm) -> None:
    efd = os.eventfd(0)
    try:
        with kvm.create_vm() as vm:
            vm.create_irqchip()
            vm.register_irqfd(efd, 5)
            vm.unregister_irqfd(efd, 5)
            vm.register_ioeventfd(efd, 0x3F0, 1, pio=True, datamatch=7)
            vm.unregister_ioeventfd(efd, 0x3F0, 1, pio=True, datamatch=7)
            with pytest.raises(KvmError, match="KVM_IOEVENTFD"):
                vm.unregister_ioeventfd(efd, 0x3F0, 1, pio=True, datamatch=7)
    finally:
        os.close(efd)


def test_dirty_log_reports_the_pages_the_guest_wrote(kvm: Kvm) -> None:
    # mov byte [0x5000], 1 ; hlt
    code = bytes([0xC6, 0x06, 0x00, 0x50, 0x01, 0xF4])
    region = GuestRegionMmap.anonymous(GuestAddress(0), RAM_SIZE, log_dirty_pages=True)
    with kvm.create_vm() as vm, GuestMemoryMmap.from_regions([region]) as memory:
        with real_mode_vcpu(vm, memory, code) as vcpu:
            vm.get_dirty_log(0, RAM_SIZE)  # host writes are not logged; start from a clean slate
            assert vcpu.run() == k.Hlt()
        bitmap = vm.get_dirty_log(0, RAM_SIZE)
        dirty = {i for i in range(RAM_SIZE // 4096) if bitmap[i // 8] >> (i % 8) & 1}
        assert dirty == {5}
        assert not any(vm.get_dirty_log(0, RAM_SIZE))  # reading the log cleared it


def test_immediate_exit_returns_intr_without_running(kvm: Kvm) -> None:
    vm, memory = new_vm(kvm)
    with vm, memory, real_mode_vcpu(vm, memory, bytes([0xF4])) as vcpu:
        vcpu.set_immediate_exit(True)
        assert vcpu.run() == Intr()
        assert vcpu.get_regs().rip == 0x1000
        vcpu.set_immediate_exit(False)
        assert vcpu.run() == k.Hlt()
