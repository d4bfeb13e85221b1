"""IoManager: registration, dispatch, and the policy for accesses nobody claims."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvmlib.bus import BusError, IoManager, MmioRange, PioRange


class Recorder:
    def __init__(self, answer: int = 0xAB) -> None:
        self.answer = answer
        self.calls: list[tuple[str, int, int, bytes]] = []

    def pio_read(self, base: int, offset: int, data: memoryview) -> None:
        self.calls.append(("pio_read", base, offset, bytes(data)))
        data[:] = bytes([self.answer]) * len(data)

    def pio_write(self, base: int, offset: int, data: memoryview) -> None:
        self.calls.append(("pio_write", base, offset, bytes(data)))

    def mmio_read(self, base: int, offset: int, data: memoryview) -> None:
        self.calls.append(("mmio_read", base, offset, bytes(data)))
        data[:] = bytes([self.answer]) * len(data)

    def mmio_write(self, base: int, offset: int, data: memoryview) -> None:
        self.calls.append(("mmio_write", base, offset, bytes(data)))


def test_accesses_reach_the_device_with_base_and_offset() -> None:
    bus, dev = IoManager(), Recorder()
    bus.register_pio(PioRange(0x3F8, 8), dev)
    bus.register_mmio(MmioRange(0xD000_0000, 0x1000), dev)
    buf = memoryview(bytearray(2))
    assert bus.pio_read(0x3FA, buf) and bytes(buf) == b"\xab\xab"
    assert bus.pio_write(0x3F8, memoryview(b"x"))
    assert bus.mmio_write(0xD000_0010, memoryview(b"\x01\x02\x03\x04"))
    assert bus.mmio_read(0xD000_0FFC, memoryview(bytearray(4)))
    assert [c[:3] for c in dev.calls] == [("pio_read", 0x3F8, 2), ("pio_write", 0x3F8, 0),
                                          ("mmio_write", 0xD000_0000, 0x10),
                                          ("mmio_read", 0xD000_0000, 0xFFC)]


@pytest.mark.parametrize("second", [(0x3F8, 8), (0x3F0, 9), (0x3FF, 1), (0x300, 0x200)])
def test_overlapping_ranges_are_rejected(second: tuple[int, int]) -> None:
    bus = IoManager()
    bus.register_pio(PioRange(0x3F8, 8), Recorder())
    with pytest.raises(BusError, match="overlaps"):
        bus.register_pio(PioRange(*second), Recorder())
    bus.register_pio(PioRange(0x400, 1), Recorder())  # adjacent is fine
    bus.register_mmio(MmioRange(0x1000, 0x1000), Recorder())
    with pytest.raises(BusError, match="overlaps"):
        bus.register_mmio(MmioRange(0x1FFF, 2), Recorder())


@pytest.mark.parametrize("make", [lambda: PioRange(0, 0), lambda: PioRange(0xFFFF, 2),
                                  lambda: PioRange(-1, 1), lambda: MmioRange(2**64 - 1, 2)])
def test_invalid_ranges_are_rejected(make: object) -> None:
    with pytest.raises(BusError):
        make()  # type: ignore[operator]


def test_unclaimed_reads_return_all_ones_and_writes_are_dropped_and_counted() -> None:
    bus, dev = IoManager(), Recorder()
    bus.register_pio(PioRange(0x60, 4), dev)
    buf = memoryview(bytearray(4))
    assert not bus.pio_read(0x80, buf) and bytes(buf) == b"\xff" * 4
    assert not bus.pio_read(0x62, buf)  # straddles the end of the range: unclaimed
    assert not bus.pio_write(0x80, memoryview(b"\x00"))
    assert not bus.mmio_read(0x1000, buf)
    assert not bus.mmio_write(0x1000, memoryview(b"\x00"))
    assert (bus.unclaimed_pio_reads, bus.unclaimed_pio_writes) == (2, 1)
    assert (bus.unclaimed_mmio_reads, bus.unclaimed_mmio_writes) == (1, 1)
    assert dev.calls == []


def test_deregistered_ranges_stop_dispatching() -> None:
    bus, dev = IoManager(), Recorder()
    bus.register_pio(PioRange(0x70, 2), dev)
    bus.deregister_pio(0x70)
    assert not bus.pio_write(0x70, memoryview(b"\x00"))
    with pytest.raises(BusError):
        bus.deregister_pio(0x70)


def test_a_device_exception_propagates() -> None:
    class Broken(Recorder):
        def pio_write(self, base: int, offset: int, data: memoryview) -> None:
            raise RuntimeError("broken")

    bus = IoManager()
    bus.register_pio(PioRange(0x10, 1), Broken())
    with pytest.raises(RuntimeError, match="broken"):
        bus.pio_write(0x10, memoryview(b"\x00"))


@given(st.lists(st.tuples(st.integers(0, 0xFF), st.integers(1, 16)), max_size=12),
       st.integers(0, 0x120), st.integers(1, 4))
def test_dispatch_matches_a_brute_force_model(ranges: list[tuple[int, int]], addr: int,
                                              length: int) -> None:
    bus = IoManager()
    accepted: list[tuple[int, int, Recorder]] = []
    for base, size in ranges:
        dev = Recorder()
        try:
            bus.register_pio(PioRange(base, size), dev)
        except BusError:
            assert any(base < b + s and b < base + size for b, s, _ in accepted)
            continue
        accepted.append((base, size, dev))
    owner = [d for b, s, d in accepted if b <= addr and addr + length <= b + s]
    assert bus.pio_write(addr, memoryview(bytes(length))) == bool(owner)
    for _b, _s, dev in accepted:
        assert len(dev.calls) == (1 if owner and dev is owner[0] else 0)
