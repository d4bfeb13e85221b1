"""The Linux x86 boot protocol ABI: ``<asm/bootparam.h>`` structures and flag values (x86 is little-endian).

Names and layouts follow the kernel's ``arch/x86/include/uapi/asm/bootparam.h`` (and the headers it
includes: ``screen_info.h``, ``apm_bios.h``, ``ist.h``, ``edid.h``, ``edd.h``) so that
``Documentation/arch/x86/boot.rst`` and ``zero-page.rst`` read directly onto this module. Every
structure is packed as in C; ``tests/test_loader.py`` compares sizes and offsets with the installed
headers. Helper types for the kernel's anonymous inner structs and unions start with an underscore.
"""

from __future__ import annotations

from ctypes import Array, c_uint8, c_uint16, c_uint32, c_uint64

from kvmlib.ioctl.structs import KernelStruct, KernelUnion

# --------------------------------------------------------------------------------------------------
# Constants
# --------------------------------------------------------------------------------------------------

#: ``setup_header.boot_flag``: the 0xAA55 boot-sector signature at image offset 0x1fe.
BOOT_FLAG_MAGIC = 0xAA55
#: ``setup_header.header``: "HdrS" read as a little-endian 32-bit value.
HDRS_MAGIC = 0x53726448
#: Image offset of the setup header (``boot_params.hdr`` sits at the same zero-page offset).
SETUP_HEADER_OFFSET = 0x1F1
#: The setup header's length is given by the short jump at 0x200: it ends at 0x202 + byte at 0x201.
SETUP_HEADER_JUMP_OFFSET = 0x201
#: Setup code and data come in 512-byte sectors; a ``setup_sects`` of 0 means 4.
SECTOR_SIZE = 512
SETUP_SECTS_DEFAULT = 4
#: The 64-bit entry point is 0x200 bytes into the protected-mode kernel; this is ABI.
STARTUP_64_OFFSET = 0x200
#: ``cmdline_size`` for kernels with no setup header (x86 ``COMMAND_LINE_SIZE`` is 2048, NUL included).
COMMAND_LINE_SIZE = 2048
#: ``hdr.vid_mode``: "normal" 80x25 text mode, asking nothing of a video BIOS.
NORMAL_VGA = 0xFFFF
#: ``hdr.type_of_loader`` for a boot loader that has no assigned id.
LOADER_TYPE_UNDEFINED = 0xFF

# loadflags
LOADED_HIGH = 1 << 0
KASLR_FLAG = 1 << 1
QUIET_FLAG = 1 << 5
KEEP_SEGMENTS = 1 << 6
CAN_USE_HEAP = 1 << 7

# xloadflags
XLF_KERNEL_64 = 1 << 0
XLF_CAN_BE_LOADED_ABOVE_4G = 1 << 1
XLF_EFI_HANDOVER_32 = 1 << 2
XLF_EFI_HANDOVER_64 = 1 << 3
XLF_EFI_KEXEC = 1 << 4
XLF_5LEVEL = 1 << 5
XLF_5LEVEL_ENABLED = 1 << 6

#: How many ``boot_e820_entry`` fit in ``boot_params.e820_table``.
E820_MAX_ENTRIES_ZEROPAGE = 128
EDD_MBR_SIG_MAX = 16
EDDMAXNR = 6

# --------------------------------------------------------------------------------------------------
# Structures included by boot_params
# --------------------------------------------------------------------------------------------------


