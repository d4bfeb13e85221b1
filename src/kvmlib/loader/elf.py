"""ELF vmlinux: check the headers, load PT_LOAD segments at their physical addresses, find the PVH note.

Only what a kernel image needs is supported: ELF64, little-endian, x86-64, ``ET_EXEC``. Every
offset and size is checked against the file before it is used. The structures mirror ``<elf.h>``.
"""

from __future__ import annotations

import ctypes
from ctypes import Structure, c_uint8, c_uint16, c_uint32, c_uint64

import attrs

from kvmlib.loader.errors import LoaderError
from kvmlib.loader.image import KernelKind, LoadedKernel, check_kernel_fits, write_guest, zero_guest
from kvmlib.loader.start_info import XEN_ELFNOTE_NAME, XEN_ELFNOTE_PHYS32_ENTRY
from kvmlib.memory import GuestMemoryMmap

ELFMAG = b"\x7fELF"
EI_CLASS, EI_DATA = 4, 5
ELFCLASS32, ELFCLASS64 = 1, 2
ELFDATA2LSB = 1
ET_EXEC = 2
EM_X86_64 = 62
PT_LOAD = 1
PT_NOTE = 4
PN_XNUM = 0xFFFF

_ADDR_LIMIT = 1 << 64


class Elf64_Ehdr(Structure):
    """``Elf64_Ehdr``: the ELF file header."""

    _fields_ = [
        ("e_ident", c_uint8 * 16),
        ("e_type", c_uint16),
        ("e_machine", c_uint16),
        ("e_version", c_uint32),
        ("e_entry", c_uint64),
        ("e_phoff", c_uint64),
        ("e_shoff", c_uint64),
        ("e_flags", c_uint32),
        ("e_ehsize", c_uint16),
        ("e_phentsize", c_uint16),
        ("e_phnum", c_uint16),
        ("e_shentsize", c_uint16),
        ("e_shnum", c_uint16),
        ("e_shstrndx", c_uint16),
    ]


class Elf64_Phdr(Structure):
    """``Elf64_Phdr``: one program header (segment)."""

    _fields_ = [
        ("p_type", c_uint32),
        ("p_flags", c_uint32),
        ("p_offset", c_uint64),
        ("p_vaddr", c_uint64),
        ("p_paddr", c_uint64),
        ("p_filesz", c_uint64),
        ("p_memsz", c_uint64),
        ("p_align", c_uint64),
    ]


class Elf64_Nhdr(Structure):
    """``Elf64_Nhdr``: the header of one note; name and descriptor follow, each padded."""

    _fields_ = [("n_namesz", c_uint32), ("n_descsz", c_uint32), ("n_type", c_uint32)]


_EHDR_SIZE = ctypes.sizeof(Elf64_Ehdr)
_PHDR_SIZE = ctypes.sizeof(Elf64_Phdr)
_NHDR_SIZE = ctypes.sizeof(Elf64_Nhdr)


@attrs.define(frozen=True, slots=True)
class ElfSegment:
    """A PT_LOAD segment, checked against the file.

    ``filesz`` bytes from file offset ``offset`` go to ``paddr``, then zeros up to ``memsz``.
    """

    offset: int
    paddr: int
    vaddr: int
    filesz: int
    memsz: int

    @property
    def end(self) -> int:
        """The first physical address past the segment in memory."""
        return self.paddr + self.memsz


@attrs.define(frozen=True, slots=True)
class ElfInfo:
    """What :func:`parse_elf` found.

    Attributes:
        segments: the non-empty PT_LOAD segments, in file order.
        entry: the ELF entry point as a physical address.
        pvh_entry: the 32-bit PVH entry point from a ``XEN_ELFNOTE_PHYS32_ENTRY`` note, if any.
    """

    segments: tuple[ElfSegment, ...]
    entry: int
    pvh_entry: int | None

    @property
    def load_addr(self) -> int:
        """The lowest physical address a segment occupies."""
        return min(s.paddr for s in self.segments)

    @property
    def load_end(self) -> int:
        """The first physical address past the highest segment."""
        return max(s.end for s in self.segments)


