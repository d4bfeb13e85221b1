"""bzImage: parse and check the setup header (boot protocol 2.06+), load the protected-mode kernel.

Where the kernel goes: at ``pref_address`` (1 MiB for headers that give none, or a smaller one).
That is where a relocatable kernel decompresses and runs anyway: its 64-bit entry code moves the
image up to ``max(align_up(load address, kernel_alignment), LOAD_PHYSICAL_ADDR)`` and uses
``init_size`` bytes from there, and ``pref_address`` is ``LOAD_PHYSICAL_ADDR``. Loading lower would
save no memory, loading higher would waste the RAM below. A non-relocatable kernel must run there.
"""

from __future__ import annotations

import ctypes
import struct

import attrs

from kvmlib.ioctl.structs import field_offset
from kvmlib.loader.bootparam import (
    BOOT_FLAG_MAGIC,
    HDRS_MAGIC,
    LOADED_HIGH,
    SECTOR_SIZE,
    SETUP_HEADER_JUMP_OFFSET,
    SETUP_HEADER_OFFSET,
    SETUP_SECTS_DEFAULT,
    STARTUP_64_OFFSET,
    XLF_KERNEL_64,
    boot_params,
    setup_header,
)
from kvmlib.loader.errors import LoaderError
from kvmlib.loader.image import KernelKind, LoadedKernel, check_kernel_fits, write_guest
from kvmlib.loader.layout import HIMEM_START, align_up
from kvmlib.memory import GuestMemoryMmap

#: The oldest boot protocol accepted: 2.06 brought ``cmdline_size``.
MIN_PROTOCOL_VERSION = 0x0206
#: The 64-bit entry point and ``xloadflags`` came with protocol 2.12.
PROTOCOL_64BIT_ENTRY = 0x020C
_HEADER_SIZE = ctypes.sizeof(setup_header)
# Fields are read up to the end of init_size (protocol 2.10); the header copied into the zero page
# may run further, but never past hdr's slot there (edd_mbr_sig_buffer follows at 0x290).
_FIELDS_END = SETUP_HEADER_OFFSET + field_offset(setup_header, "init_size") + 4
_ZERO_PAGE_HDR_END = field_offset(boot_params, "edd_mbr_sig_buffer")
_U16 = struct.Struct("<H")


def _version_str(version: int) -> str:
    return f"{version >> 8}.{version & 0xFF:02d}"


@attrs.define(frozen=True, slots=True)
class BzImageInfo:
    """What :func:`parse_bzimage` found: the header and where each part of the image goes.

    Attributes:
        header: the setup header bytes to copy into the zero page (from image offset 0x1f1).
        setup_header: the header's fields (a copy; fields past the header's end read 0).
        kernel_offset: where the protected-mode kernel starts in the image ((setup_sects + 1) * 512).
        kernel_size: its length (``syssize`` * 16).
        load_addr: where it is loaded in guest memory.
        run_end: the first address past what the kernel uses while decompressing and running.
    """

    header: bytes
    setup_header: setup_header = attrs.field(eq=False)
    kernel_offset: int
    kernel_size: int
    load_addr: int
    run_end: int

    @property
    def entry_64(self) -> int:
        """The 64-bit entry point: 0x200 bytes into the loaded protected-mode kernel."""
        return self.load_addr + STARTUP_64_OFFSET


