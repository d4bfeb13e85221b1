"""The PVH boot ABI: Xen's ``hvm_start_info`` and the ELF note that marks a PVH entry point.

Mirrors ``xen/include/public/arch-x86/hvm/start_info.h`` (also in Linux as
``include/xen/interface/hvm/start_info.h``) and the ``XEN_ELFNOTE_PHYS32_ENTRY`` note number from
``xen/include/public/elfnote.h``. A PVH kernel is entered in 32-bit protected mode without paging,
with the physical address of an ``hvm_start_info`` in EBX.
"""

from __future__ import annotations

from ctypes import c_uint32, c_uint64

from kvmlib.ioctl.structs import KernelStruct

#: ``hvm_start_info.magic``: "xEn3" with the 0x80 bit of the "E" set.
XEN_HVM_START_MAGIC_VALUE = 0x336EC578
#: Version 1 adds the memory map fields; Linux falls back to a Xen hypercall without them.
HVM_START_INFO_VERSION = 1
#: The ELF note (owner "Xen") whose descriptor is the 32-bit physical PVH entry point.
XEN_ELFNOTE_PHYS32_ENTRY = 18
XEN_ELFNOTE_NAME = b"Xen"

# hvm_memmap_table_entry.type: the same numbers as the e820 types.
XEN_HVM_MEMMAP_TYPE_RAM = 1
XEN_HVM_MEMMAP_TYPE_RESERVED = 2
XEN_HVM_MEMMAP_TYPE_ACPI = 3
XEN_HVM_MEMMAP_TYPE_NVS = 4
XEN_HVM_MEMMAP_TYPE_UNUSABLE = 5
XEN_HVM_MEMMAP_TYPE_DISABLED = 6
XEN_HVM_MEMMAP_TYPE_PMEM = 7


class hvm_start_info(KernelStruct):
    """``struct hvm_start_info``: the start-of-day block a PVH kernel finds at EBX."""

    magic: int
    version: int
    flags: int
    nr_modules: int
    modlist_paddr: int
    cmdline_paddr: int
    rsdp_paddr: int
    memmap_paddr: int
    memmap_entries: int
    reserved: int

    _fields_ = [
        ("magic", c_uint32),
        ("version", c_uint32),
        ("flags", c_uint32),
        ("nr_modules", c_uint32),
        ("modlist_paddr", c_uint64),
        ("cmdline_paddr", c_uint64),
        ("rsdp_paddr", c_uint64),
        # Version 1 and later:
        ("memmap_paddr", c_uint64),
        ("memmap_entries", c_uint32),
        ("reserved", c_uint32),
    ]


class hvm_modlist_entry(KernelStruct):
    """``struct hvm_modlist_entry``: one module; Linux takes the first as its initrd."""

    paddr: int
    size: int
    cmdline_paddr: int
    reserved: int

    _fields_ = [
        ("paddr", c_uint64),
        ("size", c_uint64),
        ("cmdline_paddr", c_uint64),
        ("reserved", c_uint64),
    ]


class hvm_memmap_table_entry(KernelStruct):
    """``struct hvm_memmap_table_entry``: one range of the PVH memory map."""

    addr: int
    size: int
    type: int
    reserved: int

    _fields_ = [
        ("addr", c_uint64),
        ("size", c_uint64),
        ("type", c_uint32),
        ("reserved", c_uint32),
    ]


#: Every structure above, for the layout test.
START_INFO_STRUCTS = (hvm_start_info, hvm_modlist_entry, hvm_memmap_table_entry)

__all__ = [
    "HVM_START_INFO_VERSION", "START_INFO_STRUCTS", "XEN_ELFNOTE_NAME", "XEN_ELFNOTE_PHYS32_ENTRY",
    "XEN_HVM_MEMMAP_TYPE_ACPI", "XEN_HVM_MEMMAP_TYPE_DISABLED", "XEN_HVM_MEMMAP_TYPE_NVS",
    "XEN_HVM_MEMMAP_TYPE_PMEM", "XEN_HVM_MEMMAP_TYPE_RAM", "XEN_HVM_MEMMAP_TYPE_RESERVED",
    "XEN_HVM_MEMMAP_TYPE_UNUSABLE", "XEN_HVM_START_MAGIC_VALUE", "hvm_memmap_table_entry",
    "hvm_modlist_entry", "hvm_start_info",
]
