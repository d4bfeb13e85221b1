"""In-memory snapshots and fast reset: a VM's state and a copy of its memory, and going back to it.

:meth:`kvmlib.KvmVm.snapshot` takes a :class:`VmSnapshot`; :meth:`kvmlib.KvmVm.reset_to` puts the
VM back. This module owns the memory side and its bookkeeping: from a snapshot on, the VM's dirty
tracker accumulates the pages written (by the guest or through :class:`~kvmlib.GuestMemoryMmap`)
under its own cursor, so a reset copies back only those, as long as guest memory last equalled
that very snapshot.
"""

from __future__ import annotations

import attrs

from kvmlib.dirty import DirtyTracker
from kvmlib.memory import GuestMemoryMmap
from kvmlib.memory_image import MemoryImage
from kvmlib.resources import Closeable
from kvmlib.state import VmState

#: The dirty-tracking cursor fast reset reads (see :class:`kvmlib.dirty.DirtyTracker`).
RESET_DIRTY_CURSOR = "reset"


@attrs.define(frozen=True, slots=True, eq=False)
class VmSnapshot(Closeable):
    """A VM's state and a copy of its memory, held in this process.

    What :meth:`kvmlib.KvmVm.reset_to` goes back to. Take one with :meth:`kvmlib.KvmVm.snapshot`;
    :meth:`close` frees the memory copy. (:mod:`kvmlib.snapshot` writes snapshots to disk.)
    """

    state: VmState
    memory: MemoryImage

    def close(self) -> None:
        """Free the memory copy; idempotent."""
        self.memory.close()


class FastReset:
    """Which guest pages a reset must copy back, for one VM.

    Args:
        tracker: the VM's dirty tracker; this uses the cursor :data:`RESET_DIRTY_CURSOR`.
    """

    def __init__(self, tracker: DirtyTracker) -> None:
        self._tracker = tracker
        # The snapshot guest memory equalled when the cursor was last restarted.
        self._synced: VmSnapshot | None = None

    def capture(self, state: VmState, memory: GuestMemoryMmap) -> VmSnapshot:
        """Copy ``memory`` into a new snapshot of ``state``; dirty pages count from now on."""
        # Tracking restarts before the copy, so no write can fall between the two.
        self._tracker.start(RESET_DIRTY_CURSOR)
        snapshot = VmSnapshot(state, MemoryImage.capture(memory))
        self._synced = snapshot
        return snapshot

    def restore_memory(self, snapshot: VmSnapshot, memory: GuestMemoryMmap) -> int:
        """Copy ``snapshot``'s memory back into ``memory``; returns how many pages were copied.

        Only the pages dirtied since, in regions that log dirty pages, when guest memory last
        equalled this snapshot (taken or last reset to here); every page otherwise.
        """
        incremental = self._synced is snapshot and self._tracker.tracking(RESET_DIRTY_CURSOR)
        dirty = {d.slot: d for d in self._tracker.take(RESET_DIRTY_CURSOR)} if incremental else {}
        copied = 0
        for slot in range(len(memory.regions)):
            runs = dirty[slot].runs() if slot in dirty else None
            copied += snapshot.memory.copy_to(memory, slot, runs)
        if not incremental:
            self._tracker.start(RESET_DIRTY_CURSOR)
            self._synced = snapshot
        return copied


__all__ = ["RESET_DIRTY_CURSOR", "FastReset", "VmSnapshot"]
