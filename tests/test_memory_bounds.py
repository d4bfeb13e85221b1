"""Guest memory: layout validation and bounds-checked, all-or-nothing access."""

from __future__ import annotations

import ctypes
import errno
import resource
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvmlib import ClosedError, GuestAddress, GuestMemoryError, GuestMemoryMmap, GuestRegionMmap
from kvmlib import memory as memory_module
from kvmlib.errors import GuestMemoryMapError
from kvmlib.memory import HUGE_PAGE_SIZE, KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY

PAGE = 0x1000


@pytest.fixture
def memory() -> GuestMemoryMmap:
    # Two adjacent regions, then a hole, then a third: [0, 2P) [2P, 3P) hole [4P, 5P).
    return GuestMemoryMmap.from_ranges([(0, 2 * PAGE), (2 * PAGE, PAGE), (4 * PAGE, PAGE)])


def test_an_access_across_adjacent_regions_round_trips(memory: GuestMemoryMmap) -> None:
    data = bytes(range(256)) * 2
    memory.write(GuestAddress(2 * PAGE - 100), data)
    assert memory.read(GuestAddress(2 * PAGE - 100), len(data)) == data


@pytest.mark.parametrize("addr, size", [(3 * PAGE - 4, 8), (5 * PAGE - 4, 8), (5 * PAGE, 1),
                                        (2**64 - 1, 2), (10 * PAGE, 1)])
def test_an_access_into_a_hole_or_past_the_end_raises_and_touches_nothing(
        memory: GuestMemoryMmap, addr: int, size: int) -> None:
    before = [memory.read(GuestAddress(a), PAGE) for a in (0, PAGE, 2 * PAGE, 4 * PAGE)]
    with pytest.raises(GuestMemoryError):
        memory.write(GuestAddress(addr), b"\xAA" * size)
    with pytest.raises(GuestMemoryError):
        memory.read(GuestAddress(addr), size)
    assert [memory.read(GuestAddress(a), PAGE) for a in (0, PAGE, 2 * PAGE, 4 * PAGE)] == before


@pytest.mark.parametrize("ranges, message", [
    ([(0, PAGE + 1)], "page aligned"),
    ([(1, PAGE)], "page aligned"),
    ([(0, 0)], "must be > 0"),
    ([(0, 2 * PAGE), (PAGE, PAGE)], "overlap"),
    ([(2**64 - PAGE, 2 * PAGE)], "2\\*\\*64"),
])
def test_bad_layouts_are_rejected_with_a_clear_message(
        ranges: list[tuple[int, int]], message: str) -> None:
    with pytest.raises(GuestMemoryError, match=message):
        GuestMemoryMmap.from_ranges(ranges)


def test_integers_are_little_endian_and_range_checked(memory: GuestMemoryMmap) -> None:
    memory.write_u32(GuestAddress(0x10), 0x11223344)
    assert memory.read(GuestAddress(0x10), 4) == bytes([0x44, 0x33, 0x22, 0x11])
    assert memory.read_u16(GuestAddress(0x10)) == 0x3344
    memory.write_u64(GuestAddress(0x20), 2**64 - 1)
    assert memory.read_u64(GuestAddress(0x20)) == 2**64 - 1
    with pytest.raises(GuestMemoryError, match="does not fit"):
        memory.write_u8(GuestAddress(0), 256)


def test_ctypes_objects_round_trip(memory: GuestMemoryMmap) -> None:
    class Pair(ctypes.Structure):
        _fields_ = [("a", ctypes.c_uint32), ("b", ctypes.c_uint64)]

    memory.write_obj(GuestAddress(0x100), Pair(7, 9))
    got = memory.read_obj(GuestAddress(0x100), Pair)
    assert (got.a, got.b) == (7, 9)


def test_host_address_points_at_the_guest_bytes(memory: GuestMemoryMmap) -> None:
    memory.write(GuestAddress(4 * PAGE + 8), b"kvmlib")
    assert ctypes.string_at(memory.host_address(GuestAddress(4 * PAGE + 8)), 6) == b"kvmlib"
    with pytest.raises(GuestMemoryError):
        memory.host_address(GuestAddress(3 * PAGE))


def test_closed_memory_refuses_access_and_close_is_idempotent(memory: GuestMemoryMmap) -> None:
    memory.close()
    memory.close()
    with pytest.raises(ClosedError, match="closed"):
        memory.read(GuestAddress(0), 1)
    with pytest.raises(ValueError, match="closed"):  # as for a closed file
        memory.write(GuestAddress(0), b"x")


def test_guest_address_is_an_int_in_range() -> None:
    assert GuestAddress(0x1000) + 1 == 0x1001
    assert repr(GuestAddress(0x1000)) == "GuestAddress(0x1000)"
    assert GuestAddress(2**64 - 1).checked_add(1) is None
    with pytest.raises(GuestMemoryError):
        GuestAddress(-1)


@given(addr=st.integers(0, 6 * PAGE), data=st.binary(min_size=0, max_size=3 * PAGE))
def test_any_write_either_round_trips_or_changes_nothing(addr: int, data: bytes) -> None:
    with GuestMemoryMmap.from_ranges([(0, 2 * PAGE), (2 * PAGE, PAGE), (4 * PAGE, PAGE)]) as mem:
        snapshot = [mem.read(r.start_addr, r.size) for r in mem.regions]
        try:
            mem.write(GuestAddress(addr), data)
        except GuestMemoryError:
            assert [mem.read(r.start_addr, r.size) for r in mem.regions] == snapshot
            assert not (addr + len(data) <= 3 * PAGE or 4 * PAGE <= addr <= 5 * PAGE - len(data))
        else:
            assert mem.read(GuestAddress(addr), len(data)) == data


