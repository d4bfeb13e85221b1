"""Load a Linux kernel into guest memory and prepare its boot: the x86 boot protocol and PVH.

A VMM boots a kernel in this order (64-bit boot protocol and PVH alike)::

    memory = GuestMemoryMmap.from_ranges(guest_ram_ranges(mem_size))   # RAM split around the MMIO gap
    kernel = load_kernel(memory, "/boot/vmlinuz")                        # bzImage or ELF vmlinux
    boot = configure_boot(memory, kernel, "console=ttyS0", initrd="/boot/initrd.img")
    vm = KvmVm.new(kvm, VmConfig.from_kvm(kvm, num_vcpus), memory, handler, bus)  # MP table, vCPUs
    vm.load_boot_state(boot_state(boot))                                 # GDT, page tables, vCPU 0
    vm.run()                                                             # no address: keep the registers

``configure_boot`` and ``KvmVm.new`` may come in either order (they write disjoint memory; creating
a vCPU writes none). :func:`setup_vcpu_for_boot` does what ``load_boot_state`` does on a bare
:class:`~kvmlib.VcpuFd`. A bzImage
or a plain ELF vmlinux is entered in 64-bit mode with RSI = the zero page; an ELF vmlinux with a
PVH note is entered through PVH (32-bit protected mode, EBX = ``hvm_start_info``) unless
``configure_boot(..., pvh=False)`` asks for its 64-bit entry instead.

The memory layout is described in :mod:`kvmlib.loader.layout`.
"""

from kvmlib.loader.boot import BootMode, BootSetup, configure_boot
from kvmlib.loader.e820 import E820Entry, E820Type, build_e820
from kvmlib.loader.errors import LoaderError
from kvmlib.loader.image import ImageSource, KernelKind, LoadedKernel
from kvmlib.loader.kernel import load_kernel
from kvmlib.loader.layout import (
    CMDLINE_MAX_SIZE,
    CMDLINE_START,
    IDENTITY_MAP_END,
    MMIO_GAP_END,
    MMIO_GAP_SIZE,
    MMIO_GAP_START,
    guest_ram_ranges,
)
from kvmlib.loader.vcpu_boot import boot_state, setup_vcpu_for_boot

__all__ = [
    "CMDLINE_MAX_SIZE",
    "CMDLINE_START",
    "IDENTITY_MAP_END",
    "MMIO_GAP_END",
    "MMIO_GAP_SIZE",
    "MMIO_GAP_START",
    "BootMode",
    "BootSetup",
    "E820Entry",
    "E820Type",
    "ImageSource",
    "KernelKind",
    "LoadedKernel",
    "LoaderError",
    "boot_state",
    "build_e820",
    "configure_boot",
    "guest_ram_ranges",
    "load_kernel",
    "setup_vcpu_for_boot",
]
