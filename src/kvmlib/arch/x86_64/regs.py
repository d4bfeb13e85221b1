"""The boot state of an x86-64 vCPU: GDT, identity-mapped page tables, segments, FPU and LAPIC.

This module is the one writer of a vCPU's boot state. :func:`write_boot_tables` puts the tables in
guest memory and :func:`set_boot_registers` loads the segment, control and general registers for a
:class:`BootState`; both :meth:`kvmlib.KvmVm.run` (a bare 64-bit entry) and the kernel loader
(:func:`kvmlib.loader.setup_vcpu_for_boot`) go through them. Creating a vCPU writes nothing into
guest memory.

The 64-bit GDT has the Linux boot protocol's selectors (``__BOOT_CS`` 0x10, ``__BOOT_DS`` 0x18)
with the TSS in the slot it leaves free (0x08); PVH uses the same slots for 32-bit descriptors. The
low guest-physical pages below hold what this module writes; a guest program must not be loaded over
them:

======================  =========================================
``0x0500 - 0x051f``     GDT (null, TSS, code, data descriptors)
``0x0520 - 0x0527``     IDT (empty: the guest installs its own)
``0x7000``              zero page pointer given in RSI
``0x8ff0``              initial stack pointer (grows down)
``0x9000 - 0xbfff``     PML4, PDPT and PD identity-mapping the first GiB with 2 MiB pages
======================  =========================================
"""

from __future__ import annotations

import enum
import struct

import attrs

from kvmlib.ioctl import VcpuFd, kvm_regs, kvm_segment
from kvmlib.memory import GuestAddress, GuestMemoryMmap

BOOT_GDT_OFFSET = 0x500
BOOT_IDT_OFFSET = 0x520
BOOT_GDT_MAX = 4
ZERO_PAGE_START = 0x7000
BOOT_STACK_POINTER = 0x8FF0
PML4_START = 0x9000
PDPTE_START = 0xA000
PDE_START = 0xB000
#: The first guest-physical address past what :func:`write_boot_tables` writes.
BOOT_DATA_END = 0xC000

X86_CR0_PE = 1 << 0
X86_CR0_ET = 1 << 4
X86_CR0_NW = 1 << 29
X86_CR0_CD = 1 << 30
X86_CR0_PG = 1 << 31
X86_CR4_PAE = 1 << 5
EFER_LME = 1 << 8
EFER_LMA = 1 << 10

# LAPIC local vector table registers and delivery modes.
APIC_LVT0 = 0x350
APIC_LVT1 = 0x360
APIC_MODE_NMI = 0x4
APIC_MODE_EXTINT = 0x7

PAGE_PRESENT_RW = 0x3
PAGE_PS = 0x80
# Accessed and dirty set up front: the page walker would otherwise write them into the tables on
# first use, and those writes would show up in dirty-page tracking as if the guest had made them.
PAGE_ACCESSED = 0x20
PAGE_DIRTY = 0x40


def gdt_entry(flags: int, base: int, limit: int) -> int:
    """Encode a segment descriptor from its 16 flag bits (as in 0xa09b), base and limit."""
    return (
        ((base & 0xFF000000) << (56 - 24))
        | ((flags & 0x0000F0FF) << 40)
        | ((limit & 0x000F0000) << (48 - 16))
        | ((base & 0x00FFFFFF) << 16)
        | (limit & 0x0000FFFF)
    )