class screen_info(KernelStruct):
    """``struct screen_info`` (``<linux/screen_info.h>``): what the firmware left on screen."""

    orig_x: int
    orig_y: int
    ext_mem_k: int
    orig_video_page: int
    orig_video_mode: int
    orig_video_cols: int
    flags: int
    unused2: int
    orig_video_ega_bx: int
    unused3: int
    orig_video_lines: int
    orig_video_isVGA: int  # noqa: N815 - the kernel's name
    orig_video_points: int
    lfb_width: int
    lfb_height: int
    lfb_depth: int
    lfb_base: int
    lfb_size: int
    cl_magic: int
    cl_offset: int
    lfb_linelength: int
    red_size: int
    red_pos: int
    green_size: int
    green_pos: int
    blue_size: int
    blue_pos: int
    rsvd_size: int
    rsvd_pos: int
    vesapm_seg: int
    vesapm_off: int
    pages: int
    vesa_attributes: int
    capabilities: int
    ext_lfb_base: int
    _reserved: Array[c_uint8]

    _pack_ = 1
    _fields_ = [
        ("orig_x", c_uint8),
        ("orig_y", c_uint8),
        ("ext_mem_k", c_uint16),
        ("orig_video_page", c_uint16),
        ("orig_video_mode", c_uint8),
        ("orig_video_cols", c_uint8),
        ("flags", c_uint8),
        ("unused2", c_uint8),
        ("orig_video_ega_bx", c_uint16),
        ("unused3", c_uint16),
        ("orig_video_lines", c_uint8),
        ("orig_video_isVGA", c_uint8),
        ("orig_video_points", c_uint16),
        ("lfb_width", c_uint16),
        ("lfb_height", c_uint16),
        ("lfb_depth", c_uint16),
        ("lfb_base", c_uint32),
        ("lfb_size", c_uint32),
        ("cl_magic", c_uint16),
        ("cl_offset", c_uint16),
        ("lfb_linelength", c_uint16),
        ("red_size", c_uint8),
        ("red_pos", c_uint8),
        ("green_size", c_uint8),
        ("green_pos", c_uint8),
        ("blue_size", c_uint8),
        ("blue_pos", c_uint8),
        ("rsvd_size", c_uint8),
        ("rsvd_pos", c_uint8),
        ("vesapm_seg", c_uint16),
        ("vesapm_off", c_uint16),
        ("pages", c_uint16),
        ("vesa_attributes", c_uint16),
        ("capabilities", c_uint32),
        ("ext_lfb_base", c_uint32),
        ("_reserved", c_uint8 * 2),
    ]


class apm_bios_info(KernelStruct):
    """``struct apm_bios_info`` (``<linux/apm_bios.h>``); not packed, but has no holes."""

    version: int
    cseg: int
    offset: int
    cseg_16: int
    dseg: int
    flags: int
    cseg_len: int
    cseg_16_len: int
    dseg_len: int

    _fields_ = [
        ("version", c_uint16),
        ("cseg", c_uint16),
        ("offset", c_uint32),
        ("cseg_16", c_uint16),
        ("dseg", c_uint16),
        ("flags", c_uint16),
        ("cseg_len", c_uint16),
        ("cseg_16_len", c_uint16),
        ("dseg_len", c_uint16),
    ]


class ist_info(KernelStruct):
    """``struct ist_info`` (``<asm/ist.h>``): Intel SpeedStep BIOS information."""

    signature: int
    command: int
    event: int
    perf_level: int

    _fields_ = [
        ("signature", c_uint32),
        ("command", c_uint32),
        ("event", c_uint32),
        ("perf_level", c_uint32),
    ]


class sys_desc_table(KernelStruct):
    """``struct sys_desc_table`` (obsolete)."""

    length: int
    table: Array[c_uint8]

    _fields_ = [("length", c_uint16), ("table", c_uint8 * 14)]


class olpc_ofw_header(KernelStruct):
    """``struct olpc_ofw_header``: OLPC OpenFirmware hand-off."""

    ofw_magic: int
    ofw_version: int
    cif_handler: int
    irq_desc_table: int

    _pack_ = 1
    _fields_ = [
        ("ofw_magic", c_uint32),
        ("ofw_version", c_uint32),
        ("cif_handler", c_uint32),
        ("irq_desc_table", c_uint32),
    ]


class edid_info(KernelStruct):
    """``struct edid_info`` (``<video/edid.h>``)."""

    dummy: Array[c_uint8]

    _fields_ = [("dummy", c_uint8 * 128)]


