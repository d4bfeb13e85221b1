"""A VM's fd wrapper, :class:`VmFd`: memory slots, the in-kernel irqchip and devices, vCPUs."""

from __future__ import annotations

import ctypes
import mmap
import os
from ctypes import (
    c_char,
    c_uint64,
    sizeof,
)

from kvmlib.errors import KernelBufferError
from kvmlib.ioctl.cap import Cap
from kvmlib.ioctl.fd import _enable_cap, _FdOwner
from kvmlib.ioctl.numbers import (
    KVM_CHECK_EXTENSION,
    KVM_CREATE_IRQCHIP,
    KVM_CREATE_PIT2,
    KVM_CREATE_VCPU,
    KVM_ENABLE_CAP,
    KVM_GET_CLOCK,
    KVM_GET_DIRTY_LOG,
    KVM_GET_IRQCHIP,
    KVM_GET_PIT2,
    KVM_IOEVENTFD,
    KVM_IRQ_LINE,
    KVM_IRQFD,
    KVM_SET_CLOCK,
    KVM_SET_IDENTITY_MAP_ADDR,
    KVM_SET_IRQCHIP,
    KVM_SET_PIT2,
    KVM_SET_TSS_ADDR,
    KVM_SET_USER_MEMORY_REGION,
)
from kvmlib.ioctl.structs import (
    KVM_IOEVENTFD_FLAG_DATAMATCH,
    KVM_IOEVENTFD_FLAG_DEASSIGN,
    KVM_IOEVENTFD_FLAG_PIO,
    KVM_IRQFD_FLAG_DEASSIGN,
    KVM_IRQFD_FLAG_RESAMPLE,
    KVM_PIT_SPEAKER_DUMMY,
    kvm_clock_data,
    kvm_dirty_log,
    kvm_ioeventfd,
    kvm_irq_level,
    kvm_irqchip,
    kvm_irqfd,
    kvm_pit_config,
    kvm_pit_state2,
    kvm_userspace_memory_region,
    kvm_xsave,
)
from kvmlib.ioctl.vcpu import VcpuFd

_U32_MAX = 0xFFFF_FFFF


def _check_slot(slot: int) -> None:
    # ctypes would silently wrap a larger value into another slot.
    if not 0 <= slot <= _U32_MAX:
        raise ValueError(f"a memory slot is a u32 (address space << 16 | slot id), not {slot}")