def _phdrs(data: bytes, ehdr: Elf64_Ehdr) -> list[Elf64_Phdr]:
    if ehdr.e_phnum == 0:
        raise LoaderError("the ELF file has no program headers: nothing to load")
    if ehdr.e_phnum == PN_XNUM:
        raise LoaderError("the ELF file has 65535 or more program headers (PN_XNUM); not a kernel")
    if ehdr.e_phentsize != _PHDR_SIZE:
        raise LoaderError(f"e_phentsize is {ehdr.e_phentsize}, not {_PHDR_SIZE} as ELF64 requires")
    end = ehdr.e_phoff + ehdr.e_phnum * _PHDR_SIZE
    if end > len(data):
        raise LoaderError(f"the program headers [{ehdr.e_phoff:#x}, {end:#x}) run past the end of "
                          f"the {len(data)}-byte file: it is truncated or damaged")
    return [Elf64_Phdr.from_buffer_copy(data, ehdr.e_phoff + i * _PHDR_SIZE)
            for i in range(ehdr.e_phnum)]


def _segment(data: bytes, index: int, ph: Elf64_Phdr) -> ElfSegment:
    if ph.p_offset + ph.p_filesz > len(data):
        raise LoaderError(f"PT_LOAD segment {index}'s file bytes [{ph.p_offset:#x}, "
                          f"{ph.p_offset + ph.p_filesz:#x}) run past the end of the {len(data)}-byte "
                          "file: it is truncated")
    if ph.p_filesz > ph.p_memsz:
        raise LoaderError(f"PT_LOAD segment {index} has p_filesz {ph.p_filesz:#x} > p_memsz "
                          f"{ph.p_memsz:#x}")
    if ph.p_paddr + ph.p_memsz > _ADDR_LIMIT:
        raise LoaderError(f"PT_LOAD segment {index} at {ph.p_paddr:#x} (+{ph.p_memsz:#x}) wraps "
                          "past the end of the address space")
    return ElfSegment(offset=ph.p_offset, paddr=ph.p_paddr, vaddr=ph.p_vaddr, filesz=ph.p_filesz,
                      memsz=ph.p_memsz)


