"""``load_kernel``: recognise a kernel image's format and load it."""

from __future__ import annotations

from kvmlib.loader.bootparam import HDRS_MAGIC
from kvmlib.loader.bzimage import load_bzimage
from kvmlib.loader.elf import ELFMAG, load_elf
from kvmlib.loader.errors import LoaderError
from kvmlib.loader.image import ImageSource, LoadedKernel, guest_ram_size, read_image
from kvmlib.memory import GuestMemoryMmap

_HDRS = HDRS_MAGIC.to_bytes(4, "little")


def load_kernel(memory: GuestMemoryMmap, image: ImageSource) -> LoadedKernel:
    """Load a bzImage or an ELF vmlinux into guest memory.

    The format is told by content: the ELF magic at 0 is ELF, ``HdrS`` at 0x202 a bzImage. A
    bzImage's protected-mode kernel goes to its ``pref_address`` (see :mod:`kvmlib.loader.bzimage`);
    ELF ``PT_LOAD`` segments to their ``p_paddr``, bss zeroed. Every check happens before the first
    byte is written, so a rejected image leaves guest memory as it was.

    Args:
        memory: the guest's memory; the kernel must fit in its RAM above 1 MiB and below the MMIO
            gap (see :func:`~kvmlib.loader.guest_ram_ranges`).
        image: the image's bytes, or the path of a file holding it (read whole, in one read).

    Returns:
        Where the kernel went and how to enter it; pass it to
        :func:`~kvmlib.loader.configure_boot`.

    Raises:
        LoaderError: the image is unreadable, of an unknown format, malformed, not 64-bit, or does
            not fit in guest memory.
    """
    data = read_image(image, "kernel image", guest_ram_size(memory))
    if data[:4] == ELFMAG:
        return load_elf(memory, data)
    if data[0x202:0x206] == _HDRS:
        return load_bzimage(memory, data)
    raise LoaderError(f"not a kernel image: neither an ELF vmlinux (\\x7fELF at 0) nor a bzImage "
                      f"('HdrS' at 0x202); the {len(data)}-byte image starts with {data[:8]!r}")


__all__ = ["load_kernel"]
