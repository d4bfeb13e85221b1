"""kvmlib.loader: bzImage and ELF loading, the zero page, PVH start info, e820, and booting under KVM.

Images come from three places: the real kernel under /boot (skipped without one, unless
KVMLIB_REQUIRE_KVM=1), synthetic images built field by field in tests/loader_images.py, and
hypothesis (random and mutated bytes, which must only ever give LoaderError).
"""

from __future__ import annotations

import ctypes
import glob
import os
import shutil
import struct
import subprocess
from collections.abc import Iterator
from ctypes import Structure, Union
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmlib import EventExitHandler, GuestMemoryError, GuestMemoryMmap, Kvm, KvmError, KvmVm, VmConfig
from kvmlib.arch.x86_64.regs import BOOT_GDT_OFFSET, BOOT_STACK_POINTER, ZERO_PAGE_START
from kvmlib.ioctl import field_offset
from kvmlib.loader import (
    CMDLINE_START,
    MMIO_GAP_SIZE,
    MMIO_GAP_START,
    BootMode,
    E820Entry,
    E820Type,
    KernelKind,
    LoadedKernel,
    LoaderError,
    build_e820,
    configure_boot,
    guest_ram_ranges,
    load_kernel,
    setup_vcpu_for_boot,
)
from kvmlib.loader.bootparam import BOOTPARAM_STRUCTS, boot_params, setup_header
from kvmlib.loader.elf import Elf64_Ehdr, Elf64_Nhdr, Elf64_Phdr
from kvmlib.loader.start_info import hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info
from kvmlib.loader.vcpu_boot import BOOT_CS, BOOT_DS

from .loader_images import (
    CAN_USE_HEAP,
    HEADER_FIELDS,
    LOADED_HIGH,
    Segment,
    bzimage,
    elf64,
    note,
)
from .vm_guests import REPORT_PORT, Reporter, bus_with

REQUIRE_KVM = os.environ.get("KVMLIB_REQUIRE_KVM") == "1"
MIB = 1 << 20
GIB = 1 << 30
RAM = E820Type.RAM
RESERVED = E820Type.RESERVED
XEN_ELFNOTE_PHYS32_ENTRY = 18


@pytest.fixture
def memory() -> Iterator[GuestMemoryMmap]:
    """16 MiB of guest RAM from address 0."""
    with GuestMemoryMmap.from_ranges(guest_ram_ranges(16 * MIB)) as mem:
        yield mem


# --------------------------------------------------------------------------------------------------
# Structure layouts, against the installed kernel headers and the numbers in bootparam.h / start_info.h
# --------------------------------------------------------------------------------------------------


def _layout_checks(struct_type: type[Any], c_type: str) -> dict[str, tuple[str, int]]:
    """(C expression, ctypes value) for the size of ``c_type`` and every member's offset and size."""
    checks = {f"sizeof {c_type}": (f"sizeof({c_type})", ctypes.sizeof(struct_type))}

    def walk(t: Any, prefix: str, base: int) -> None:
        for name, ftype in t._fields_:
            off = base + getattr(t, name).offset
            path = f"{prefix}{name}"
            checks[f"offsetof {c_type}.{path}"] = (f"offsetof({c_type}, {path})", off)
            checks[f"sizeof {c_type}.{path}"] = (f"sizeof((({c_type} *)0)->{path})",
                                                 ctypes.sizeof(ftype))
            if isinstance(ftype, type) and issubclass(ftype, (Structure, Union)):
                walk(ftype, f"{path}.", off)

    walk(struct_type, "", 0)
    return checks


@pytest.mark.skipif(shutil.which("gcc") is None or not any(
    Path(d, "asm/bootparam.h").exists() for d in ("/usr/include", "/usr/include/x86_64-linux-gnu")),
    reason="gcc or <asm/bootparam.h> is not installed")
def test_bootparam_and_elf_structures_match_the_installed_headers(tmp_path: Path) -> None:
    checks: dict[str, tuple[str, int]] = {}
    for st_type in BOOTPARAM_STRUCTS:
        checks.update(_layout_checks(st_type, f"struct {st_type.__name__}"))
    for elf_type in (Elf64_Ehdr, Elf64_Phdr, Elf64_Nhdr):
        checks.update(_layout_checks(elf_type, elf_type.__name__))
    assert len(checks) > 400  # every member of every structure is really compared
    lines = ["#include <stddef.h>", "#include <stdio.h>", "#include <elf.h>", "#include <asm/bootparam.h>",
             "int main(void) {"]
    lines += [f'    printf("%s=%lu\\n", "{key}", (unsigned long)({expr}));'
              for key, (expr, _) in checks.items()]
    lines += ["    return 0;", "}"]
    (tmp_path / "layout.c").write_text("\n".join(lines) + "\n")
    subprocess.run(["gcc", "-o", str(tmp_path / "layout"), str(tmp_path / "layout.c")], check=True,
                   capture_output=True)
    out = subprocess.run([str(tmp_path / "layout")], check=True, capture_output=True, text=True).stdout
    c_values = {k: int(v) for k, v in (line.rsplit("=", 1) for line in out.splitlines())}
    assert [f"{k}: kvmlib {v} != C {c_values[k]}" for k, (_, v) in checks.items() if c_values[k] != v] == []


