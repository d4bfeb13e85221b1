"""Register state for a 64-bit boot: GDT, identity-mapped page tables, segments, FPU and LAPIC.

The low guest-physical pages below hold what this module writes; a guest program must not be
loaded over them:

======================  =========================================
``0x0500 - 0x051f``     GDT (null, code, data, TSS descriptors)
``0x0520 - 0x0527``     IDT (empty: the guest installs its own)
``0x7000``              zero page pointer given in RSI
``0x8ff0``              initial stack pointer (grows down)
``0x9000 - 0xbfff``     PML4, PDPT and PD identity-mapping the first GiB with 2 MiB pages
======================  =========================================
"""

from __future__ import annotations

import struct

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
#: The first guest-physical address past what :func:`setup_sregs` writes.
BOOT_DATA_END = 0xC000

X86_CR0_PE = 1 << 0
X86_CR0_ET = 1 << 4
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


# Null, 64-bit code, data, and a busy TSS: what long mode needs to run ring-0 code.
BOOT_GDT = (
    gdt_entry(0, 0, 0),
    gdt_entry(0xA09B, 0, 0xFFFFF),
    gdt_entry(0xC093, 0, 0xFFFFF),
    gdt_entry(0x808B, 0, 0xFFFFF),
)


def write_boot_tables(memory: GuestMemoryMmap) -> None:
    """Write the GDT, the empty IDT and the page tables identity-mapping the first GiB."""
    memory.write(GuestAddress(BOOT_GDT_OFFSET), struct.pack(f"<{len(BOOT_GDT)}Q", *BOOT_GDT))
    memory.write(GuestAddress(BOOT_IDT_OFFSET), bytes(8))
    table = PAGE_PRESENT_RW | PAGE_ACCESSED
    memory.write(GuestAddress(PML4_START), struct.pack("<Q", PDPTE_START | table))
    memory.write(GuestAddress(PDPTE_START), struct.pack("<Q", PDE_START | table))
    pdes = [(i << 21) | PAGE_PS | PAGE_PRESENT_RW | PAGE_ACCESSED | PAGE_DIRTY for i in range(512)]
    memory.write(GuestAddress(PDE_START), struct.pack("<512Q", *pdes))


def setup_sregs(vcpu: VcpuFd, memory: GuestMemoryMmap) -> None:
    """Put the vCPU in 64-bit long mode with paging on, using the tables in guest memory."""
    write_boot_tables(memory)
    sregs = vcpu.get_sregs()
    code = segment_from_gdt(BOOT_GDT[1], 1)
    data = segment_from_gdt(BOOT_GDT[2], 2)
    tss = segment_from_gdt(BOOT_GDT[3], 3)
    sregs.gdt.base, sregs.gdt.limit = BOOT_GDT_OFFSET, len(BOOT_GDT) * 8 - 1
    sregs.idt.base, sregs.idt.limit = BOOT_IDT_OFFSET, 7
    sregs.cs = code
    sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = data
    sregs.tr = tss
    sregs.cr3 = PML4_START
    sregs.cr4 |= X86_CR4_PAE
    sregs.cr0 |= X86_CR0_PE | X86_CR0_PG | X86_CR0_ET
    sregs.efer |= EFER_LME | EFER_LMA
    vcpu.set_sregs(sregs)


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


def setup_boot_regs(vcpu: VcpuFd, instruction_pointer: int) -> None:
    """Start at ``instruction_pointer`` with the boot stack and the zero page in RSI."""
    regs = kvm_regs()
    regs.rflags = 0x2  # bit 1 is reserved and must be set
    regs.rip = instruction_pointer
    regs.rsp = regs.rbp = BOOT_STACK_POINTER
    regs.rsi = ZERO_PAGE_START
    vcpu.set_regs(regs)


__all__ = [
    "BOOT_DATA_END", "setup_boot_regs", "setup_fpu", "setup_lapic", "setup_sregs",
    "write_boot_tables",
]
