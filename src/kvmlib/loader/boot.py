"""``configure_boot``: the command line, the initrd, and the zero page (or PVH start info).

What goes where (see :mod:`kvmlib.loader.layout`): the command line at ``CMDLINE_START``
(0x20000), NUL-terminated; the initrd page-aligned as high as it fits in one RAM range below both
the kernel's ``initrd_addr_max`` and the MMIO gap, and above the kernel's run-time footprint;
``boot_params`` at ``ZERO_PAGE_START`` (0x7000) for the 64-bit boot protocol, or for PVH the
``hvm_start_info`` in the same page with its module list and memory map behind it.
"""

from __future__ import annotations

import ctypes
import enum

import attrs

from kvmlib.arch.x86_64.regs import BOOT_STACK_POINTER
from kvmlib.loader.bootparam import (
    BOOT_FLAG_MAGIC,
    CAN_USE_HEAP,
    HDRS_MAGIC,
    LOADED_HIGH,
    LOADER_TYPE_UNDEFINED,
    NORMAL_VGA,
    SETUP_HEADER_OFFSET,
    boot_params,
)
from kvmlib.loader.bzimage import PROTOCOL_64BIT_ENTRY
from kvmlib.loader.e820 import E820Entry, E820Type, build_e820, describe_ram, ram_entry_containing
from kvmlib.loader.errors import LoaderError
from kvmlib.loader.image import (
    ImageSource,
    KernelKind,
    LoadedKernel,
    guest_ram_size,
    read_image,
    write_guest,
)
from kvmlib.loader.layout import (
    BOOT_INFO_START,
    CMDLINE_MAX_SIZE,
    CMDLINE_START,
    EBDA_START,
    HIMEM_START,
    IDENTITY_MAP_END,
    MMIO_GAP_START,
    PVH_MEMMAP_START,
    PVH_MODLIST_START,
    X86_PAGE_SIZE,
    align_down,
    align_up,
)
from kvmlib.loader.start_info import (
    HVM_START_INFO_VERSION,
    XEN_HVM_START_MAGIC_VALUE,
    hvm_memmap_table_entry,
    hvm_modlist_entry,
    hvm_start_info,
)
from kvmlib.memory import GuestMemoryMmap

_MIB = 1 << 20


class BootMode(enum.Enum):
    """How the vCPU enters the kernel."""

    #: The Linux 64-bit boot protocol: long mode with the first GiB identity-mapped, RIP at the
    #: 64-bit entry, RSI = the zero page.
    LINUX_64 = "linux-64"
    #: PVH: 32-bit protected mode without paging, EIP at the PVH entry, EBX = hvm_start_info.
    PVH = "pvh"


@attrs.define(frozen=True, slots=True)
class BootSetup:
    """What :func:`configure_boot` wrote, and the registers the boot vCPU must start with.

    Attributes:
        mode: how the kernel is entered.
        entry: the instruction pointer to start at.
        boot_info_addr: the zero page (LINUX_64) or the ``hvm_start_info`` (PVH).
        cmdline_addr: where the NUL-terminated command line is.
        cmdline: the command line, without the NUL.
        initrd_addr: where the initrd is, or None without one.
        initrd_size: its length in bytes (0 without one).
        e820: the memory map given to the guest.
        stack_pointer: the initial RSP (the kernel sets its own stack at once; this one is valid).
    """

    mode: BootMode
    entry: int
    boot_info_addr: int
    cmdline_addr: int
    cmdline: bytes
    initrd_addr: int | None
    initrd_size: int
    e820: tuple[E820Entry, ...]
    stack_pointer: int = BOOT_STACK_POINTER

    @property
    def rip(self) -> int:
        """The initial RIP."""
        return self.entry

    @property
    def rsi(self) -> int:
        """The initial RSI: the zero page for the 64-bit boot protocol, else 0."""
        return self.boot_info_addr if self.mode is BootMode.LINUX_64 else 0

    @property
    def rbx(self) -> int:
        """The initial RBX: the ``hvm_start_info`` for PVH, else 0."""
        return self.boot_info_addr if self.mode is BootMode.PVH else 0


