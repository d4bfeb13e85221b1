"""The x86-64 ``<linux/kvm.h>`` structures, under the kernel's names, and their flag values.

Field names and order are the kernel's; ``tests/test_layout.py`` proves every size and offset against
the installed headers. Helper types for the kernel's anonymous inner structs and unions start with an
underscore. The variable-length structures (``kvm_msrs``, ``kvm_msr_list``, ``kvm_cpuid2``) are built
with :func:`make_kvm_msrs`, :func:`make_kvm_msr_list` and :func:`make_kvm_cpuid2`.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterable
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
from typing import Any, TypeVar

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


