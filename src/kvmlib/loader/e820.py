"""The e820 memory map a guest is given, built from its guest memory regions."""

from __future__ import annotations

import enum
from collections.abc import Iterable

import attrs

from kvmlib.loader.bootparam import E820_MAX_ENTRIES_ZEROPAGE
from kvmlib.loader.errors import LoaderError
from kvmlib.loader.layout import (
    EBDA_START,
    HIGH_RAM_START,
    HIMEM_START,
    MMIO_GAP_END,
    MMIO_GAP_START,
)

_ADDR_LIMIT = 1 << 64


class E820Type(enum.IntEnum):
    """e820 range types (``E820_TYPE_*`` in the kernel; the PVH memory map uses the same numbers)."""

    RAM = 1
    RESERVED = 2
    ACPI = 3
    NVS = 4
    UNUSABLE = 5
    PMEM = 7


@attrs.define(frozen=True, slots=True)
class E820Entry:
    """One range of the memory map: ``[addr, addr + size)`` of type ``type``."""

    addr: int
    size: int
    type: E820Type

    @property
    def end(self) -> int:
        """The first address past the range."""
        return self.addr + self.size


# Where guest memory counts as RAM. The EBDA and the legacy hole up to 1 MiB are backed by the
# first memory region but hold the MP table and nothing the guest may allocate; the MMIO gap should
# not be backed at all, and is excluded in case a VMM backs it anyway.
_RAM_WINDOWS = ((0, EBDA_START), (HIMEM_START, MMIO_GAP_START), (HIGH_RAM_START, _ADDR_LIMIT))
_RESERVED = ((EBDA_START, HIMEM_START), (MMIO_GAP_START, MMIO_GAP_END))


def build_e820(ranges: Iterable[tuple[int, int]]) -> tuple[E820Entry, ...]:
    """The memory map for guest memory made of the ``(base, size)`` ranges, sorted by address.

    RAM is what the ranges back, minus ``[EBDA_START, 1 MiB)`` and the MMIO gap, adjacent ranges
    merged; those two windows are always listed as reserved (they hold the MP table, the IOAPIC and
    the LAPIC whether or not the ranges reach them).

    Raises:
        LoaderError: the map would have more entries than the zero page holds (128).
    """
    pieces: list[tuple[int, int]] = []
    for base, size in ranges:
        for lo, hi in _RAM_WINDOWS:
            start, end = max(base, lo), min(base + size, hi)
            if start < end:
                pieces.append((start, end))
    pieces.sort()
    merged: list[list[int]] = []
    for start, end in pieces:
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    entries = [E820Entry(s, e - s, E820Type.RAM) for s, e in merged]
    entries += [E820Entry(s, e - s, E820Type.RESERVED) for s, e in _RESERVED]
    entries.sort(key=lambda e: e.addr)
    if len(entries) > E820_MAX_ENTRIES_ZEROPAGE:
        raise LoaderError(f"guest memory makes {len(entries)} e820 entries; the zero page holds at "
                          f"most {E820_MAX_ENTRIES_ZEROPAGE} (use fewer, larger memory regions)")
    return tuple(entries)


def ram_entry_containing(entries: Iterable[E820Entry], start: int, end: int) -> E820Entry | None:
    """The RAM entry holding all of ``[start, end)``, or None if no single one does."""
    for entry in entries:
        if entry.type is E820Type.RAM and entry.addr <= start and end <= entry.end:
            return entry
    return None


def describe_ram(entries: Iterable[E820Entry]) -> str:
    """The RAM ranges of a map, for error messages."""
    ram = [f"[{e.addr:#x}, {e.end:#x})" for e in entries if e.type is E820Type.RAM]
    return ", ".join(ram) or "none"


__all__ = ["E820Entry", "E820Type", "build_e820", "describe_ram", "ram_entry_containing"]
