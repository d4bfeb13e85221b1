"""The Intel MultiProcessor Specification 1.4 table that tells a guest its CPUs and interrupt wiring.

Written at the start of the EBDA (``MPTABLE_START``), where a guest scans for the ``_MP_`` floating
pointer; the configuration table follows it directly.
"""

from __future__ import annotations

import struct

import attrs

from kvmlib.errors import KvmError
from kvmlib.memory import GuestAddress, GuestMemoryMmap

MPTABLE_START = 0x9FC00
APIC_DEFAULT_PHYS_BASE = 0xFEE00000
IO_APIC_DEFAULT_PHYS_BASE = 0xFEC00000
#: APIC ids 0..n-1 go to the CPUs, n to the IOAPIC, and 0xFF means broadcast.
MAX_SUPPORTED_CPUS = 254

_MPF = struct.Struct("<4sIBBB5s")  # floating pointer: 16 bytes
_HEADER = struct.Struct("<4sHBB8s12sIHHII")  # configuration table header: 44 bytes
_CPU = struct.Struct("<BBBBII8x")  # processor entry: 20 bytes
_BUS = struct.Struct("<BB6s")
_IOAPIC = struct.Struct("<BBBBI")
_IRQ = struct.Struct("<BBHBBBB")  # I/O and local interrupt assignment entries

_ENTRY_PROCESSOR, _ENTRY_BUS, _ENTRY_IOAPIC, _ENTRY_INTSRC, _ENTRY_LINTSRC = range(5)
_SPEC_REV = 4
_APIC_VERSION = 0x14
_IOAPIC_VERSION = 0x11
_CPU_ENABLED, _CPU_BSP = 1, 2
_CPU_SIGNATURE = 0x600  # family 6
_CPU_FEATURES = (1 << 0) | (1 << 9)  # FPU, APIC
_IRQ_INT, _IRQ_NMI, _IRQ_EXTINT = 0, 1, 3
_ISA_IRQS = 16
_BROADCAST = 0xFF


class MpTableError(KvmError):
    """The MP table cannot be built, does not fit guest memory, or does not parse."""


def _checksum(data: bytes) -> int:
    """The byte that makes ``data`` sum to 0 modulo 256."""
    return -sum(data) & 0xFF


class MpTable:
    """The MP table of a VM with ``num_cpus`` CPUs (1..254); CPU 0 is the bootstrap processor."""

    def __init__(self, num_cpus: int) -> None:
        if not isinstance(num_cpus, int) or not 1 <= num_cpus <= MAX_SUPPORTED_CPUS:
            raise MpTableError(f"the MP table holds 1..{MAX_SUPPORTED_CPUS} CPUs, not {num_cpus!r}")
        self.num_cpus = num_cpus

    @property
    def size(self) -> int:
        """Bytes the floating pointer and the configuration table take."""
        return len(self.to_bytes())

    def _entries(self) -> list[bytes]:
        ioapic_id = self.num_cpus
        entries = [
            _CPU.pack(_ENTRY_PROCESSOR, cpu, _APIC_VERSION,
                      _CPU_ENABLED | (_CPU_BSP if cpu == 0 else 0), _CPU_SIGNATURE, _CPU_FEATURES)
            for cpu in range(self.num_cpus)
        ]
        entries.append(_BUS.pack(_ENTRY_BUS, 0, b"ISA   "))
        entries.append(_IOAPIC.pack(_ENTRY_IOAPIC, ioapic_id, _IOAPIC_VERSION, 1,
                                    IO_APIC_DEFAULT_PHYS_BASE))
        entries += [_IRQ.pack(_ENTRY_INTSRC, _IRQ_INT, 0, 0, irq, ioapic_id, irq)
                    for irq in range(_ISA_IRQS)]
        # The PIC reaches every LAPIC's LINT0 as ExtINT, NMIs their LINT1.
        entries.append(_IRQ.pack(_ENTRY_LINTSRC, _IRQ_EXTINT, 0, 0, 0, _BROADCAST, 0))
        entries.append(_IRQ.pack(_ENTRY_LINTSRC, _IRQ_NMI, 0, 0, 0, _BROADCAST, 1))
        return entries

    def to_bytes(self, start: int = MPTABLE_START) -> bytes:
        """The floating pointer at ``start`` followed by the configuration table."""
        entries = self._entries()
        body = b"".join(entries)
        length = _HEADER.size + len(body)

        def header(checksum: int) -> bytes:
            return _HEADER.pack(b"PCMP", length, _SPEC_REV, checksum, b"KVMLIB  ",
                                b"kvmlib VM   ", 0, 0, len(entries), APIC_DEFAULT_PHYS_BASE, 0)

        table = header(_checksum(header(0) + body)) + body

        def mpf(checksum: int) -> bytes:
            return _MPF.pack(b"_MP_", start + _MPF.size, 1, _SPEC_REV, checksum, bytes(5))

        return mpf(_checksum(mpf(0))) + table

    def write(self, memory: GuestMemoryMmap) -> None:
        """Write the table at ``MPTABLE_START``; MpTableError if guest memory does not hold it."""
        data = self.to_bytes()
        start, end = MPTABLE_START, MPTABLE_START + len(data)
        if not all(memory.address_in_range(a) for a in range(start, end, 0x1000)) or \
                not memory.address_in_range(end - 1):
            raise MpTableError(f"guest memory must hold [{start:#x}, {end:#x}) for the MP table of "
                               f"{self.num_cpus} CPUs")
        memory.write(GuestAddress(start), data)


