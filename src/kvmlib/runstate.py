"""The VM's one lifecycle state, and the run state its vCPUs park on.

A VM is in exactly one :class:`LifecycleState`. It lives in :class:`VcpuRunState`, under the
condition variable the vCPU threads wait on, so one lock orders every transition: a caller's
``pause()``, a watchdog's ``shutdown()``, a vCPU that parks or ends. Every change is a
compare-and-set against :data:`TRANSITIONS`; ``STOPPING`` and what follows are final.

The vCPUs see the coarser :class:`VmRunState` of rust-vmm's vmm-reference (``RUNNING``,
``SUSPENDING``, ``EXITING``), derived from the lifecycle state, and keep that API
(:meth:`VcpuRunState.set_and_notify`). This module is the lowest of the lifecycle: :mod:`kvmlib.vcpu`
parks on it and :mod:`kvmlib.vm` drives it.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable, Collection, Mapping

from kvmlib.errors import ClosedError, VmError


class LifecycleState(enum.Enum):
    """Where a VM is in its life. See :data:`TRANSITIONS` for the moves between states."""

    #: Built; vCPUs exist but no thread runs them. Inspect, configure, save, then ``run()``.
    CREATED = "created"
    #: vCPU threads run the guest.
    RUNNING = "running"
    #: ``pause()`` has kicked the vCPUs and waits for every one to park.
    PAUSING = "pausing"
    #: Every vCPU is parked (or has ended): registers and memory are quiet.
    PAUSED = "paused"
    #: ``shutdown()`` was called or a vCPU ended: the threads are ending. Final: nothing resumes.
    STOPPING = "stopping"
    #: Every vCPU thread has ended and been joined; registers can still be read.
    STOPPED = "stopped"
    #: ``close()`` released every fd; only ``close()`` and ``shutdown()`` (no-ops) remain.
    CLOSED = "closed"


class VmRunState(enum.Enum):
    """What the vCPUs do when they next leave KVM_RUN (vmm-reference's ``VmRunState``)."""

    RUNNING = "running"
    SUSPENDING = "suspending"
    EXITING = "exiting"


_C, _R, _PG, _PD, _SG, _SD, _X = LifecycleState

#: Every allowed move, and only these: each transition is checked against this table.
TRANSITIONS: Mapping[LifecycleState, frozenset[LifecycleState]] = {
    _C: frozenset({_R, _SD}),        # run(); shutdown() before run()
    _R: frozenset({_PG, _SG}),       # pause(); shutdown() or a vCPU ended
    _PG: frozenset({_PD, _R, _SG}),  # the last vCPU parked; pause() timed out; shutdown()
    _PD: frozenset({_R, _SG}),       # resume(); shutdown()
    _SG: frozenset({_SD}),           # every vCPU thread joined
    _SD: frozenset({_X}),            # close()
    _X: frozenset(),
}

_VIEW: Mapping[LifecycleState, VmRunState] = {
    _C: VmRunState.RUNNING, _R: VmRunState.RUNNING,
    _PG: VmRunState.SUSPENDING, _PD: VmRunState.SUSPENDING,
    _SG: VmRunState.EXITING, _SD: VmRunState.EXITING, _X: VmRunState.EXITING,
}

#: The states from which the VM can still be brought to a stop (and into which it never returns).
_LIVE = frozenset({_R, _PG, _PD})


class VcpuRunState:
    """The lifecycle state shared by a VM and its vCPUs, under one condition variable.

    vCPUs call :meth:`park` when kicked while the VM is suspending, and the VM's driver calls
    :meth:`vcpu_ended` when a vCPU thread ends; the last of them to stop moves a pausing VM to
    ``PAUSED``. Everything else is done by :class:`kvmlib.KvmVm`.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._lifecycle = LifecycleState.CREATED
        # vCPU threads started, still in their loop and not parked; parked; ended.
        self._running = 0
        self._parked = 0
        self._ended = 0
        self._started = 0
        # Counts completed pauses, so a waiter can tell "paused, then resumed" from "never paused".
        self._pauses = 0

    # ---- reading --------------------------------------------------------------------------------

    @property
    def state(self) -> VmRunState:
        """What the vCPUs are asked to do, derived from :attr:`lifecycle`."""
        return _VIEW[self._lifecycle]

    @property
    def lifecycle(self) -> LifecycleState:
        """The VM's lifecycle state (a snapshot: it may change as soon as it is read)."""
        return self._lifecycle

    @property
    def parked(self) -> int:
        """How many vCPUs are waiting in :meth:`park`."""
        return self._parked

    @property
    def condition(self) -> threading.Condition:
        """The one lock (and condition) every lifecycle transition takes."""
        return self._cond

    # ---- vmm-reference API ----------------------------------------------------------------------

    def set_and_notify(self, state: VmRunState) -> None:
        """Ask the vCPUs to run, suspend or exit, and wake every waiter.

        ``EXITING`` is always accepted and final: it stops a live VM, marks a created one stopped,
        and does nothing once the VM is stopping. ``SUSPENDING`` and ``RUNNING`` move a live VM
        between running and pausing.

        Raises:
            VmError: the VM is not live (not started, or already stopping).
        """
        with self._cond:
            current = self._lifecycle
            if state is VmRunState.EXITING:
                if current is _C:
                    self._move(_SD)
                elif current in _LIVE:
                    self._move(_SG)
            elif _VIEW[current] is not state:
                if current not in _LIVE:
                    raise VmError(f"cannot set the run state to {state.value}: the VM is "
                                  f"{current.value}")
                self._move(_R if state is VmRunState.RUNNING else _PG)
            self._cond.notify_all()

    def wait_until(self, predicate: Callable[[VcpuRunState], bool],
                   timeout: float | None = None) -> bool:
        """Block until ``predicate(self)`` holds (checked on every notify); False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self), timeout)

    # ---- the vCPU side --------------------------------------------------------------------------

    def park(self) -> VmRunState:
        """Called by a vCPU thread: wait while the VM is suspending, then return the new state."""
        with self._cond:
            self._running -= 1
            self._parked += 1
            self._check_paused()
            try:
                while _VIEW[self._lifecycle] is VmRunState.SUSPENDING:
                    self._cond.wait()
            finally:
                self._parked -= 1
                self._running += 1
            return _VIEW[self._lifecycle]

    def vcpu_ended(self) -> None:
        """Called once by each vCPU thread as it ends: the VM stops (as in vmm-reference)."""
        with self._cond:
            self._running -= 1
            self._ended += 1
            if self._lifecycle in _LIVE:
                self._move(_SG)
            self._cond.notify_all()

    # ---- the VM side (callers hold :attr:`condition`) -------------------------------------------

    def begin(self, num_threads: int) -> None:
        """Record that ``num_threads`` vCPU threads are being started (CREATED to RUNNING)."""
        self.require(frozenset({_C}), "run")
        self._started = self._running = num_threads
        self._move(_R)

    def not_started(self, count: int) -> None:
        """``count`` of the threads :meth:`begin` announced could not be started."""
        self._started -= count
        self._running -= count
        if self._lifecycle in _LIVE:
            self._move(_SG)
        self._cond.notify_all()

    @property
    def all_ended(self) -> bool:
        """Whether every started vCPU thread has ended."""
        return self._ended >= self._started

    @property
    def running_vcpus(self) -> int:
        """How many vCPU threads are neither parked nor ended."""
        return self._running

    @property
    def pauses(self) -> int:
        """How many times the VM has reached ``PAUSED``."""
        return self._pauses

    def require(self, allowed: Collection[LifecycleState], action: str) -> LifecycleState:
        """The current state, or raise the error that says why ``action`` is refused there."""
        current = self._lifecycle
        if current in allowed:
            return current
        if current is _X:
            raise ClosedError(f"cannot {action}: the VM is closed")
        hint = ""
        if current is _PG:
            hint = ": a pause() is in progress"
        elif current is _R and _PD in allowed:
            hint = "; pause() it first"
        elif current is _C and _R in allowed:
            hint = "; run() it first"
        elif _C in allowed and current is not _C:
            hint = " (a VM runs once)"
        raise VmError(f"cannot {action}: the VM is {current.value}{hint}")

    def move(self, new: LifecycleState) -> None:
        """Move to ``new`` (checked against :data:`TRANSITIONS`) and wake every waiter."""
        self._move(new)
        self._cond.notify_all()

    def _move(self, new: LifecycleState) -> None:
        if new not in TRANSITIONS[self._lifecycle]:
            raise VmError(f"internal error: no transition from {self._lifecycle.value} to "
                          f"{new.value}")
        self._lifecycle = new
        if new is _PG:
            self._check_paused()

    def _check_paused(self) -> None:
        if self._lifecycle is _PG and self._running <= 0:
            self._lifecycle = _PD
            self._pauses += 1
            self._cond.notify_all()


__all__ = ["TRANSITIONS", "LifecycleState", "VcpuRunState", "VmRunState"]