def _boot_mode(kernel: LoadedKernel, pvh: bool | None) -> tuple[BootMode, int]:
    if pvh is None:
        pvh = kernel.kind is KernelKind.ELF_PVH
    if pvh:
        if kernel.kind is not KernelKind.ELF_PVH:
            raise LoaderError(f"a PVH boot was asked for, but this {kernel.kind.value} kernel has no "
                              "XEN_ELFNOTE_PHYS32_ENTRY note (Linux needs CONFIG_PVH and an ELF vmlinux)")
        return BootMode.PVH, kernel.entry
    # A PVH kernel booted the 64-bit way starts at its ELF entry point instead.
    return BootMode.LINUX_64, kernel.entry if kernel.elf_entry is None else kernel.elf_entry


def _cmdline_bytes(cmdline: str | bytes, kernel: LoadedKernel) -> bytes:
    raw = cmdline.encode() if isinstance(cmdline, str) else bytes(cmdline)
    if b"\0" in raw:
        raise LoaderError(f"the command line has a NUL byte at {raw.index(0)}; the kernel would cut it there")
    limit = min(kernel.cmdline_size, CMDLINE_MAX_SIZE - 1)
    if len(raw) > limit:
        why = "this kernel's cmdline_size" if kernel.cmdline_size <= CMDLINE_MAX_SIZE - 1 else \
            "the command line area"
        raise LoaderError(f"the command line is {len(raw)} bytes; {why} allows at most {limit}")
    return raw


def place_initrd(e820: tuple[E820Entry, ...], size: int, low: int, limit: int) -> int | None:
    """The highest page-aligned address for ``size`` bytes within one RAM entry, in ``[low, limit)``.

    Args:
        e820: the guest's memory map.
        size: the initrd's length.
        low: the lowest address it may start at (above the kernel).
        limit: the first address it must stay below.

    Returns:
        The address, or None if no RAM range has room.
    """
    best: int | None = None
    for entry in e820:
        if entry.type is not E820Type.RAM:
            continue
        top = min(entry.end, limit)
        addr = align_down(top - size, X86_PAGE_SIZE)
        if addr >= max(entry.addr, low) and (best is None or addr > best):
            best = addr
    return best


def _zero_page(kernel: LoadedKernel, initrd_addr: int | None, initrd_size: int,
               e820: tuple[E820Entry, ...]) -> boot_params:
    params = boot_params()
    hdr = params.hdr
    if kernel.header is not None:
        # The image's own header, byte for byte: fields this loader does not know about keep the
        # values the kernel build put there.
        ctypes.memmove(ctypes.addressof(params) + SETUP_HEADER_OFFSET, kernel.header, len(kernel.header))
        hdr.code32_start = kernel.load_addr
    else:
        # An ELF kernel has no header; give it the signatures and the version the kernel's own PVH
        # code writes into the header it makes for itself.
        hdr.boot_flag = BOOT_FLAG_MAGIC
        hdr.header = HDRS_MAGIC
        hdr.version = PROTOCOL_64BIT_ENTRY
        hdr.cmdline_size = kernel.cmdline_size
    hdr.type_of_loader = LOADER_TYPE_UNDEFINED
    # The real-mode setup code, the only user of a heap, never runs on the 64-bit entry.
    hdr.loadflags = (hdr.loadflags | LOADED_HIGH) & ~CAN_USE_HEAP
    hdr.heap_end_ptr = 0
    hdr.vid_mode = NORMAL_VGA
    hdr.cmd_line_ptr = CMDLINE_START
    if initrd_addr is not None:
        hdr.ramdisk_image = initrd_addr
        hdr.ramdisk_size = initrd_size
    params.e820_entries = len(e820)
    for slot, entry in zip(params.e820_table, e820, strict=False):
        slot.addr, slot.size, slot.type = entry.addr, entry.size, int(entry.type)
    return params


def _write_start_info(memory: GuestMemoryMmap, initrd_addr: int | None, initrd_size: int,
                      e820: tuple[E820Entry, ...]) -> None:
    # The page may hold an earlier zero page; PVH readers must not see its bytes as their fields.
    write_guest(memory, BOOT_INFO_START, bytes(X86_PAGE_SIZE), "boot information page")
    info = hvm_start_info(magic=XEN_HVM_START_MAGIC_VALUE, version=HVM_START_INFO_VERSION,
                          cmdline_paddr=CMDLINE_START, memmap_paddr=PVH_MEMMAP_START,
                          memmap_entries=len(e820))
    if initrd_addr is not None:
        info.nr_modules, info.modlist_paddr = 1, PVH_MODLIST_START
        module = hvm_modlist_entry(paddr=initrd_addr, size=initrd_size)
        write_guest(memory, PVH_MODLIST_START, bytes(module), "PVH module list")
    table = (hvm_memmap_table_entry * len(e820))()
    for slot, entry in zip(table, e820, strict=True):
        slot.addr, slot.size, slot.type = entry.addr, entry.size, int(entry.type)
    write_guest(memory, PVH_MEMMAP_START, bytes(table), "PVH memory map")
    write_guest(memory, BOOT_INFO_START, bytes(info), "hvm_start_info")