def _pvh_entry(data: bytes, phdrs: list[Elf64_Phdr]) -> int | None:
    """The descriptor of a Xen PHYS32_ENTRY note in a PT_NOTE segment, if there is one."""
    for index, ph in enumerate(phdrs):
        if ph.p_type != PT_NOTE:
            continue
        start, end = ph.p_offset, ph.p_offset + ph.p_filesz
        if end > len(data):
            raise LoaderError(f"PT_NOTE segment {index} [{start:#x}, {end:#x}) runs past the end of "
                              f"the {len(data)}-byte file: it is truncated")
        # Notes are 4-byte aligned in practice (Linux's too), even in ELF64; honour an 8 if asked.
        align = 8 if ph.p_align == 8 else 4
        pos = start
        while pos + _NHDR_SIZE <= end:
            note = Elf64_Nhdr.from_buffer_copy(data, pos)
            name_at = pos + _NHDR_SIZE
            desc_at = name_at + -(-note.n_namesz // align) * align
            next_at = desc_at + -(-note.n_descsz // align) * align
            if desc_at + note.n_descsz > end:
                raise LoaderError(f"a note at {pos:#x} in PT_NOTE segment {index} runs past the "
                                  "segment's end: the file is damaged")
            name = data[name_at:name_at + note.n_namesz].rstrip(b"\0")
            if name == XEN_ELFNOTE_NAME and note.n_type == XEN_ELFNOTE_PHYS32_ENTRY:
                if note.n_descsz not in (4, 8):
                    raise LoaderError(f"the Xen PHYS32_ENTRY note has a {note.n_descsz}-byte "
                                      "descriptor; 4 or 8 bytes were expected")
                value = int.from_bytes(data[desc_at:desc_at + note.n_descsz], "little")
                if value >= 1 << 32:
                    raise LoaderError(f"the PVH entry point {value:#x} is not a 32-bit address")
                return value
            pos = next_at
    return None


def _physical_entry(e_entry: int, segments: tuple[ElfSegment, ...]) -> int:
    """``e_entry`` as a physical address.

    As is if a segment holds it physically (vmlinux gives a physical one), else translated
    through the segment whose virtual range holds it.
    """
    for seg in segments:
        if seg.paddr <= e_entry < seg.end:
            return e_entry
    for seg in segments:
        if seg.vaddr <= e_entry < seg.vaddr + seg.memsz:
            return e_entry - seg.vaddr + seg.paddr
    raise LoaderError(f"the ELF entry point {e_entry:#x} is inside no PT_LOAD segment, physically "
                      "or virtually")


def parse_elf(data: bytes) -> ElfInfo:
    """Parse and check an ELF64 x86-64 kernel without touching guest memory.

    Raises:
        LoaderError: not ELF64 little-endian x86-64 ``ET_EXEC``, headers or segments past the end
            of the file, no PT_LOAD segment, an entry point outside the segments, or a bad note.
    """
    if len(data) < _EHDR_SIZE or data[:4] != ELFMAG:
        raise LoaderError(f"not an ELF file (it is {len(data)} bytes; an ELF header needs "
                          f"{_EHDR_SIZE} starting with \\x7fELF)")
    ehdr = Elf64_Ehdr.from_buffer_copy(data)
    if ehdr.e_ident[EI_CLASS] != ELFCLASS64:
        kind = "a 32-bit" if ehdr.e_ident[EI_CLASS] == ELFCLASS32 else "an unknown-class"
        raise LoaderError(f"{kind} ELF file; only ELF64 x86-64 kernels are supported")
    if ehdr.e_ident[EI_DATA] != ELFDATA2LSB:
        raise LoaderError("a big-endian ELF file; only little-endian x86-64 kernels are supported")
    if ehdr.e_machine != EM_X86_64:
        raise LoaderError(f"an ELF file for machine {ehdr.e_machine}, not x86-64 ({EM_X86_64})")
    if ehdr.e_type != ET_EXEC:
        raise LoaderError(f"ELF type {ehdr.e_type} is not ET_EXEC ({ET_EXEC}): a vmlinux is an "
                          "executable, not a shared object or relocatable file")
    phdrs = _phdrs(data, ehdr)
    segments = tuple(_segment(data, i, ph) for i, ph in enumerate(phdrs)
                     if ph.p_type == PT_LOAD and ph.p_memsz > 0)
    if not segments:
        raise LoaderError("the ELF file has no non-empty PT_LOAD segment: nothing to load")
    entry = _physical_entry(ehdr.e_entry, segments)
    pvh = _pvh_entry(data, phdrs)
    if pvh is not None and not any(s.paddr <= pvh < s.end for s in segments):
        raise LoaderError(f"the PVH entry point {pvh:#x} is inside no PT_LOAD segment")
    return ElfInfo(segments=segments, entry=entry, pvh_entry=pvh)


def load_elf(memory: GuestMemoryMmap, data: bytes) -> LoadedKernel:
    """Check an ELF kernel and write its PT_LOAD segments to guest memory, zeroing each bss.

    Raises:
        LoaderError: the file is malformed (see :func:`parse_elf`) or a segment is not all guest RAM
            above 1 MiB; nothing is written then.
    """
    info = parse_elf(data)
    for i, seg in enumerate(info.segments):
        check_kernel_fits(memory, seg.paddr, seg.end, f"PT_LOAD segment {i} (p_paddr {seg.paddr:#x})")
    for seg in info.segments:
        write_guest(memory, seg.paddr, memoryview(data)[seg.offset:seg.offset + seg.filesz],
                    "ELF segment")
        zero_guest(memory, seg.paddr + seg.filesz, seg.memsz - seg.filesz, "ELF segment's bss")
    kind = KernelKind.ELF if info.pvh_entry is None else KernelKind.ELF_PVH
    return LoadedKernel(kind=kind, entry=info.entry if info.pvh_entry is None else info.pvh_entry,
                        load_addr=info.load_addr, load_end=info.load_end, header=None,
                        elf_entry=info.entry)


__all__ = [
    "EM_X86_64", "ET_EXEC", "PT_LOAD", "PT_NOTE", "Elf64_Ehdr", "Elf64_Nhdr", "Elf64_Phdr", "ElfInfo",
    "ElfSegment", "load_elf", "parse_elf",
]
