"""In-memory snapshots and fast reset: a VM's state and a copy of its memory, and going back to it.

:meth:`kvmlib.KvmVm.snapshot` takes a :class:`VmSnapshot`; :meth:`kvmlib.KvmVm.reset_to` puts the
VM back. This module owns the memory side and its bookkeeping: from a snapshot on, the VM's dirty
tracker accumulates the pages written (by the guest or through :class:`~kvmlib.GuestMemoryMmap`)
under its own cursor, so a reset copies back only those, as long as guest memory last equalled
that very snapshot.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import attrs

from kvmlib.bus import IoManager, StatefulDevice
from kvmlib.dirty import DirtyTracker
from kvmlib.ioctl import kvm_clock_data, kvm_irqchip, kvm_pit_state2
from kvmlib.memory import GuestMemoryMmap
from kvmlib.memory_image import MemoryImage
from kvmlib.resources import Closeable
from kvmlib.state import VmState
from kvmlib.vcpu import KvmVcpu, VcpuResetPlan

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


@attrs.define(slots=True)
class ResetTimings:
    """Where a fast reset's time went, in seconds, phase by phase (snapchange-style).

    Pass one to :meth:`kvmlib.KvmVm.reset_to`; each reset adds to it, and :attr:`resets` counts
    them, so a benchmark can divide.
    """

    #: Reading and clearing the dirty log, and finding the dirty runs.
    harvest: float = 0.0
    #: Copying the dirty pages back.
    copy: float = 0.0
    #: The in-kernel devices: PIT, clock, PICs and IOAPIC.
    in_kernel: float = 0.0
    #: The vCPUs' state.
    vcpus: float = 0.0
    #: The bus devices' state.
    devices: float = 0.0
    #: How many resets were timed.
    resets: int = 0

    @property
    def total(self) -> float:
        """All phases together."""
        return self.harvest + self.copy + self.in_kernel + self.vcpus + self.devices


@attrs.define(frozen=True, slots=True, eq=False)
class ResetPlan:
    """Everything a reset to one snapshot applies, built once: what :class:`FastReset` keeps.

    Valid while the bus has the devices it had (``bus_generation``).
    """

    snapshot: VmSnapshot
    bus_generation: int
    pit2: kvm_pit_state2
    clock: kvm_clock_data
    irqchips: tuple[kvm_irqchip, ...]
    vcpus: tuple[VcpuResetPlan, ...]
    devices: tuple[tuple[StatefulDevice, bytes], ...]


class FastReset:
    """Which guest pages a reset must copy back, for one VM.

    Args:
        tracker: the VM's dirty tracker; this uses the cursor :data:`RESET_DIRTY_CURSOR`.
    """

    def __init__(self, tracker: DirtyTracker) -> None:
        self._tracker = tracker
        # The snapshot guest memory equalled when the cursor was last restarted.
        self._synced: VmSnapshot | None = None
        self._plan: ResetPlan | None = None

    def plan(self, snapshot: VmSnapshot, vcpus: Sequence[KvmVcpu], bus: IoManager,
             check: Callable[[VmSnapshot], None]) -> ResetPlan:
        """The plan of a reset to ``snapshot``: the last one made, while it still holds.

        ``check`` raises if the snapshot does not fit the VM; it runs only when a plan is made.
        """
        plan = self._plan
        if plan is not None and plan.snapshot is snapshot and plan.bus_generation == bus.generation:
            return plan
        generation = bus.generation
        check(snapshot)
        state = snapshot.state
        devices = bus.stateful_devices()
        plan = ResetPlan(
            snapshot=snapshot, bus_generation=generation,
            pit2=kvm_pit_state2.from_buffer_copy(state.pit2),
            clock=kvm_clock_data.from_buffer_copy(state.clock),
            irqchips=tuple(kvm_irqchip.from_buffer_copy(blob)
                           for blob in (state.pic_master, state.pic_slave, state.ioapic)),
            vcpus=tuple(vcpu.plan_reset(saved)
                        for vcpu, saved in zip(vcpus, state.vcpus, strict=True)),
            devices=tuple((devices[saved.key], saved.data) for saved in state.devices))
        self._plan = plan
        return plan

    def capture(self, state: VmState, memory: GuestMemoryMmap) -> VmSnapshot:
        """Copy ``memory`` into a new snapshot of ``state``; dirty pages count from now on."""
        # Tracking restarts before the copy, so no write can fall between the two.
        self._tracker.start(RESET_DIRTY_CURSOR)
        snapshot = VmSnapshot(state, MemoryImage.capture(memory))
        self._synced = snapshot
        return snapshot

    def harvest(self, snapshot: VmSnapshot) -> dict[int, list[tuple[int, int]]] | None:
        """The page runs dirtied since guest memory last equalled ``snapshot``, per slot.

        None when it does not (another snapshot was taken or reset to since): then every page
        must be copied.
        """
        if self._synced is not snapshot or not self._tracker.tracking(RESET_DIRTY_CURSOR):
            return None
        return self._tracker.take_runs(RESET_DIRTY_CURSOR)

    def copy_back(self, snapshot: VmSnapshot, memory: GuestMemoryMmap,
                  dirty: dict[int, list[tuple[int, int]]] | None) -> int:
        """Copy ``snapshot``'s pages back: the ``dirty`` runs (from :meth:`harvest`), or all.

        Regions that do not log dirty pages are copied whole. Returns the pages copied.
        """
        copied = 0
        for slot in range(len(memory.regions)):
            runs = dirty.get(slot) if dirty is not None else None
            copied += snapshot.memory.copy_to(memory, slot, runs)
        if dirty is None:
            self._tracker.start(RESET_DIRTY_CURSOR)
            self._synced = snapshot
        return copied

    def restore_memory(self, snapshot: VmSnapshot, memory: GuestMemoryMmap) -> int:
        """Copy ``snapshot``'s memory back into ``memory``; returns how many pages were copied.

        Only the pages dirtied since, in regions that log dirty pages, when guest memory last
        equalled this snapshot (taken or last reset to here); every page otherwise.
        """
        return self.copy_back(snapshot, memory, self.harvest(snapshot))


__all__ = ["RESET_DIRTY_CURSOR", "FastReset", "ResetPlan", "ResetTimings", "VmSnapshot"]