class VmFd(_FdOwner):
    """A VM's fd, from :meth:`Kvm.create_vm`.

    It remembers the size of each memory slot it registered, which is what KVM_GET_DIRTY_LOG
    writes a bit for, and the XSAVE size its vCPUs' KVM_GET_XSAVE2 writes.
    """

    def __init__(self, fd: int, vcpu_mmap_size: int) -> None:
        super().__init__(fd)
        self._vcpu_mmap_size = vcpu_mmap_size
        # slot (the full u32: address space << 16 | id) -> memory_size, as the kernel has it.
        self._slot_sizes: dict[int, int] = {}
        # Per slot, KVM_GET_DIRTY_LOG's argument and the bitmap it points into, built once: a
        # fast reset reads the log after every run.
        self._dirty_logs: dict[int, tuple[kvm_dirty_log, bytearray, ctypes.Array[c_char]]] = {}
        self._xsave2_size: int | None = None

    def _describe(self) -> str:
        return "this VmFd"

    @property
    def slot_sizes(self) -> dict[int, int]:
        """A copy of ``{slot: memory_size}`` for every memory slot registered through this object."""
        with self._lock:
            return dict(self._slot_sizes)

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on the VM (some capabilities answer per VM)."""
        return self._ioctl_int("KVM_CHECK_EXTENSION", KVM_CHECK_EXTENSION, int(cap))

    def set_user_memory_region(self, slot: int, guest_phys_addr: int, memory_size: int,
                               userspace_addr: int, flags: int = 0) -> None:
        """KVM_SET_USER_MEMORY_REGION: map host memory into a guest slot (size 0 deletes it).

        ``slot`` is the kernel's u32: the address space in bits 16-31 and the slot id below.
        """
        _check_slot(slot)
        region = kvm_userspace_memory_region(slot, flags, guest_phys_addr, memory_size,
                                             userspace_addr)
        # One critical section with the bookkeeping: get_dirty_log never sees a size the kernel
        # no longer has.
        with self._lock:
            self._ioctl_buf("KVM_SET_USER_MEMORY_REGION", KVM_SET_USER_MEMORY_REGION, region)
            if memory_size:
                self._slot_sizes[slot] = memory_size
            else:
                self._slot_sizes.pop(slot, None)
            self._dirty_logs.pop(slot, None)

    def enable_cap(self, cap: int, *args: int, flags: int = 0) -> None:
        """KVM_ENABLE_CAP on the VM: turn on ``cap`` with up to four arguments.

        For instance ``enable_cap(Cap.KVM_CAP_X86_USER_SPACE_MSR, KVM_MSR_EXIT_REASON_UNKNOWN)``
        sends ``rdmsr`` / ``wrmsr`` of MSRs KVM does not know to user space.
        """
        self._ioctl_buf("KVM_ENABLE_CAP", KVM_ENABLE_CAP, _enable_cap(cap, args, flags))

    def create_irqchip(self) -> None:
        """KVM_CREATE_IRQCHIP: in-kernel PIC pair, IOAPIC and per-vCPU LAPICs."""
        self._ioctl_int("KVM_CREATE_IRQCHIP", KVM_CREATE_IRQCHIP, 0)

    def create_pit2(self, flags: int = KVM_PIT_SPEAKER_DUMMY) -> None:
        """KVM_CREATE_PIT2: the in-kernel 8254 (with the dummy speaker port by default)."""
        self._ioctl_buf("KVM_CREATE_PIT2", KVM_CREATE_PIT2, kvm_pit_config(flags))

    def set_tss_address(self, address: int) -> None:
        """KVM_SET_TSS_ADDR: three pages of guest-physical space KVM needs on Intel."""
        self._ioctl_int("KVM_SET_TSS_ADDR", KVM_SET_TSS_ADDR, address)

    def set_identity_map_address(self, address: int) -> None:
        """KVM_SET_IDENTITY_MAP_ADDR: one page for the real-mode identity map on Intel."""
        self._ioctl_buf("KVM_SET_IDENTITY_MAP_ADDR", KVM_SET_IDENTITY_MAP_ADDR, c_uint64(address))

    def irq_line(self, irq: int, level: int) -> None:
        """KVM_IRQ_LINE: drive an interrupt line of the in-kernel irqchip."""
        arg = kvm_irq_level(level=level)
        arg.irq = irq
        self._ioctl_buf("KVM_IRQ_LINE", KVM_IRQ_LINE, arg)

    def register_irqfd(self, eventfd: int, gsi: int, resamplefd: int | None = None) -> None:
        """KVM_IRQFD: raise ``gsi`` whenever ``eventfd`` is signalled."""
        arg = kvm_irqfd(fd=eventfd, gsi=gsi)
        if resamplefd is not None:
            arg.flags, arg.resamplefd = KVM_IRQFD_FLAG_RESAMPLE, resamplefd
        self._ioctl_buf("KVM_IRQFD", KVM_IRQFD, arg)

    def unregister_irqfd(self, eventfd: int, gsi: int) -> None:
        """KVM_IRQFD with KVM_IRQFD_FLAG_DEASSIGN."""
        self._ioctl_buf("KVM_IRQFD", KVM_IRQFD,
                        kvm_irqfd(fd=eventfd, gsi=gsi, flags=KVM_IRQFD_FLAG_DEASSIGN))

    def _ioeventfd(self, eventfd: int, addr: int, length: int, pio: bool, datamatch: int | None,
                   deassign: bool) -> None:
        flags = (KVM_IOEVENTFD_FLAG_PIO if pio else 0) | (
            KVM_IOEVENTFD_FLAG_DEASSIGN if deassign else 0)
        if datamatch is not None:
            flags |= KVM_IOEVENTFD_FLAG_DATAMATCH
        arg = kvm_ioeventfd(datamatch=datamatch or 0, addr=addr, len=length, fd=eventfd,
                            flags=flags)
        self._ioctl_buf("KVM_IOEVENTFD", KVM_IOEVENTFD, arg)

    def register_ioeventfd(self, eventfd: int, addr: int, length: int, *, pio: bool = False,
                           datamatch: int | None = None) -> None:
        """KVM_IOEVENTFD: signal ``eventfd`` on a guest write of ``length`` bytes at ``addr``."""
        self._ioeventfd(eventfd, addr, length, pio, datamatch, False)

    def unregister_ioeventfd(self, eventfd: int, addr: int, length: int, *, pio: bool = False,
                             datamatch: int | None = None) -> None:
        """KVM_IOEVENTFD with KVM_IOEVENTFD_FLAG_DEASSIGN; arguments as at registration."""
        self._ioeventfd(eventfd, addr, length, pio, datamatch, True)

    def get_irqchip(self, chip_id: int) -> kvm_irqchip:
        """KVM_GET_IRQCHIP for ``KVM_IRQCHIP_PIC_MASTER``, ``_PIC_SLAVE`` or ``_IOAPIC``."""
        chip = kvm_irqchip(chip_id=chip_id)
        self._ioctl_buf("KVM_GET_IRQCHIP", KVM_GET_IRQCHIP, chip)
        return chip

    def set_irqchip(self, chip: kvm_irqchip) -> None:
        """KVM_SET_IRQCHIP."""
        self._ioctl_buf("KVM_SET_IRQCHIP", KVM_SET_IRQCHIP, chip)

    def get_pit2(self) -> kvm_pit_state2:
        """KVM_GET_PIT2."""
        return self._get("KVM_GET_PIT2", KVM_GET_PIT2, kvm_pit_state2)

    def set_pit2(self, state: kvm_pit_state2) -> None:
        """KVM_SET_PIT2."""
        self._ioctl_buf("KVM_SET_PIT2", KVM_SET_PIT2, state)

    def get_clock(self) -> kvm_clock_data:
        """KVM_GET_CLOCK: the kvmclock value."""
        return self._get("KVM_GET_CLOCK", KVM_GET_CLOCK, kvm_clock_data)

    def set_clock(self, data: kvm_clock_data) -> None:
        """KVM_SET_CLOCK."""
        self._ioctl_buf("KVM_SET_CLOCK", KVM_SET_CLOCK, data)

    def get_dirty_log(self, slot: int, memory_size: int | None = None) -> bytearray:
        """KVM_GET_DIRTY_LOG: one bit per page of the slot (bit 0 = its first page), then cleared.

        The kernel writes a bit for every page of the slot as it was registered, so the bitmap is
        sized from the size :meth:`set_user_memory_region` gave. ``memory_size`` is optional and
        only checked against it.

        Raises:
            KernelBufferError: this object never registered ``slot`` (or deleted it), or
                ``memory_size`` is not the slot's size. Nothing is read from the kernel then.
        """
        _check_slot(slot)
        with self._lock:
            self._check_open("KVM_GET_DIRTY_LOG")
            registered = self._slot_sizes.get(slot)
            if registered is None:
                asked = "" if memory_size is None else f" (asked for {memory_size:#x} bytes)"
                raise KernelBufferError(
                    f"KVM_GET_DIRTY_LOG: memory slot {slot:#x} was not registered through this "
                    f"VmFd{asked}, so the size of its bitmap is unknown")
            if memory_size is not None and memory_size != registered:
                raise KernelBufferError(
                    f"KVM_GET_DIRTY_LOG: memory slot {slot:#x} is registered with {registered:#x} "
                    f"bytes, not the {memory_size:#x} asked for; the kernel writes a bit for every "
                    "page of the registered size")
            cached = self._dirty_logs.get(slot)
            if cached is None:
                pages = (registered + mmap.PAGESIZE - 1) // mmap.PAGESIZE
                # The kernel writes whole 64-bit words.
                bitmap = bytearray(((pages + 63) // 64) * 8)
                holder = (c_char * len(bitmap)).from_buffer(bitmap)
                arg = kvm_dirty_log(slot=slot)
                arg.dirty_bitmap = ctypes.addressof(holder)
                cached = self._dirty_logs[slot] = (arg, bitmap, holder)
            arg, bitmap, _ = cached
            self._ioctl_buf("KVM_GET_DIRTY_LOG", KVM_GET_DIRTY_LOG, arg)
            return bytearray(bitmap)

    @property
    def xsave2_size(self) -> int | None:
        """The bytes KVM_GET_XSAVE2 writes for this VM's vCPUs; None until the first vCPU exists.

        ``KVM_CAP_XSAVE2`` on the VM fd, at least ``sizeof(struct kvm_xsave)``.
        """
        return self._xsave2_size

    def create_vcpu(self, vcpu_id: int) -> VcpuFd:
        """KVM_CREATE_VCPU, with the vCPU's ``kvm_run`` page mapped at once."""
        fd = self._ioctl_int("KVM_CREATE_VCPU", KVM_CREATE_VCPU, vcpu_id)
        try:
            with self._lock:
                if self._xsave2_size is None:
                    # Asked after the first vCPU exists, not with the VM: the size follows the
                    # process's permission for large XSAVE features (AMX), which the process may
                    # still widen until its first vCPU is created and cannot change afterwards.
                    cap = self.check_extension(Cap.KVM_CAP_XSAVE2)
                    # 0 on kernels without KVM_GET_XSAVE2, which then writes nothing.
                    self._xsave2_size = max(cap, sizeof(kvm_xsave))
                xsave2_size = self._xsave2_size
        except BaseException:
            os.close(fd)
            raise
        return VcpuFd(fd, self._vcpu_mmap_size, vcpu_id=vcpu_id, xsave2_size=xsave2_size)


