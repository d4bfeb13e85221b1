"""What a loaded kernel is, and the checks every image format shares."""

from __future__ import annotations

import ctypes
import enum
import os
import stat
from typing import Union

import attrs

from kvmlib.errors import GuestMemoryError
from kvmlib.loader import bootparam
from kvmlib.loader.e820 import build_e820, describe_ram, ram_entry_containing
from kvmlib.loader.errors import LoaderError
from kvmlib.loader.layout import HIMEM_START
from kvmlib.memory import GuestMemoryMmap

#: A kernel image or initrd: its bytes, or the path of a file holding them.
ImageSource = Union[bytes, bytearray, memoryview, str, "os.PathLike[str]"]

_MIB = 1 << 20


class KernelKind(enum.Enum):
    """The format of a loaded kernel, which decides how it is entered."""

    #: A bzImage, entered through the 64-bit boot protocol at load address + 0x200.
    BZIMAGE = "bzImage"
    #: An ELF vmlinux without a PVH note, entered in 64-bit mode at its ELF entry point.
    ELF = "elf"
    #: An ELF vmlinux with a ``XEN_ELFNOTE_PHYS32_ENTRY`` note, entered there through PVH.
    ELF_PVH = "elf-pvh"


@attrs.define(frozen=True, slots=True)
class LoadedKernel:
    """A kernel written to guest memory by :func:`~kvmlib.loader.load_kernel`.

    Attributes:
        kind: the image format.
        entry: where the vCPU starts: the 64-bit entry for BZIMAGE and ELF, the 32-bit PVH entry
            for ELF_PVH.
        load_addr: the lowest guest-physical address the kernel occupies.
        load_end: the first address past the memory the kernel needs to run (for a bzImage
            ``init_size`` from its run address, which covers decompression); the initrd goes above.
        header: for a bzImage, its setup header bytes (image offset 0x1f1 up to the header's end),
            to be copied into the zero page; None for ELF.
        elf_entry: for ELF kinds, the ELF entry point as a physical address (a 64-bit entry, also
            usable for a PVH kernel booted the 64-bit way); None for a bzImage.
        cmdline_size: the longest command line the kernel takes, without the terminating NUL.
        initrd_addr_max: the highest address the initrd may occupy.
    """

    kind: KernelKind
    entry: int
    load_addr: int
    load_end: int
    header: bytes | None = None
    elf_entry: int | None = None
    # ELF kernels have no header to say: x86's COMMAND_LINE_SIZE, and anywhere a 32-bit
    # ramdisk_image reaches.
    cmdline_size: int = bootparam.COMMAND_LINE_SIZE - 1
    initrd_addr_max: int = 0xFFFFFFFF

    @property
    def setup_header(self) -> bootparam.setup_header | None:
        """A fresh copy of the bzImage's parsed setup header (fields past its end read 0), or None."""
        if self.header is None:
            return None
        size = ctypes.sizeof(bootparam.setup_header)
        return bootparam.setup_header.from_buffer_copy(self.header[:size].ljust(size, b"\0"))

    @property
    def protocol_version(self) -> int | None:
        """The boot protocol version of a bzImage (e.g. 0x020f for 2.15), or None for ELF."""
        hdr = self.setup_header
        return None if hdr is None else int(hdr.version)


def read_image(source: ImageSource, what: str, size_limit: int) -> bytes:
    """The bytes of ``source``; a path is read whole, in one read, after checking its size.

    Raises:
        LoaderError: the file cannot be read, is not a regular file, or is larger than
            ``size_limit`` (there would be no room for it).
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if len(data) > size_limit:
            raise LoaderError(f"the {what} ({len(data) / _MIB:.1f} MiB) is larger than the "
                              f"{size_limit / _MIB:.1f} MiB it could be loaded into")
        return data
    path = os.fspath(source)
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise LoaderError(f"the {what} {path!r} is not a regular file")
            if st.st_size > size_limit:
                raise LoaderError(f"the {what} {path!r} ({st.st_size / _MIB:.1f} MiB) is larger "
                                  f"than the {size_limit / _MIB:.1f} MiB it could be loaded into")
            return f.read()
    except OSError as e:
        raise LoaderError(f"cannot read the {what} {path!r}: {e.strerror}") from None


def guest_ram_size(memory: GuestMemoryMmap) -> int:
    """The bytes of guest memory in all regions."""
    return sum(r.size for r in memory.regions)


def check_kernel_fits(memory: GuestMemoryMmap, start: int, end: int, what: str) -> None:
    """Raise unless ``[start, end)`` lies in one RAM range of the guest's e820 map, above 1 MiB.

    Raises:
        LoaderError: naming the range, the guest's RAM, and how much RAM would do.
    """
    if start < HIMEM_START:
        raise LoaderError(f"{what} starts at {start:#x}, below 1 MiB where the boot data (zero page, "
                          "command line, page tables, MP table) lives; it must load at 0x100000 or above")
    e820 = build_e820((int(r.start_addr), r.size) for r in memory.regions)
    if ram_entry_containing(e820, start, end) is None:
        raise LoaderError(
            f"{what} needs guest RAM [{start:#x}, {end:#x}) ({(end - start) / _MIB:.1f} MiB from "
            f"{start / _MIB:.1f} MiB) but the guest's RAM is {describe_ram(e820)}: give the guest at "
            f"least {-(-end // _MIB)} MiB below the MMIO gap")


def write_guest(memory: GuestMemoryMmap, addr: int, data: bytes | memoryview, what: str) -> None:
    """``memory.write`` with a failure reported as LoaderError (callers check ranges first)."""
    try:
        memory.write(addr, data)
    except GuestMemoryError as e:
        raise LoaderError(f"cannot write the {what} at {addr:#x}: {e}") from e


def zero_guest(memory: GuestMemoryMmap, addr: int, size: int, what: str) -> None:
    """Zero ``size`` bytes from ``addr`` in bounded chunks (a bss may be hundreds of MiB)."""
    chunk = bytes(min(size, 1 << 20))
    done = 0
    while done < size:
        n = min(len(chunk), size - done)
        write_guest(memory, addr + done, memoryview(chunk)[:n], what)
        done += n


__all__ = [
    "ImageSource", "KernelKind", "LoadedKernel", "check_kernel_fits", "guest_ram_size", "read_image",
    "write_guest", "zero_guest",
]