class efi_info(KernelStruct):
    """``struct efi_info``: where EFI firmware left its system table and memory map."""

    efi_loader_signature: int
    efi_systab: int
    efi_memdesc_size: int
    efi_memdesc_version: int
    efi_memmap: int
    efi_memmap_size: int
    efi_systab_hi: int
    efi_memmap_hi: int

    _fields_ = [
        ("efi_loader_signature", c_uint32),
        ("efi_systab", c_uint32),
        ("efi_memdesc_size", c_uint32),
        ("efi_memdesc_version", c_uint32),
        ("efi_memmap", c_uint32),
        ("efi_memmap_size", c_uint32),
        ("efi_systab_hi", c_uint32),
        ("efi_memmap_hi", c_uint32),
    ]


class boot_e820_entry(KernelStruct):
    """``struct boot_e820_entry``: one range of the BIOS memory map in the zero page."""

    addr: int
    size: int
    type: int

    _pack_ = 1
    _fields_ = [("addr", c_uint64), ("size", c_uint64), ("type", c_uint32)]


# ---- struct edd_device_params (<linux/edd.h>) and its two unions of packed structs ---------------

class _edd_isa(KernelStruct):
    base_address: int
    reserved1: int
    reserved2: int

    _pack_ = 1
    _fields_ = [("base_address", c_uint16), ("reserved1", c_uint16), ("reserved2", c_uint32)]


class _edd_pci(KernelStruct):
    bus: int
    slot: int
    function: int
    channel: int
    reserved: int

    _pack_ = 1
    _fields_ = [("bus", c_uint8), ("slot", c_uint8), ("function", c_uint8), ("channel", c_uint8),
                ("reserved", c_uint32)]


class _edd_reserved64(KernelStruct):
    reserved: int

    _pack_ = 1
    _fields_ = [("reserved", c_uint64)]


class _edd_interface_path(KernelUnion):
    isa: _edd_isa
    pci: _edd_pci
    ibnd: _edd_reserved64
    xprs: _edd_reserved64
    htpt: _edd_reserved64
    unknown: _edd_reserved64

    _fields_ = [("isa", _edd_isa), ("pci", _edd_pci), ("ibnd", _edd_reserved64),
                ("xprs", _edd_reserved64), ("htpt", _edd_reserved64), ("unknown", _edd_reserved64)]


class _edd_ata(KernelStruct):
    device: int
    reserved1: int
    reserved2: int
    reserved3: int
    reserved4: int

    _pack_ = 1
    _fields_ = [("device", c_uint8), ("reserved1", c_uint8), ("reserved2", c_uint16),
                ("reserved3", c_uint32), ("reserved4", c_uint64)]


class _edd_atapi(KernelStruct):
    device: int
    lun: int
    reserved1: int
    reserved2: int
    reserved3: int
    reserved4: int

    _pack_ = 1
    _fields_ = [("device", c_uint8), ("lun", c_uint8), ("reserved1", c_uint8), ("reserved2", c_uint8),
                ("reserved3", c_uint32), ("reserved4", c_uint64)]


class _edd_scsi(KernelStruct):
    id: int
    lun: int
    reserved1: int
    reserved2: int

    _pack_ = 1
    _fields_ = [("id", c_uint16), ("lun", c_uint64), ("reserved1", c_uint16), ("reserved2", c_uint32)]


class _edd_usb(KernelStruct):
    serial_number: int
    reserved: int

    _pack_ = 1
    _fields_ = [("serial_number", c_uint64), ("reserved", c_uint64)]


class _edd_i1394(KernelStruct):
    eui: int
    reserved: int

    _pack_ = 1
    _fields_ = [("eui", c_uint64), ("reserved", c_uint64)]


class _edd_fibre(KernelStruct):
    wwid: int
    lun: int

    _pack_ = 1
    _fields_ = [("wwid", c_uint64), ("lun", c_uint64)]


class _edd_i2o(KernelStruct):
    identity_tag: int
    reserved: int

    _pack_ = 1
    _fields_ = [("identity_tag", c_uint64), ("reserved", c_uint64)]