def test_boot_params_has_the_documented_size_and_offsets() -> None:
    # Offsets from the comments in arch/x86/include/uapi/asm/bootparam.h and zero-page.rst.
    assert ctypes.sizeof(boot_params) == 4096
    assert ctypes.sizeof(setup_header) == 0x26C - 0x1F1
    expected = {"screen_info": 0x000, "apm_bios_info": 0x040, "tboot_addr": 0x058, "acpi_rsdp_addr": 0x070,
                "ext_ramdisk_image": 0x0C0, "ext_ramdisk_size": 0x0C4, "ext_cmd_line_ptr": 0x0C8,
                "cc_blob_address": 0x13C, "edid_info": 0x140, "efi_info": 0x1C0, "alt_mem_k": 0x1E0,
                "e820_entries": 0x1E8, "eddbuf_entries": 0x1E9, "sentinel": 0x1EF, "hdr": 0x1F1,
                "edd_mbr_sig_buffer": 0x290, "e820_table": 0x2D0, "eddbuf": 0xD00}
    assert {name: getattr(boot_params, name).offset for name in expected} == expected
    assert boot_params.__dict__["e820_table"].size == 128 * 20


def test_setup_header_fields_sit_at_the_offsets_boot_rst_gives() -> None:
    got = {name: 0x1F1 + getattr(setup_header, name).offset for name in HEADER_FIELDS}
    assert got == {name: offset for name, (offset, _) in HEADER_FIELDS.items()}


def test_pvh_start_info_structures_have_the_abi_layout() -> None:
    # Offsets from the layout diagram in xen/include/public/arch-x86/hvm/start_info.h.
    assert ctypes.sizeof(hvm_start_info) == 56
    assert [getattr(hvm_start_info, f).offset for f in (
        "magic", "version", "flags", "nr_modules", "modlist_paddr", "cmdline_paddr", "rsdp_paddr",
        "memmap_paddr", "memmap_entries", "reserved")] == [0, 4, 8, 12, 16, 24, 32, 40, 48, 52]
    assert ctypes.sizeof(hvm_modlist_entry) == 32
    assert ctypes.sizeof(hvm_memmap_table_entry) == 24
    assert field_offset(hvm_memmap_table_entry, "type") == 16


# --------------------------------------------------------------------------------------------------
# The real kernel under /boot
# --------------------------------------------------------------------------------------------------


class RealBoot:
    """The real bzImage loaded into 256 MiB with its initrd (or a synthetic one) and a command line."""

    CMDLINE = "console=ttyS0 root=/dev/vda ro kvmlib-loader-test"

    def __init__(self, path: Path) -> None:
        self.path = path
        self.image = path.read_bytes()
        initrd = path.with_name(path.name.replace("vmlinuz", "initrd.img"))
        self.initrd = initrd.read_bytes() if initrd.is_file() else bytes(range(256)) * 12289
        self.memory = GuestMemoryMmap.from_ranges(guest_ram_ranges(256 * MIB))
        self.kernel = load_kernel(self.memory, path)
        self.boot = configure_boot(self.memory, self.kernel, self.CMDLINE, self.initrd)

    def zero_page(self) -> boot_params:
        return self.memory.read_obj(ZERO_PAGE_START, boot_params)


@pytest.fixture(scope="module")
def real() -> Iterator[RealBoot]:
    """The newest /boot/vmlinuz-*; skips without one unless KVMLIB_REQUIRE_KVM=1."""
    images = sorted(p for p in glob.glob("/boot/vmlinuz-*") if os.access(p, os.R_OK))
    if not images:
        if REQUIRE_KVM:
            pytest.fail("KVMLIB_REQUIRE_KVM=1 but no readable kernel image matches /boot/vmlinuz-*")
        pytest.skip("no readable kernel image matches /boot/vmlinuz-*")
    boot = RealBoot(Path(images[-1]))
    yield boot
    boot.memory.close()


def test_real_bzimage_header_is_parsed_as_its_bytes_say(real: RealBoot) -> None:
    img = real.image
    hdr = real.kernel.setup_header
    assert hdr is not None
    assert real.kernel.kind is KernelKind.BZIMAGE
    assert img[0x202:0x206] == b"HdrS"
    raw = {
        "setup_sects": img[0x1F1], "version": struct.unpack_from("<H", img, 0x206)[0],
        "loadflags": img[0x211], "xloadflags": struct.unpack_from("<H", img, 0x236)[0],
        "kernel_alignment": struct.unpack_from("<I", img, 0x230)[0],
        "pref_address": struct.unpack_from("<Q", img, 0x258)[0],
        "init_size": struct.unpack_from("<I", img, 0x260)[0],
        "cmdline_size": struct.unpack_from("<I", img, 0x238)[0],
        "initrd_addr_max": struct.unpack_from("<I", img, 0x22C)[0],
    }
    assert {name: getattr(hdr, name) for name in raw} == raw
    assert real.kernel.protocol_version == raw["version"] >= 0x0206
    assert real.kernel.cmdline_size == raw["cmdline_size"]
    assert real.kernel.initrd_addr_max == raw["initrd_addr_max"]
    # The copied header runs to the end the jump at 0x200 gives.
    assert real.kernel.header == img[0x1F1:0x202 + img[0x201]]


def test_real_bzimage_kernel_lands_at_its_preferred_address_byte_for_byte(real: RealBoot) -> None:
    img = real.image
    setup_sects = img[0x1F1] or 4
    syssize = struct.unpack_from("<I", img, 0x1F4)[0]
    pref_address = struct.unpack_from("<Q", img, 0x258)[0]
    init_size = struct.unpack_from("<I", img, 0x260)[0]
    start = (setup_sects + 1) * 512
    assert real.kernel.load_addr == pref_address
    assert real.kernel.entry == pref_address + 0x200
    assert real.kernel.load_end == pref_address + init_size
    assert real.memory.read(pref_address, syssize * 16) == img[start:start + syssize * 16]


