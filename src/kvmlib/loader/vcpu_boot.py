"""``setup_vcpu_for_boot``: put the boot vCPU in the state the kernel's entry point requires.

The 64-bit boot protocol (boot.rst, "64-bit Boot Protocol") wants long mode with paging, an
identity map over the kernel, zero page and command line, and a GDT whose ``__BOOT_CS`` (0x10) is a
flat code segment and ``__BOOT_DS`` (0x18) a flat data segment, with CS = __BOOT_CS and DS, ES, SS =
__BOOT_DS, interrupts off and RSI = the zero page. regs.py's ``setup_sregs`` (applied by
:class:`kvmlib.KvmVcpu` at creation) loads CS = 0x08 and DS = 0x10 instead; Linux reloads its own
GDT first thing and copes, but this module follows the protocol: it rewrites the 4-entry GDT at
``BOOT_GDT_OFFSET`` as null, TSS (0x08), __BOOT_CS (0x10), __BOOT_DS (0x18) — the same size and place,
so nothing else in low memory moves — and reuses regs.py's identity-mapping page tables.

PVH (Xen's ``docs/misc/pvh.pandoc``) wants 32-bit protected mode, paging off, CS a flat 32-bit
code segment, DS/ES/SS flat 32-bit data, TR a 32-bit TSS with base 0 and limit 0x67, CR4 = 0, EFER
clear, IF/TF/VM clear, and EBX = the ``hvm_start_info``; the same GDT slots hold the 32-bit
descriptors.
"""

from __future__ import annotations

import struct

from kvmlib.arch.x86_64.regs import (
    BOOT_GDT_OFFSET,
    BOOT_IDT_OFFSET,
    EFER_LMA,
    EFER_LME,
    PML4_START,
    X86_CR0_ET,
    X86_CR0_PE,
    X86_CR0_PG,
    X86_CR4_PAE,
    gdt_entry,
    segment_from_gdt,
    write_boot_tables,
)
from kvmlib.errors import GuestMemoryError
from kvmlib.ioctl import VcpuFd, kvm_regs
from kvmlib.loader.boot import BootMode, BootSetup
from kvmlib.loader.errors import LoaderError
from kvmlib.loader.image import write_guest
from kvmlib.memory import GuestMemoryMmap

#: The boot protocol's selectors (``arch/x86/include/asm/segment.h``).
BOOT_CS = 0x10
BOOT_DS = 0x18
#: The TSS sits in the slot the protocol leaves free, so the GDT keeps regs.py's four entries.
BOOT_TSS = 0x08

#: Null, 64-bit TSS (8-byte form, as regs.py uses: it is only ever cached, never reloaded), flat
#: 64-bit code, flat data.
LINUX_64_GDT = (
    gdt_entry(0, 0, 0),
    gdt_entry(0x808B, 0, 0xFFFFF),
    gdt_entry(0xA09B, 0, 0xFFFFF),
    gdt_entry(0xC093, 0, 0xFFFFF),
)
#: Null, 32-bit busy TSS (base 0, limit 0x67), flat 32-bit code, flat 32-bit data.
PVH_GDT = (
    gdt_entry(0, 0, 0),
    gdt_entry(0x008B, 0, 0x67),
    gdt_entry(0xC09B, 0, 0xFFFFF),
    gdt_entry(0xC093, 0, 0xFFFFF),
)
X86_CR0_NW = 1 << 29
X86_CR0_CD = 1 << 30
_RFLAGS_RESERVED = 0x2  # bit 1 is reserved and must be set; IF, TF and VM stay clear


def setup_vcpu_for_boot(vcpu: VcpuFd, memory: GuestMemoryMmap, boot: BootSetup) -> None:
    """Set the boot vCPU's segments, control registers and general registers for ``boot``.

    Writes the page tables (regs.py's, identity-mapping the first GiB) and the GDT to guest memory,
    then KVM_SET_SREGS and KVM_SET_REGS: RIP = entry, RSP = RBP = the boot stack, RFLAGS = 0x2,
    RSI = the zero page (64-bit) or RBX = the ``hvm_start_info`` (PVH), every other register 0.

    Call it for vCPU 0 only (the others wait for INIT/SIPI from the kernel), after the vCPU exists —
    creating a :class:`kvmlib.KvmVcpu` rewrites the GDT — and start the VM with ``run()`` given no
    address, since ``run(addr)`` would reset the registers set here.

    Raises:
        LoaderError: guest memory does not hold the boot tables.
        KvmIoctlError: KVM rejected the register state.
    """
    pvh = boot.mode is BootMode.PVH
    gdt = PVH_GDT if pvh else LINUX_64_GDT
    try:
        write_boot_tables(memory)  # the page tables, and a GDT replaced just below
    except GuestMemoryError as e:
        raise LoaderError(f"guest memory cannot hold the boot page tables at {PML4_START:#x}: {e}") from e
    write_guest(memory, BOOT_GDT_OFFSET, struct.pack(f"<{len(gdt)}Q", *gdt), "boot GDT")
    sregs = vcpu.get_sregs()
    sregs.gdt.base, sregs.gdt.limit = BOOT_GDT_OFFSET, len(gdt) * 8 - 1
    sregs.idt.base, sregs.idt.limit = BOOT_IDT_OFFSET, 7
    sregs.cs = segment_from_gdt(gdt[BOOT_CS // 8], BOOT_CS // 8)
    sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = segment_from_gdt(gdt[BOOT_DS // 8],
                                                                          BOOT_DS // 8)
    sregs.tr = segment_from_gdt(gdt[BOOT_TSS // 8], BOOT_TSS // 8)
    if pvh:
        sregs.cr0 = X86_CR0_PE | X86_CR0_ET
        sregs.cr3 = 0
        sregs.cr4 = 0
        sregs.efer &= ~(EFER_LME | EFER_LMA)
    else:
        sregs.cr3 = PML4_START
        sregs.cr4 |= X86_CR4_PAE
        # Caches on, as firmware hands over: KVM's reset CR0 has CD and NW set, and nothing
        # obliges the kernel to clear them before it has decompressed itself.
        sregs.cr0 = (sregs.cr0 | X86_CR0_PE | X86_CR0_PG | X86_CR0_ET) & ~(X86_CR0_CD | X86_CR0_NW)
        sregs.efer |= EFER_LME | EFER_LMA
    vcpu.set_sregs(sregs)
    regs = kvm_regs()
    regs.rflags = _RFLAGS_RESERVED
    regs.rip = boot.rip
    regs.rsp = regs.rbp = boot.stack_pointer
    regs.rsi = boot.rsi
    regs.rbx = boot.rbx
    vcpu.set_regs(regs)


__all__ = ["BOOT_CS", "BOOT_DS", "BOOT_TSS", "LINUX_64_GDT", "PVH_GDT", "setup_vcpu_for_boot"]
