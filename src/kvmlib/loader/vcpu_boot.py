"""``setup_vcpu_for_boot``: put the boot vCPU in the state the kernel's entry point requires.

The 64-bit boot protocol (boot.rst, "64-bit Boot Protocol") wants long mode with paging, an identity
map over the kernel, zero page and command line, and a GDT whose ``__BOOT_CS`` (0x10) is a flat code
segment and ``__BOOT_DS`` (0x18) a flat data segment, with CS = __BOOT_CS and DS, ES, SS = __BOOT_DS,
interrupts off and RSI = the zero page. PVH (Xen's ``docs/misc/pvh.pandoc``) wants 32-bit protected
mode, paging off, CS a flat 32-bit code segment, DS/ES/SS flat 32-bit data, TR a 32-bit TSS with
base 0 and limit 0x67, CR4 = 0, EFER clear, IF/TF/VM clear, and EBX = the ``hvm_start_info``.

Both are boot states (:class:`kvmlib.arch.x86_64.regs.BootState`): this module only says which, and the one
writer of boot state (:mod:`kvmlib.arch.x86_64.regs`) writes the tables and loads the registers.
"""

from __future__ import annotations

from kvmlib.arch.x86_64.regs import (
    BOOT_CS,
    BOOT_DS,
    BOOT_TSS,
    PML4_START,
    BootProtocol,
    BootState,
    set_boot_registers,
    write_boot_tables,
)
from kvmlib.errors import GuestMemoryError
from kvmlib.ioctl import VcpuFd
from kvmlib.loader.boot import BootMode, BootSetup
from kvmlib.loader.errors import LoaderError
from kvmlib.memory import GuestMemoryMmap


def boot_state(boot: BootSetup) -> BootState:
    """The registers the boot vCPU starts with for ``boot``."""
    protocol = BootProtocol.PROTECTED_MODE if boot.mode is BootMode.PVH else BootProtocol.LONG_MODE
    return BootState(protocol, boot.rip, boot.stack_pointer, boot.rsi, boot.rbx)


def setup_vcpu_for_boot(vcpu: VcpuFd, memory: GuestMemoryMmap, boot: BootSetup) -> None:
    """Set the boot vCPU's segments, control registers and general registers for ``boot``.

    Writes the GDT (and, for the 64-bit protocol, the page tables identity-mapping the first GiB)
    to guest memory, then KVM_SET_SREGS and KVM_SET_REGS: RIP = entry, RSP = RBP = the boot stack,
    RFLAGS = 0x2, RSI = the zero page (64-bit) or RBX = the ``hvm_start_info`` (PVH), every other
    register 0.

    Call it for vCPU 0 only (the others wait for INIT/SIPI from the kernel) and start the VM with
    ``run()`` given no address, since ``run(addr)`` would load a bare 64-bit entry instead.

    Raises:
        LoaderError: guest memory does not hold the boot tables.
        KvmIoctlError: KVM rejected the register state.
    """
    state = boot_state(boot)
    try:
        write_boot_tables(memory, state.protocol)
    except GuestMemoryError as e:
        raise LoaderError(f"guest memory cannot hold the boot tables below {PML4_START:#x}: {e}") from e
    set_boot_registers(vcpu, state)


__all__ = ["BOOT_CS", "BOOT_DS", "BOOT_TSS", "boot_state", "setup_vcpu_for_boot"]
