"""The MP table: built, written into guest memory and parsed back."""

from __future__ import annotations

import pytest

from kvmlib import GuestAddress, GuestMemoryMmap
from kvmlib.arch.x86_64.mptable import (
    MPTABLE_START,
    MpTable,
    MpTableError,
    parse_mptable,
)


@pytest.mark.parametrize("num_cpus", [1, 2, 254])
def test_the_table_written_to_memory_parses_back(num_cpus: int) -> None:
    with GuestMemoryMmap.from_ranges([(GuestAddress(0), 1 << 20)]) as memory:
        table = MpTable(num_cpus)
        table.write(memory)
        parsed = parse_mptable(memory.read(GuestAddress(MPTABLE_START), table.size))
    assert parsed.apic_ids == tuple(range(num_cpus))
    assert parsed.bsp_id == 0
    assert parsed.ioapic_id == num_cpus
    assert (parsed.ioapic_address, parsed.lapic_address) == (0xFEC00000, 0xFEE00000)
    assert (parsed.num_intsrc, parsed.num_lintsrc) == (16, 2)


def test_the_floating_pointer_leads_to_the_table_and_both_sums_are_zero() -> None:
    data = MpTable(4).to_bytes()
    assert data[:4] == b"_MP_" and sum(data[:16]) % 256 == 0
    assert int.from_bytes(data[4:8], "little") == MPTABLE_START + 16
    assert data[16:20] == b"PCMP" and sum(data[16:]) % 256 == 0


@pytest.mark.parametrize("num_cpus", [0, 255, -1])
def test_cpu_counts_outside_the_specification_are_rejected(num_cpus: int) -> None:
    with pytest.raises(MpTableError, match=r"1\.\.254"):
        MpTable(num_cpus)


def test_memory_that_cannot_hold_the_table_is_rejected_untouched() -> None:
    with GuestMemoryMmap.from_ranges([(GuestAddress(0), 0x10000)]) as memory:
        with pytest.raises(MpTableError, match="must hold"):
            MpTable(1).write(memory)
        assert memory.read(GuestAddress(0), 0x10000) == bytes(0x10000)


@pytest.mark.parametrize("offset", [0, 10, 16, 60, 100])
def test_one_corrupted_byte_makes_parsing_fail(offset: int) -> None:
    data = bytearray(MpTable(2).to_bytes())
    data[offset] ^= 0x01
    with pytest.raises(MpTableError):
        parse_mptable(bytes(data))