def test_a_file_backed_region_shares_its_bytes_with_the_file(tmp_path: Path) -> None:
    backing = tmp_path / "ram"
    backing.write_bytes(bytes(2 * PAGE))
    region = GuestRegionMmap.from_file(GuestAddress(PAGE), PAGE, str(backing), offset=PAGE)
    with GuestMemoryMmap.from_regions([region]) as mem:
        mem.write(GuestAddress(PAGE + 16), b"persisted")
        region.as_memoryview()  # still mapped
    assert backing.read_bytes()[PAGE + 16:PAGE + 25] == b"persisted"


def test_a_missing_backing_file_is_a_guest_memory_error(tmp_path: Path) -> None:
    with pytest.raises(GuestMemoryError, match="cannot open"):
        GuestRegionMmap.from_file(GuestAddress(0), PAGE, str(tmp_path / "absent"))


def test_region_flags_are_the_kvm_slot_flags() -> None:
    plain = GuestRegionMmap.anonymous(GuestAddress(0), PAGE)
    ro = GuestRegionMmap.anonymous(GuestAddress(0), PAGE, read_only=True)
    logged = GuestRegionMmap.anonymous(GuestAddress(0), PAGE, log_dirty_pages=True)
    assert (plain.flags, ro.flags, logged.flags) == (0, KVM_MEM_READONLY, KVM_MEM_LOG_DIRTY_PAGES)
    for r in (plain, ro, logged):
        r.close()


def test_huge_page_regions_when_the_host_has_them() -> None:
    with pytest.raises(GuestMemoryError, match="2 MiB"):
        GuestRegionMmap.anonymous(GuestAddress(0), PAGE, hugepages=True)
    try:
        mem = GuestMemoryMmap.from_ranges([(GuestAddress(0), HUGE_PAGE_SIZE)], hugepages=True)
    except GuestMemoryError as e:
        assert "nr_hugepages" in str(e)
        pytest.skip(f"no huge pages reserved on this host: {e}")
    with mem:
        mem.write_u64(GuestAddress(HUGE_PAGE_SIZE - 8), 0x1234)
        assert mem.read_u64(GuestAddress(HUGE_PAGE_SIZE - 8)) == 0x1234


# ---- populate and discard --------------------------------------------------------------------------


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def test_populate_takes_the_page_faults_up_front_and_changes_nothing() -> None:
    pages = 1024
    region = GuestRegionMmap.anonymous(0, pages * PAGE)
    try:
        view = region.as_memoryview()
        view[5 * PAGE:5 * PAGE + 4] = b"kept"
        region.populate(PAGE)  # from page 1 to the end
        before = _minor_faults()
        for page in range(1, pages):
            view[page * PAGE + 8] = 1
        # Writing every populated page faults (almost) nowhere: the memory is already there.
        assert _minor_faults() - before < pages // 10
        assert bytes(view[5 * PAGE:5 * PAGE + 4]) == b"kept"
    finally:
        region.close()


def test_discard_zeroes_anonymous_memory_by_giving_it_back() -> None:
    region = GuestRegionMmap.anonymous(0, 64 * PAGE, log_dirty_pages=True)
    try:
        view = region.as_memoryview()
        view[:] = b"\xaa" * len(view)
        region.discard(2 * PAGE, 3 * PAGE)
        assert bytes(view[2 * PAGE:5 * PAGE]) == bytes(3 * PAGE)
        assert view[2 * PAGE - 1] == view[5 * PAGE] == 0xAA
        # The pages went back to the kernel: touching them faults again.
        before = _minor_faults()
        for page in range(2, 5):
            view[page * PAGE] = 1
        assert _minor_faults() - before >= 3
        assert region.take_host_dirty() == 0b11100  # a host write, for dirty tracking
    finally:
        region.close()


def test_discard_zero_fills_a_file_backed_region(tmp_path: Path) -> None:
    path = tmp_path / "ram"
    path.write_bytes(b"\x55" * (4 * PAGE))
    region = GuestRegionMmap.from_file(0, 4 * PAGE, path)
    try:
        region.discard(PAGE, PAGE)
    finally:
        region.close()
    assert path.read_bytes() == b"\x55" * PAGE + bytes(PAGE) + b"\x55" * (2 * PAGE)


@pytest.mark.parametrize("offset, size", [(1, PAGE), (0, PAGE + 1), (PAGE, 4 * PAGE), (5 * PAGE, None)])
def test_populate_and_discard_refuse_ranges_outside_the_region_or_unaligned(
        offset: int, size: int | None) -> None:
    region = GuestRegionMmap.anonymous(0, 4 * PAGE)
    try:
        for call in (region.populate, region.discard):
            with pytest.raises(GuestMemoryError, match="not page aligned inside the region"):
                call(offset, size)
    finally:
        region.close()
    for call in (region.populate, region.discard):
        with pytest.raises(ClosedError):
            call()


def test_a_kernel_refusal_to_populate_is_a_map_error_with_its_errno(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory_module, "_MADV_POPULATE_WRITE", 0x7FFF)  # no such advice: EINVAL
    region = GuestRegionMmap.anonymous(0, 4 * PAGE)
    try:
        with pytest.raises(GuestMemoryMapError, match="cannot populate 0x4000 bytes") as info:
            region.populate()
        assert info.value.errno == errno.EINVAL
    finally:
        region.close()
