"""The kernel interface: ioctl numbers, ``<linux/kvm.h>`` structures, and one wrapper per fd kind.

Everything here mirrors the kernel's x86-64 KVM ABI under the kernel's own names, so that the KVM API
document reads directly onto this module. Above it sit :mod:`kvmlib.memory`, :mod:`kvmlib.vcpu` and
:mod:`kvmlib.vm`; this module imports none of them.

Three thin wrappers own the three kinds of KVM file descriptor, in the manner of rust-vmm's
kvm-ioctls: :class:`Kvm` (``/dev/kvm``), :class:`VmFd` (one VM) and :class:`VcpuFd` (one vCPU, with its
``kvm_run`` page mapped once). Each method is one ioctl; a failure raises
:class:`~kvmlib.errors.KvmIoctlError` naming the ioctl and the errno.

Where the kernel decides how many bytes it writes (a dirty bitmap, an XSAVE area, a list), the buffer
is sized from what the kernel will write, never from a caller's guess: a size that cannot hold it
raises :class:`~kvmlib.errors.KernelBufferError` before the ioctl, and the lists grow until they
fit. Every wrapper is safe against a ``close()`` from another thread: an ioctl either runs on the fd
it was meant for or raises :class:`~kvmlib.errors.ClosedError`.
"""

from __future__ import annotations

import ctypes
import errno as _errno
import fcntl
import mmap
import os
import struct
import threading
from ctypes import (
    Structure,
    Union,
    c_char,
    c_int32,
    c_int64,
    c_uint8,
    c_uint16,
    c_uint32,
    c_uint64,
    sizeof,
)
from enum import IntEnum
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar
from typing import Union as TUnion

from kvmlib.errors import ClosedError, KernelBufferError, KvmIoctlError, KvmUnavailableError
from kvmlib.resources import Closeable

if TYPE_CHECKING:
    from collections.abc import Iterable

# --------------------------------------------------------------------------------------------------
# ioctl number encoding (asm-generic/ioctl.h, which x86-64 uses)
# --------------------------------------------------------------------------------------------------
_IOC_NRBITS = 8
_IOC_TYPEBITS = 8
_IOC_SIZEBITS = 14
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS
_IOC_NONE = 0
_IOC_WRITE = 1
_IOC_READ = 2


def _IOC(direction: int, type_: int, nr: int, size: int) -> int:
    """Encode an ioctl request number as the kernel's ``_IOC`` macro does."""
    if not 0 <= size < (1 << _IOC_SIZEBITS):
        raise ValueError(f"ioctl argument size {size} does not fit in {_IOC_SIZEBITS} bits")
    return (
        (direction << _IOC_DIRSHIFT)
        | (type_ << _IOC_TYPESHIFT)
        | (nr << _IOC_NRSHIFT)
        | (size << _IOC_SIZESHIFT)
    )


def _IO(type_: int, nr: int) -> int:
    """An ioctl with no argument structure."""
    return _IOC(_IOC_NONE, type_, nr, 0)


def _IOR(type_: int, nr: int, argtype: type[Any]) -> int:
    """An ioctl through which the kernel writes ``argtype`` to userspace."""
    return _IOC(_IOC_READ, type_, nr, sizeof(argtype))


def _IOW(type_: int, nr: int, argtype: type[Any]) -> int:
    """An ioctl through which userspace passes ``argtype`` to the kernel."""
    return _IOC(_IOC_WRITE, type_, nr, sizeof(argtype))


def _IOWR(type_: int, nr: int, argtype: type[Any]) -> int:
    """An ioctl whose ``argtype`` travels both ways."""
    return _IOC(_IOC_READ | _IOC_WRITE, type_, nr, sizeof(argtype))


KVMIO = 0xAE
KVM_API_VERSION = 12

# --------------------------------------------------------------------------------------------------
# Structures (x86-64). Field names and order are the kernel's; tests/test_layout.py proves it.
# Helper types for the kernel's anonymous inner structs/unions start with an underscore.
# --------------------------------------------------------------------------------------------------


class kvm_userspace_memory_region(Structure):
    """``struct kvm_userspace_memory_region``: one guest-physical slot backed by host memory."""

    _fields_ = [
        ("slot", c_uint32),
        ("flags", c_uint32),
        ("guest_phys_addr", c_uint64),
        ("memory_size", c_uint64),
        ("userspace_addr", c_uint64),
    ]


class _kvm_irq_level_u(Union):
    _fields_ = [("irq", c_uint32), ("status", c_int32)]


class kvm_irq_level(Structure):
    """``struct kvm_irq_level`` for KVM_IRQ_LINE."""

    _anonymous_ = ("_u",)
    _fields_ = [("_u", _kvm_irq_level_u), ("level", c_uint32)]


class kvm_pic_state(Structure):
    """``struct kvm_pic_state``: one 8259 PIC."""

    _fields_ = [
        (name, c_uint8)
        for name in (
            "last_irr", "irr", "imr", "isr", "priority_add", "irq_base", "read_reg_select",
            "poll", "special_mask", "init_state", "auto_eoi", "rotate_on_auto_eoi",
            "special_fully_nested_mode", "init4", "elcr", "elcr_mask",
        )
    ]


KVM_IOAPIC_NUM_PINS = 24


class _kvm_ioapic_redirtbl_fields(Structure):
    _fields_ = [
        ("vector", c_uint8),
        ("delivery_mode", c_uint8, 3),
        ("dest_mode", c_uint8, 1),
        ("delivery_status", c_uint8, 1),
        ("polarity", c_uint8, 1),
        ("remote_irr", c_uint8, 1),
        ("trig_mode", c_uint8, 1),
        ("mask", c_uint8, 1),
        ("reserve", c_uint8, 7),
        ("reserved", c_uint8 * 4),
        ("dest_id", c_uint8),
    ]


class _kvm_ioapic_redirtbl(Union):
    _fields_ = [("bits", c_uint64), ("fields", _kvm_ioapic_redirtbl_fields)]


class kvm_ioapic_state(Structure):
    """``struct kvm_ioapic_state``: the in-kernel IOAPIC."""

    _fields_ = [
        ("base_address", c_uint64),
        ("ioregsel", c_uint32),
        ("id", c_uint32),
        ("irr", c_uint32),
        ("pad", c_uint32),
        ("redirtbl", _kvm_ioapic_redirtbl * KVM_IOAPIC_NUM_PINS),
    ]


class _kvm_irqchip_chip(Union):
    _fields_ = [("dummy", c_char * 512), ("pic", kvm_pic_state), ("ioapic", kvm_ioapic_state)]


KVM_IRQCHIP_PIC_MASTER = 0
KVM_IRQCHIP_PIC_SLAVE = 1
KVM_IRQCHIP_IOAPIC = 2
KVM_NR_IRQCHIPS = 3


class kvm_irqchip(Structure):
    """``struct kvm_irqchip``: the state of one in-kernel interrupt controller (``chip_id``)."""

    _fields_ = [("chip_id", c_uint32), ("pad", c_uint32), ("chip", _kvm_irqchip_chip)]


class kvm_pit_config(Structure):
    """``struct kvm_pit_config`` for KVM_CREATE_PIT2."""

    _fields_ = [("flags", c_uint32), ("pad", c_uint32 * 15)]


KVM_PIT_SPEAKER_DUMMY = 1

# kvm_clock_data.flags
KVM_CLOCK_TSC_STABLE = 2
KVM_CLOCK_REALTIME = 1 << 2
KVM_CLOCK_HOST_TSC = 1 << 3