def segment_from_gdt(entry: int, table_index: int) -> kvm_segment:
    """The ``kvm_segment`` KVM wants for a descriptor, as if loaded from GDT slot ``table_index``."""
    seg = kvm_segment()
    seg.base = ((entry >> 16) & 0xFFFFFF) | (((entry >> 56) & 0xFF) << 24)
    limit = (entry & 0xFFFF) | (((entry >> 48) & 0xF) << 16)
    seg.g = (entry >> 55) & 1
    # With granularity set the limit counts 4 KiB pages; KVM takes it in bytes.
    seg.limit = (limit << 12) | 0xFFF if seg.g else limit
    seg.selector = table_index * 8
    seg.type = (entry >> 40) & 0xF
    seg.present = (entry >> 47) & 1
    seg.dpl = (entry >> 45) & 3
    seg.db = (entry >> 54) & 1
    seg.s = (entry >> 44) & 1
    seg.l = (entry >> 53) & 1
    seg.avl = (entry >> 52) & 1
    seg.unusable = 0 if seg.present else 1
    return seg


#: The boot protocol's selectors (``arch/x86/include/asm/segment.h``), and the TSS in the slot the
#: protocol leaves free, so every boot GDT has the same four entries at the same place.
BOOT_TSS = 0x08
BOOT_CS = 0x10
BOOT_DS = 0x18

#: Null, busy 64-bit TSS (only ever cached, never reloaded), flat 64-bit code, flat data.
LONG_MODE_GDT = (
    gdt_entry(0, 0, 0),
    gdt_entry(0x808B, 0, 0xFFFFF),
    gdt_entry(0xA09B, 0, 0xFFFFF),
    gdt_entry(0xC093, 0, 0xFFFFF),
)
#: Null, busy 32-bit TSS (base 0, limit 0x67), flat 32-bit code, flat 32-bit data.
PROTECTED_MODE_GDT = (
    gdt_entry(0, 0, 0),
    gdt_entry(0x008B, 0, 0x67),
    gdt_entry(0xC09B, 0, 0xFFFFF),
    gdt_entry(0xC093, 0, 0xFFFFF),
)
_RFLAGS_RESERVED = 0x2  # bit 1 is reserved and must be set; IF, TF and VM stay clear


class BootProtocol(enum.Enum):
    """The CPU mode a vCPU starts its guest in."""

    #: Long mode with paging, the first GiB identity-mapped (Linux's 64-bit boot protocol, and
    #: what :meth:`kvmlib.KvmVm.run` gives a bare 64-bit program).
    LONG_MODE = "long-mode"
    #: 32-bit protected mode without paging (PVH): CR4 and EFER clear.
    PROTECTED_MODE = "protected-mode"


@attrs.define(frozen=True, slots=True)
class BootState:
    """The registers a vCPU starts with; every other general register is 0, RFLAGS 0x2.

    Attributes:
        protocol: the CPU mode.
        rip: the entry point.
        rsp: the stack pointer (RBP too).
        rsi: RSI (the zero page, for Linux's 64-bit boot protocol).
        rbx: RBX (the ``hvm_start_info``, for PVH).
    """

    protocol: BootProtocol
    rip: int
    rsp: int = BOOT_STACK_POINTER
    rsi: int = 0
    rbx: int = 0

    @classmethod
    def long_mode(cls, rip: int) -> BootState:
        """A bare 64-bit entry at ``rip``: the boot stack, and RSI at the (empty) zero page."""
        return cls(BootProtocol.LONG_MODE, int(rip), rsi=ZERO_PAGE_START)

    @property
    def gdt(self) -> tuple[int, ...]:
        """The GDT this protocol loads."""
        return LONG_MODE_GDT if self.protocol is BootProtocol.LONG_MODE else PROTECTED_MODE_GDT


def write_boot_tables(memory: GuestMemoryMmap, protocol: BootProtocol) -> None:
    """Write the protocol's GDT, an empty IDT and, for long mode, the identity-mapping page tables.

    Raises:
        GuestMemoryError: guest memory does not cover the low pages the tables live in.
    """
    gdt = LONG_MODE_GDT if protocol is BootProtocol.LONG_MODE else PROTECTED_MODE_GDT
    memory.write(GuestAddress(BOOT_GDT_OFFSET), struct.pack(f"<{len(gdt)}Q", *gdt))
    memory.write(GuestAddress(BOOT_IDT_OFFSET), bytes(8))
    if protocol is BootProtocol.LONG_MODE:
        table = PAGE_PRESENT_RW | PAGE_ACCESSED
        memory.write(GuestAddress(PML4_START), struct.pack("<Q", PDPTE_START | table))
        memory.write(GuestAddress(PDPTE_START), struct.pack("<Q", PDE_START | table))
        pdes = [(i << 21) | PAGE_PS | PAGE_PRESENT_RW | PAGE_ACCESSED | PAGE_DIRTY
                for i in range(512)]
        memory.write(GuestAddress(PDE_START), struct.pack("<512Q", *pdes))


