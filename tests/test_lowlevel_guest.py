"""A guest driven through Kvm / VmFd / VcpuFd alone: port I/O both ways, MMIO both ways, hlt."""

from __future__ import annotations

import os

import pytest

from kvmlib import (
    ClosedError,
    GuestAddress,
    Hlt,
    IoIn,
    IoOut,
    Kvm,
    KvmIoctlError,
    MmioRead,
    MmioWrite,
)
from kvmlib.ioctl import KVM_EXIT_IO

from .guest import MMIO_ADDR, new_vm, real_mode_vcpu

# 16-bit real-mode code. MMIO_ADDR (0x20000) is reached through ES = 0x2000.
PORT_AND_MMIO_GUEST = bytes([
    0xBA, 0xF8, 0x03,        # mov dx, 0x3f8
    0xB0, ord("O"),          # mov al, 'O'
    0xEE,                    # out dx, al
    0xB0, ord("K"),          # mov al, 'K'
    0xEE,                    # out dx, al
    0xBA, 0x10, 0x00,        # mov dx, 0x10
    0xED,                    # in ax, dx          (the test answers 0x1234)
    0x40,                    # inc ax
    0xB9, 0x00, 0x20,        # mov cx, 0x2000
    0x8E, 0xC1,              # mov es, cx
    0x26, 0xA3, 0x00, 0x00,  # mov es:[0], ax     (MMIO write of 0x1235)
    0x26, 0x8B, 0x1E, 0x04, 0x00,  # mov bx, es:[4]  (MMIO read; the test answers 0xBEEF)
    0x89, 0x1E, 0x00, 0x30,  # mov [0x3000], bx   (RAM, for the test to check)
    0xF4,                    # hlt
])


def test_guest_exits_reach_the_caller_and_answers_reach_the_guest(kvm: Kvm) -> None:
    vm, memory = new_vm(kvm)
    with vm, memory, real_mode_vcpu(vm, memory, PORT_AND_MMIO_GUEST) as vcpu:
        out1 = vcpu.run()
        assert isinstance(out1, IoOut)
        assert (out1.port, out1.size, out1.count, bytes(out1.data)) == (0x3F8, 1, 1, b"O")
        out2 = vcpu.run()
        assert isinstance(out2, IoOut) and bytes(out2.data) == b"K"

        io_in = vcpu.run()
        assert isinstance(io_in, IoIn)
        assert (io_in.port, io_in.size, io_in.count) == (0x10, 2, 1)
        io_in.data[:] = (0x1234).to_bytes(2, "little")

        write = vcpu.run()
        assert isinstance(write, MmioWrite)
        assert write.address == MMIO_ADDR and bytes(write.data) == (0x1235).to_bytes(2, "little")

        read = vcpu.run()
        assert isinstance(read, MmioRead)
        assert read.address == MMIO_ADDR + 4 and len(read.data) == 2
        read.data[:] = (0xBEEF).to_bytes(2, "little")

        assert vcpu.run() == Hlt()
        assert memory.read_u16(GuestAddress(0x3000)) == 0xBEEF
        regs = vcpu.get_regs()
        assert regs.rax & 0xFFFF == 0x1235 and regs.rbx & 0xFFFF == 0xBEEF
        assert vcpu.kvm_run.exit_reason != KVM_EXIT_IO


def test_a_failed_ioctl_names_the_ioctl_and_errno(kvm: Kvm) -> None:
    with kvm.create_vm() as vm, pytest.raises(KvmIoctlError) as info:
        vm.create_vcpu(0).close()
        vm.create_vcpu(0)  # the same id twice
    assert info.value.ioctl == "KVM_CREATE_VCPU"
    assert info.value.errno != 0
    assert "KVM_CREATE_VCPU failed" in str(info.value)


def test_closing_twice_is_safe_and_a_closed_fd_refuses_ioctls(kvm: Kvm) -> None:
    vm = kvm.create_vm()
    vcpu = vm.create_vcpu(0)
    vcpu.close()
    vcpu.close()
    vm.close()
    vm.close()
    with pytest.raises(ClosedError, match="KVM_GET_REGS: the VcpuFd of vCPU 0 is closed"):
        vcpu.get_regs()
    with pytest.raises(ClosedError, match="KVM_CREATE_VCPU: this VmFd is closed"):
        vm.create_vcpu(1)


def _open_vcpu_fds() -> int:
    return sum(os.readlink(f"/proc/self/fd/{fd}").startswith("anon_inode:kvm-vcpu")
               for fd in os.listdir("/proc/self/fd") if os.path.exists(f"/proc/self/fd/{fd}"))


def test_close_releases_exit_views_a_caller_still_holds(kvm: Kvm) -> None:
    vm, memory = new_vm(kvm)
    with vm, memory:
        vcpu = real_mode_vcpu(vm, memory, PORT_AND_MMIO_GUEST)
        kept = vcpu.run()
        assert isinstance(kept, IoOut) and bytes(kept.data) == b"O"
        vcpu.close()
        # The mapping and the fd are gone although the exit object lives on...
        assert _open_vcpu_fds() == 0
        # ...and its view refuses access instead of reading unmapped memory.
        with pytest.raises(ValueError, match="released"):
            bytes(kept.data)