class _edd_raid(KernelStruct):
    array_number: int
    reserved1: int
    reserved2: int

    _pack_ = 1
    _fields_ = [("array_number", c_uint32), ("reserved1", c_uint32), ("reserved2", c_uint64)]


class _edd_unknown_device(KernelStruct):
    reserved1: int
    reserved2: int

    _pack_ = 1
    _fields_ = [("reserved1", c_uint64), ("reserved2", c_uint64)]


class _edd_device_path(KernelUnion):
    ata: _edd_ata
    atapi: _edd_atapi
    scsi: _edd_scsi
    usb: _edd_usb
    i1394: _edd_i1394
    fibre: _edd_fibre
    i2o: _edd_i2o
    raid: _edd_raid
    sata: _edd_ata
    unknown: _edd_unknown_device

    _fields_ = [("ata", _edd_ata), ("atapi", _edd_atapi), ("scsi", _edd_scsi), ("usb", _edd_usb),
                ("i1394", _edd_i1394), ("fibre", _edd_fibre), ("i2o", _edd_i2o), ("raid", _edd_raid),
                ("sata", _edd_ata), ("unknown", _edd_unknown_device)]


class edd_device_params(KernelStruct):
    """``struct edd_device_params``: a BIOS Enhanced Disk Drive parameter block."""

    length: int
    info_flags: int
    num_default_cylinders: int
    num_default_heads: int
    sectors_per_track: int
    number_of_sectors: int
    bytes_per_sector: int
    dpte_ptr: int
    key: int
    device_path_info_length: int
    reserved2: int
    reserved3: int
    host_bus_type: Array[c_uint8]
    interface_type: Array[c_uint8]
    interface_path: _edd_interface_path
    device_path: _edd_device_path
    reserved4: int
    checksum: int

    _pack_ = 1
    _fields_ = [
        ("length", c_uint16),
        ("info_flags", c_uint16),
        ("num_default_cylinders", c_uint32),
        ("num_default_heads", c_uint32),
        ("sectors_per_track", c_uint32),
        ("number_of_sectors", c_uint64),
        ("bytes_per_sector", c_uint16),
        ("dpte_ptr", c_uint32),
        ("key", c_uint16),
        ("device_path_info_length", c_uint8),
        ("reserved2", c_uint8),
        ("reserved3", c_uint16),
        ("host_bus_type", c_uint8 * 4),
        ("interface_type", c_uint8 * 8),
        ("interface_path", _edd_interface_path),
        ("device_path", _edd_device_path),
        ("reserved4", c_uint8),
        ("checksum", c_uint8),
    ]


class edd_info(KernelStruct):
    """``struct edd_info``: one disk the BIOS described (unused by a VMM, kept for the layout)."""

    device: int
    version: int
    interface_support: int
    legacy_max_cylinder: int
    legacy_max_head: int
    legacy_sectors_per_track: int
    params: edd_device_params

    _pack_ = 1
    _fields_ = [
        ("device", c_uint8),
        ("version", c_uint8),
        ("interface_support", c_uint16),
        ("legacy_max_cylinder", c_uint16),
        ("legacy_max_head", c_uint8),
        ("legacy_sectors_per_track", c_uint8),
        ("params", edd_device_params),
    ]


# --------------------------------------------------------------------------------------------------
# The setup header and the zero page
# --------------------------------------------------------------------------------------------------


