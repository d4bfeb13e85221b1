"""The x86-64 ``<linux/kvm.h>`` structures, under the kernel's names, and their flag values.

Field names and order are the kernel's; ``tests/test_layout.py`` proves every size and offset against
the installed headers. Helper types for the kernel's anonymous inner structs and unions start with an
underscore. The variable-length structures (``kvm_msrs``, ``kvm_msr_list``, ``kvm_cpuid2``) are built
with :func:`make_kvm_msrs`, :func:`make_kvm_msr_list` and :func:`make_kvm_cpuid2`.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterable, Sequence
from ctypes import (
    Structure,
    Union,
    c_char,
    c_int16,
    c_int32,
    c_int64,
    c_uint8,
    c_uint16,
    c_uint32,
    c_uint64,
    sizeof,
)
from enum import IntFlag
from typing import TYPE_CHECKING, Any, ClassVar, TypedDict, TypeVar

if TYPE_CHECKING:
    from _ctypes import _CData, _PyCStructType, _UnionType
    from collections.abc import Sequence
    from ctypes import Array

    class _KernelType(_CData):
        # What a type checker sees instead of ctypes' Structure, whose __getattr__ and
        # __setattr__ accept any name: here only the annotated fields exist.
        _fields_: ClassVar[Sequence[tuple[Any, ...]]]
        _anonymous_: ClassVar[Sequence[str]]

        def __init__(self, *args: Any, **kw: Any) -> None: ...

    class KernelStruct(_KernelType, metaclass=_PyCStructType):
        """A ``struct`` of ``<linux/kvm.h>``."""

    class KernelUnion(_KernelType, metaclass=_UnionType):
        """A ``union`` of ``<linux/kvm.h>``."""

else:
    from ctypes import Array

    def _only_fields(self: Any, name: str, value: Any) -> None:
        # A ctypes structure would accept any name, and a typo (regs.ripp = ...) would do
        # nothing: every field is a descriptor on the class, anything else is refused.
        if not hasattr(type(self), name):
            raise AttributeError(f"{type(self).__name__} has no field {name!r}")
        object.__setattr__(self, name, value)

    class KernelStruct(Structure):
        """A ``struct`` of ``<linux/kvm.h>``: only its fields can be set."""

        __setattr__ = _only_fields

    class KernelUnion(Union):
        """A ``union`` of ``<linux/kvm.h>``: only its fields can be set."""

        __setattr__ = _only_fields

# --------------------------------------------------------------------------------------------------
# Structures (x86-64). Field names and order are the kernel's; tests/test_layout.py proves it.
# Helper types for the kernel's anonymous inner structs/unions start with an underscore.
# --------------------------------------------------------------------------------------------------


class kvm_userspace_memory_region(KernelStruct):
    """``struct kvm_userspace_memory_region``: one guest-physical slot backed by host memory."""

    slot: int
    flags: int
    guest_phys_addr: int
    memory_size: int
    userspace_addr: int

    _fields_ = [
        ("slot", c_uint32),
        ("flags", c_uint32),
        ("guest_phys_addr", c_uint64),
        ("memory_size", c_uint64),
        ("userspace_addr", c_uint64),
    ]


class _kvm_irq_level_u(KernelUnion):
    irq: int
    status: int

    _fields_ = [("irq", c_uint32), ("status", c_int32)]


class kvm_irq_level(KernelStruct):
    """``struct kvm_irq_level`` for KVM_IRQ_LINE."""

    _u: _kvm_irq_level_u
    irq: int
    status: int
    level: int

    _anonymous_ = ("_u",)
    _fields_ = [("_u", _kvm_irq_level_u), ("level", c_uint32)]


class kvm_pic_state(KernelStruct):
    """``struct kvm_pic_state``: one 8259 PIC."""

    last_irr: int
    irr: int
    imr: int
    isr: int
    priority_add: int
    irq_base: int
    read_reg_select: int
    poll: int
    special_mask: int
    init_state: int
    auto_eoi: int
    rotate_on_auto_eoi: int
    special_fully_nested_mode: int
    init4: int
    elcr: int
    elcr_mask: int

    _fields_ = [
        (name, c_uint8)
        for name in (
            "last_irr", "irr", "imr", "isr", "priority_add", "irq_base", "read_reg_select",
            "poll", "special_mask", "init_state", "auto_eoi", "rotate_on_auto_eoi",
            "special_fully_nested_mode", "init4", "elcr", "elcr_mask",
        )
    ]


KVM_IOAPIC_NUM_PINS = 24


class _kvm_ioapic_redirtbl_fields(KernelStruct):
    vector: int
    delivery_mode: int
    dest_mode: int
    delivery_status: int
    polarity: int
    remote_irr: int
    trig_mode: int
    mask: int
    reserve: int
    reserved: Array[c_uint8]
    dest_id: int

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


class _kvm_ioapic_redirtbl(KernelUnion):
    bits: int
    fields: _kvm_ioapic_redirtbl_fields

    _fields_ = [("bits", c_uint64), ("fields", _kvm_ioapic_redirtbl_fields)]


class kvm_ioapic_state(KernelStruct):
    """``struct kvm_ioapic_state``: the in-kernel IOAPIC."""

    base_address: int
    ioregsel: int
    id: int
    irr: int
    pad: int
    redirtbl: Array[_kvm_ioapic_redirtbl]

    _fields_ = [
        ("base_address", c_uint64),
        ("ioregsel", c_uint32),
        ("id", c_uint32),
        ("irr", c_uint32),
        ("pad", c_uint32),
        ("redirtbl", _kvm_ioapic_redirtbl * KVM_IOAPIC_NUM_PINS),
    ]


class _kvm_irqchip_chip(KernelUnion):
    dummy: bytes
    pic: kvm_pic_state
    ioapic: kvm_ioapic_state

    _fields_ = [("dummy", c_char * 512), ("pic", kvm_pic_state), ("ioapic", kvm_ioapic_state)]


KVM_IRQCHIP_PIC_MASTER = 0
KVM_IRQCHIP_PIC_SLAVE = 1
KVM_IRQCHIP_IOAPIC = 2
KVM_NR_IRQCHIPS = 3


class kvm_irqchip(KernelStruct):
    """``struct kvm_irqchip``: the state of one in-kernel interrupt controller (``chip_id``)."""

    chip_id: int
    pad: int
    chip: _kvm_irqchip_chip

    _fields_ = [("chip_id", c_uint32), ("pad", c_uint32), ("chip", _kvm_irqchip_chip)]


class kvm_pit_config(KernelStruct):
    """``struct kvm_pit_config`` for KVM_CREATE_PIT2."""

    flags: int
    pad: Array[c_uint32]

    _fields_ = [("flags", c_uint32), ("pad", c_uint32 * 15)]


KVM_PIT_SPEAKER_DUMMY = 1

# kvm_clock_data.flags
KVM_CLOCK_TSC_STABLE = 2
KVM_CLOCK_REALTIME = 1 << 2
KVM_CLOCK_HOST_TSC = 1 << 3


class kvm_regs(KernelStruct):
    """``struct kvm_regs``: the general-purpose registers, RIP and RFLAGS."""

    rax: int
    rbx: int
    rcx: int
    rdx: int
    rsi: int
    rdi: int
    rsp: int
    rbp: int
    r8: int
    r9: int
    r10: int
    r11: int
    r12: int
    r13: int
    r14: int
    r15: int
    rip: int
    rflags: int

    _fields_ = [
        (name, c_uint64)
        for name in (
            "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
            "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags",
        )
    ]


KVM_APIC_REG_SIZE = 0x400


class kvm_lapic_state(KernelStruct):
    """``struct kvm_lapic_state``: the local APIC's 1 KiB register page."""

    regs: bytes

    _fields_ = [("regs", c_char * KVM_APIC_REG_SIZE)]