def test_real_zero_page_holds_the_header_cmdline_and_loader_fields(real: RealBoot) -> None:
    zp = real.zero_page()
    raw = bytes(zp)
    header_end = 0x202 + real.image[0x201]
    # Byte for byte the image's header, except the fields a loader must fill in.
    filled = {"type_of_loader", "loadflags", "code32_start", "ramdisk_image", "ramdisk_size",
              "heap_end_ptr", "cmd_line_ptr", "vid_mode"}
    for name, (offset, fmt) in HEADER_FIELDS.items():
        if name not in filled and offset < header_end:
            assert struct.unpack_from("<" + fmt, raw, offset) == struct.unpack_from(
                "<" + fmt, real.image, offset), name
    assert raw[0x1F1:0x210] == real.image[0x1F1:0x210]  # up to type_of_loader, untouched
    hdr = zp.hdr
    assert hdr.type_of_loader == 0xFF
    assert hdr.loadflags & LOADED_HIGH and not hdr.loadflags & CAN_USE_HEAP
    assert hdr.vid_mode == 0xFFFF
    assert hdr.code32_start == real.kernel.load_addr
    assert hdr.cmd_line_ptr == CMDLINE_START
    cmdline = RealBoot.CMDLINE.encode()
    assert real.memory.read(hdr.cmd_line_ptr, len(cmdline) + 1) == cmdline + b"\0"
    assert zp.sentinel == 0  # a clean buffer: only the header was copied
    assert real.boot.mode is BootMode.LINUX_64
    assert (real.boot.rip, real.boot.rsi, real.boot.rbx) == (real.kernel.entry, ZERO_PAGE_START, 0)


def test_real_initrd_is_page_aligned_high_below_its_limit_and_intact(real: RealBoot) -> None:
    hdr = real.zero_page().hdr
    addr, size = hdr.ramdisk_image, hdr.ramdisk_size
    assert (addr, size) == (real.boot.initrd_addr, len(real.initrd))
    assert addr % 4096 == 0
    assert addr >= real.kernel.load_end
    assert addr + size - 1 <= real.kernel.initrd_addr_max
    # As high as possible: the next page up would run past the end of RAM.
    assert addr + size <= 256 * MIB < addr + 4096 + size
    assert real.memory.read(addr, size) == real.initrd


def test_real_zero_page_e820_map_for_256_mib(real: RealBoot) -> None:
    zp = real.zero_page()
    table = [(e.addr, e.size, e.type) for e in zp.e820_table[:zp.e820_entries]]
    assert table == [
        (0, 0x9FC00, RAM),
        (0x9FC00, 0x100000 - 0x9FC00, RESERVED),
        (0x100000, 256 * MIB - 0x100000, RAM),
        (MMIO_GAP_START, MMIO_GAP_SIZE, RESERVED),
    ]
    assert all(e.addr == e.size == e.type == 0 for e in zp.e820_table[zp.e820_entries:])


# --------------------------------------------------------------------------------------------------
# The e820 map and the RAM layout
# --------------------------------------------------------------------------------------------------


