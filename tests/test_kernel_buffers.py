"""Buffers whose size the kernel decides: each method gets a too-small size and must answer with a
clean error or the whole result, never let the kernel write (or read) past the buffer."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import kvmlib
from kvmlib import (
    GuestAddress,
    GuestRegionMmap,
    KernelBufferError,
    Kvm,
    KvmError,
    KvmIoctlError,
    VcpuFd,
)
from kvmlib import ioctl as k
from kvmlib.ioctl import KVM_MEM_LOG_DIRTY_PAGES, Cap
from kvmlib.ioctl import fd as fd_module

GIB = 1 << 30
PAGE = 4096
MSR_IA32_SYSENTER_CS = 0x174


@pytest.fixture
def big_region() -> Iterator[GuestRegionMmap]:
    """1 GiB of MAP_NORESERVE anonymous memory: nothing is committed until touched."""
    region = GuestRegionMmap.anonymous(GuestAddress(0), GIB, log_dirty_pages=True)
    try:
        yield region
    finally:
        region.close()


def test_kernel_buffer_error_is_a_kvm_error_and_a_value_error() -> None:
    assert issubclass(KernelBufferError, KvmError)
    assert issubclass(KernelBufferError, ValueError)


# ---- KVM_GET_DIRTY_LOG ---------------------------------------------------------------------------

# Before the fix, get_dirty_log(0, 4096) made an 8-byte bitmap and the kernel wrote the slot's 32 KiB
# over the heap behind it. Run in a child so that a regression kills the child, not the test run.
DIRTY_LOG_CHILD = textwrap.dedent("""
    from kvmlib import GuestAddress, GuestRegionMmap, KernelBufferError, Kvm

    GIB = 1 << 30
    region = GuestRegionMmap.anonymous(GuestAddress(0), GIB, log_dirty_pages=True)
    with Kvm() as kvm, kvm.create_vm() as vm:
        vm.set_user_memory_region(0, 0, GIB, region.host_address, region.flags)
        for _ in range(64):  # the old code corrupted the heap every time; crash for sure
            try:
                vm.get_dirty_log(0, 4096)
            except KernelBufferError as e:
                refused = str(e)
            else:
                raise SystemExit("a 4 KiB bitmap was handed to the kernel for a 1 GiB slot")
        bitmap = vm.get_dirty_log(0)
        print("refused:", refused)
        print("bitmap bytes:", len(bitmap))