class setup_header(KernelStruct):
    """``struct setup_header``: the bzImage header at image offset 0x1f1, copied into the zero page.

    A field exists only from the protocol version boot.rst gives for it; the header's real length
    in an image is given by the jump at 0x200, so an image may carry fewer (older protocol) or more
    (newer protocol) bytes than this structure.
    """

    setup_sects: int
    root_flags: int
    syssize: int
    ram_size: int
    vid_mode: int
    root_dev: int
    boot_flag: int
    jump: int
    header: int
    version: int
    realmode_swtch: int
    start_sys_seg: int
    kernel_version: int
    type_of_loader: int
    loadflags: int
    setup_move_size: int
    code32_start: int
    ramdisk_image: int
    ramdisk_size: int
    bootsect_kludge: int
    heap_end_ptr: int
    ext_loader_ver: int
    ext_loader_type: int
    cmd_line_ptr: int
    initrd_addr_max: int
    kernel_alignment: int
    relocatable_kernel: int
    min_alignment: int
    xloadflags: int
    cmdline_size: int
    hardware_subarch: int
    hardware_subarch_data: int
    payload_offset: int
    payload_length: int
    setup_data: int
    pref_address: int
    init_size: int
    handover_offset: int
    kernel_info_offset: int

    _pack_ = 1
    _fields_ = [
        ("setup_sects", c_uint8),
        ("root_flags", c_uint16),
        ("syssize", c_uint32),
        ("ram_size", c_uint16),
        ("vid_mode", c_uint16),
        ("root_dev", c_uint16),
        ("boot_flag", c_uint16),
        ("jump", c_uint16),
        ("header", c_uint32),
        ("version", c_uint16),
        ("realmode_swtch", c_uint32),
        ("start_sys_seg", c_uint16),
        ("kernel_version", c_uint16),
        ("type_of_loader", c_uint8),
        ("loadflags", c_uint8),
        ("setup_move_size", c_uint16),
        ("code32_start", c_uint32),
        ("ramdisk_image", c_uint32),
        ("ramdisk_size", c_uint32),
        ("bootsect_kludge", c_uint32),
        ("heap_end_ptr", c_uint16),
        ("ext_loader_ver", c_uint8),
        ("ext_loader_type", c_uint8),
        ("cmd_line_ptr", c_uint32),
        ("initrd_addr_max", c_uint32),
        ("kernel_alignment", c_uint32),
        ("relocatable_kernel", c_uint8),
        ("min_alignment", c_uint8),
        ("xloadflags", c_uint16),
        ("cmdline_size", c_uint32),
        ("hardware_subarch", c_uint32),
        ("hardware_subarch_data", c_uint64),
        ("payload_offset", c_uint32),
        ("payload_length", c_uint32),
        ("setup_data", c_uint64),
        ("pref_address", c_uint64),
        ("init_size", c_uint32),
        ("handover_offset", c_uint32),
        ("kernel_info_offset", c_uint32),
    ]


