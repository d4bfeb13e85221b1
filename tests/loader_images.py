"""Synthetic kernel images for the loader tests: bzImages and ELF64 files built field by field.

The builders write the formats from the specifications (boot.rst's setup header, the ELF64
headers) rather than reusing kvmlib's parser structures, so that a test fails if the two disagree.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

# The setup header's fields as (image offset, struct format), from boot.rst.
HEADER_FIELDS = {
    "setup_sects": (0x1F1, "B"),
    "syssize": (0x1F4, "I"),
    "vid_mode": (0x1FA, "H"),
    "boot_flag": (0x1FE, "H"),
    "jump": (0x200, "H"),
    "header": (0x202, "4s"),
    "version": (0x206, "H"),
    "type_of_loader": (0x210, "B"),
    "loadflags": (0x211, "B"),
    "code32_start": (0x214, "I"),
    "ramdisk_image": (0x218, "I"),
    "ramdisk_size": (0x21C, "I"),
    "heap_end_ptr": (0x224, "H"),
    "cmd_line_ptr": (0x228, "I"),
    "initrd_addr_max": (0x22C, "I"),
    "kernel_alignment": (0x230, "I"),
    "relocatable_kernel": (0x234, "B"),
    "min_alignment": (0x235, "B"),
    "xloadflags": (0x236, "H"),
    "cmdline_size": (0x238, "I"),
    "pref_address": (0x258, "Q"),
    "init_size": (0x260, "I"),
}
HEADER_END = 0x26C  # protocol 2.15: kernel_info_offset ends here

LOADED_HIGH = 0x01
CAN_USE_HEAP = 0x80
XLF_KERNEL_64 = 0x01


def bzimage(kernel: bytes = b"", *, setup_sects: int = 4, version: int = 0x020F,
            loadflags: int = LOADED_HIGH, xloadflags: int = XLF_KERNEL_64, relocatable: int = 1,
            kernel_alignment: int = 0x200000, pref_address: int = 0x100000, init_size: int | None = None,
            cmdline_size: int = 255, initrd_addr_max: int = 0x7FFFFFFF, boot_flag: int = 0xAA55,
            magic: bytes = b"HdrS", header_end: int = HEADER_END) -> bytes:
    """A bzImage whose protected-mode kernel is ``kernel`` (its 64-bit entry is at offset 0x200)."""
    sects = setup_sects or 4
    setup = bytearray((sects + 1) * 512)
    payload = kernel.ljust(max(16, -(-len(kernel) // 16) * 16), b"\0")  # syssize counts 16-byte units
    values: dict[str, int | bytes] = {
        "setup_sects": setup_sects, "syssize": len(payload) // 16, "vid_mode": 0xFFFF,
        "boot_flag": boot_flag, "jump": 0xEB | ((header_end - 0x202) << 8), "header": magic,
        "version": version, "loadflags": loadflags, "code32_start": 0x100000,
        "initrd_addr_max": initrd_addr_max, "kernel_alignment": kernel_alignment,
        "relocatable_kernel": relocatable, "xloadflags": xloadflags, "cmdline_size": cmdline_size,
        "pref_address": pref_address,
        "init_size": init_size if init_size is not None else len(payload) + 0x10000,
    }
    for name, value in values.items():
        offset, fmt = HEADER_FIELDS[name]
        struct.pack_into("<" + fmt, setup, offset, value)
    return bytes(setup) + payload


@dataclass(frozen=True)
class Segment:
    """A PT_LOAD segment for :func:`elf64`: ``data`` at ``paddr``, then zeros up to ``memsz``."""

    paddr: int
    data: bytes
    memsz: int | None = None
    vaddr: int | None = None


EHDR = struct.Struct("<16sHHIQQQIHHHHHH")  # 64 bytes
PHDR = struct.Struct("<IIQQQQQQ")          # 56 bytes
PT_LOAD, PT_NOTE = 1, 4


def note(name: bytes, note_type: int, desc: bytes) -> bytes:
    """One ELF note, name and descriptor padded to 4 bytes."""
    name_z = name + b"\0"
    return (struct.pack("<III", len(name_z), len(desc), note_type)
            + name_z + bytes(-len(name_z) % 4) + desc + bytes(-len(desc) % 4))


def elf64(segments: Sequence[Segment], entry: int, *, notes: bytes = b"", elf_class: int = 2,
          machine: int = 62, elf_type: int = 2) -> bytes:
    """An ELF64 executable with the given PT_LOAD segments and, if ``notes``, one PT_NOTE."""
    phnum = len(segments) + (1 if notes else 0)
    offset = EHDR.size + phnum * PHDR.size
    phdrs, blobs = [], []
    for seg in segments:
        offset += -offset % 16
        memsz = seg.memsz if seg.memsz is not None else len(seg.data)
        vaddr = seg.vaddr if seg.vaddr is not None else seg.paddr
        phdrs.append(PHDR.pack(PT_LOAD, 5, offset, vaddr, seg.paddr, len(seg.data), memsz, 16))
        blobs.append((offset, seg.data))
        offset += len(seg.data)
    if notes:
        offset += -offset % 4
        phdrs.append(PHDR.pack(PT_NOTE, 4, offset, 0, 0, len(notes), len(notes), 4))
        blobs.append((offset, notes))
        offset += len(notes)
    ident = b"\x7fELF" + bytes([elf_class, 1, 1]) + bytes(9)
    image = bytearray(offset)
    image[:EHDR.size] = EHDR.pack(ident, elf_type, machine, 1, entry, EHDR.size, 0, 0, EHDR.size,
                                  PHDR.size, phnum, 64, 0, 0)
    image[EHDR.size:EHDR.size + len(phdrs) * PHDR.size] = b"".join(phdrs)
    for at, blob in blobs:
        image[at:at + len(blob)] = blob
    return bytes(image)
