"""Dirty-page tracking: which pages of each guest memory region were written, and since when.

KVM's ``KVM_GET_DIRTY_LOG`` returns the pages the guest wrote since the previous call *and clears
them*, so it can serve only one reader. A VM has several (the user's :meth:`KvmVm.dirty_pages`,
diff snapshots, fast reset), so :class:`DirtyTracker` drains the kernel's log, adds the host's
own writes, and keeps one accumulated bitmap per reader ("cursor"). Bitmaps are Python ints (bit
``n`` = page ``n`` of the region): OR-ing two of them is one C loop, whatever their size.

Why the plain log: measured right after a guest dirtied k pages of 256 MiB, harvesting with
``KVM_GET_DIRTY_LOG`` took 11-15 us for k = 1..256; manual protection (GET then
``KVM_CLEAR_DIRTY_LOG``) 1.5-2 us more at every k; the dirty ring 2-5 us for k <= 10 but 58 us at
k = 256 (one Python step per page), with ring-full exits to handle and no bitmap for the other
readers. The log is the one that never loses badly.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence

import attrs

from kvmlib.memory import PAGE_SIZE, GuestAddress, GuestRegionMmap

_WORD_BITS = 64


@attrs.define(frozen=True, slots=True)
class DirtyBitmap:
    """The pages of one memory region written in some interval.

    Attributes:
        slot: the region's index in its :class:`~kvmlib.GuestMemoryMmap` (its KVM slot).
        start_addr: the region's first guest address.
        num_pages: the region's size in pages.
        bits: bit ``n`` set when page ``n`` of the region was written.
    """

    slot: int
    start_addr: GuestAddress
    num_pages: int
    bits: int = 0

    @property
    def bitmap(self) -> bytes:
        """The bitmap as KVM lays it out: little-endian 64-bit words, bit 0 = the first page."""
        words = (self.num_pages + _WORD_BITS - 1) // _WORD_BITS
        return self.bits.to_bytes(words * 8, "little")

    def __len__(self) -> int:
        """How many pages are dirty."""
        return self.bits.bit_count()

    def __contains__(self, page: object) -> bool:
        return isinstance(page, int) and 0 <= page < self.num_pages and bool(self.bits >> page & 1)

    def pages(self) -> list[int]:
        """The dirty page numbers, ascending (page ``n`` is at ``start_addr + n * PAGE_SIZE``)."""
        return [p for first, count in self.runs() for p in range(first, first + count)]

    def addresses(self) -> list[GuestAddress]:
        """The guest addresses of the dirty pages."""
        base = int(self.start_addr)
        return [GuestAddress(base + p * PAGE_SIZE) for p in self.pages()]

    def runs(self) -> list[tuple[int, int]]:
        """Maximal runs of consecutive dirty pages as ``(first_page, page_count)``."""
        return list(_runs(self.bits))


# Maps every byte that is not zero to 1: a bitmap's dirty bytes, found then with bytes.find, which
# skips the clean stretches at memchr speed.
_DIRTY_BYTE = bytes([0] + [1] * 255)


def _runs(bits: int) -> Iterator[tuple[int, int]]:
    # Only the words holding dirty bits are visited in Python; a loop over every word of a large,
    # mostly clean region would cost more than the rest of a fast reset. Inside a word, bit
    # tricks jump from run to run, so the work follows the number of runs.
    # Only the words from the first dirty one on are converted and scanned: a fuzz target's few
    # pages rarely span much of a large region.
    skipped = ((bits & -bits).bit_length() - 1) // _WORD_BITS if bits else 0
    bits >>= skipped * _WORD_BITS
    raw = bits.to_bytes((bits.bit_length() + 63) // 64 * 8, "little")
    dirty_bytes = raw.translate(_DIRTY_BYTE)
    words = memoryview(raw).cast("Q")
    start = -1  # the first page of the run still open, if any
    previous = -2
    found = dirty_bytes.find(1)
    while found >= 0:
        w = found >> 3
        found = dirty_bytes.find(1, (w + 1) * 8)
        if start >= 0 and w != previous + 1:  # a clean word came between: the run ended
            yield start, (skipped + previous + 1) * _WORD_BITS - start
            start = -1
        previous = w
        base = (skipped + w) * _WORD_BITS
        word = words[w]
        if word == 0xFFFFFFFFFFFFFFFF:
            if start < 0:
                start = base
            continue
        pos = 0
        while word:
            if not word & 1:
                zeros = (word & -word).bit_length() - 1
                if start >= 0:
                    yield start, base + pos - start
                    start = -1
                word >>= zeros
                pos += zeros
            ones = (word ^ (word + 1)).bit_length() - 1  # the trailing one bits
            if start < 0:
                start = base + pos
            word >>= ones
            pos += ones
        if pos < _WORD_BITS and start >= 0:  # the word's top bits are clear: the run ends
            yield start, base + pos - start
            start = -1
    if start >= 0:
        yield start, (skipped + previous + 1) * _WORD_BITS - start


# A log is converted to an int a chunk at a time, skipping clean chunks with a memcmp each: a
# fuzz target's few pages then cost one small conversion instead of one of the whole log.
_CHUNK = 1024
_ZERO_CHUNK = bytes(_CHUNK)


def _log_bits(log: bytes | bytearray) -> int:
    if len(log) <= 2 * _CHUNK:
        return int.from_bytes(log, "little")
    bits = 0
    for off in range(0, len(log), _CHUNK):
        chunk = log[off:off + _CHUNK]
        if chunk != _ZERO_CHUNK:
            bits |= int.from_bytes(chunk, "little") << (off * 8)
    return bits


#: Reads and clears KVM's dirty log of one slot: ``fetch(slot, region) -> bitmap bytes``.
DirtyLogFetch = Callable[[int, GuestRegionMmap], "bytes | bytearray"]


class DirtyTracker:
    """Accumulates dirty pages of the regions that log them, separately for each named reader.

    Args:
        regions: the guest memory regions, in slot order.
        fetch: reads and clears KVM's log for a slot.
    """

    def __init__(self, regions: Sequence[GuestRegionMmap], fetch: DirtyLogFetch) -> None:
        self._regions = tuple(regions)
        self._fetch = fetch
        self._cursors: dict[str, list[int]] = {}
        # What each cursor's start stands for (e.g. the id of the snapshot file it runs from).
        self._labels: dict[str, str | None] = {}
        # Draining the kernel's log and folding it into every cursor must not interleave.
        self._lock = threading.RLock()
        self._zeros: dict[int, bytes] = {}
        self._tracked = tuple(i for i, r in enumerate(self._regions) if r.log_dirty_pages)

    @property
    def tracked_slots(self) -> tuple[int, ...]:
        """The slots whose regions log dirty pages."""
        return self._tracked

    def _drain(self) -> None:
        regions, zeros, cursors = self._regions, self._zeros, self._cursors.values()
        for slot in self._tracked:
            region = regions[slot]
            log = self._fetch(slot, region)
            # A clean log (the common case between two resets) is one memcmp, not a conversion.
            zero = zeros.get(len(log))
            if zero is None:
                zero = zeros[len(log)] = bytes(len(log))
            bits = region.take_host_dirty()
            if log != zero:
                bits |= _log_bits(log)
            if bits:
                for acc in cursors:
                    acc[slot] |= bits

    def start(self, cursor: str) -> None:
        """Begin (or restart) accumulating for ``cursor``: nothing is dirty for it from now on."""
        with self._lock:
            self._drain()
            self._cursors[cursor] = [0] * len(self._regions)
            self._labels[cursor] = None

    def peek(self, cursor: str) -> list[DirtyBitmap]:
        """What ``cursor`` has accumulated, one bitmap per tracked region, without clearing it."""
        with self._lock:
            self._drain()
            acc = self._cursors[cursor]
            return [DirtyBitmap(slot, self._regions[slot].start_addr,
                                self._regions[slot].num_pages, acc[slot])
                    for slot in self.tracked_slots]

    def take(self, cursor: str) -> list[DirtyBitmap]:
        """What ``cursor`` has accumulated, then clear it (it keeps accumulating)."""
        with self._lock:
            result = self.peek(cursor)
            self._cursors[cursor] = [0] * len(self._regions)
            return result

    def take_runs(self, cursor: str) -> dict[int, list[tuple[int, int]]]:
        """:meth:`take` as runs of dirty pages per tracked slot (``(first_page, count)``).

        What a fast reset copies back, without building bitmaps on the way.
        """
        with self._lock:
            self._drain()
            acc = self._cursors[cursor]
            self._cursors[cursor] = [0] * len(self._regions)
            return {slot: list(_runs(acc[slot])) if acc[slot] else [] for slot in self._tracked}

    def tracking(self, cursor: str) -> bool:
        """Whether :meth:`start` was called for ``cursor``."""
        return cursor in self._cursors

    def label(self, cursor: str) -> str | None:
        """What the reader said ``cursor``'s start stands for (:meth:`set_label`), if anything."""
        with self._lock:
            return self._labels.get(cursor)

    def set_label(self, cursor: str, label: str | None) -> None:
        """Record what ``cursor``'s start stands for; :meth:`start` clears it."""
        with self._lock:
            self._labels[cursor] = label


__all__ = ["DirtyBitmap", "DirtyLogFetch", "DirtyTracker"]