def set_boot_registers(vcpu: VcpuFd, state: BootState) -> None:
    """Load the segment, control and general registers of ``state`` (KVM_SET_SREGS, KVM_SET_REGS).

    The tables :func:`write_boot_tables` writes must be in guest memory before the vCPU runs.
    """
    gdt = state.gdt
    sregs = vcpu.get_sregs()
    sregs.gdt.base, sregs.gdt.limit = BOOT_GDT_OFFSET, len(gdt) * 8 - 1
    sregs.idt.base, sregs.idt.limit = BOOT_IDT_OFFSET, 7
    sregs.cs = segment_from_gdt(gdt[BOOT_CS // 8], BOOT_CS // 8)
    sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = segment_from_gdt(gdt[BOOT_DS // 8],
                                                                          BOOT_DS // 8)
    sregs.tr = segment_from_gdt(gdt[BOOT_TSS // 8], BOOT_TSS // 8)
    # Caches on, as firmware hands over: KVM's reset CR0 has CD and NW set, and nothing obliges
    # a kernel to clear them before it has decompressed itself.
    cr0 = (sregs.cr0 | X86_CR0_PE | X86_CR0_ET) & ~(X86_CR0_CD | X86_CR0_NW)
    if state.protocol is BootProtocol.LONG_MODE:
        sregs.cr0 = cr0 | X86_CR0_PG
        sregs.cr3 = PML4_START
        sregs.cr4 |= X86_CR4_PAE
        sregs.efer |= EFER_LME | EFER_LMA
    else:
        sregs.cr0 = cr0 & ~X86_CR0_PG
        sregs.cr3 = 0
        sregs.cr4 = 0
        sregs.efer &= ~(EFER_LME | EFER_LMA)
    vcpu.set_sregs(sregs)
    regs = kvm_regs()
    regs.rflags = _RFLAGS_RESERVED
    regs.rip = state.rip
    regs.rsp = regs.rbp = state.rsp
    regs.rsi = state.rsi
    regs.rbx = state.rbx
    vcpu.set_regs(regs)


def setup_fpu(vcpu: VcpuFd) -> None:
    """The FPU state after FNINIT, with SSE exceptions masked."""
    fpu = vcpu.get_fpu()
    fpu.fcw = 0x37F
    fpu.mxcsr = 0x1F80
    vcpu.set_fpu(fpu)


def setup_lapic(vcpu: VcpuFd) -> None:
    """Route LINT0 as ExtINT (the PIC) and LINT1 as NMI, as a PC's firmware leaves them."""
    lapic = vcpu.get_lapic()
    # A view, not ``lapic.regs``: ctypes cuts a char array's value at the first NUL.
    raw = memoryview(lapic).cast("B")
    for reg, mode in ((APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)):
        value = int.from_bytes(raw[reg:reg + 4], "little")
        value = (value & ~0x700) | (mode << 8)
        raw[reg:reg + 4] = value.to_bytes(4, "little")
    vcpu.set_lapic(lapic)


__all__ = [
    "BOOT_CS", "BOOT_DATA_END", "BOOT_DS", "BOOT_TSS", "LONG_MODE_GDT", "PROTECTED_MODE_GDT",
    "BootProtocol", "BootState", "set_boot_registers", "setup_fpu", "setup_lapic",
    "write_boot_tables",
]