def test_guest_ram_ranges_split_around_the_mmio_gap() -> None:
    assert guest_ram_ranges(256 * MIB) == [(0, 256 * MIB)]
    assert guest_ram_ranges(MMIO_GAP_START) == [(0, MMIO_GAP_START)]
    assert guest_ram_ranges(4 * GIB + GIB // 2) == [(0, MMIO_GAP_START),
                                                    (4 * GIB, 4 * GIB + GIB // 2 - MMIO_GAP_START)]
    assert MMIO_GAP_START + MMIO_GAP_SIZE == 4 * GIB


@pytest.mark.parametrize("size", [0, -4096, 4097, 12345])
def test_guest_ram_ranges_rejects_sizes_that_are_not_whole_pages(size: int) -> None:
    with pytest.raises(LoaderError, match="multiple of 4 KiB"):
        guest_ram_ranges(size)


def test_e820_for_a_4_5_gib_guest_reserves_the_gap_and_continues_at_4_gib() -> None:
    assert build_e820(guest_ram_ranges(4 * GIB + GIB // 2)) == (
        E820Entry(0, 0x9FC00, RAM),
        E820Entry(0x9FC00, 0x60400, RESERVED),
        E820Entry(0x100000, MMIO_GAP_START - 0x100000, RAM),
        E820Entry(MMIO_GAP_START, MMIO_GAP_SIZE, RESERVED),
        E820Entry(4 * GIB, 4 * GIB + GIB // 2 - MMIO_GAP_START, RAM),
    )


def test_e820_merges_adjacent_regions_and_never_reports_backed_gap_memory_as_ram() -> None:
    # A VMM that backs the gap anyway still gets it reported reserved, not RAM.
    assert build_e820([(0, 2 * MIB), (2 * MIB, 2 * MIB), (3 * GIB, 2 * GIB)]) == (
        E820Entry(0, 0x9FC00, RAM),
        E820Entry(0x9FC00, 0x60400, RESERVED),
        E820Entry(0x100000, 3 * MIB, RAM),
        E820Entry(3 * GIB, MMIO_GAP_START - 3 * GIB, RAM),
        E820Entry(MMIO_GAP_START, MMIO_GAP_SIZE, RESERVED),
        E820Entry(4 * GIB, GIB, RAM),
    )


def test_e820_with_more_entries_than_the_zero_page_holds_is_an_error() -> None:
    ranges = [(4 * GIB + i * 2 * MIB, MIB) for i in range(130)]
    with pytest.raises(LoaderError, match="at most 128"):
        build_e820(ranges)


def test_a_4_5_gib_guest_boots_with_the_high_ram_in_its_zero_page() -> None:
    try:
        memory = GuestMemoryMmap.from_ranges(guest_ram_ranges(4 * GIB + GIB // 2))
    except GuestMemoryError as e:  # mappings are lazy, but a strict overcommit policy refuses them
        pytest.skip(f"cannot map 4.5 GiB of (lazy) guest memory here: {e}")
    with memory:
        kernel = load_kernel(memory, bzimage(bytes(0x400), pref_address=0x1000000))
        boot = configure_boot(memory, kernel, "x", initrd=b"\x5a" * 10000)
        zp = memory.read_obj(ZERO_PAGE_START, boot_params)
        assert [(e.addr, e.size, e.type) for e in zp.e820_table[:zp.e820_entries]] == [
            (e.addr, e.size, e.type) for e in build_e820(guest_ram_ranges(4 * GIB + GIB // 2))]
        assert zp.e820_entries == 5
        # The initrd stays below the gap (ramdisk_image is 32-bit) and initrd_addr_max (2 GiB).
        assert boot.initrd_addr is not None
        assert boot.initrd_addr + 10000 <= 0x80000000
        assert zp.hdr.ramdisk_image == boot.initrd_addr and zp.ext_ramdisk_image == 0


# --------------------------------------------------------------------------------------------------
# Synthetic bzImages
# --------------------------------------------------------------------------------------------------


def test_a_synthetic_bzimage_loads_its_kernel_at_pref_address(memory: GuestMemoryMmap) -> None:
    payload = bytes(range(256)) * 8
    kernel = load_kernel(memory, bzimage(payload, pref_address=0x200000, init_size=0x100000))
    assert (kernel.kind, kernel.load_addr, kernel.entry) == (KernelKind.BZIMAGE, 0x200000, 0x200200)
    assert kernel.load_end == 0x300000
    assert memory.read(0x200000, len(payload)) == payload


def test_a_pref_address_below_1_mib_loads_at_1_mib(memory: GuestMemoryMmap) -> None:
    kernel = load_kernel(memory, bzimage(b"\x90" * 32, pref_address=0))
    assert (kernel.load_addr, kernel.entry) == (0x100000, 0x100200)


def test_setup_sects_0_means_4(memory: GuestMemoryMmap) -> None:
    image = bzimage(b"KERNEL!!" * 2, setup_sects=0)
    assert len(image) == 5 * 512 + 16
    load_kernel(memory, image)
    assert memory.read(0x100000, 16) == b"KERNEL!!" * 2


def test_a_kernel_file_is_read_from_a_path(memory: GuestMemoryMmap, tmp_path: Path) -> None:
    path = tmp_path / "bzImage"
    path.write_bytes(bzimage(b"from a file!!!!!"))
    assert load_kernel(memory, path).kind is KernelKind.BZIMAGE
    assert load_kernel(memory, str(path)).kind is KernelKind.BZIMAGE
    assert memory.read(0x100000, 16) == b"from a file!!!!!"


@pytest.mark.parametrize(("image", "message"), [
    (bzimage(boot_flag=0x1234), "boot_flag at 0x1fe is 0x1234"),
    (bzimage(magic=b"HdrZ"), "neither an ELF vmlinux .* nor a bzImage"),
    (bzimage(version=0x0205), "boot protocol 2.05 is older than 2.06"),
    (bzimage(version=0x020B), r"no 64-bit entry point \(protocol 2.11"),
    (bzimage(xloadflags=0), "no 64-bit entry point.*XLF_KERNEL_64 is unset"),
    (bzimage(loadflags=0), "LOADED_HIGH"),
    (bzimage(header_end=0x250), "setup header ends at 0x250"),
    (bzimage(kernel_alignment=0x300000), "kernel_alignment 0x300000 .* not a power of 2"),
    (bzimage(b"\x90" * 4096)[:-1], "truncated: 6655 bytes, but its header says 4 setup sectors and a "
                                   "4096-byte kernel, 6656 bytes in all"),
    (bzimage(b"\x90" * 4096)[:3000], "truncated"),
    (bzimage()[:0x230], "too short for a bzImage setup header"),
    (b"", "neither an ELF vmlinux .* nor a bzImage"),
    (b"MZ" + bytes(1000), r"starts with b'MZ\\x00"),
])
def test_a_bad_bzimage_is_refused_with_the_reason(memory: GuestMemoryMmap, image: bytes,
                                                  message: str) -> None:
    with pytest.raises(LoaderError, match=message):
        load_kernel(memory, image)


def test_a_kernel_larger_than_guest_ram_is_refused_before_anything_is_written(
        memory: GuestMemoryMmap) -> None:
    memory.write(0x100000, b"\xaa" * 64)
    with pytest.raises(LoaderError, match=r"needs guest RAM \[0x100000, 0x1100000\).*at least 17 MiB"):
        load_kernel(memory, bzimage(b"\x90" * 64, init_size=16 * MIB, kernel_alignment=MIB))
    assert memory.read(0x100000, 64) == b"\xaa" * 64


def test_an_image_file_larger_than_guest_memory_is_refused_unread(tmp_path: Path) -> None:
    path = tmp_path / "huge"
    with path.open("wb") as f:
        f.truncate(64 * MIB)  # sparse
    with GuestMemoryMmap.from_ranges(guest_ram_ranges(8 * MIB)) as small, \
            pytest.raises(LoaderError, match=r"larger than the 8\.0 MiB"):
        load_kernel(small, path)


@pytest.mark.parametrize("name", ["missing", "."])
def test_an_unreadable_kernel_path_is_a_loader_error(memory: GuestMemoryMmap, tmp_path: Path,
                                                     name: str) -> None:
    with pytest.raises(LoaderError, match=r"cannot read|not a regular file"):
        load_kernel(memory, tmp_path / name)


# --------------------------------------------------------------------------------------------------
# Command line and initrd
# --------------------------------------------------------------------------------------------------


def test_the_cmdline_may_be_exactly_cmdline_size_but_not_longer(memory: GuestMemoryMmap) -> None:
    kernel = load_kernel(memory, bzimage(cmdline_size=64))
    boot = configure_boot(memory, kernel, "a" * 64)
    assert memory.read(CMDLINE_START, 65) == b"a" * 64 + b"\0"
    assert boot.cmdline == b"a" * 64
    with pytest.raises(LoaderError, match="command line is 65 bytes; this kernel's cmdline_size allows "
                                          "at most 64"):
        configure_boot(memory, kernel, b"a" * 65)


def test_a_cmdline_with_a_nul_byte_is_refused(memory: GuestMemoryMmap) -> None:
    kernel = load_kernel(memory, bzimage())
    with pytest.raises(LoaderError, match="NUL byte at 3"):
        configure_boot(memory, kernel, b"abc\0def")


def test_an_elf_kernel_takes_a_2047_byte_cmdline(memory: GuestMemoryMmap) -> None:
    kernel = load_kernel(memory, elf64([Segment(0x100000, b"\xf4")], 0x100000))
    configure_boot(memory, kernel, "b" * 2047)
    with pytest.raises(LoaderError, match="at most 2047"):
        configure_boot(memory, kernel, "b" * 2048)


def test_the_initrd_goes_as_high_as_initrd_addr_max_allows(memory: GuestMemoryMmap) -> None:
    kernel = load_kernel(memory, bzimage(initrd_addr_max=0x7FFFFF))
    initrd = bytes(range(256)) * 100  # 25600 bytes
    boot = configure_boot(memory, kernel, "", initrd)
    assert boot.initrd_addr == 0x800000 - 0x7000  # 25600 bytes rounded up to 7 pages, ending at 8 MiB
    zp = memory.read_obj(ZERO_PAGE_START, boot_params)
    assert (zp.hdr.ramdisk_image, zp.hdr.ramdisk_size) == (0x800000 - 0x7000, 25600)
    assert memory.read(0x800000 - 0x7000, len(initrd)) == initrd


def test_an_initrd_that_does_not_fit_is_refused(memory: GuestMemoryMmap) -> None:
    kernel = load_kernel(memory, bzimage(init_size=8 * MIB, kernel_alignment=MIB))  # [1 MiB, 9 MiB)
    configure_boot(memory, kernel, "", bytes(7 * MIB))
    with pytest.raises(LoaderError, match=r"7.0 MiB initrd does not fit .* kernel's end \(0x900000\)"):
        configure_boot(memory, kernel, "", bytes(7 * MIB + 1))


def test_an_initrd_file_is_read_from_a_path(memory: GuestMemoryMmap, tmp_path: Path) -> None:
    (tmp_path / "initrd").write_bytes(b"initrd!" * 1000)
    kernel = load_kernel(memory, bzimage())
    boot = configure_boot(memory, kernel, "", tmp_path / "initrd")
    assert boot.initrd_addr is not None
    assert memory.read(boot.initrd_addr, 7000) == b"initrd!" * 1000


def test_guest_memory_must_cover_low_memory(tmp_path: Path) -> None:
    with GuestMemoryMmap.from_ranges([(0x100000, 8 * MIB)]) as high_only:
        kernel = load_kernel(high_only, bzimage())
        with pytest.raises(LoaderError, match="must be RAM from 0 to 0x9fc00"):
            configure_boot(high_only, kernel, "")


# --------------------------------------------------------------------------------------------------
# ELF kernels and PVH
# --------------------------------------------------------------------------------------------------


def test_an_elf_kernel_loads_its_segments_at_p_paddr_and_zeroes_bss(memory: GuestMemoryMmap) -> None:
    memory.write(0x200000, b"\xaa" * 0x3000)  # stale bytes where the bss goes
    text, data = b"\x90" * 100 + b"\xf4", b"DATA" * 16
    image = elf64([Segment(0x100000, text, vaddr=0xFFFFFFFF81000000),
                   Segment(0x200000, data, memsz=0x3000, vaddr=0xFFFFFFFF81100000)],
                  entry=0x100010)
    kernel = load_kernel(memory, image)
    assert (kernel.kind, kernel.entry, kernel.elf_entry) == (KernelKind.ELF, 0x100010, 0x100010)
    assert (kernel.load_addr, kernel.load_end, kernel.setup_header) == (0x100000, 0x203000, None)
    assert memory.read(0x100000, len(text)) == text
    assert memory.read(0x200000, 0x3000) == data + bytes(0x3000 - len(data))


def test_a_virtual_elf_entry_point_is_translated_to_physical(memory: GuestMemoryMmap) -> None:
    image = elf64([Segment(0x100000, b"\x90" * 0x20, vaddr=0xFFFFFFFF81000000)],
                  entry=0xFFFFFFFF81000010)
    assert load_kernel(memory, image).entry == 0x100010


@pytest.mark.parametrize("width", [4, 8])
def test_an_elf_with_a_pvh_note_is_elf_pvh_entered_at_the_note(memory: GuestMemoryMmap,
                                                               width: int) -> None:
    notes = note(b"GNU", 3, b"\x01" * 20) + note(b"Xen", XEN_ELFNOTE_PHYS32_ENTRY,
                                                   (0x100040).to_bytes(width, "little"))
    kernel = load_kernel(memory, elf64([Segment(0x100000, b"\x90" * 0x100)], 0x100000, notes=notes))
    assert (kernel.kind, kernel.entry, kernel.elf_entry) == (KernelKind.ELF_PVH, 0x100040, 0x100000)


def test_a_note_of_another_owner_does_not_make_a_pvh_kernel(memory: GuestMemoryMmap) -> None:
    notes = note(b"Linux", XEN_ELFNOTE_PHYS32_ENTRY, (0x100040).to_bytes(4, "little"))
    kernel = load_kernel(memory, elf64([Segment(0x100000, b"\x90" * 0x100)], 0x100000, notes=notes))
    assert kernel.kind is KernelKind.ELF


def _pvh_kernel(memory: GuestMemoryMmap, code: bytes = b"\xf4", at: int = 0x100000) -> LoadedKernel:
    notes = note(b"Xen", XEN_ELFNOTE_PHYS32_ENTRY, at.to_bytes(4, "little"))
    return load_kernel(memory, elf64([Segment(at, code)], at, notes=notes))


def test_a_pvh_boot_writes_start_info_with_cmdline_module_and_memory_map(memory: GuestMemoryMmap) -> None:
    kernel = _pvh_kernel(memory)
    boot = configure_boot(memory, kernel, "console=hvc0", initrd=b"\x11" * 5000)
    assert boot.mode is BootMode.PVH
    assert (boot.rip, boot.rbx, boot.rsi) == (0x100000, ZERO_PAGE_START, 0)
    info = memory.read_obj(ZERO_PAGE_START, hvm_start_info)
    assert (info.magic, info.version, info.flags, info.rsdp_paddr) == (0x336EC578, 1, 0, 0)
    assert memory.read(info.cmdline_paddr, 13) == b"console=hvc0\0"
    assert info.nr_modules == 1
    module = memory.read_obj(info.modlist_paddr, hvm_modlist_entry)
    assert (module.paddr, module.size) == (boot.initrd_addr, 5000)
    assert memory.read(module.paddr, 5000) == b"\x11" * 5000
    table = memory.read_obj(info.memmap_paddr, hvm_memmap_table_entry * info.memmap_entries)
    assert [(e.addr, e.size, e.type, e.reserved) for e in table] == [
        (e.addr, e.size, e.type, 0) for e in build_e820(guest_ram_ranges(16 * MIB))]
    assert info.memmap_entries == 4


def test_a_pvh_kernel_can_be_booted_the_64_bit_way(memory: GuestMemoryMmap) -> None:
    notes = note(b"Xen", XEN_ELFNOTE_PHYS32_ENTRY, (0x100040).to_bytes(4, "little"))
    kernel = load_kernel(memory, elf64([Segment(0x100000, b"\x90" * 0x100)], 0x100000, notes=notes))
    boot = configure_boot(memory, kernel, "", pvh=False)
    assert (boot.mode, boot.rip, boot.rsi, boot.rbx) == (BootMode.LINUX_64, 0x100000, ZERO_PAGE_START, 0)
    zp = memory.read_obj(ZERO_PAGE_START, boot_params)
    assert (zp.hdr.boot_flag, zp.hdr.header, zp.hdr.type_of_loader) == (0xAA55, 0x53726448, 0xFF)


def test_pvh_cannot_be_forced_on_a_kernel_without_a_pvh_entry(memory: GuestMemoryMmap) -> None:
    kernel = load_kernel(memory, bzimage())
    with pytest.raises(LoaderError, match="no XEN_ELFNOTE_PHYS32_ENTRY note"):
        configure_boot(memory, kernel, "", pvh=True)


def test_a_64_bit_entry_needs_the_kernel_in_the_identity_mapped_first_gib() -> None:
    with GuestMemoryMmap.from_ranges(guest_ram_ranges(2 * GIB)) as memory:
        kernel = load_kernel(memory, elf64([Segment(GIB + 0x200000, b"\xf4")], GIB + 0x200000))
        with pytest.raises(LoaderError, match="past the first GiB"):
            configure_boot(memory, kernel, "")
        pvh = _pvh_kernel(memory, at=GIB + 0x400000)  # PVH runs without paging: anywhere below 4 GiB
        assert configure_boot(memory, pvh, "").rip == GIB + 0x400000


@pytest.mark.parametrize(("image", "message"), [
    (elf64([Segment(0x100000, b"x")], 0x100000, elf_class=1), "a 32-bit ELF file"),
    (elf64([Segment(0x100000, b"x")], 0x100000, machine=3), "machine 3, not x86-64"),
    (elf64([Segment(0x100000, b"x")], 0x100000, elf_type=3), "ELF type 3 is not ET_EXEC"),
    (elf64([], 0x100000), "no program headers"),
    (elf64([Segment(0x100000, b"x", memsz=0)], 0x100000), "no non-empty PT_LOAD"),
    (elf64([Segment(0x100000, b"x" * 64)], 0x100000)[:100], "program headers .* run past the end"),
    (elf64([Segment(0x100000, b"x" * 64)], 0x100000)[:-1], "segment 0's file bytes .* truncated"),
    (elf64([Segment(0x100000, b"x" * 64, memsz=32)], 0x100000), "p_filesz 0x40 > p_memsz 0x20"),
    (elf64([Segment(0x10000, b"x")], 0x10000), "below 1 MiB"),
    (elf64([Segment(0x100000, b"x")], 0x500000), "entry point 0x500000 is inside no PT_LOAD"),
    (elf64([Segment(0x100000, b"x")], 0x100000, notes=note(b"Xen", 18, b"\x00\x00\x60\x00")),
     "PVH entry point 0x600000 is inside no PT_LOAD"),
    (elf64([Segment(0x100000, b"x")], 0x100000, notes=note(b"Xen", 18, b"\x00" * 2)),
     "2-byte descriptor"),
    (elf64([Segment(0x100000, b"x")], 0x100000, notes=note(b"Xen", 18, b"\x00" * 8)[:-4]),
     "runs past the segment's end"),
    (b"\x7fELF" + bytes(20), "not an ELF file"),
])
def test_a_bad_elf_is_refused_with_the_reason(memory: GuestMemoryMmap, image: bytes, message: str) -> None:
    with pytest.raises(LoaderError, match=message):
        load_kernel(memory, image)


def test_an_elf_segment_outside_ram_is_refused_before_any_segment_is_written(
        memory: GuestMemoryMmap) -> None:
    image = elf64([Segment(0x100000, b"first"), Segment(15 * MIB, b"x", memsz=2 * MIB)], 0x100000)
    with pytest.raises(LoaderError, match=r"PT_LOAD segment 1 .* needs guest RAM \[0xf00000, 0x1100000\)"):
        load_kernel(memory, image)
    assert memory.read(0x100000, 5) == bytes(5)


# --------------------------------------------------------------------------------------------------
# Untrusted input: random and mutated images only ever give LoaderError
# --------------------------------------------------------------------------------------------------

_VALID_BZIMAGE = bzimage(b"\x90" * 600, cmdline_size=100)
_VALID_ELF = elf64([Segment(0x100000, b"\x90" * 64, memsz=0x2000), Segment(0x200000, b"d" * 32)],
                   0x100000, notes=note(b"Xen", 18, (0x100010).to_bytes(8, "little")))


def _load_and_boot(memory: GuestMemoryMmap, image: bytes) -> None:
    """Load and configure ``image``; anything but LoaderError fails the test."""
    try:
        kernel = load_kernel(memory, image)
        configure_boot(memory, kernel, "console=ttyS0", initrd=b"i" * 5000)
    except LoaderError:
        pass


def test_random_bytes_only_ever_give_loader_error() -> None:
    with GuestMemoryMmap.from_ranges(guest_ram_ranges(4 * MIB)) as memory:

        @settings(max_examples=300, deadline=None)
        @given(st.binary(max_size=3000) | st.binary(min_size=4, max_size=600).map(lambda b: b"\x7fELF" + b)
               | st.binary(min_size=0x300, max_size=0x1000).map(lambda b: b[:0x202] + b"HdrS" + b[0x206:]))
        def check(image: bytes) -> None:
            _load_and_boot(memory, image)

        check()


@pytest.mark.parametrize("base", [_VALID_BZIMAGE, _VALID_ELF], ids=["bzImage", "elf"])
def test_mutated_images_only_ever_give_loader_error(base: bytes) -> None:
    # Mutations aim at the headers, where every length and offset the loader trusts lives.
    hot = (0x1F0, 0x270) if base is _VALID_BZIMAGE else (0, len(base) - 1)
    with GuestMemoryMmap.from_ranges(guest_ram_ranges(4 * MIB)) as memory:

        @settings(max_examples=300, deadline=None)
        @given(st.lists(st.tuples(st.integers(*hot), st.integers(0, 255)), min_size=1, max_size=6),
               st.integers(0, len(base)))
        def check(changes: list[tuple[int, int]], cut: int) -> None:
            image = bytearray(base)
            for offset, value in changes:
                image[offset] = value
            _load_and_boot(memory, bytes(image[:cut] if cut > 0 else image))

        check()


# --------------------------------------------------------------------------------------------------
# End to end under KVM: the entry point and the boot registers, seen by guest code
# --------------------------------------------------------------------------------------------------

# 64-bit code at the kernel's entry point: reports RSI (the zero page), fields read through it, the
# first command line byte, and the CS and DS selectors, then halts.
REPORT_LINUX_64 = bytes([
    0x48, 0x89, 0xF0,                    # mov rax, rsi
    0xE6, REPORT_PORT,                   # out REPORT_PORT, al        zero page, bits 0-7
    0x48, 0xC1, 0xE8, 0x08,              # shr rax, 8
    0xE6, REPORT_PORT,                   # out REPORT_PORT, al        zero page, bits 8-15
    0x8A, 0x86, 0xFE, 0x01, 0x00, 0x00,  # mov al, [rsi + 0x1fe]      boot_flag, low byte
    0xE6, REPORT_PORT,                   # out REPORT_PORT, al
    0x8A, 0x86, 0x10, 0x02, 0x00, 0x00,  # mov al, [rsi + 0x210]      type_of_loader
    0xE6, REPORT_PORT,                   # out REPORT_PORT, al
    0x8B, 0x86, 0x28, 0x02, 0x00, 0x00,  # mov eax, [rsi + 0x228]     cmd_line_ptr
    0x8A, 0x00,                          # mov al, [rax]              the command line's first byte
    0xE6, REPORT_PORT,                   # out REPORT_PORT, al
    0x8C, 0xC8,                          # mov eax, cs
    0xE6, REPORT_PORT,                   # out REPORT_PORT, al
    0x8C, 0xD8,                          # mov eax, ds
    0xE6, REPORT_PORT,                   # out REPORT_PORT, al
    0xF4,                                # hlt
])
EXPECT_LINUX_64 = [0x00, 0x70, 0x55, 0xFF, ord("k"), BOOT_CS, BOOT_DS]

# 32-bit code at a PVH entry point: reports EBX (the start info), its magic, the first command line
# byte, CR0 (protected mode, no paging) and CS, then halts.
REPORT_PVH = bytes([
    0x89, 0xD8,                          # mov eax, ebx
    0xE6, REPORT_PORT,                   # out REPORT_PORT, al        start info, bits 0-7
    0x88, 0xE0,                          # mov al, ah
    0xE6, REPORT_PORT,                   # out REPORT_PORT, al        start info, bits 8-15
    0x8B, 0x03,                          # mov eax, [ebx]             magic
    0xE6, REPORT_PORT,                   # out REPORT_PORT, al
    0x8B, 0x43, 0x18,                    # mov eax, [ebx + 0x18]      cmdline_paddr
    0x8A, 0x00,                          # mov al, [eax]
    0xE6, REPORT_PORT,                   # out REPORT_PORT, al
    0x0F, 0x20, 0xC0,                    # mov eax, cr0
    0xE6, REPORT_PORT,                   # out REPORT_PORT, al
    0x8C, 0xC8,                          # mov eax, cs
    0xE6, REPORT_PORT,                   # out REPORT_PORT, al
    0xF4,                                # hlt
])
EXPECT_PVH = [0x00, 0x70, 0x78, ord("k"), 0x11, BOOT_CS]  # CR0 = PE | ET


def _boot_and_collect(kvm: Kvm, image: bytes, expected: int) -> tuple[list[int], BootMode, int, int]:
    """Boot ``image`` the documented way; the bytes the guest reported, the mode, vCPU 0's RSP and CR0."""
    reporter = Reporter()
    with GuestMemoryMmap.from_ranges(guest_ram_ranges(16 * MIB)) as memory:
        kernel = load_kernel(memory, image)
        boot = configure_boot(memory, kernel, "kvmlib-boot-test", initrd=b"\x42" * 4096)
        vm = KvmVm.new(kvm, VmConfig.from_kvm(kvm, 1), memory, EventExitHandler(), bus_with(reporter))
        try:
            setup_vcpu_for_boot(vm.vcpus[0].vcpu_fd, memory, boot)
            rsp, cr0 = vm.vcpu_regs(0).rsp, vm.vcpu_sregs(0).cr0
            vm.run()
            with reporter.cond:
                reporter.cond.wait_for(lambda: len(reporter.writes) >= expected, 10.0)
            vm.shutdown()
        finally:
            vm.close()
        # The GDT the vCPU was given has the boot protocol's selectors.
        gdt = struct.unpack("<4Q", memory.read(BOOT_GDT_OFFSET, 32))
    assert (gdt[BOOT_CS // 8] >> 47) & 1 and (gdt[BOOT_DS // 8] >> 47) & 1  # both present
    return [value for _, value in reporter.writes], boot.mode, rsp, cr0


def test_a_bzimage_is_entered_at_its_64_bit_entry_with_rsi_at_the_zero_page(kvm: Kvm) -> None:
    image = bzimage(bytes(0x200) + REPORT_LINUX_64)  # the 64-bit entry is 0x200 into the kernel
    seen, mode, rsp, cr0 = _boot_and_collect(kvm, image, len(EXPECT_LINUX_64))
    assert mode is BootMode.LINUX_64
    assert rsp == BOOT_STACK_POINTER
    assert cr0 & 0x80000001 == 0x80000001 and not cr0 & 0x60000000  # PG, PE; caches on (no CD, NW)
    assert seen == EXPECT_LINUX_64


def test_an_elf_kernel_is_entered_at_its_entry_point_with_rsi_at_the_zero_page(kvm: Kvm) -> None:
    image = elf64([Segment(0x100000, bytes(0x10) + REPORT_LINUX_64, vaddr=0xFFFFFFFF81000000)],
                  entry=0xFFFFFFFF81000010)
    seen, mode, _, _ = _boot_and_collect(kvm, image, len(EXPECT_LINUX_64))
    assert mode is BootMode.LINUX_64
    assert seen == EXPECT_LINUX_64


def test_a_pvh_kernel_is_entered_in_32_bit_protected_mode_with_ebx_at_start_info(kvm: Kvm) -> None:
    notes = note(b"Xen", XEN_ELFNOTE_PHYS32_ENTRY, (0x100020).to_bytes(8, "little"))
    image = elf64([Segment(0x100000, bytes(0x20) + REPORT_PVH)], 0x100000, notes=notes)
    seen, mode, _, _ = _boot_and_collect(kvm, image, len(EXPECT_PVH))
    assert mode is BootMode.PVH
    assert seen == EXPECT_PVH


def test_loader_error_is_a_kvm_error() -> None:
    assert issubclass(LoaderError, KvmError)