class kvm_regs(Structure):
    """``struct kvm_regs``: the general-purpose registers, RIP and RFLAGS."""

    _fields_ = [
        (name, c_uint64)
        for name in (
            "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
            "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags",
        )
    ]


KVM_APIC_REG_SIZE = 0x400


class kvm_lapic_state(Structure):
    """``struct kvm_lapic_state``: the local APIC's 1 KiB register page."""

    _fields_ = [("regs", c_char * KVM_APIC_REG_SIZE)]


class kvm_segment(Structure):
    """``struct kvm_segment``: one segment register in unpacked form."""

    _fields_ = [
        ("base", c_uint64),
        ("limit", c_uint32),
        ("selector", c_uint16),
        ("type", c_uint8),
        ("present", c_uint8),
        ("dpl", c_uint8),
        ("db", c_uint8),
        ("s", c_uint8),
        ("l", c_uint8),
        ("g", c_uint8),
        ("avl", c_uint8),
        ("unusable", c_uint8),
        ("padding", c_uint8),
    ]


class kvm_dtable(Structure):
    """``struct kvm_dtable``: a descriptor-table register (GDTR / IDTR)."""

    _fields_ = [("base", c_uint64), ("limit", c_uint16), ("padding", c_uint16 * 3)]


KVM_NR_INTERRUPTS = 256


