"""Where the loader puts things in guest-physical memory, and the RAM layout it expects.

The first MiB, shared with :mod:`kvmlib.arch.x86_64.regs` and :mod:`kvmlib.arch.x86_64.mptable`:

=========================  ====================================================================
``0x0500 - 0x0527``        GDT and IDT (regs.py; :func:`~kvmlib.loader.setup_vcpu_for_boot`
                           rewrites the GDT with the boot protocol's selectors)
``0x7000 - 0x7fff``        the zero page (``boot_params``), or for PVH the ``hvm_start_info``,
                           its module list (``+0x40``) and memory map (``+0x80``)
``0x8000 - 0x8fef``        the boot stack (RSP starts at 0x8ff0)
``0x9000 - 0xbfff``        page tables identity-mapping the first GiB (regs.py)
``0x20000 - 0x2ffff``      the kernel command line, NUL-terminated
``0x9fc00 - 0xfffff``      EBDA (the MP table), VGA hole and BIOS area: reserved in the e820 map
=========================  ====================================================================

Above it: the kernel from 1 MiB or its preferred address, the initrd as high as it fits in RAM
below 4 GiB, and the 32-bit MMIO gap ``[MMIO_GAP_START, 4 GiB)``, which holds no RAM (the IOAPIC
at 0xfec00000, the LAPIC at 0xfee00000 and the KVM TSS pages are there) and is reserved in the e820
map. RAM that does not fit below the gap continues at 4 GiB; :func:`guest_ram_ranges` does this
split for a VMM.
"""

from __future__ import annotations

from kvmlib.arch.x86_64.mptable import MPTABLE_START
from kvmlib.arch.x86_64.regs import ZERO_PAGE_START
from kvmlib.loader.errors import LoaderError

#: x86 page size: the alignment of everything the loader places (the host's may differ).
X86_PAGE_SIZE = 0x1000
#: The end of the real-mode-addressable low memory reported as RAM; the EBDA starts here.
EBDA_START = MPTABLE_START
#: Start of "high" memory: the default protected-mode kernel load address.
HIMEM_START = 0x100000
#: The 32-bit MMIO gap: 768 MiB below 4 GiB kept free of RAM for device registers and PCI BARs.
MMIO_GAP_START = 0xD0000000
MMIO_GAP_SIZE = 0x30000000
MMIO_GAP_END = MMIO_GAP_START + MMIO_GAP_SIZE
#: Where RAM that does not fit below the MMIO gap continues.
HIGH_RAM_START = 1 << 32
#: The kernel command line: at a fixed address well clear of the zero page and the EBDA.
CMDLINE_START = 0x20000
CMDLINE_MAX_SIZE = 0x10000
#: The zero page; for a PVH boot the same page holds hvm_start_info, modules and memory map.
BOOT_INFO_START = ZERO_PAGE_START
PVH_START_INFO_START = BOOT_INFO_START
PVH_MODLIST_START = BOOT_INFO_START + 0x40
PVH_MEMMAP_START = BOOT_INFO_START + 0x80
#: What the page tables regs.py writes identity-map: a 64-bit entry needs the kernel below it.
IDENTITY_MAP_END = 1 << 30


def guest_ram_ranges(mem_size: int) -> list[tuple[int, int]]:
    """Split ``mem_size`` bytes of guest RAM around the MMIO gap, as ``(base, size)`` pairs.

    The result feeds :meth:`kvmlib.GuestMemoryMmap.from_ranges`: one range from 0 up to the gap
    (or the whole RAM if it is smaller), and the rest, if any, from 4 GiB.

    Raises:
        LoaderError: ``mem_size`` is not a positive multiple of 4 KiB.
    """
    if not isinstance(mem_size, int) or mem_size <= 0 or mem_size % X86_PAGE_SIZE:
        raise LoaderError(f"guest RAM size {mem_size!r} must be a positive multiple of 4 KiB")
    low = min(mem_size, MMIO_GAP_START)
    ranges = [(0, low)]
    if mem_size > low:
        ranges.append((HIGH_RAM_START, mem_size - low))
    return ranges


def align_up(value: int, alignment: int) -> int:
    """``value`` rounded up to a multiple of the power of two ``alignment``."""
    return (value + alignment - 1) & ~(alignment - 1)


def align_down(value: int, alignment: int) -> int:
    """``value`` rounded down to a multiple of the power of two ``alignment``."""
    return value & ~(alignment - 1)


__all__ = [
    "BOOT_INFO_START", "CMDLINE_MAX_SIZE", "CMDLINE_START", "EBDA_START", "HIGH_RAM_START",
    "HIMEM_START", "IDENTITY_MAP_END", "MMIO_GAP_END", "MMIO_GAP_SIZE", "MMIO_GAP_START",
    "PVH_MEMMAP_START", "PVH_MODLIST_START", "PVH_START_INFO_START", "X86_PAGE_SIZE", "align_down",
    "align_up", "guest_ram_ranges",
]
