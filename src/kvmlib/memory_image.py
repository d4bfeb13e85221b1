"""A copy of guest memory kept outside the guest: what fast reset copies pages back from."""

from __future__ import annotations

import mmap
from collections.abc import Iterable, Sequence

from kvmlib.errors import GuestMemoryError
from kvmlib.memory import PAGE_SIZE, GuestMemoryMmap
from kvmlib.resources import Closeable

#: A memory layout: ``(start, size)`` of each region, ascending.
Layout = tuple[tuple[int, int], ...]


def layout_of(memory: GuestMemoryMmap) -> Layout:
    """The ``(start, size)`` of every region of ``memory``."""
    return tuple((int(r.start_addr), r.size) for r in memory.regions)


class MemoryImage(Closeable):
    """Private copies of every region of a guest memory, in the same layout.

    Build one with :meth:`capture`. Each region's copy is an anonymous mapping, so pages of the
    guest that were never touched cost nothing here either until copied.
    """

    def __init__(self, layout: Layout, maps: Sequence[mmap.mmap]) -> None:
        if len(layout) != len(maps) or any(len(m) != size for (_, size), m in zip(layout, maps, strict=True)):
            raise GuestMemoryError("a memory image needs one mapping of the right size per region")
        self.layout = layout
        self._maps: list[mmap.mmap] | None = list(maps)

    @classmethod
    def capture(cls, memory: GuestMemoryMmap) -> MemoryImage:
        """Copy all of ``memory``."""
        layout = layout_of(memory)
        maps: list[mmap.mmap] = []
        try:
            for region in memory.regions:
                copy = mmap.mmap(-1, region.size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
                maps.append(copy)
                copy[:] = region.as_memoryview()
        except BaseException:
            for m in maps:
                m.close()
            raise
        return cls(layout, maps)

    @property
    def size(self) -> int:
        """The total size of all regions, in bytes."""
        return sum(size for _, size in self.layout)

    def view(self, slot: int) -> memoryview:
        """Region ``slot``'s copy, read-only."""
        if self._maps is None:
            raise GuestMemoryError("the memory image is closed")
        return memoryview(self._maps[slot]).toreadonly()

    def check_layout(self, memory: GuestMemoryMmap) -> None:
        """Raise GuestMemoryError unless ``memory`` has exactly this image's layout."""
        theirs = layout_of(memory)
        if theirs != self.layout:
            raise GuestMemoryError(f"guest memory layout {_fmt(theirs)} differs from the image's "
                                   f"{_fmt(self.layout)}")

    def copy_to(self, memory: GuestMemoryMmap, slot: int,
                runs: Iterable[tuple[int, int]] | None = None) -> int:
        """Copy region ``slot`` back into ``memory``: all of it, or only ``(first, count)`` page runs.

        Returns:
            The number of pages copied.
        """
        if self._maps is None:
            raise GuestMemoryError("the memory image is closed")
        src = memoryview(self._maps[slot])
        dst = memory.regions[slot].as_memoryview()
        if runs is None:
            dst[:] = src
            return len(src) // PAGE_SIZE
        copied = 0
        limit = len(src)
        for first, count in runs:
            lo, hi = first * PAGE_SIZE, (first + count) * PAGE_SIZE
            if not 0 <= lo < hi <= limit:
                raise GuestMemoryError(f"page run {first}+{count} is outside region {slot}")
            dst[lo:hi] = src[lo:hi]
            copied += count
        return copied

    def close(self) -> None:
        """Unmap the copies; idempotent."""
        maps, self._maps = self._maps, None
        for m in maps or ():
            try:
                m.close()
            except BufferError:
                pass  # a caller's view is alive: the mapping goes with the last such view



def _fmt(layout: Layout) -> str:
    return "[" + ", ".join(f"{start:#x}+{size:#x}" for start, size in layout) + "]"


__all__ = ["Layout", "MemoryImage", "layout_of"]