class kvm_segment(KernelStruct):
    """``struct kvm_segment``: one segment register in unpacked form."""

    base: int
    limit: int
    selector: int
    type: int
    present: int
    dpl: int
    db: int
    s: int
    l: int  # noqa: E741 - the kernel's name
    g: int
    avl: int
    unusable: int
    padding: int

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


class kvm_dtable(KernelStruct):
    """``struct kvm_dtable``: a descriptor-table register (GDTR / IDTR)."""

    base: int
    limit: int
    padding: Array[c_uint16]

    _fields_ = [("base", c_uint64), ("limit", c_uint16), ("padding", c_uint16 * 3)]


KVM_NR_INTERRUPTS = 256


class kvm_sregs(KernelStruct):
    """``struct kvm_sregs``: segment, descriptor-table and control registers."""

    cs: kvm_segment
    ds: kvm_segment
    es: kvm_segment
    fs: kvm_segment
    gs: kvm_segment
    ss: kvm_segment
    tr: kvm_segment
    ldt: kvm_segment
    gdt: kvm_dtable
    idt: kvm_dtable
    cr0: int
    cr2: int
    cr3: int
    cr4: int
    cr8: int
    efer: int
    apic_base: int
    interrupt_bitmap: Array[c_uint64]

    _fields_ = [
        *((name, kvm_segment) for name in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")),
        ("gdt", kvm_dtable),
        ("idt", kvm_dtable),
        *((name, c_uint64) for name in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")),
        ("interrupt_bitmap", c_uint64 * ((KVM_NR_INTERRUPTS + 63) // 64)),
    ]


class RegsFields(TypedDict, total=False):
    """Keyword arguments naming ``kvm_regs`` fields (e.g. ``set_regs(rip=0x1000, rax=1)``)."""

    rax: int
    rbx: int
    rcx: int
    rdx: int
    rsi: int
    rdi: int
    rsp: int
    rbp: int
    r8: int
    r9: int
    r10: int
    r11: int
    r12: int
    r13: int
    r14: int
    r15: int
    rip: int
    rflags: int


class SregsFields(TypedDict, total=False):
    """Keyword arguments naming ``kvm_sregs`` fields (e.g. ``set_sregs(cr3=0x9000)``)."""

    cs: kvm_segment
    ds: kvm_segment
    es: kvm_segment
    fs: kvm_segment
    gs: kvm_segment
    ss: kvm_segment
    tr: kvm_segment
    ldt: kvm_segment
    gdt: kvm_dtable
    idt: kvm_dtable
    cr0: int
    cr2: int
    cr3: int
    cr4: int
    cr8: int
    efer: int
    apic_base: int


class kvm_fpu(KernelStruct):
    """``struct kvm_fpu``: x87 and SSE state in FXSAVE form."""

    fpr: Array[Array[c_uint8]]
    fcw: int
    fsw: int
    ftwx: int
    pad1: int
    last_opcode: int
    last_ip: int
    last_dp: int
    xmm: Array[Array[c_uint8]]
    mxcsr: int
    pad2: int

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


class kvm_msr_entry(KernelStruct):
    """``struct kvm_msr_entry``: one MSR index and value."""

    index: int
    reserved: int
    data: int

    _fields_ = [("index", c_uint32), ("reserved", c_uint32), ("data", c_uint64)]


class kvm_msrs(KernelStruct):
    """``struct kvm_msrs`` header; build one with room for N entries with :func:`make_kvm_msrs`."""

    nmsrs: int
    pad: int
    entries: Array[kvm_msr_entry]

    _fields_ = [("nmsrs", c_uint32), ("pad", c_uint32), ("entries", kvm_msr_entry * 0)]


class kvm_msr_list(KernelStruct):
    """``struct kvm_msr_list`` header; see :func:`make_kvm_msr_list`."""

    nmsrs: int
    indices: Array[c_uint32]

    _fields_ = [("nmsrs", c_uint32), ("indices", c_uint32 * 0)]


class kvm_cpuid_entry2(KernelStruct):
    """``struct kvm_cpuid_entry2``: one CPUID leaf / subleaf."""

    function: int
    index: int
    flags: int
    eax: int
    ebx: int
    ecx: int
    edx: int
    padding: Array[c_uint32]

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


class kvm_cpuid2(KernelStruct):
    """``struct kvm_cpuid2`` header; see :func:`make_kvm_cpuid2`."""

    nent: int
    padding: int
    entries: Array[kvm_cpuid_entry2]

    _fields_ = [("nent", c_uint32), ("padding", c_uint32), ("entries", kvm_cpuid_entry2 * 0)]


class kvm_pit_channel_state(KernelStruct):
    """``struct kvm_pit_channel_state``: one 8254 PIT channel."""

    count: int
    latched_count: int
    count_latched: int
    status_latched: int
    status: int
    read_state: int
    write_state: int
    write_latch: int
    rw_mode: int
    mode: int
    bcd: int
    gate: int
    count_load_time: int

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


class kvm_pit_state2(KernelStruct):
    """``struct kvm_pit_state2``: the in-kernel PIT."""

    channels: Array[kvm_pit_channel_state]
    flags: int
    reserved: Array[c_uint32]

    _fields_ = [
        ("channels", kvm_pit_channel_state * 3),
        ("flags", c_uint32),
        ("reserved", c_uint32 * 9),
    ]


class kvm_debug_exit_arch(KernelStruct):
    """``struct kvm_debug_exit_arch``: what a KVM_EXIT_DEBUG reports."""

    exception: int
    pad: int
    pc: int
    dr6: int
    dr7: int

    _fields_ = [("exception", c_uint32), ("pad", c_uint32), ("pc", c_uint64), ("dr6", c_uint64),
                ("dr7", c_uint64)]


class kvm_guest_debug_arch(KernelStruct):
    """``struct kvm_guest_debug_arch``: the debug registers for KVM_SET_GUEST_DEBUG."""

    debugreg: Array[c_uint64]

    _fields_ = [("debugreg", c_uint64 * 8)]


class kvm_guest_debug(KernelStruct):
    """``struct kvm_guest_debug`` for KVM_SET_GUEST_DEBUG."""

    control: int
    pad: int
    arch: kvm_guest_debug_arch

    _fields_ = [("control", c_uint32), ("pad", c_uint32), ("arch", kvm_guest_debug_arch)]


KVM_GUESTDBG_ENABLE = 0x00000001
KVM_GUESTDBG_SINGLESTEP = 0x00000002
KVM_GUESTDBG_USE_SW_BP = 0x00010000
KVM_GUESTDBG_USE_HW_BP = 0x00020000
KVM_GUESTDBG_INJECT_DB = 0x00040000
KVM_GUESTDBG_INJECT_BP = 0x00080000


class GuestDebug(IntFlag):
    """``KVM_GUESTDBG_*``: what KVM_SET_GUEST_DEBUG turns on (``ENABLE`` is added for you)."""

    ENABLE = KVM_GUESTDBG_ENABLE
    #: Exit after every guest instruction (a :class:`~kvmlib.Debug` exit with vector 1).
    SINGLESTEP = KVM_GUESTDBG_SINGLESTEP
    #: ``int3`` exits to user space (vector 3) instead of reaching the guest's handler; the
    #: breakpoints themselves are ``0xcc`` bytes the debugger writes into guest memory.
    USE_SW_BP = KVM_GUESTDBG_USE_SW_BP
    #: Up to four execution breakpoints in the debug registers (vector 1, DR6 says which).
    USE_HW_BP = KVM_GUESTDBG_USE_HW_BP
    INJECT_DB = KVM_GUESTDBG_INJECT_DB
    INJECT_BP = KVM_GUESTDBG_INJECT_BP


def make_kvm_guest_debug(flags: GuestDebug, breakpoints: Sequence[int] = ()) -> kvm_guest_debug:
    """A ``kvm_guest_debug`` for ``flags``, with execution breakpoints at ``breakpoints``.

    Breakpoints (at most four, the debug registers' count) go in DR0-DR3, each enabled locally in
    DR7 as an execution breakpoint; ``USE_HW_BP`` is added when there are any.

    Raises:
        ValueError: more than four breakpoints, or an address outside 0..2**64-1.
    """
    if len(breakpoints) > 4:
        raise ValueError(f"x86 has 4 hardware breakpoints, not {len(breakpoints)}")
    debug = kvm_guest_debug()
    control = GuestDebug(flags) | GuestDebug.ENABLE
    dr7 = 0
    for i, address in enumerate(breakpoints):
        if not 0 <= address < 1 << 64:
            raise ValueError(f"breakpoint address {address:#x} is outside 0..2**64-1")
        debug.arch.debugreg[i] = address
        dr7 |= 1 << (2 * i)  # L<i>; R/W and LEN 0: break on execution
    if breakpoints:
        control |= GuestDebug.USE_HW_BP
        debug.arch.debugreg[7] = dr7
    debug.control = int(control)
    return debug


class _kvm_vcpu_events_exception(KernelStruct):
    injected: int
    nr: int
    has_error_code: int
    pending: int
    error_code: int

    _fields_ = [("injected", c_uint8), ("nr", c_uint8), ("has_error_code", c_uint8),
                ("pending", c_uint8), ("error_code", c_uint32)]


class _kvm_vcpu_events_interrupt(KernelStruct):
    injected: int
    nr: int
    soft: int
    shadow: int

    _fields_ = [("injected", c_uint8), ("nr", c_uint8), ("soft", c_uint8), ("shadow", c_uint8)]


class _kvm_vcpu_events_nmi(KernelStruct):
    injected: int
    pending: int
    masked: int
    pad: int

    _fields_ = [("injected", c_uint8), ("pending", c_uint8), ("masked", c_uint8), ("pad", c_uint8)]


class _kvm_vcpu_events_smi(KernelStruct):
    smm: int
    pending: int
    smm_inside_nmi: int
    latched_init: int

    _fields_ = [("smm", c_uint8), ("pending", c_uint8), ("smm_inside_nmi", c_uint8),
                ("latched_init", c_uint8)]


class _kvm_vcpu_events_triple_fault(KernelStruct):
    pending: int

    _fields_ = [("pending", c_uint8)]


class kvm_vcpu_events(KernelStruct):
    """``struct kvm_vcpu_events``: pending exceptions, interrupts, NMIs and SMIs."""

    exception: _kvm_vcpu_events_exception
    interrupt: _kvm_vcpu_events_interrupt
    nmi: _kvm_vcpu_events_nmi
    sipi_vector: int
    flags: int
    smi: _kvm_vcpu_events_smi
    triple_fault: _kvm_vcpu_events_triple_fault
    reserved: Array[c_uint8]
    exception_has_payload: int
    exception_payload: int

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


class kvm_debugregs(KernelStruct):
    """``struct kvm_debugregs``: DR0-DR3, DR6 and DR7."""

    db: Array[c_uint64]
    dr6: int
    dr7: int
    flags: int
    reserved: Array[c_uint64]

    _fields_ = [("db", c_uint64 * 4), ("dr6", c_uint64), ("dr7", c_uint64), ("flags", c_uint64),
                ("reserved", c_uint64 * 9)]


class kvm_xsave(KernelStruct):
    """``struct kvm_xsave``: the XSAVE area (4 KiB; KVM_GET_XSAVE2 may need more)."""

    region: Array[c_uint32]
    extra: Array[c_uint32]

    _fields_ = [("region", c_uint32 * 1024), ("extra", c_uint32 * 0)]


KVM_MAX_XCRS = 16


class kvm_xcr(KernelStruct):
    """``struct kvm_xcr``: one extended control register."""

    xcr: int
    reserved: int
    value: int

    _fields_ = [("xcr", c_uint32), ("reserved", c_uint32), ("value", c_uint64)]


class kvm_xcrs(KernelStruct):
    """``struct kvm_xcrs``: the extended control registers (XCR0)."""

    nr_xcrs: int
    flags: int
    xcrs: Array[kvm_xcr]
    padding: Array[c_uint64]

    _fields_ = [("nr_xcrs", c_uint32), ("flags", c_uint32), ("xcrs", kvm_xcr * KVM_MAX_XCRS),
                ("padding", c_uint64 * 16)]


class kvm_sync_regs(KernelStruct):
    """``struct kvm_sync_regs``: registers shared through ``kvm_run`` with KVM_CAP_SYNC_REGS."""

    regs: kvm_regs
    sregs: kvm_sregs
    events: kvm_vcpu_events

    _fields_ = [("regs", kvm_regs), ("sregs", kvm_sregs), ("events", kvm_vcpu_events)]


class kvm_mp_state(KernelStruct):
    """``struct kvm_mp_state``: the vCPU's multiprocessing state (``KVM_MP_STATE_*``)."""

    mp_state: int

    _fields_ = [("mp_state", c_uint32)]


KVM_MP_STATE_RUNNABLE = 0
KVM_MP_STATE_UNINITIALIZED = 1
KVM_MP_STATE_INIT_RECEIVED = 2
KVM_MP_STATE_HALTED = 3
KVM_MP_STATE_SIPI_RECEIVED = 4


class kvm_enable_cap(KernelStruct):
    """``struct kvm_enable_cap`` for KVM_ENABLE_CAP: turn on a capability with its arguments."""

    cap: int
    flags: int
    args: Array[c_uint64]
    pad: Array[c_uint8]

    _fields_ = [("cap", c_uint32), ("flags", c_uint32), ("args", c_uint64 * 4), ("pad", c_uint8 * 64)]


class kvm_clock_data(KernelStruct):
    """``struct kvm_clock_data`` for KVM_GET_CLOCK / KVM_SET_CLOCK."""

    clock: int
    flags: int
    pad0: int
    realtime: int
    host_tsc: int
    pad: Array[c_uint32]

    _fields_ = [("clock", c_uint64), ("flags", c_uint32), ("pad0", c_uint32),
                ("realtime", c_uint64), ("host_tsc", c_uint64), ("pad", c_uint32 * 4)]


class _kvm_dirty_log_u(KernelUnion):
    dirty_bitmap: int | None
    padding2: int

    _fields_ = [("dirty_bitmap", ctypes.c_void_p), ("padding2", c_uint64)]


class kvm_dirty_log(KernelStruct):
    """``struct kvm_dirty_log`` for KVM_GET_DIRTY_LOG."""

    slot: int
    padding1: int
    _u: _kvm_dirty_log_u
    dirty_bitmap: int | None
    padding2: int

    _anonymous_ = ("_u",)
    _fields_ = [("slot", c_uint32), ("padding1", c_uint32), ("_u", _kvm_dirty_log_u)]


class kvm_stats_header(KernelStruct):
    """``struct kvm_stats_header``: the start of a binary statistics fd (``KVM_GET_STATS_FD``)."""

    flags: int
    name_size: int
    num_desc: int
    id_offset: int
    desc_offset: int
    data_offset: int

    _fields_ = [("flags", c_uint32), ("name_size", c_uint32), ("num_desc", c_uint32),
                ("id_offset", c_uint32), ("desc_offset", c_uint32), ("data_offset", c_uint32)]


class kvm_stats_desc(KernelStruct):
    """``struct kvm_stats_desc``: one statistic; its name (``name_size`` bytes) follows."""

    flags: int
    exponent: int
    size: int
    offset: int
    bucket_size: int
    name: bytes

    _fields_ = [("flags", c_uint32), ("exponent", c_int16), ("size", c_uint16),
                ("offset", c_uint32), ("bucket_size", c_uint32), ("name", c_char * 0)]


class kvm_irqfd(KernelStruct):
    """``struct kvm_irqfd``: route an eventfd to a GSI."""

    fd: int
    gsi: int
    flags: int
    resamplefd: int
    pad: Array[c_uint8]

    _fields_ = [("fd", c_uint32), ("gsi", c_uint32), ("flags", c_uint32), ("resamplefd", c_uint32),
                ("pad", c_uint8 * 16)]


KVM_IRQFD_FLAG_DEASSIGN = 1 << 0
KVM_IRQFD_FLAG_RESAMPLE = 1 << 1


class kvm_ioeventfd(KernelStruct):
    """``struct kvm_ioeventfd``: signal an eventfd on a guest PIO/MMIO write."""

    datamatch: int
    addr: int
    len: int
    fd: int
    flags: int
    pad: Array[c_uint8]

    _fields_ = [("datamatch", c_uint64), ("addr", c_uint64), ("len", c_uint32), ("fd", c_int32),
                ("flags", c_uint32), ("pad", c_uint8 * 36)]


KVM_IOEVENTFD_FLAG_DATAMATCH = 1 << 0
KVM_IOEVENTFD_FLAG_PIO = 1 << 1
KVM_IOEVENTFD_FLAG_DEASSIGN = 1 << 2

KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1

# ---- kvm_run and its exit union ----


class _kvm_run_hw(KernelStruct):
    hardware_exit_reason: int

    _fields_ = [("hardware_exit_reason", c_uint64)]


class _kvm_run_fail_entry(KernelStruct):
    hardware_entry_failure_reason: int
    cpu: int

    _fields_ = [("hardware_entry_failure_reason", c_uint64), ("cpu", c_uint32)]


class _kvm_run_ex(KernelStruct):
    exception: int
    error_code: int

    _fields_ = [("exception", c_uint32), ("error_code", c_uint32)]


class _kvm_run_io(KernelStruct):
    direction: int
    size: int
    port: int
    count: int
    data_offset: int

    _fields_ = [("direction", c_uint8), ("size", c_uint8), ("port", c_uint16), ("count", c_uint32),
                ("data_offset", c_uint64)]


class _kvm_run_debug(KernelStruct):
    arch: kvm_debug_exit_arch

    _fields_ = [("arch", kvm_debug_exit_arch)]


class _kvm_run_mmio(KernelStruct):
    phys_addr: int
    data: Array[c_uint8]
    len: int
    is_write: int

    _fields_ = [("phys_addr", c_uint64), ("data", c_uint8 * 8), ("len", c_uint32),
                ("is_write", c_uint8)]


class _kvm_run_internal(KernelStruct):
    suberror: int
    ndata: int
    data: Array[c_uint64]

    _fields_ = [("suberror", c_uint32), ("ndata", c_uint32), ("data", c_uint64 * 16)]


class _kvm_run_system_event_u(KernelUnion):
    flags: int
    data: Array[c_uint64]

    _fields_ = [("flags", c_uint64), ("data", c_uint64 * 16)]


class _kvm_run_system_event(KernelStruct):
    type: int
    ndata: int
    _u: _kvm_run_system_event_u
    flags: int
    data: Array[c_uint64]

    _anonymous_ = ("_u",)
    _fields_ = [("type", c_uint32), ("ndata", c_uint32), ("_u", _kvm_run_system_event_u)]


class _kvm_run_hypercall(KernelStruct):
    # Newer kernels make longmode and pad one union with a u64 "flags"; the bytes are the same.
    nr: int
    args: Array[c_uint64]
    ret: int
    longmode: int
    pad: int

    _fields_ = [("nr", c_uint64), ("args", c_uint64 * 6), ("ret", c_uint64), ("longmode", c_uint32),
                ("pad", c_uint32)]


class _kvm_run_msr(KernelStruct):
    error: int
    pad: Array[c_uint8]
    reason: int
    index: int
    data: int

    _fields_ = [("error", c_uint8), ("pad", c_uint8 * 7), ("reason", c_uint32), ("index", c_uint32),
                ("data", c_uint64)]


class _kvm_run_exit(KernelUnion):
    hw: _kvm_run_hw
    fail_entry: _kvm_run_fail_entry
    ex: _kvm_run_ex
    io: _kvm_run_io
    debug: _kvm_run_debug
    mmio: _kvm_run_mmio
    hypercall: _kvm_run_hypercall
    internal: _kvm_run_internal
    system_event: _kvm_run_system_event
    msr: _kvm_run_msr
    padding: bytes

    _fields_ = [
        ("hw", _kvm_run_hw),
        ("fail_entry", _kvm_run_fail_entry),
        ("ex", _kvm_run_ex),
        ("io", _kvm_run_io),
        ("debug", _kvm_run_debug),
        ("mmio", _kvm_run_mmio),
        ("hypercall", _kvm_run_hypercall),
        ("internal", _kvm_run_internal),
        ("system_event", _kvm_run_system_event),
        ("msr", _kvm_run_msr),
        # The other exits (s390, papr, ...) are reached through these raw bytes.
        ("padding", c_char * 256),
    ]


SYNC_REGS_SIZE_BYTES = 2048


class _kvm_run_s(KernelUnion):
    regs: kvm_sync_regs
    padding: bytes

    _fields_ = [("regs", kvm_sync_regs), ("padding", c_char * SYNC_REGS_SIZE_BYTES)]


class kvm_run(KernelStruct):
    """``struct kvm_run``: the page shared with the kernel through which KVM_RUN reports exits."""

    request_interrupt_window: int
    immediate_exit: int
    padding1: Array[c_uint8]
    exit_reason: int
    ready_for_interrupt_injection: int
    if_flag: int
    flags: int
    cr8: int
    apic_base: int
    _exit: _kvm_run_exit
    hw: _kvm_run_hw
    fail_entry: _kvm_run_fail_entry
    ex: _kvm_run_ex
    io: _kvm_run_io
    debug: _kvm_run_debug
    mmio: _kvm_run_mmio
    hypercall: _kvm_run_hypercall
    internal: _kvm_run_internal
    system_event: _kvm_run_system_event
    msr: _kvm_run_msr
    padding: bytes
    kvm_valid_regs: int
    kvm_dirty_regs: int
    s: _kvm_run_s

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
KERNEL_STRUCTS: tuple[type[KernelStruct], ...] = (
    kvm_userspace_memory_region, kvm_irq_level, kvm_pic_state, kvm_ioapic_state, kvm_irqchip,
    kvm_pit_config, kvm_regs, kvm_lapic_state, kvm_segment, kvm_dtable, kvm_sregs, kvm_fpu,
    kvm_msr_entry, kvm_msrs, kvm_msr_list, kvm_cpuid_entry2, kvm_cpuid2, kvm_pit_channel_state,
    kvm_pit_state2, kvm_debug_exit_arch, kvm_guest_debug_arch, kvm_guest_debug, kvm_vcpu_events,
    kvm_debugregs, kvm_xsave, kvm_xcr, kvm_xcrs, kvm_sync_regs, kvm_mp_state, kvm_clock_data,
    kvm_dirty_log, kvm_irqfd, kvm_ioeventfd, kvm_run, kvm_enable_cap,
)

# ---- variable-length structures ----

def field_offset(struct: type[KernelStruct | KernelUnion], name: str) -> int:
    """The byte offset of field ``name`` in ``struct`` (C's ``offsetof``)."""
    return int(getattr(struct, name).offset)


_S = TypeVar("_S", bound=KernelStruct)
_flex_cache: dict[tuple[type[KernelStruct], int], type[KernelStruct]] = {}


def _flex_type(base: type[_S], element: type[Any], n: int) -> type[_S]:
    """A subclass of ``base`` whose trailing flexible array holds ``n`` elements.

    A ctypes subclass appends its fields to its base's: the base ends with the zero-length array,
    so the new array of the same name starts at the same offset and hides it.
    """
    if n < 0:
        raise ValueError(f"entry count must be >= 0, not {n}")
    key = (base, n)
    cls = _flex_cache.get(key)
    if cls is None:
        name = base._fields_[-1][0]
        cls = type(f"{base.__name__}_{n}", (base,), {"_fields_": [(name, element * n)]})
        _flex_cache[key] = cls
    return cls  # type: ignore[return-value]


def make_kvm_msrs(entries: Iterable[tuple[int, int]] | int) -> kvm_msrs:
    """A ``kvm_msrs`` with room for N entries, or filled from ``(index, data)`` pairs."""
    items = [] if isinstance(entries, int) else list(entries)
    n = entries if isinstance(entries, int) else len(items)
    obj = _flex_type(kvm_msrs, kvm_msr_entry, n)()
    obj.nmsrs = n
    for i, (index, data) in enumerate(items):
        obj.entries[i].index = index
        obj.entries[i].data = data
    return obj


def make_kvm_msr_list(n: int) -> kvm_msr_list:
    """A ``kvm_msr_list`` with room for ``n`` indices."""
    obj = _flex_type(kvm_msr_list, c_uint32, n)()
    obj.nmsrs = n
    return obj


def make_kvm_cpuid2(entries: Iterable[kvm_cpuid_entry2] | int) -> kvm_cpuid2:
    """A ``kvm_cpuid2`` with room for N entries, or holding copies of the given entries."""
    items = [] if isinstance(entries, int) else list(entries)
    n = entries if isinstance(entries, int) else len(items)
    obj = _flex_type(kvm_cpuid2, kvm_cpuid_entry2, n)()
    obj.nent = n
    for i, e in enumerate(items):
        ctypes.memmove(ctypes.addressof(obj.entries[i]), ctypes.addressof(e), sizeof(e))
    return obj


