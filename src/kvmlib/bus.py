"""The I/O bus: port (PIO) and MMIO address ranges mapped to devices.

vCPU threads dispatch every port and MMIO exit here. Registration is rare and takes a lock; dispatch
is the hot path and takes none: it reads an immutable snapshot (one tuple of the sorted range starts
and the entries) that registration replaces in one assignment.
"""

from __future__ import annotations

import bisect
import logging
import threading
from collections.abc import Callable, Mapping
from typing import Protocol, runtime_checkable

import attrs

from kvmlib.errors import KvmError

log = logging.getLogger(__name__)


class BusError(KvmError):
    """A bus range is invalid or collides with one already registered."""


def _check_range(kind: str, limit: int, base: int, size: int) -> None:
    if not isinstance(base, int) or not isinstance(size, int):
        raise BusError(f"{kind} range base and size must be ints, not {base!r}, {size!r}")
    if size <= 0 or base < 0 or base + size > limit:
        raise BusError(f"{kind} range [{base:#x}, +{size:#x}) must be non-empty and inside "
                       f"0..{limit:#x}")


class _Range:
    """What port and MMIO ranges share: ``[base, base + size)`` arithmetic."""

    __slots__ = ()
    base: int
    size: int

    @property
    def end(self) -> int:
        """The first port past the range."""
        return self.base + self.size

    def contains(self, addr: int, length: int = 1) -> bool:
        """Whether the whole access ``[addr, addr + length)`` lies inside."""
        return self.base <= addr and addr + length <= self.base + self.size

    def overlaps(self, other: _Range) -> bool:
        """Whether the two ranges share an address."""
        return self.base < other.base + other.size and other.base < self.base + self.size


@attrs.define(frozen=True, slots=True)
class PioRange(_Range):
    """Ports ``[base, base + size)``; the port space is 64 KiB."""

    base: int
    size: int

    def __attrs_post_init__(self) -> None:
        _check_range("PIO", 1 << 16, self.base, self.size)


@attrs.define(frozen=True, slots=True)
class MmioRange(_Range):
    """Guest-physical addresses ``[base, base + size)``."""

    base: int
    size: int

    def __attrs_post_init__(self) -> None:
        _check_range("MMIO", 1 << 64, self.base, self.size)


@runtime_checkable
class PioDevice(Protocol):
    """A device on ports. ``base`` is its range's start and ``offset`` the port minus ``base``."""

    def pio_read(self, base: int, offset: int, data: memoryview) -> None:
        """Fill ``data`` (the guest's ``in``); its length is the access size."""

    def pio_write(self, base: int, offset: int, data: memoryview) -> None:
        """Take the guest's ``out`` of ``data``."""


@runtime_checkable
class MmioDevice(Protocol):
    """A device on guest-physical addresses no memory slot backs."""

    def mmio_read(self, base: int, offset: int, data: memoryview) -> None:
        """Fill ``data`` (the guest's load)."""

    def mmio_write(self, base: int, offset: int, data: memoryview) -> None:
        """Take the guest's store of ``data``."""


def answer_byte(data: memoryview, value: int) -> None:
    """Answer a read of an 8-bit register: ``value`` in the first byte, zeros above it.

    For device writers: a guest may read a byte register with a wider access.
    """
    data[0] = value
    if len(data) > 1:
        data[1:] = bytes(len(data) - 1)


@runtime_checkable
class StatefulDevice(Protocol):
    """A device whose state a snapshot carries (see :mod:`kvmlib.snapshot`).

    The encoding of the bytes is the device's own; :meth:`restore_state` must refuse (raise) bytes
    it cannot read rather than apply part of them.
    """

    def save_state(self) -> bytes:
        """The device's state, taken while the VM is paused."""

    def restore_state(self, state: bytes) -> None:
        """Put back what :meth:`save_state` returned."""


_Entry = tuple[int, int, object]  # (base, end, device)
_Table = tuple[tuple[int, ...], tuple[_Entry, ...]]  # (sorted starts, the entries in that order)
#: What :attr:`IoManager.pio_handlers` maps a port to: ``(base, end, read, write)``, the device's
#: range and its bound ``pio_read`` / ``pio_write``.
PioHandler = tuple[int, int, Callable[[int, int, memoryview], None],
                   Callable[[int, int, memoryview], None]]