class boot_params(KernelStruct):
    """``struct boot_params``, the 4 KiB "zero page" whose address the kernel gets in RSI."""

    screen_info: screen_info
    apm_bios_info: apm_bios_info
    _pad2: Array[c_uint8]
    tboot_addr: int
    ist_info: ist_info
    acpi_rsdp_addr: int
    _pad3: Array[c_uint8]
    hd0_info: Array[c_uint8]
    hd1_info: Array[c_uint8]
    sys_desc_table: sys_desc_table
    olpc_ofw_header: olpc_ofw_header
    ext_ramdisk_image: int
    ext_ramdisk_size: int
    ext_cmd_line_ptr: int
    _pad4: Array[c_uint8]
    cc_blob_address: int
    edid_info: edid_info
    efi_info: efi_info
    alt_mem_k: int
    scratch: int
    e820_entries: int
    eddbuf_entries: int
    edd_mbr_sig_buf_entries: int
    kbd_status: int
    secure_boot: int
    _pad5: Array[c_uint8]
    sentinel: int
    _pad6: Array[c_uint8]
    hdr: setup_header
    _pad7: Array[c_uint8]
    edd_mbr_sig_buffer: Array[c_uint32]
    e820_table: Array[boot_e820_entry]
    _pad8: Array[c_uint8]
    eddbuf: Array[edd_info]
    _pad9: Array[c_uint8]

    _pack_ = 1
    _fields_ = [
        ("screen_info", screen_info),                    # 0x000
        ("apm_bios_info", apm_bios_info),                # 0x040
        ("_pad2", c_uint8 * 4),                          # 0x054
        ("tboot_addr", c_uint64),                        # 0x058
        ("ist_info", ist_info),                          # 0x060
        ("acpi_rsdp_addr", c_uint64),                    # 0x070
        ("_pad3", c_uint8 * 8),                          # 0x078
        ("hd0_info", c_uint8 * 16),                      # 0x080
        ("hd1_info", c_uint8 * 16),                      # 0x090
        ("sys_desc_table", sys_desc_table),              # 0x0a0
        ("olpc_ofw_header", olpc_ofw_header),            # 0x0b0
        ("ext_ramdisk_image", c_uint32),                 # 0x0c0
        ("ext_ramdisk_size", c_uint32),                  # 0x0c4
        ("ext_cmd_line_ptr", c_uint32),                  # 0x0c8
        ("_pad4", c_uint8 * 112),                        # 0x0cc
        ("cc_blob_address", c_uint32),                   # 0x13c
        ("edid_info", edid_info),                        # 0x140
        ("efi_info", efi_info),                          # 0x1c0
        ("alt_mem_k", c_uint32),                         # 0x1e0
        ("scratch", c_uint32),                           # 0x1e4
        ("e820_entries", c_uint8),                       # 0x1e8
        ("eddbuf_entries", c_uint8),                     # 0x1e9
        ("edd_mbr_sig_buf_entries", c_uint8),            # 0x1ea
        ("kbd_status", c_uint8),                         # 0x1eb
        ("secure_boot", c_uint8),                        # 0x1ec
        ("_pad5", c_uint8 * 2),                          # 0x1ed
        ("sentinel", c_uint8),                           # 0x1ef
        ("_pad6", c_uint8 * 1),                          # 0x1f0
        ("hdr", setup_header),                           # 0x1f1
        ("_pad7", c_uint8 * (0x290 - 0x1F1 - 123)),      # sizeof(struct setup_header) is 123
        ("edd_mbr_sig_buffer", c_uint32 * EDD_MBR_SIG_MAX),                    # 0x290
        ("e820_table", boot_e820_entry * E820_MAX_ENTRIES_ZEROPAGE),          # 0x2d0
        ("_pad8", c_uint8 * 48),                         # 0xcd0
        ("eddbuf", edd_info * EDDMAXNR),                 # 0xd00
        ("_pad9", c_uint8 * 276),                        # 0xeec
    ]


#: Every structure above, for the layout test against ``<asm/bootparam.h>``.
BOOTPARAM_STRUCTS = (screen_info, apm_bios_info, ist_info, sys_desc_table, olpc_ofw_header, edid_info,
                     efi_info, boot_e820_entry, edd_device_params, edd_info, setup_header, boot_params)

__all__ = [
    "BOOTPARAM_STRUCTS", "BOOT_FLAG_MAGIC", "CAN_USE_HEAP", "COMMAND_LINE_SIZE",
    "E820_MAX_ENTRIES_ZEROPAGE", "EDDMAXNR", "EDD_MBR_SIG_MAX", "HDRS_MAGIC", "KASLR_FLAG",
    "KEEP_SEGMENTS", "LOADED_HIGH", "LOADER_TYPE_UNDEFINED", "NORMAL_VGA", "QUIET_FLAG", "SECTOR_SIZE",
    "SETUP_HEADER_JUMP_OFFSET", "SETUP_HEADER_OFFSET", "SETUP_SECTS_DEFAULT", "STARTUP_64_OFFSET",
    "XLF_5LEVEL", "XLF_5LEVEL_ENABLED", "XLF_CAN_BE_LOADED_ABOVE_4G", "XLF_EFI_HANDOVER_32",
    "XLF_EFI_HANDOVER_64", "XLF_EFI_KEXEC", "XLF_KERNEL_64", "apm_bios_info", "boot_e820_entry",
    "boot_params", "edd_device_params", "edd_info", "edid_info", "efi_info", "ist_info",
    "olpc_ofw_header", "screen_info", "setup_header", "sys_desc_table",
]