def configure_boot(memory: GuestMemoryMmap, kernel: LoadedKernel, cmdline: str | bytes = b"",
                   initrd: ImageSource | None = None, *, pvh: bool | None = None) -> BootSetup:
    """Write the command line, the initrd and the boot information for a loaded kernel.

    Everything is checked before anything is written. Call it after
    :func:`~kvmlib.loader.load_kernel`, then hand the result to
    :func:`~kvmlib.loader.setup_vcpu_for_boot`.

    Args:
        memory: the guest memory the kernel was loaded into; it must hold RAM from address 0 up
            to the EBDA (0x9fc00).
        kernel: what :func:`~kvmlib.loader.load_kernel` returned.
        cmdline: the kernel command line (a str is encoded as UTF-8); at most the kernel's
            ``cmdline_size`` bytes (2047 for ELF kernels).
        initrd: the initrd's bytes or file path, or None; an empty one counts as none.
        pvh: enter through PVH (True), the 64-bit boot protocol (False), or PVH exactly when the
            kernel has a PVH entry (None).

    Returns:
        Where everything went and the register values the boot vCPU needs.

    Raises:
        LoaderError: low memory missing, a command line too long or holding a NUL, an initrd that
            does not fit, a kernel beyond the identity-mapped first GiB for a 64-bit entry, or PVH
            asked of a kernel without a PVH entry.
    """
    mode, entry = _boot_mode(kernel, pvh)
    e820 = build_e820((int(r.start_addr), r.size) for r in memory.regions)
    if ram_entry_containing(e820, 0, EBDA_START) is None:
        raise LoaderError(f"guest memory must be RAM from 0 to {EBDA_START:#x} (the zero page, command "
                          f"line and boot page tables live there), but its RAM is {describe_ram(e820)}")
    raw_cmdline = _cmdline_bytes(cmdline, kernel)
    if mode is BootMode.LINUX_64 and max(kernel.load_end, entry + 1) > IDENTITY_MAP_END:
        raise LoaderError(
            f"the kernel reaches {max(kernel.load_end, entry + 1):#x}, past the first GiB that the boot "
            "page tables identity-map; the 64-bit entry needs all of it mapped")
    initrd_data = b"" if initrd is None else read_image(initrd, "initrd", guest_ram_size(memory))
    initrd_addr = None
    if initrd_data:
        # ramdisk_image is 32 bits and the gap is below 4 GiB, so the gap bounds it in every mode.
        limit = min(kernel.initrd_addr_max + 1, MMIO_GAP_START)
        low = max(align_up(kernel.load_end, X86_PAGE_SIZE), HIMEM_START)
        initrd_addr = place_initrd(e820, len(initrd_data), low, limit)
        if initrd_addr is None:
            raise LoaderError(
                f"the {len(initrd_data) / _MIB:.1f} MiB initrd does not fit in guest RAM between the "
                f"kernel's end ({low:#x}) and {limit:#x} (initrd_addr_max and the MMIO gap); the "
                f"guest's RAM is {describe_ram(e820)}: give the guest more memory")
    write_guest(memory, CMDLINE_START, raw_cmdline + b"\0", "command line")
    if initrd_addr is not None:
        write_guest(memory, initrd_addr, initrd_data, "initrd")
    if mode is BootMode.LINUX_64:
        params = _zero_page(kernel, initrd_addr, len(initrd_data), e820)
        write_guest(memory, BOOT_INFO_START, bytes(params), "zero page")
    else:
        _write_start_info(memory, initrd_addr, len(initrd_data), e820)
    return BootSetup(mode=mode, entry=entry, boot_info_addr=BOOT_INFO_START, cmdline_addr=CMDLINE_START,
                     cmdline=raw_cmdline, initrd_addr=initrd_addr, initrd_size=len(initrd_data), e820=e820)


__all__ = ["BootMode", "BootSetup", "configure_boot", "place_initrd"]