class kvm_sregs(Structure):
    """``struct kvm_sregs``: segment, descriptor-table and control registers."""

    _fields_ = [
        *((name, kvm_segment) for name in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")),
        ("gdt", kvm_dtable),
        ("idt", kvm_dtable),
        *((name, c_uint64) for name in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")),
        ("interrupt_bitmap", c_uint64 * ((KVM_NR_INTERRUPTS + 63) // 64)),
    ]


class kvm_fpu(Structure):
    """``struct kvm_fpu``: x87 and SSE state in FXSAVE form."""

    _fields_ = [
        ("fpr", (c_uint8 * 16) * 8),
        ("fcw", c_uint16),
        ("fsw", c_uint16),
        ("ftwx", c_uint8),
        ("pad1", c_uint8),
        ("last_opcode", c_uint16),
        ("last_ip", c_uint64),
        ("last_dp", c_uint64),
        ("xmm", (c_uint8 * 16) * 16),
        ("mxcsr", c_uint32),
        ("pad2", c_uint32),
    ]


class kvm_msr_entry(Structure):
    """``struct kvm_msr_entry``: one MSR index and value."""

    _fields_ = [("index", c_uint32), ("reserved", c_uint32), ("data", c_uint64)]


class kvm_msrs(Structure):
    """``struct kvm_msrs`` header; build one with room for N entries with :func:`make_kvm_msrs`."""

    _fields_ = [("nmsrs", c_uint32), ("pad", c_uint32), ("entries", kvm_msr_entry * 0)]


class kvm_msr_list(Structure):
    """``struct kvm_msr_list`` header; see :func:`make_kvm_msr_list`."""

    _fields_ = [("nmsrs", c_uint32), ("indices", c_uint32 * 0)]


class kvm_cpuid_entry2(Structure):
    """``struct kvm_cpuid_entry2``: one CPUID leaf / subleaf."""

    _fields_ = [
        ("function", c_uint32),
        ("index", c_uint32),
        ("flags", c_uint32),
        ("eax", c_uint32),
        ("ebx", c_uint32),
        ("ecx", c_uint32),
        ("edx", c_uint32),
        ("padding", c_uint32 * 3),
    ]


KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1 << 0


class kvm_cpuid2(Structure):
    """``struct kvm_cpuid2`` header; see :func:`make_kvm_cpuid2`."""

    _fields_ = [("nent", c_uint32), ("padding", c_uint32), ("entries", kvm_cpuid_entry2 * 0)]


class kvm_pit_channel_state(Structure):
    """``struct kvm_pit_channel_state``: one 8254 PIT channel."""

    _fields_ = [
        ("count", c_uint32),
        ("latched_count", c_uint16),
        ("count_latched", c_uint8),
        ("status_latched", c_uint8),
        ("status", c_uint8),
        ("read_state", c_uint8),
        ("write_state", c_uint8),
        ("write_latch", c_uint8),
        ("rw_mode", c_uint8),
        ("mode", c_uint8),
        ("bcd", c_uint8),
        ("gate", c_uint8),
        ("count_load_time", c_int64),
    ]


class kvm_pit_state2(Structure):
    """``struct kvm_pit_state2``: the in-kernel PIT."""

    _fields_ = [
        ("channels", kvm_pit_channel_state * 3),
        ("flags", c_uint32),
        ("reserved", c_uint32 * 9),
    ]


class kvm_debug_exit_arch(Structure):
    """``struct kvm_debug_exit_arch``: what a KVM_EXIT_DEBUG reports."""

    _fields_ = [("exception", c_uint32), ("pad", c_uint32), ("pc", c_uint64), ("dr6", c_uint64),
                ("dr7", c_uint64)]


class kvm_guest_debug_arch(Structure):
    """``struct kvm_guest_debug_arch``: the debug registers for KVM_SET_GUEST_DEBUG."""

    _fields_ = [("debugreg", c_uint64 * 8)]


class kvm_guest_debug(Structure):
    """``struct kvm_guest_debug`` for KVM_SET_GUEST_DEBUG."""

    _fields_ = [("control", c_uint32), ("pad", c_uint32), ("arch", kvm_guest_debug_arch)]


KVM_GUESTDBG_ENABLE = 0x00000001
KVM_GUESTDBG_SINGLESTEP = 0x00000002


class _kvm_vcpu_events_exception(Structure):
    _fields_ = [("injected", c_uint8), ("nr", c_uint8), ("has_error_code", c_uint8),
                ("pending", c_uint8), ("error_code", c_uint32)]


class _kvm_vcpu_events_interrupt(Structure):
    _fields_ = [("injected", c_uint8), ("nr", c_uint8), ("soft", c_uint8), ("shadow", c_uint8)]


class _kvm_vcpu_events_nmi(Structure):
    _fields_ = [("injected", c_uint8), ("pending", c_uint8), ("masked", c_uint8), ("pad", c_uint8)]


class _kvm_vcpu_events_smi(Structure):
    _fields_ = [("smm", c_uint8), ("pending", c_uint8), ("smm_inside_nmi", c_uint8),
                ("latched_init", c_uint8)]


class _kvm_vcpu_events_triple_fault(Structure):
    _fields_ = [("pending", c_uint8)]


class kvm_vcpu_events(Structure):
    """``struct kvm_vcpu_events``: pending exceptions, interrupts, NMIs and SMIs."""

    _fields_ = [
        ("exception", _kvm_vcpu_events_exception),
        ("interrupt", _kvm_vcpu_events_interrupt),
        ("nmi", _kvm_vcpu_events_nmi),
        ("sipi_vector", c_uint32),
        ("flags", c_uint32),
        ("smi", _kvm_vcpu_events_smi),
        ("triple_fault", _kvm_vcpu_events_triple_fault),
        ("reserved", c_uint8 * 26),
        ("exception_has_payload", c_uint8),
        ("exception_payload", c_uint64),
    ]


class kvm_debugregs(Structure):
    """``struct kvm_debugregs``: DR0-DR3, DR6 and DR7."""

    _fields_ = [("db", c_uint64 * 4), ("dr6", c_uint64), ("dr7", c_uint64), ("flags", c_uint64),
                ("reserved", c_uint64 * 9)]


class kvm_xsave(Structure):
    """``struct kvm_xsave``: the XSAVE area (4 KiB; KVM_GET_XSAVE2 may need more)."""

    _fields_ = [("region", c_uint32 * 1024), ("extra", c_uint32 * 0)]


KVM_MAX_XCRS = 16


class kvm_xcr(Structure):
    """``struct kvm_xcr``: one extended control register."""

    _fields_ = [("xcr", c_uint32), ("reserved", c_uint32), ("value", c_uint64)]


class kvm_xcrs(Structure):
    """``struct kvm_xcrs``: the extended control registers (XCR0)."""

    _fields_ = [("nr_xcrs", c_uint32), ("flags", c_uint32), ("xcrs", kvm_xcr * KVM_MAX_XCRS),
                ("padding", c_uint64 * 16)]


class kvm_sync_regs(Structure):
    """``struct kvm_sync_regs``: registers shared through ``kvm_run`` with KVM_CAP_SYNC_REGS."""

    _fields_ = [("regs", kvm_regs), ("sregs", kvm_sregs), ("events", kvm_vcpu_events)]


class kvm_mp_state(Structure):
    """``struct kvm_mp_state``: the vCPU's multiprocessing state (``KVM_MP_STATE_*``)."""

    _fields_ = [("mp_state", c_uint32)]


KVM_MP_STATE_RUNNABLE = 0
KVM_MP_STATE_UNINITIALIZED = 1
KVM_MP_STATE_INIT_RECEIVED = 2
KVM_MP_STATE_HALTED = 3
KVM_MP_STATE_SIPI_RECEIVED = 4


class kvm_clock_data(Structure):
    """``struct kvm_clock_data`` for KVM_GET_CLOCK / KVM_SET_CLOCK."""

    _fields_ = [("clock", c_uint64), ("flags", c_uint32), ("pad0", c_uint32),
                ("realtime", c_uint64), ("host_tsc", c_uint64), ("pad", c_uint32 * 4)]


class _kvm_dirty_log_u(Union):
    _fields_ = [("dirty_bitmap", ctypes.c_void_p), ("padding2", c_uint64)]


class kvm_dirty_log(Structure):
    """``struct kvm_dirty_log`` for KVM_GET_DIRTY_LOG."""

    _anonymous_ = ("_u",)
    _fields_ = [("slot", c_uint32), ("padding1", c_uint32), ("_u", _kvm_dirty_log_u)]


class kvm_irqfd(Structure):
    """``struct kvm_irqfd``: route an eventfd to a GSI."""

    _fields_ = [("fd", c_uint32), ("gsi", c_uint32), ("flags", c_uint32), ("resamplefd", c_uint32),
                ("pad", c_uint8 * 16)]


KVM_IRQFD_FLAG_DEASSIGN = 1 << 0
KVM_IRQFD_FLAG_RESAMPLE = 1 << 1


class kvm_ioeventfd(Structure):
    """``struct kvm_ioeventfd``: signal an eventfd on a guest PIO/MMIO write."""

    _fields_ = [("datamatch", c_uint64), ("addr", c_uint64), ("len", c_uint32), ("fd", c_int32),
                ("flags", c_uint32), ("pad", c_uint8 * 36)]


KVM_IOEVENTFD_FLAG_DATAMATCH = 1 << 0
KVM_IOEVENTFD_FLAG_PIO = 1 << 1
KVM_IOEVENTFD_FLAG_DEASSIGN = 1 << 2

KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1

# ---- kvm_run and its exit union ----


class _kvm_run_hw(Structure):
    _fields_ = [("hardware_exit_reason", c_uint64)]


class _kvm_run_fail_entry(Structure):
    _fields_ = [("hardware_entry_failure_reason", c_uint64), ("cpu", c_uint32)]


class _kvm_run_ex(Structure):
    _fields_ = [("exception", c_uint32), ("error_code", c_uint32)]


class _kvm_run_io(Structure):
    _fields_ = [("direction", c_uint8), ("size", c_uint8), ("port", c_uint16), ("count", c_uint32),
                ("data_offset", c_uint64)]


class _kvm_run_debug(Structure):
    _fields_ = [("arch", kvm_debug_exit_arch)]


class _kvm_run_mmio(Structure):
    _fields_ = [("phys_addr", c_uint64), ("data", c_uint8 * 8), ("len", c_uint32),
                ("is_write", c_uint8)]


class _kvm_run_internal(Structure):
    _fields_ = [("suberror", c_uint32), ("ndata", c_uint32), ("data", c_uint64 * 16)]


class _kvm_run_system_event_u(Union):
    _fields_ = [("flags", c_uint64), ("data", c_uint64 * 16)]


class _kvm_run_system_event(Structure):
    _anonymous_ = ("_u",)
    _fields_ = [("type", c_uint32), ("ndata", c_uint32), ("_u", _kvm_run_system_event_u)]


class _kvm_run_exit(Union):
    _fields_ = [
        ("hw", _kvm_run_hw),
        ("fail_entry", _kvm_run_fail_entry),
        ("ex", _kvm_run_ex),
        ("io", _kvm_run_io),
        ("debug", _kvm_run_debug),
        ("mmio", _kvm_run_mmio),
        ("internal", _kvm_run_internal),
        ("system_event", _kvm_run_system_event),
        # The other exits (hypercall, s390, papr, ...) are reached through these raw bytes.
        ("padding", c_char * 256),
    ]


SYNC_REGS_SIZE_BYTES = 2048


class _kvm_run_s(Union):
    _fields_ = [("regs", kvm_sync_regs), ("padding", c_char * SYNC_REGS_SIZE_BYTES)]


class kvm_run(Structure):
    """``struct kvm_run``: the page shared with the kernel through which KVM_RUN reports exits."""

    _anonymous_ = ("_exit",)
    _fields_ = [
        ("request_interrupt_window", c_uint8),
        ("immediate_exit", c_uint8),
        ("padding1", c_uint8 * 6),
        ("exit_reason", c_uint32),
        ("ready_for_interrupt_injection", c_uint8),
        ("if_flag", c_uint8),
        ("flags", c_uint16),
        ("cr8", c_uint64),
        ("apic_base", c_uint64),
        ("_exit", _kvm_run_exit),
        ("kvm_valid_regs", c_uint64),
        ("kvm_dirty_regs", c_uint64),
        ("s", _kvm_run_s),
    ]


#: The structures whose layout tests/test_layout.py checks against ``<linux/kvm.h>``.
KERNEL_STRUCTS: tuple[type[Structure], ...] = (
    kvm_userspace_memory_region, kvm_irq_level, kvm_pic_state, kvm_ioapic_state, kvm_irqchip,
    kvm_pit_config, kvm_regs, kvm_lapic_state, kvm_segment, kvm_dtable, kvm_sregs, kvm_fpu,
    kvm_msr_entry, kvm_msrs, kvm_msr_list, kvm_cpuid_entry2, kvm_cpuid2, kvm_pit_channel_state,
    kvm_pit_state2, kvm_debug_exit_arch, kvm_guest_debug_arch, kvm_guest_debug, kvm_vcpu_events,
    kvm_debugregs, kvm_xsave, kvm_xcr, kvm_xcrs, kvm_sync_regs, kvm_mp_state, kvm_clock_data,
    kvm_dirty_log, kvm_irqfd, kvm_ioeventfd, kvm_run,
)

# ---- variable-length structures ----

_S = TypeVar("_S", bound=Structure)
_flex_cache: dict[tuple[type[Structure], int], type[Structure]] = {}


def _flex_type(base: type[_S], element: type[Any], n: int) -> type[_S]:
    """A subclass of ``base`` whose trailing flexible array holds ``n`` elements."""
    if n < 0:
        raise ValueError(f"entry count must be >= 0, not {n}")
    key = (base, n)
    cls = _flex_cache.get(key)
    if cls is None:
        head = [f for f in base._fields_[:-1]]
        name = base._fields_[-1][0]
        cls = type(f"{base.__name__}_{n}", (Structure,), {"_fields_": [*head, (name, element * n)]})
        _flex_cache[key] = cls
    return cls  # type: ignore[return-value]


def make_kvm_msrs(entries: Iterable[tuple[int, int]] | int) -> Any:
    """A ``kvm_msrs`` with room for N entries, or filled from ``(index, data)`` pairs."""
    items = [] if isinstance(entries, int) else list(entries)
    n = entries if isinstance(entries, int) else len(items)
    obj = _flex_type(kvm_msrs, kvm_msr_entry, n)()
    obj.nmsrs = n
    for i, (index, data) in enumerate(items):
        obj.entries[i].index = index
        obj.entries[i].data = data
    return obj


def make_kvm_msr_list(n: int) -> Any:
    """A ``kvm_msr_list`` with room for ``n`` indices."""
    obj = _flex_type(kvm_msr_list, c_uint32, n)()
    obj.nmsrs = n
    return obj


def make_kvm_cpuid2(entries: Iterable[kvm_cpuid_entry2] | int) -> Any:
    """A ``kvm_cpuid2`` with room for N entries, or holding copies of the given entries."""
    items = [] if isinstance(entries, int) else list(entries)
    n = entries if isinstance(entries, int) else len(items)
    obj = _flex_type(kvm_cpuid2, kvm_cpuid_entry2, n)()
    obj.nent = n
    for i, e in enumerate(items):
        ctypes.memmove(ctypes.addressof(obj.entries[i]), ctypes.addressof(e), sizeof(e))
    return obj


# --------------------------------------------------------------------------------------------------
# ioctl numbers
# --------------------------------------------------------------------------------------------------
# system ioctls
KVM_GET_API_VERSION = _IO(KVMIO, 0x00)
KVM_CREATE_VM = _IO(KVMIO, 0x01)
KVM_GET_MSR_INDEX_LIST = _IOWR(KVMIO, 0x02, kvm_msr_list)
KVM_CHECK_EXTENSION = _IO(KVMIO, 0x03)
KVM_GET_VCPU_MMAP_SIZE = _IO(KVMIO, 0x04)
KVM_GET_SUPPORTED_CPUID = _IOWR(KVMIO, 0x05, kvm_cpuid2)
KVM_GET_MSR_FEATURE_INDEX_LIST = _IOWR(KVMIO, 0x0A, kvm_msr_list)
# VM ioctls
KVM_CREATE_VCPU = _IO(KVMIO, 0x41)
KVM_GET_DIRTY_LOG = _IOW(KVMIO, 0x42, kvm_dirty_log)
KVM_SET_USER_MEMORY_REGION = _IOW(KVMIO, 0x46, kvm_userspace_memory_region)
KVM_SET_TSS_ADDR = _IO(KVMIO, 0x47)
KVM_SET_IDENTITY_MAP_ADDR = _IOW(KVMIO, 0x48, c_uint64)
KVM_CREATE_IRQCHIP = _IO(KVMIO, 0x60)
KVM_IRQ_LINE = _IOW(KVMIO, 0x61, kvm_irq_level)
KVM_GET_IRQCHIP = _IOWR(KVMIO, 0x62, kvm_irqchip)
KVM_SET_IRQCHIP = _IOR(KVMIO, 0x63, kvm_irqchip)
KVM_IRQ_LINE_STATUS = _IOWR(KVMIO, 0x67, kvm_irq_level)
KVM_IRQFD = _IOW(KVMIO, 0x76, kvm_irqfd)
KVM_CREATE_PIT2 = _IOW(KVMIO, 0x77, kvm_pit_config)
KVM_IOEVENTFD = _IOW(KVMIO, 0x79, kvm_ioeventfd)
KVM_SET_CLOCK = _IOW(KVMIO, 0x7B, kvm_clock_data)
KVM_GET_CLOCK = _IOR(KVMIO, 0x7C, kvm_clock_data)
KVM_GET_PIT2 = _IOR(KVMIO, 0x9F, kvm_pit_state2)
KVM_SET_PIT2 = _IOW(KVMIO, 0xA0, kvm_pit_state2)
# vCPU ioctls
KVM_RUN = _IO(KVMIO, 0x80)
KVM_GET_REGS = _IOR(KVMIO, 0x81, kvm_regs)
KVM_SET_REGS = _IOW(KVMIO, 0x82, kvm_regs)
KVM_GET_SREGS = _IOR(KVMIO, 0x83, kvm_sregs)
KVM_SET_SREGS = _IOW(KVMIO, 0x84, kvm_sregs)
KVM_GET_MSRS = _IOWR(KVMIO, 0x88, kvm_msrs)
KVM_SET_MSRS = _IOW(KVMIO, 0x89, kvm_msrs)
KVM_GET_FPU = _IOR(KVMIO, 0x8C, kvm_fpu)
KVM_SET_FPU = _IOW(KVMIO, 0x8D, kvm_fpu)
KVM_GET_LAPIC = _IOR(KVMIO, 0x8E, kvm_lapic_state)
KVM_SET_LAPIC = _IOW(KVMIO, 0x8F, kvm_lapic_state)
KVM_SET_CPUID2 = _IOW(KVMIO, 0x90, kvm_cpuid2)
KVM_GET_CPUID2 = _IOWR(KVMIO, 0x91, kvm_cpuid2)
KVM_GET_MP_STATE = _IOR(KVMIO, 0x98, kvm_mp_state)
KVM_SET_MP_STATE = _IOW(KVMIO, 0x99, kvm_mp_state)
KVM_NMI = _IO(KVMIO, 0x9A)
KVM_SET_GUEST_DEBUG = _IOW(KVMIO, 0x9B, kvm_guest_debug)
KVM_GET_VCPU_EVENTS = _IOR(KVMIO, 0x9F, kvm_vcpu_events)
KVM_SET_VCPU_EVENTS = _IOW(KVMIO, 0xA0, kvm_vcpu_events)
KVM_GET_DEBUGREGS = _IOR(KVMIO, 0xA1, kvm_debugregs)
KVM_SET_DEBUGREGS = _IOW(KVMIO, 0xA2, kvm_debugregs)
KVM_GET_XSAVE = _IOR(KVMIO, 0xA4, kvm_xsave)
KVM_SET_XSAVE = _IOW(KVMIO, 0xA5, kvm_xsave)
KVM_GET_XSAVE2 = _IOR(KVMIO, 0xCF, kvm_xsave)
KVM_GET_XCRS = _IOR(KVMIO, 0xA6, kvm_xcrs)
KVM_SET_XCRS = _IOW(KVMIO, 0xA7, kvm_xcrs)
KVM_KVMCLOCK_CTRL = _IO(KVMIO, 0xAD)

# exit reasons
KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_IRQ_WINDOW_OPEN = 7
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24
KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1
KVM_INTERNAL_ERROR_EMULATION = 1
KVM_SYSTEM_EVENT_SHUTDOWN = 1
KVM_SYSTEM_EVENT_RESET = 2
KVM_SYSTEM_EVENT_CRASH = 3


class Cap(IntEnum):
    """KVM capabilities for :meth:`Kvm.check_extension` (``KVM_CAP_*``)."""

    KVM_CAP_IRQCHIP = 0
    KVM_CAP_HLT = 1
    KVM_CAP_USER_MEMORY = 3
    KVM_CAP_SET_TSS_ADDR = 4
    KVM_CAP_EXT_CPUID = 7
    KVM_CAP_NR_VCPUS = 9
    KVM_CAP_NR_MEMSLOTS = 10
    KVM_CAP_PIT = 11
    KVM_CAP_MP_STATE = 14
    KVM_CAP_SYNC_MMU = 16
    KVM_CAP_USER_NMI = 22
    KVM_CAP_SET_GUEST_DEBUG = 23
    KVM_CAP_IRQ_ROUTING = 25
    KVM_CAP_IRQFD = 32
    KVM_CAP_PIT2 = 33
    KVM_CAP_PIT_STATE2 = 35
    KVM_CAP_IOEVENTFD = 36
    KVM_CAP_SET_IDENTITY_MAP_ADDR = 37
    KVM_CAP_ADJUST_CLOCK = 39
    KVM_CAP_INTERNAL_ERROR_DATA = 40
    KVM_CAP_VCPU_EVENTS = 41
    KVM_CAP_DEBUGREGS = 50
    KVM_CAP_XSAVE = 55
    KVM_CAP_XCRS = 56
    KVM_CAP_MAX_VCPUS = 66
    KVM_CAP_READONLY_MEM = 81
    KVM_CAP_MAX_VCPU_ID = 128
    KVM_CAP_IMMEDIATE_EXIT = 136
    KVM_CAP_XSAVE2 = 208


# --------------------------------------------------------------------------------------------------
# Exits
# --------------------------------------------------------------------------------------------------


class IoIn(NamedTuple):
    """A guest ``in``: write the answer into ``data`` (a writable view into ``kvm_run``)."""

    port: int
    size: int
    count: int  # type: ignore[assignment]  # the kernel's name, shadowing tuple.count on purpose
    data: memoryview


class IoOut(NamedTuple):
    """A guest ``out``: ``data`` holds ``size * count`` bytes the guest wrote."""

    port: int
    size: int
    count: int  # type: ignore[assignment]  # the kernel's name, shadowing tuple.count on purpose
    data: memoryview


class MmioRead(NamedTuple):
    """A guest read of unbacked memory: write the answer into ``data`` (a view into ``kvm_run``)."""

    address: int
    data: memoryview


class MmioWrite(NamedTuple):
    """A guest write to unbacked (or read-only) memory."""

    address: int
    data: memoryview


class _Singleton:
    """An exit with no payload: every instance equals every other of its class, and only those."""

    __slots__ = ()

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self)

    def __hash__(self) -> int:
        return hash(type(self))

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Hlt(_Singleton):
    """The guest executed ``hlt`` with no in-kernel irqchip to wait on."""

    __slots__ = ()


class Shutdown(_Singleton):
    """The guest shut down (on x86 typically a triple fault)."""

    __slots__ = ()


class Intr(_Singleton):
    """KVM_RUN returned because of a signal or ``immediate_exit`` (EINTR)."""

    __slots__ = ()


class SystemEvent(NamedTuple):
    """KVM_EXIT_SYSTEM_EVENT: ``type`` is a ``KVM_SYSTEM_EVENT_*`` value."""

    type: int
    data: tuple[int, ...]


class InternalError(NamedTuple):
    """KVM_EXIT_INTERNAL_ERROR: KVM could not handle the guest (e.g. emulation failed)."""

    suberror: int
    data: tuple[int, ...]


class FailEntry(NamedTuple):
    """KVM_EXIT_FAIL_ENTRY: the hardware refused to enter the guest."""

    reason: int
    cpu: int = 0


class Unknown(NamedTuple):
    """Any other exit reason; ``reason`` is the raw ``exit_reason``."""

    reason: int


def _eq_same_type(self: tuple[Any, ...], other: object) -> bool:
    return type(other) is type(self) and tuple.__eq__(self, other) is True


def _ne_same_type(self: tuple[Any, ...], other: object) -> bool:
    return not _eq_same_type(self, other)


def _hash_with_type(self: tuple[Any, ...]) -> int:
    return hash((type(self), tuple(self)))


# Exits with the same fields must still differ by kind: IoIn(...) never equals IoOut(...).
for _cls in (IoIn, IoOut, MmioRead, MmioWrite, SystemEvent, InternalError, FailEntry, Unknown):
    _cls.__eq__ = _eq_same_type  # type: ignore[method-assign]
    _cls.__ne__ = _ne_same_type  # type: ignore[method-assign, assignment]
    _cls.__hash__ = _hash_with_type  # type: ignore[method-assign]
del _cls

VcpuExit = TUnion[IoIn, IoOut, MmioRead, MmioWrite, Hlt, Shutdown, Intr, SystemEvent, InternalError,
                  FailEntry, Unknown]
"""The decoded result of :meth:`VcpuFd.run`."""

_HLT = Hlt()
_SHUTDOWN = Shutdown()
_INTR = Intr()

# Offsets inside kvm_run that the hot path reads with precompiled unpackers instead of ctypes
# attribute access (which allocates and is several times slower).
_EXIT_REASON_OFF = kvm_run.exit_reason.offset
_EXIT_OFF = kvm_run._exit.offset
# exit_reason and, when it is KVM_EXIT_IO, the io header, in one unpack.
_HEAD_UNPACK = struct.Struct(f"<I{_EXIT_OFF - _EXIT_REASON_OFF - 4}xBBHIQ").unpack_from
_MMIO_UNPACK = struct.Struct("<Q8sIB").unpack_from
_MMIO_DATA_OFF = _EXIT_OFF + _kvm_run_mmio.data.offset
_INTERNAL_UNPACK = struct.Struct("<II16Q").unpack_from
_SYSEV_UNPACK = struct.Struct("<II16Q").unpack_from
_FAIL_UNPACK = struct.Struct("<QI").unpack_from
# tuple.__new__ skips the Python-level __new__ NamedTuple generates: the exit loop's largest cost.
_tuple_new = tuple.__new__
_IMMEDIATE_EXIT_OFF = kvm_run.immediate_exit.offset


# --------------------------------------------------------------------------------------------------
# fd wrappers
# --------------------------------------------------------------------------------------------------
_Buf = TUnion[Structure, Union, "ctypes.Array[Any]", "ctypes._SimpleCData[Any]", bytearray]

_libc = ctypes.CDLL(None, use_errno=True)
_libc_ioctl = _libc.ioctl
_libc_ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong)
_libc_ioctl.restype = ctypes.c_int
_ioctl = fcntl.ioctl
# KVM_RUN's own entry point, without argtypes: the fastest call Python can make to ioctl(2). Its
# three arguments all fit a C int, the default conversion. fcntl.ioctl costs about a microsecond
# more per call, because it first tries (and fails) to read its argument as a buffer.
_run_ioctl = ctypes.CDLL(None, use_errno=True).ioctl
_get_errno = ctypes.get_errno


_T = TypeVar("_T", bound=Structure)
_IOC_SIZEMASK = (1 << _IOC_SIZEBITS) - 1


def _buffer_size(buf: _Buf) -> int:
    return len(buf) if isinstance(buf, bytearray) else sizeof(buf)


class _FdOwner(Closeable):
    """Owns one fd: ``close()`` is idempotent and the object is a context manager.

    A per-object lock is held across every ioctl (but KVM_RUN, see :meth:`VcpuFd.run`) and across
    :meth:`close`: without it, a ``close()`` between reading the fd and the ioctl would let the ioctl
    reach whatever file the kernel next gave that fd number.
    """

    _fd: int

    def __init__(self, fd: int) -> None:
        self._fd = fd
        # Reentrant: a method holding it may call another ioctl method, and a signal handler that
        # runs on a thread holding it may still use the object.
        self._lock = threading.RLock()

    @property
    def fd(self) -> int:
        """The raw file descriptor (-1 once closed)."""
        return self._fd

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has run."""
        return self._fd < 0

    def close(self) -> None:
        """Close the file descriptor; calling it again does nothing.

        Waits for an ioctl another thread is making on this object (never for a KVM_RUN).
        """
        with self._lock:
            fd, self._fd = self._fd, -1
            if fd >= 0:
                os.close(fd)

    def __del__(self) -> None:
        # A safety net only: owners are expected to be closed explicitly.
        try:
            self.close()
        except Exception:
            pass

    def _describe(self) -> str:
        return f"this {type(self).__name__}"

    def _closed_error(self, name: str) -> ClosedError:
        return ClosedError(f"{name}: {self._describe()} is closed")

    def _check_open(self, name: str) -> int:
        """The fd, or ClosedError; call with the lock held, and keep it across the fd's use."""
        fd = self._fd
        if fd < 0:
            raise self._closed_error(name)
        return fd

    def _ioctl_int(self, name: str, request: int, arg: int = 0) -> int:
        with self._lock:
            fd = self._check_open(name)
            # libc's ioctl, not fcntl.ioctl: the latter passes a C int, and some arguments (guest
            # addresses) are unsigned longs above 2**31.
            ret: int = _libc_ioctl(fd, request, arg)
            if ret < 0:
                raise KvmIoctlError(name, ctypes.get_errno())
        return ret

    def _ioctl_buf(self, name: str, request: int, buf: _Buf) -> int:
        # The size encoded in the request is what the kernel copies for a fixed-size argument, and
        # the header it reads first for a variable one: a smaller buffer would be overrun.
        need = (request >> _IOC_SIZESHIFT) & _IOC_SIZEMASK
        have = _buffer_size(buf)
        if have < need:
            raise KernelBufferError(f"{name} needs a buffer of at least {need} bytes, not {have}")
        with self._lock:
            fd = self._check_open(name)
            try:
                ret: int = fcntl.ioctl(fd, request, buf, True)
            except OSError as e:
                raise KvmIoctlError(name, e.errno or 0) from None
        return ret

    def _get(self, name: str, request: int, cls: type[_T]) -> _T:
        obj = cls()
        self._ioctl_buf(name, request, obj)
        return obj

    def _get_growing(self, name: str, request: int, make: Any, count_field: str,
                     start: int) -> Any:
        # The list ioctls write at most as many entries as the count field allows and answer E2BIG
        # when that is too few (KVM_GET_MSR_INDEX_LIST also writes back the count it needs).
        n = max(start, 1)
        while True:
            obj = make(n)
            try:
                self._ioctl_buf(name, request, obj)
            except KvmIoctlError as e:
                if e.errno != _errno.E2BIG or n >= 1 << 16:
                    raise
                needed = getattr(obj, count_field)
                n = needed if needed > n else n * 2
                continue
            return obj


class Kvm(_FdOwner):
    """``/dev/kvm``: the system fd. Checks the API version on open.

    Args:
        path: the KVM device node.

    Raises:
        KvmUnavailableError: the device is missing, not permitted, or speaks another API version.
    """

    def __init__(self, path: str = "/dev/kvm") -> None:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise KvmUnavailableError(
                f"{path} does not exist: load the KVM module (modprobe kvm_intel or kvm_amd) and "
                "check that virtualization is enabled in the firmware"
            ) from None
        except PermissionError:
            raise KvmUnavailableError(
                f"no permission to open {path}: add your user to the 'kvm' group "
                "(then log in again) or adjust the device's permissions"
            ) from None
        except OSError as e:
            raise KvmUnavailableError(f"cannot open {path}: {e.strerror}") from None
        super().__init__(fd)
        self._path = path
        version = self.get_api_version()
        if version != KVM_API_VERSION:
            self.close()
            raise KvmUnavailableError(
                f"{path} speaks KVM API version {version}; kvmlib needs {KVM_API_VERSION}"
            )

    def get_api_version(self) -> int:
        """KVM_GET_API_VERSION (always 12 on any kernel kvmlib supports)."""
        return self._ioctl_int("KVM_GET_API_VERSION", KVM_GET_API_VERSION)

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION: 0 when ``cap`` is unsupported, else a positive, cap-specific value."""
        return self._ioctl_int("KVM_CHECK_EXTENSION", KVM_CHECK_EXTENSION, int(cap))

    def get_vcpu_mmap_size(self) -> int:
        """KVM_GET_VCPU_MMAP_SIZE: the size of a vCPU's ``kvm_run`` mapping."""
        return self._ioctl_int("KVM_GET_VCPU_MMAP_SIZE", KVM_GET_VCPU_MMAP_SIZE)

    @property
    def vcpu_mmap_size(self) -> int:
        """The size of a vCPU's ``kvm_run`` mapping (KVM_GET_VCPU_MMAP_SIZE)."""
        return self.get_vcpu_mmap_size()

    def _describe(self) -> str:
        return f"the Kvm handle on {self._path}"

    def get_supported_cpuid(self, max_entries: int = 256) -> Any:
        """KVM_GET_SUPPORTED_CPUID: a ``kvm_cpuid2`` trimmed to the entries the kernel filled.

        ``max_entries`` is only the first guess: a larger list is fetched whole.
        """
        obj = self._get_growing("KVM_GET_SUPPORTED_CPUID", KVM_GET_SUPPORTED_CPUID,
                                make_kvm_cpuid2, "nent", max_entries)
        return make_kvm_cpuid2(obj.entries[i] for i in range(obj.nent))

    def get_msr_index_list(self, max_entries: int = 256) -> list[int]:
        """KVM_GET_MSR_INDEX_LIST: the MSRs KVM saves and restores.

        ``max_entries`` is only the first guess: a longer list is fetched whole.
        """
        obj = self._get_growing("KVM_GET_MSR_INDEX_LIST", KVM_GET_MSR_INDEX_LIST,
                                make_kvm_msr_list, "nmsrs", max_entries)
        return [obj.indices[i] for i in range(obj.nmsrs)]

    def create_vm(self) -> VmFd:
        """KVM_CREATE_VM: a new, empty VM."""
        fd = self._ioctl_int("KVM_CREATE_VM", KVM_CREATE_VM, 0)
        try:
            mmap_size = self.get_vcpu_mmap_size()
        except BaseException:
            os.close(fd)
            raise
        return VmFd(fd, mmap_size)


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
            pages = (registered + mmap.PAGESIZE - 1) // mmap.PAGESIZE
            # The kernel writes whole 64-bit words.
            bitmap = bytearray(((pages + 63) // 64) * 8)
            holder = (c_char * len(bitmap)).from_buffer(bitmap)
            arg = kvm_dirty_log(slot=slot)
            arg.dirty_bitmap = ctypes.addressof(holder)
            try:
                self._ioctl_buf("KVM_GET_DIRTY_LOG", KVM_GET_DIRTY_LOG, arg)
            finally:
                del holder
        return bitmap

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


class VcpuFd(_FdOwner):
    """A vCPU's fd, from :meth:`VmFd.create_vcpu`; ``kvm_run`` is mapped once for its lifetime.

    Args:
        fd: the fd KVM_CREATE_VCPU returned; the object owns it.
        mmap_size: KVM_GET_VCPU_MMAP_SIZE.
        vcpu_id: the vCPU's id, for messages.
        xsave2_size: the bytes KVM_GET_XSAVE2 writes (``KVM_CAP_XSAVE2`` on the VM fd, asked after
            the VM's first vCPU exists). Without it :meth:`get_xsave2` refuses to run.
    """

    def __init__(self, fd: int, mmap_size: int, *, vcpu_id: int | None = None,
                 xsave2_size: int | None = None) -> None:
        super().__init__(fd)
        self._vcpu_id = vcpu_id
        self._xsave2_size = xsave2_size
        self._run_map: mmap.mmap | None = None
        try:
            self._run_map = mmap.mmap(fd, mmap_size, mmap.MAP_SHARED,
                                      mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as e:
            self.close()
            raise KvmIoctlError("mmap(kvm_run)", e.errno or 0) from None
        self._run_view = memoryview(self._run_map)
        self._views: dict[int, memoryview] = {}
        self._run_size = mmap_size
        self._run = kvm_run.from_buffer(self._run_map)

    @property
    def kvm_run(self) -> kvm_run:
        """The mapped ``struct kvm_run`` (valid until :meth:`close`)."""
        return self._run

    @property
    def xsave2_size(self) -> int | None:
        """The bytes KVM_GET_XSAVE2 writes for this vCPU (None when not known)."""
        return self._xsave2_size

    def _describe(self) -> str:
        return "this VcpuFd" if self._vcpu_id is None else f"the VcpuFd of vCPU {self._vcpu_id}"

    def close(self) -> None:
        """Unmap ``kvm_run`` and close the fd; safe to call twice.

        It does not wait for a KVM_RUN in progress on another thread: the kernel keeps the vCPU
        until that returns, and :meth:`run` then raises :class:`~kvmlib.errors.ClosedError`.
        """
        with self._lock:
            run_map, self._run_map = self._run_map, None
            if run_map is not None:
                del self._run
                views, self._views = self._views, {}
                for view in (*views.values(), self._run_view):
                    try:
                        view.release()
                    except BufferError:
                        pass  # something acquired a buffer from it; see below
                try:
                    run_map.close()
                except BufferError:
                    # A caller still holds a view of its own making: the mapping is released with
                    # the last such view instead, so no view ever points at unmapped memory.
                    pass
            super().close()

    def set_immediate_exit(self, value: bool) -> None:
        """Set ``kvm_run.immediate_exit``: the next (or interrupted) KVM_RUN returns EINTR at once.

        Does nothing once the vCPU is closed, also when :meth:`close` runs concurrently.
        """
        # No lock: a kick must never wait behind an ioctl that itself waits for KVM_RUN to return.
        try:
            self._run_view[_IMMEDIATE_EXIT_OFF] = 1 if value else 0
        except ValueError:
            pass  # close() released the view: no KVM_RUN is left to stop

    def run(self) -> VcpuExit:
        """KVM_RUN, decoded. EINTR is not an error but :class:`Intr`.

        Port and MMIO exits carry ``data`` as a view into ``kvm_run``: write into it the answer to an
        :class:`IoIn` or :class:`MmioRead` before the next :meth:`run`. Like the page it shows, a
        view is only meaningful until the next :meth:`run`, and it is released by :meth:`close`.

        Unlike the other methods it takes no lock (it is the hot path, and it blocks for as long as
        the guest runs): it is the vCPU thread's to call, and a :meth:`close` from elsewhere should
        come only once that thread has left its loop. Run on a closed vCPU, or closed while it
        ran, it raises :class:`~kvmlib.errors.ClosedError`.
        """
        if _run_ioctl(self._fd, KVM_RUN, 0) < 0:
            err = _get_errno()
            if err == _errno.EINTR:
                return _INTR
            if self._fd < 0:
                raise self._closed_error("KVM_RUN")
            raise KvmIoctlError("KVM_RUN", err)
        try:
            reason, direction, size, port, count, offset = _HEAD_UNPACK(self._run_view,
                                                                        _EXIT_REASON_OFF)
            if reason == KVM_EXIT_IO:
                length = size * count
                data = self._views.get((offset << 32) | length)
                if data is None:
                    data = self._view(offset, length)
                    if data is None:
                        return Unknown(reason)
                if direction == KVM_EXIT_IO_OUT:
                    return _tuple_new(IoOut, (port, size, count, data))
                return _tuple_new(IoIn, (port, size, count, data))
            if reason == KVM_EXIT_MMIO:
                addr, _data, length, is_write = _MMIO_UNPACK(self._run_view, _EXIT_OFF)
                data = self._views.get((_MMIO_DATA_OFF << 32) | length)
                if data is None:
                    data = self._view(_MMIO_DATA_OFF, min(length, 8))
                    assert data is not None
                if is_write:
                    return _tuple_new(MmioWrite, (addr, data))
                return _tuple_new(MmioRead, (addr, data))
            return self._decode_rare(reason)
        except ValueError:
            # close() released the kvm_run views while KVM_RUN ran: the exit is lost with the vCPU.
            if self._fd < 0:
                raise self._closed_error("KVM_RUN") from None
            raise

    def _view(self, offset: int, length: int) -> memoryview | None:
        """A cached view of ``kvm_run[offset:offset+length]``; None if it leaves the mapping.

        The offset comes from the kernel, but it is checked anyway: a view past the mapping would
        silently be shorter than the access.
        """
        if offset < 0 or offset + length > self._run_size:
            return None
        view = self._run_view[offset:offset + length]
        # Every distinct (offset, length) the kernel uses is a handful: I/O data sits at one offset.
        self._views[(offset << 32) | length] = view
        return view

    def _decode_rare(self, reason: int) -> VcpuExit:
        view = self._run_view
        if reason == KVM_EXIT_HLT:
            return _HLT
        if reason == KVM_EXIT_SHUTDOWN:
            return _SHUTDOWN
        if reason == KVM_EXIT_INTR:
            return _INTR
        if reason == KVM_EXIT_INTERNAL_ERROR:
            suberror, ndata, *data = _INTERNAL_UNPACK(view, _EXIT_OFF)
            return InternalError(suberror, tuple(data[: min(ndata, 16)]))
        if reason == KVM_EXIT_FAIL_ENTRY:
            hw_reason, cpu = _FAIL_UNPACK(view, _EXIT_OFF)
            return FailEntry(hw_reason, cpu)
        if reason == KVM_EXIT_SYSTEM_EVENT:
            type_, ndata, *data = _SYSEV_UNPACK(view, _EXIT_OFF)
            return SystemEvent(type_, tuple(data[: min(ndata, 16)]))
        return Unknown(reason)

    def get_regs(self) -> kvm_regs:
        """KVM_GET_REGS."""
        return self._get("KVM_GET_REGS", KVM_GET_REGS, kvm_regs)

    def set_regs(self, regs: kvm_regs) -> None:
        """KVM_SET_REGS."""
        self._ioctl_buf("KVM_SET_REGS", KVM_SET_REGS, regs)

    def get_sregs(self) -> kvm_sregs:
        """KVM_GET_SREGS."""
        return self._get("KVM_GET_SREGS", KVM_GET_SREGS, kvm_sregs)

    def set_sregs(self, sregs: kvm_sregs) -> None:
        """KVM_SET_SREGS."""
        self._ioctl_buf("KVM_SET_SREGS", KVM_SET_SREGS, sregs)

    def get_fpu(self) -> kvm_fpu:
        """KVM_GET_FPU."""
        return self._get("KVM_GET_FPU", KVM_GET_FPU, kvm_fpu)

    def set_fpu(self, fpu: kvm_fpu) -> None:
        """KVM_SET_FPU."""
        self._ioctl_buf("KVM_SET_FPU", KVM_SET_FPU, fpu)

    def get_msrs(self, indices: Iterable[int]) -> dict[int, int]:
        """KVM_GET_MSRS for ``indices``; raises if the kernel returns fewer than asked."""
        idx = list(indices)
        obj = make_kvm_msrs((i, 0) for i in idx)
        got = self._ioctl_buf("KVM_GET_MSRS", KVM_GET_MSRS, obj)
        if got != len(idx):
            bad = idx[got] if 0 <= got < len(idx) else None
            raise KvmIoctlError("KVM_GET_MSRS", _errno.EINVAL,
                                f"read {got} of {len(idx)} MSRs; first refused: {bad:#x}"
                                if bad is not None else f"read {got} of {len(idx)} MSRs")
        return {obj.entries[i].index: obj.entries[i].data for i in range(len(idx))}

    def set_msrs(self, msrs: dict[int, int] | Iterable[tuple[int, int]]) -> None:
        """KVM_SET_MSRS; raises if the kernel accepts fewer than given."""
        pairs = list(msrs.items() if isinstance(msrs, dict) else msrs)
        obj = make_kvm_msrs(pairs)
        got = self._ioctl_buf("KVM_SET_MSRS", KVM_SET_MSRS, obj)
        if got != len(pairs):
            bad = f"{pairs[got][0]:#x}" if 0 <= got < len(pairs) else "?"
            raise KvmIoctlError("KVM_SET_MSRS", _errno.EINVAL,
                                f"wrote {got} of {len(pairs)} MSRs; first refused: {bad}")

    def set_cpuid2(self, cpuid: Any) -> None:
        """KVM_SET_CPUID2 with a ``kvm_cpuid2`` from :func:`make_kvm_cpuid2`.

        Raises:
            KernelBufferError: ``nent`` counts more entries than the structure holds (the kernel
                reads ``nent`` of them).
        """
        have = sizeof(cpuid)
        need = sizeof(kvm_cpuid2) + cpuid.nent * sizeof(kvm_cpuid_entry2)
        if need > have:
            raise KernelBufferError(f"KVM_SET_CPUID2: nent is {cpuid.nent} but the structure holds "
                                    f"{(have - sizeof(kvm_cpuid2)) // sizeof(kvm_cpuid_entry2)} "
                                    "entries")
        self._ioctl_buf("KVM_SET_CPUID2", KVM_SET_CPUID2, cpuid)

    def get_cpuid2(self, max_entries: int = 256) -> Any:
        """KVM_GET_CPUID2: the CPUID this vCPU was given.

        ``max_entries`` is only the first guess: a larger table is fetched whole.
        """
        obj = self._get_growing("KVM_GET_CPUID2", KVM_GET_CPUID2, make_kvm_cpuid2, "nent",
                                max_entries)
        return make_kvm_cpuid2(obj.entries[i] for i in range(obj.nent))

    def get_lapic(self) -> kvm_lapic_state:
        """KVM_GET_LAPIC."""
        return self._get("KVM_GET_LAPIC", KVM_GET_LAPIC, kvm_lapic_state)

    def set_lapic(self, lapic: kvm_lapic_state) -> None:
        """KVM_SET_LAPIC."""
        self._ioctl_buf("KVM_SET_LAPIC", KVM_SET_LAPIC, lapic)

    def get_xsave(self) -> kvm_xsave:
        """KVM_GET_XSAVE."""
        return self._get("KVM_GET_XSAVE", KVM_GET_XSAVE, kvm_xsave)

    def set_xsave(self, xsave: kvm_xsave | bytearray) -> None:
        """KVM_SET_XSAVE; a ``bytearray`` when the area is larger than 4 KiB (see :meth:`get_xsave2`).

        The kernel reads as many bytes as KVM_GET_XSAVE2 writes, whatever it is given: an area
        shorter than that (but at least ``struct kvm_xsave``) is zero-extended first, so the kernel
        never reads past it.
        """
        known = self._xsave2_size
        have = _buffer_size(xsave)
        if known is not None and sizeof(kvm_xsave) <= have < known:
            padded = bytearray(known)
            padded[:have] = bytes(xsave)
            xsave = padded
        self._ioctl_buf("KVM_SET_XSAVE", KVM_SET_XSAVE, xsave)

    def get_xsave2(self, size: int | None = None) -> bytearray:
        """KVM_GET_XSAVE2: the whole XSAVE area, :attr:`xsave2_size` bytes by default.

        The kernel writes as much as the VM's permitted XSAVE features need (``KVM_CAP_XSAVE2``
        on the VM fd), which may exceed the 4 KiB of ``struct kvm_xsave``. A larger ``size`` gives
        a zero-padded area.

        Raises:
            KernelBufferError: ``size`` is smaller than what the kernel writes, or this VcpuFd was
                not made by :meth:`VmFd.create_vcpu` and does not know that size. Raised before the
                ioctl.
        """
        known = self._xsave2_size
        if known is None:
            raise KernelBufferError(
                f"KVM_GET_XSAVE2: the size the kernel writes is unknown for {self._describe()} "
                "(only a VcpuFd from VmFd.create_vcpu knows its VM's KVM_CAP_XSAVE2)")
        if size is None:
            size = known
        elif size < known:
            raise KernelBufferError(
                f"KVM_GET_XSAVE2 writes {known} bytes (KVM_CAP_XSAVE2) for {self._describe()}, "
                f"more than the {size} asked for")
        area = bytearray(size)
        self._ioctl_buf("KVM_GET_XSAVE2", KVM_GET_XSAVE2, area)
        return area

    def get_xcrs(self) -> kvm_xcrs:
        """KVM_GET_XCRS."""
        return self._get("KVM_GET_XCRS", KVM_GET_XCRS, kvm_xcrs)

    def set_xcrs(self, xcrs: kvm_xcrs) -> None:
        """KVM_SET_XCRS."""
        self._ioctl_buf("KVM_SET_XCRS", KVM_SET_XCRS, xcrs)

    def get_debugregs(self) -> kvm_debugregs:
        """KVM_GET_DEBUGREGS."""
        return self._get("KVM_GET_DEBUGREGS", KVM_GET_DEBUGREGS, kvm_debugregs)

    def set_debugregs(self, regs: kvm_debugregs) -> None:
        """KVM_SET_DEBUGREGS."""
        self._ioctl_buf("KVM_SET_DEBUGREGS", KVM_SET_DEBUGREGS, regs)

    def get_vcpu_events(self) -> kvm_vcpu_events:
        """KVM_GET_VCPU_EVENTS."""
        return self._get("KVM_GET_VCPU_EVENTS", KVM_GET_VCPU_EVENTS, kvm_vcpu_events)

    def set_vcpu_events(self, events: kvm_vcpu_events) -> None:
        """KVM_SET_VCPU_EVENTS."""
        self._ioctl_buf("KVM_SET_VCPU_EVENTS", KVM_SET_VCPU_EVENTS, events)

    def get_mp_state(self) -> kvm_mp_state:
        """KVM_GET_MP_STATE."""
        return self._get("KVM_GET_MP_STATE", KVM_GET_MP_STATE, kvm_mp_state)

    def set_mp_state(self, state: kvm_mp_state) -> None:
        """KVM_SET_MP_STATE."""
        self._ioctl_buf("KVM_SET_MP_STATE", KVM_SET_MP_STATE, state)

    def set_guest_debug(self, debug: kvm_guest_debug) -> None:
        """KVM_SET_GUEST_DEBUG."""
        self._ioctl_buf("KVM_SET_GUEST_DEBUG", KVM_SET_GUEST_DEBUG, debug)


__all__ = [
    "Cap", "FailEntry", "Hlt", "InternalError", "Intr", "IoIn", "IoOut", "Kvm", "MmioRead",
    "MmioWrite", "Shutdown", "SystemEvent", "Unknown", "VcpuExit", "VcpuFd", "VmFd",
    "make_kvm_cpuid2", "make_kvm_msr_list", "make_kvm_msrs",
]