""")


def test_a_too_small_dirty_log_size_is_refused_not_overrun(kvm: Kvm) -> None:
    src = Path(kvmlib.__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(src), *filter(None, [os.environ.get("PYTHONPATH")])])}
    done = subprocess.run([sys.executable, "-c", DIRTY_LOG_CHILD], capture_output=True, text=True,
                          env=env, timeout=300, check=False)
    assert done.returncode == 0, f"child ended with {done.returncode}: {done.stderr[-2000:]}"
    assert "refused: KVM_GET_DIRTY_LOG: memory slot 0x0 is registered with 0x40000000 bytes, " \
           "not the 0x1000 asked for" in done.stdout
    assert f"bitmap bytes: {GIB // PAGE // 8}" in done.stdout


def test_dirty_log_is_sized_from_the_registered_slot(kvm: Kvm, big_region: GuestRegionMmap) -> None:
    with kvm.create_vm() as vm:
        vm.set_user_memory_region(0, 0, GIB, big_region.host_address, big_region.flags)
        assert vm.slot_sizes == {0: GIB}
        bitmap = vm.get_dirty_log(0)
        assert len(bitmap) == GIB // PAGE // 8 and not any(bitmap)
        assert len(vm.get_dirty_log(0, GIB)) == len(bitmap)  # the right size is still accepted
        for wrong in (PAGE, GIB - PAGE, 2 * GIB):
            with pytest.raises(KernelBufferError, match=f"slot 0x0 is registered with {GIB:#x} "
                                                        f"bytes, not the {wrong:#x} asked for"):
                vm.get_dirty_log(0, wrong)


def test_a_slot_registered_again_with_another_size_gets_a_bitmap_of_the_new_size(
        kvm: Kvm, big_region: GuestRegionMmap) -> None:
    # The log's buffer is kept per slot between calls: registering the slot again must not leave
    # the old size behind (the kernel would write past a smaller buffer).
    with kvm.create_vm() as vm:
        vm.set_user_memory_region(0, 0, GIB // 2, big_region.host_address, big_region.flags)
        assert len(vm.get_dirty_log(0)) == GIB // 2 // PAGE // 8
        vm.set_user_memory_region(0, 0, 0, big_region.host_address, big_region.flags)
        vm.set_user_memory_region(0, 0, GIB, big_region.host_address, big_region.flags)
        first = vm.get_dirty_log(0)
        assert len(first) == GIB // PAGE // 8
        first[0] = 0xFF  # each call returns its own copy, not the kept buffer
        assert not any(vm.get_dirty_log(0))


def test_dirty_log_of_an_unknown_or_deleted_slot_is_refused(kvm: Kvm,
                                                           big_region: GuestRegionMmap) -> None:
    with kvm.create_vm() as vm:
        with pytest.raises(KernelBufferError, match="slot 0x3 was not registered"):
            vm.get_dirty_log(3)
        with pytest.raises(KernelBufferError, match=r"slot 0x3 .*\(asked for 0x1000 bytes\)"):
            vm.get_dirty_log(3, PAGE)
        vm.set_user_memory_region(3, 0, GIB, big_region.host_address, big_region.flags)
        assert len(vm.get_dirty_log(3)) == GIB // PAGE // 8
        vm.set_user_memory_region(3, 0, 0, big_region.host_address)  # size 0 deletes the slot
        assert vm.slot_sizes == {}
        with pytest.raises(KernelBufferError, match="slot 0x3 was not registered"):
            vm.get_dirty_log(3)


def test_a_refused_region_leaves_the_registered_size_alone(kvm: Kvm,
                                                          big_region: GuestRegionMmap) -> None:
    with kvm.create_vm() as vm:
        vm.set_user_memory_region(0, 0, 64 * PAGE, big_region.host_address, big_region.flags)
        # KVM refuses to resize a slot in place; the old size stays the one that counts.
        with pytest.raises(KvmIoctlError, match="KVM_SET_USER_MEMORY_REGION"):
            vm.set_user_memory_region(0, 0, GIB, big_region.host_address, big_region.flags)
        assert vm.slot_sizes == {0: 64 * PAGE}
        assert len(vm.get_dirty_log(0)) == 8


def test_the_slot_is_the_kernels_full_u32(kvm: Kvm, big_region: GuestRegionMmap) -> None:
    smm_slot = 1 << 16  # address space 1 (SMM), slot id 0: not the same slot as 0
    with kvm.create_vm() as vm:
        vm.set_user_memory_region(0, 0, 64 * PAGE, big_region.host_address, big_region.flags)
        with pytest.raises(KernelBufferError, match="slot 0x10000 was not registered"):
            vm.get_dirty_log(smm_slot)
        try:
            vm.set_user_memory_region(smm_slot, 0, 1024 * PAGE, big_region.host_address,
                                      KVM_MEM_LOG_DIRTY_PAGES)
        except KvmIoctlError as e:
            if e.errno != errno.EINVAL:
                raise
            pytest.skip("this KVM has no second address space (no SMM) to register slot 0x10000 in")
        assert len(vm.get_dirty_log(0)) == 8
        assert len(vm.get_dirty_log(smm_slot)) == 1024 // 8
        with pytest.raises(KernelBufferError, match="slot 0x10000 is registered with 0x400000"):
            vm.get_dirty_log(smm_slot, 64 * PAGE)


@pytest.mark.parametrize("slot", [-1, 1 << 32])
def test_a_slot_outside_u32_is_refused(kvm: Kvm, slot: int) -> None:
    with kvm.create_vm() as vm:
        with pytest.raises(ValueError, match="u32"):
            vm.set_user_memory_region(slot, 0, 0x1000, 0)
        with pytest.raises(ValueError, match="u32"):
            vm.get_dirty_log(slot)


# ---- KVM_GET_XSAVE2 / KVM_SET_XSAVE --------------------------------------------------------------


@pytest.fixture
def ioctl_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """Every buffer ioctl kvmlib makes during the test, as (request, buffer size)."""
    calls: list[tuple[int, int]] = []
    real = fd_module.run_ioctl  # the same function the buffer ioctls call as `ioctl`

    def spy(fd: int, request: int, arg: Any = 0, mutate: bool = True) -> Any:
        calls.append((request, len(memoryview(arg).cast("B"))))
        return real(fd, request, arg, mutate)

    monkeypatch.setattr(fd_module, "ioctl", spy)
    return calls


def test_xsave2_defaults_to_the_size_the_kernel_writes(kvm: Kvm) -> None:
    with kvm.create_vm() as vm:
        assert vm.xsave2_size is None  # asked once the first vCPU exists
        with vm.create_vcpu(0) as vcpu:
            expected = max(vm.check_extension(Cap.KVM_CAP_XSAVE2), 4096)
            assert vm.xsave2_size == vcpu.xsave2_size == expected
            area = vcpu.get_xsave2()
            assert len(area) == expected
            if expected == 4096:  # then KVM_GET_XSAVE tells the same
                assert bytes(area) == bytes(vcpu.get_xsave())
            bigger = vcpu.get_xsave2(expected + 512)
            assert bigger[:expected] == area and not any(bigger[expected:])
            vcpu.set_xsave(area)


def test_xsave2_smaller_than_the_kernel_writes_is_refused_before_the_ioctl(
        kvm: Kvm, ioctl_calls: list[tuple[int, int]]) -> None:
    with kvm.create_vm() as vm, vm.create_vcpu(0) as vcpu:
        size = vcpu.xsave2_size
        assert size is not None
        ioctl_calls.clear()
        for small in (size - 1, 64, 0):
            with pytest.raises(KernelBufferError, match=f"writes {size} bytes .* vCPU 0, more than "
                                                        f"the {small} asked for"):
                vcpu.get_xsave2(small)
        assert ioctl_calls == []
        assert len(vcpu.get_xsave2()) == size  # and the vCPU is fine


def test_xsave2_on_a_vm_whose_area_exceeds_4k(kvm: Kvm, ioctl_calls: list[tuple[int, int]]) -> None:
    # As on a host with AMX: a VcpuFd on the same vCPU that is told the kernel writes 8 KiB.
    with kvm.create_vm() as vm, vm.create_vcpu(0) as vcpu, \
            VcpuFd(os.dup(vcpu.fd), kvm.vcpu_mmap_size, vcpu_id=0, xsave2_size=8192) as amx:
        with pytest.raises(KernelBufferError, match="writes 8192 bytes"):
            amx.get_xsave2(4096)
        assert len(amx.get_xsave2()) == 8192
        # KVM_SET_XSAVE reads the full size whatever it is given: a 4 KiB area is extended.
        ioctl_calls.clear()
        amx.set_xsave(amx.get_xsave())
        assert (k.KVM_GET_XSAVE, 4096) in ioctl_calls
        assert (k.KVM_SET_XSAVE, 8192) in ioctl_calls


def test_xsave2_without_a_known_size_is_refused(kvm: Kvm) -> None:
    with kvm.create_vm() as vm, vm.create_vcpu(0) as vcpu, \
            VcpuFd(os.dup(vcpu.fd), kvm.vcpu_mmap_size) as bare:
        with pytest.raises(KernelBufferError, match="unknown"):
            bare.get_xsave2()
        with pytest.raises(KernelBufferError, match="unknown"):
            bare.get_xsave2(1 << 20)


def test_a_buffer_smaller_than_the_ioctl_argument_is_refused(
        kvm: Kvm, ioctl_calls: list[tuple[int, int]]) -> None:
    with kvm.create_vm() as vm, vm.create_vcpu(0) as vcpu:
        ioctl_calls.clear()
        with pytest.raises(KernelBufferError, match="KVM_SET_XSAVE needs a buffer of at least 4096"):
            vcpu.set_xsave(bytearray(100))
        with pytest.raises(KernelBufferError, match="KVM_SET_REGS needs a buffer of at least 144"):
            vcpu.set_regs(bytearray(8))  # type: ignore[arg-type]
        assert ioctl_calls == []


# ---- the lists: CPUID and MSR indices -------------------------------------------------------------


def _cpuid_entries(cpuid: Any) -> list[bytes]:
    return [bytes(cpuid.entries[i]) for i in range(cpuid.nent)]


@pytest.mark.parametrize("first_guess", [0, 1, 2])
def test_supported_cpuid_grows_past_a_small_guess(kvm: Kvm, first_guess: int) -> None:
    full = kvm.get_supported_cpuid()
    assert full.nent > 2
    assert _cpuid_entries(kvm.get_supported_cpuid(first_guess)) == _cpuid_entries(full)


@pytest.mark.parametrize("first_guess", [0, 1, 2])
def test_vcpu_cpuid_grows_past_a_small_guess(kvm: Kvm, first_guess: int) -> None:
    with kvm.create_vm() as vm, vm.create_vcpu(0) as vcpu:
        vcpu.set_cpuid2(kvm.get_supported_cpuid())
        full = vcpu.get_cpuid2()
        assert full.nent > 2
        assert _cpuid_entries(vcpu.get_cpuid2(first_guess)) == _cpuid_entries(full)


@pytest.mark.parametrize("first_guess", [0, 1, 2])
def test_msr_index_list_grows_past_a_small_guess(kvm: Kvm, first_guess: int) -> None:
    full = kvm.get_msr_index_list()
    assert len(full) > 2
    assert kvm.get_msr_index_list(first_guess) == full


def test_set_cpuid2_refuses_a_count_beyond_the_structure(kvm: Kvm) -> None:
    supported = kvm.get_supported_cpuid()
    short = k.make_kvm_cpuid2(supported.entries[i] for i in range(2))
    short.nent = supported.nent  # the kernel would read this many entries from a 2-entry buffer
    with kvm.create_vm() as vm, vm.create_vcpu(0) as vcpu:
        with pytest.raises(KernelBufferError, match=f"nent is {supported.nent} but the structure "
                                                    "holds 2 entries"):
            vcpu.set_cpuid2(short)
        vcpu.set_cpuid2(supported)


def test_msrs_are_sized_by_their_own_count(kvm: Kvm) -> None:
    # KVM_GET_MSRS / KVM_SET_MSRS read and write exactly nmsrs entries, and kvmlib builds the
    # structure from the list it is given, so the count always matches the buffer.
    with kvm.create_vm() as vm, vm.create_vcpu(0) as vcpu:
        vcpu.set_msrs([(MSR_IA32_SYSENTER_CS, 0x10)] * 100)
        assert vcpu.get_msrs([MSR_IA32_SYSENTER_CS] * 100) == {MSR_IA32_SYSENTER_CS: 0x10}
        assert vcpu.get_msrs([]) == {}


def test_prepared_ioctls_are_checked_once_and_issued_in_order(kvm: Kvm) -> None:
    with kvm.create_vm() as vm, vm.create_vcpu(0) as vcpu:
        with pytest.raises(KernelBufferError, match="KVM_SET_XSAVE needs a buffer of at least"):
            vcpu.prepare_set("xsave", bytearray(16))
        regs = k.kvm_regs(rip=0x1000)
        calls = (vcpu.prepare_set("regs", regs),
                 vcpu.prepare_set("msrs", k.make_kvm_msrs([(MSR_IA32_SYSENTER_CS, 0x10)])))
        vcpu.issue(calls)
        assert vcpu.get_regs().rip == 0x1000
        assert vcpu.get_msrs([MSR_IA32_SYSENTER_CS]) == {MSR_IA32_SYSENTER_CS: 0x10}
        regs.rip = 0x2000  # the kernel reads the structure at each issue
        vcpu.issue(calls)
        assert vcpu.get_regs().rip == 0x2000
        # An MSR the kernel refuses stops the batch with the ioctl's name and the count.
        refused = vcpu.prepare_set("msrs", k.make_kvm_msrs([(0xDEADBEEF, 1)]))
        with pytest.raises(KvmIoctlError, match=r"KVM_SET_MSRS.*handled 0 of the 1 entries"):
            vcpu.issue((refused, vcpu.prepare_set("regs", k.kvm_regs(rip=0x3000))))
        assert vcpu.get_regs().rip == 0x2000  # nothing after the failure was issued
    with pytest.raises(kvmlib.ClosedError, match="KVM_SET_REGS"):
        vcpu.issue(calls)