def parse_bzimage(data: bytes) -> BzImageInfo:
    """Parse and check a bzImage's setup header without touching guest memory.

    Raises:
        LoaderError: a bad signature, a protocol older than 2.06, a kernel without a 64-bit
            entry point or not loadable high, inconsistent header fields, or a truncated file.
    """
    size = len(data)
    if size < _FIELDS_END:
        raise LoaderError(f"the image is {size} bytes, too short for a bzImage setup header "
                          f"(which ends at {_FIELDS_END:#x} or later)")
    if data[0x202:0x206] != HDRS_MAGIC.to_bytes(4, "little"):
        raise LoaderError(f"no 'HdrS' signature at 0x202 (found {data[0x202:0x206]!r}): not a bzImage")
    (boot_flag,) = _U16.unpack_from(data, 0x1FE)
    if boot_flag != BOOT_FLAG_MAGIC:
        raise LoaderError(f"boot_flag at 0x1fe is {boot_flag:#06x}, not {BOOT_FLAG_MAGIC:#06x}: "
                          "not a bzImage, or a damaged one")
    (version,) = _U16.unpack_from(data, 0x206)
    if version < MIN_PROTOCOL_VERSION:
        raise LoaderError(f"boot protocol {_version_str(version)} is older than 2.06, the oldest this "
                          "loader supports (kernels since 2.6.22 have it)")
    header_end = SETUP_HEADER_JUMP_OFFSET + 1 + data[SETUP_HEADER_JUMP_OFFSET]
    if header_end < _FIELDS_END:
        raise LoaderError(f"the setup header ends at {header_end:#x} (by the jump at 0x200), before "
                          f"the fields protocol {_version_str(version)} must have (up to {_FIELDS_END:#x})")
    raw = data[SETUP_HEADER_OFFSET:min(header_end, SETUP_HEADER_OFFSET + _HEADER_SIZE)]
    hdr = setup_header.from_buffer_copy(raw.ljust(_HEADER_SIZE, b"\0"))
    if version < PROTOCOL_64BIT_ENTRY or not hdr.xloadflags & XLF_KERNEL_64:
        raise LoaderError(f"the kernel has no 64-bit entry point (protocol {_version_str(version)}, "
                          f"xloadflags {hdr.xloadflags if version >= PROTOCOL_64BIT_ENTRY else 0:#x}: "
                          "XLF_KERNEL_64 is unset); build a 64-bit kernel (CONFIG_X86_64)")
    if not hdr.loadflags & LOADED_HIGH:
        raise LoaderError("loadflags lacks LOADED_HIGH: a zImage loaded at 0x10000 is not supported")
    setup_sects = hdr.setup_sects or SETUP_SECTS_DEFAULT
    kernel_offset = (setup_sects + 1) * SECTOR_SIZE
    kernel_size = hdr.syssize * 16
    if kernel_size == 0:
        raise LoaderError("syssize is 0: the header gives no protected-mode kernel size")
    if size < kernel_offset + kernel_size:
        raise LoaderError(
            f"the image is truncated: {size} bytes, but its header says {setup_sects} setup sectors "
            f"and a {kernel_size}-byte kernel, {kernel_offset + kernel_size} bytes in all")
    if hdr.relocatable_kernel:
        align = hdr.kernel_alignment
        if align == 0 or align & (align - 1):
            raise LoaderError(f"kernel_alignment {align:#x} of a relocatable kernel is not a power of 2")
    pref = hdr.pref_address
    load_addr = pref if pref >= HIMEM_START else HIMEM_START
    run_start = align_up(load_addr, hdr.kernel_alignment) if hdr.relocatable_kernel else load_addr
    run_start = max(run_start, pref)
    run_end = max(load_addr + kernel_size, run_start + hdr.init_size)
    return BzImageInfo(header=bytes(data[SETUP_HEADER_OFFSET:min(header_end, _ZERO_PAGE_HDR_END)]),
                       setup_header=hdr, kernel_offset=kernel_offset, kernel_size=kernel_size,
                       load_addr=load_addr, run_end=run_end)


def load_bzimage(memory: GuestMemoryMmap, data: bytes) -> LoadedKernel:
    """Check a bzImage and write its protected-mode kernel to guest memory.

    Raises:
        LoaderError: the image is malformed (see :func:`parse_bzimage`), or the kernel's run-time
            footprint ``[load address, +init_size)`` is not all guest RAM.
    """
    info = parse_bzimage(data)
    hdr = info.setup_header
    check_kernel_fits(memory, info.load_addr, info.run_end,
                      f"the kernel (loaded at {info.load_addr:#x}, init_size {hdr.init_size:#x})")
    kernel = memoryview(data)[info.kernel_offset:info.kernel_offset + info.kernel_size]
    write_guest(memory, info.load_addr, kernel, "protected-mode kernel")
    return LoadedKernel(kind=KernelKind.BZIMAGE, entry=info.entry_64, load_addr=info.load_addr,
                        load_end=info.run_end, header=info.header, elf_entry=None,
                        cmdline_size=int(hdr.cmdline_size), initrd_addr_max=int(hdr.initrd_addr_max))


__all__ = ["MIN_PROTOCOL_VERSION", "PROTOCOL_64BIT_ENTRY", "BzImageInfo", "load_bzimage", "parse_bzimage"]