@attrs.define(frozen=True, slots=True)
class ParsedMpTable:
    """What :func:`parse_mptable` read back."""

    num_cpus: int
    apic_ids: tuple[int, ...]
    bsp_id: int
    ioapic_id: int
    ioapic_address: int
    lapic_address: int
    num_intsrc: int
    num_lintsrc: int


def parse_mptable(data: bytes, start: int = MPTABLE_START) -> ParsedMpTable:
    """Parse an MP table image that begins at guest address ``start``, checking signatures and sums."""
    if len(data) < _MPF.size or data[:4] != b"_MP_" or sum(data[:_MPF.size]) & 0xFF:
        raise MpTableError("no valid _MP_ floating pointer")
    _sig, physptr, _len, _rev, _sum, _feat = _MPF.unpack_from(data)
    off = physptr - start
    if not 0 <= off <= len(data) - _HEADER.size:
        raise MpTableError(f"configuration table pointer {physptr:#x} is outside the image")
    sig, length, _rev, _sum, _oem, _prod, _p, _s, count, lapic, _r = _HEADER.unpack_from(data, off)
    if sig != b"PCMP" or off + length > len(data) or sum(data[off:off + length]) & 0xFF:
        raise MpTableError("invalid PCMP configuration table (signature, length or checksum)")
    apic_ids: list[int] = []
    bsp = ioapic_id = ioapic_addr = -1
    intsrc = lintsrc = 0
    pos = off + _HEADER.size
    sizes = {_ENTRY_PROCESSOR: _CPU.size, _ENTRY_BUS: _BUS.size, _ENTRY_IOAPIC: _IOAPIC.size,
             _ENTRY_INTSRC: _IRQ.size, _ENTRY_LINTSRC: _IRQ.size}
    for _ in range(count):
        kind = data[pos]
        if kind not in sizes:
            raise MpTableError(f"unknown entry type {kind} at offset {pos:#x}")
        if kind == _ENTRY_PROCESSOR:
            _t, apic_id, _v, flags, _sig2, _f = _CPU.unpack_from(data, pos)
            apic_ids.append(apic_id)
            if flags & _CPU_BSP:
                bsp = apic_id
        elif kind == _ENTRY_IOAPIC:
            _t, ioapic_id, _v, _fl, ioapic_addr = _IOAPIC.unpack_from(data, pos)
        elif kind == _ENTRY_INTSRC:
            intsrc += 1
        elif kind == _ENTRY_LINTSRC:
            lintsrc += 1
        pos += sizes[kind]
    return ParsedMpTable(len(apic_ids), tuple(apic_ids), bsp, ioapic_id, ioapic_addr, lapic,
                         intsrc, lintsrc)


__all__ = [
    "MAX_SUPPORTED_CPUS",
    "MPTABLE_START",
    "MpTable",
    "MpTableError",
    "ParsedMpTable",
    "parse_mptable",
]
