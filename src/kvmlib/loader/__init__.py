"""Load a Linux kernel into guest memory and prepare its boot: the x86 boot protocol and PVH.

A VMM boots a kernel in this order (64-bit boot protocol and PVH alike)::

    memory = GuestMemoryMmap.from_ranges(guest_ram_ranges(mem_size))   # RAM split around the MMIO gap
    kernel = load_kernel(memory, "/boot/vmlinuz")                        # bzImage or ELF vmlinux
    boot = configure_boot(memory, kernel, "console=ttyS0", initrd="/boot/initrd.img")
    vm = KvmVm.new(kvm, VmConfig.from_kvm(kvm, num_vcpus), memory, handler, bus)  # MP table, vCPUs
    setup_vcpu_for_boot(vm.vcpus[0].vcpu_fd, memory, boot)              # after the vCPUs exist
    vm.run()                                                             # no address: keep the registers

``configure_boot`` may come before or after ``KvmVm.new`` (they write disjoint memory), but
``setup_vcpu_for_boot`` must follow it: creating a vCPU rewrites the GDT and its registers. A bzImage
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
from kvmlib.loader.vcpu_boot import setup_vcpu_for_boot

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
    "build_e820",
    "configure_boot",
    "guest_ram_ranges",
    "load_kernel",
    "setup_vcpu_for_boot",
]