class _Space:
    """One address space's registrations: a sorted snapshot swapped whole on change."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        #: Never mutated, only replaced by one store: a dispatcher that loads it once holds starts
        #: and entries of the same generation, with or without a GIL.
        self.table: _Table = ((), ())
        self.ranges: dict[int, tuple[_Range, object]] = {}

    def add(self, rng: _Range, device: object) -> None:
        for other, _ in self.ranges.values():
            if rng.overlaps(other):
                raise BusError(f"{self.kind} range [{rng.base:#x}, {rng.end:#x}) overlaps "
                               f"[{other.base:#x}, {other.end:#x})")
        self.ranges[rng.base] = (rng, device)
        self._rebuild()

    def remove(self, base: int) -> None:
        if self.ranges.pop(base, None) is None:
            raise BusError(f"no {self.kind} range starts at {base:#x}")
        self._rebuild()

    def _rebuild(self) -> None:
        ordered = sorted(self.ranges.values(), key=lambda item: item[0].base)
        entries = tuple((r.base, r.end, d) for r, d in ordered)
        self.table = (tuple(e[0] for e in entries), entries)

    def find(self, addr: int, length: int) -> _Entry | None:
        starts, entries = self.table
        i = bisect.bisect_right(starts, addr) - 1
        if i >= 0:
            entry = entries[i]
            if addr + length <= entry[1]:
                return entry
        return None


class IoManager:
    """Routes port and MMIO accesses to registered devices.

    Policy for accesses no device claims (none of its range holds the whole access): reads return
    all ones (``0xff`` bytes), as an empty ISA bus does; writes are dropped. Each is counted in
    ``unclaimed_*``; the counters are for diagnostics and may miss increments under concurrency.
    Exceptions a device raises propagate to the caller (the vCPU, which ends and reports them).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pio = _Space("PIO")
        self._mmio = _Space("MMIO")
        #: Every registered port, to its handler: one dictionary look-up per port exit (the vCPU
        #: loop's dispatch). Never mutated, only replaced, like the range tables.
        self.pio_handlers: Mapping[int, PioHandler] = {}
        #: Counts registrations and removals: what was worked out from the devices (a reset plan,
        #: the list of stateful devices) holds while it is unchanged.
        self.generation = 0
        self._stateful: tuple[int, dict[tuple[str, int], StatefulDevice]] = (-1, {})
        self.unclaimed_pio_reads = 0
        self.unclaimed_pio_writes = 0
        self.unclaimed_mmio_reads = 0
        self.unclaimed_mmio_writes = 0
        self._unclaimed_ports: set[int] = set()

    def register_pio(self, rng: PioRange, device: PioDevice) -> None:
        """Attach ``device`` to the ports of ``rng``; BusError if they overlap another range."""
        with self._lock:
            self._pio.add(rng, device)
            self._publish_pio_handlers()
            self.generation += 1

    def register_mmio(self, rng: MmioRange, device: MmioDevice) -> None:
        """Attach ``device`` to the addresses of ``rng``; BusError if they overlap another range."""
        with self._lock:
            self._mmio.add(rng, device)
            self.generation += 1

    def deregister_pio(self, base: int) -> None:
        """Remove the port range starting at ``base``."""
        with self._lock:
            self._pio.remove(base)
            self._publish_pio_handlers()
            self.generation += 1

    def _publish_pio_handlers(self) -> None:
        handlers: dict[int, PioHandler] = {}
        for rng, device in self._pio.ranges.values():
            entry = (rng.base, rng.end, device.pio_read, device.pio_write)  # type: ignore[attr-defined]
            handlers.update(dict.fromkeys(range(rng.base, rng.end), entry))
        self.pio_handlers = handlers

    def deregister_mmio(self, base: int) -> None:
        """Remove the MMIO range starting at ``base``."""
        with self._lock:
            self._mmio.remove(base)
            self.generation += 1

    def pio_ranges(self) -> tuple[tuple[_Range, object], ...]:
        """Every registered port range and its device."""
        # Under the lock: the dict must not change while it is copied.
        with self._lock:
            return tuple(self._pio.ranges.values())

    def mmio_ranges(self) -> tuple[tuple[_Range, object], ...]:
        """Every registered MMIO range and its device."""
        with self._lock:
            return tuple(self._mmio.ranges.values())

    def stateful_devices(self) -> dict[tuple[str, int], StatefulDevice]:
        """Every device with state, once each, keyed by ``("pio" | "mmio", base of its first range)``."""
        generation, found = self._stateful
        if generation == self.generation:
            return dict(found)
        generation = self.generation
        found = {}
        seen: set[int] = set()
        for space, ranges in (("pio", self.pio_ranges()), ("mmio", self.mmio_ranges())):
            for rng, device in sorted(ranges, key=lambda item: item[0].base):
                if isinstance(device, StatefulDevice) and id(device) not in seen:
                    seen.add(id(device))
                    found[space, rng.base] = device
        # Checking a runtime protocol is slow: worth doing once per set of devices.
        self._stateful = (generation, found)
        return dict(found)

    def pio_read(self, port: int, data: memoryview) -> bool:
        """Dispatch a guest ``in``; True if a device answered, else ``data`` is all ones."""
        entry = self.pio_handlers.get(port)
        if entry is None or port + len(data) > entry[1]:
            self.unclaimed_read_at(port, len(data), data)
            return False
        entry[2](entry[0], port - entry[0], data)
        return True

    def pio_write(self, port: int, data: memoryview) -> bool:
        """Dispatch a guest ``out``; True if a device took it, else it is dropped."""
        entry = self.pio_handlers.get(port)
        if entry is None or port + len(data) > entry[1]:
            self.unclaimed_write(port, len(data), data)
            return False
        entry[3](entry[0], port - entry[0], data)
        return True

    def unclaimed_read(self, data: memoryview) -> None:
        """Answer a port read no device claims: all ones, as an empty ISA bus does (counted)."""
        self.unclaimed_pio_reads += 1
        data[:] = b"\xff" * len(data)

    def unclaimed_read_at(self, port: int, size: int, data: memoryview) -> None:
        """:meth:`unclaimed_read`, called as a device would be (for the vCPU loop's dispatch)."""
        if port not in self._unclaimed_ports:
            self._first_unclaimed(port, "read")
        self.unclaimed_read(data)

    def unclaimed_write(self, port: int, size: int, data: memoryview) -> None:
        """Drop a port write no device claims (counted), called as a device would be."""
        self.unclaimed_pio_writes += 1
        if port not in self._unclaimed_ports:
            self._first_unclaimed(port, "write")

    def _first_unclaimed(self, port: int, what: str) -> None:
        # Once per port (at most 65536 of them, whatever the guest does): a guest probing for
        # hardware touches many ports, and a missing device shows here first.
        self._unclaimed_ports.add(port)
        log.debug("no device at port %#x: the guest's %s is %s (logged once per port)", port,
                  what, "answered with all ones" if what == "read" else "dropped")

    def mmio_read(self, addr: int, data: memoryview) -> bool:
        """Dispatch a guest MMIO load; True if a device answered, else ``data`` is all ones."""
        entry = self._mmio.find(addr, len(data))
        if entry is None:
            self.unclaimed_mmio_reads += 1
            data[:] = b"\xff" * len(data)
            return False
        entry[2].mmio_read(entry[0], addr - entry[0], data)  # type: ignore[attr-defined]
        return True

    def mmio_write(self, addr: int, data: memoryview) -> bool:
        """Dispatch a guest MMIO store; True if a device took it, else it is dropped."""
        entry = self._mmio.find(addr, len(data))
        if entry is None:
            self.unclaimed_mmio_writes += 1
            return False
        entry[2].mmio_write(entry[0], addr - entry[0], data)  # type: ignore[attr-defined]
        return True


__all__ = [
    "BusError", "IoManager", "MmioDevice", "MmioRange", "PioDevice", "PioRange", "StatefulDevice",
    "answer_byte",
]
