"""The lifecycle of a VM's vCPUs: one thread each, the barrier start, pause, resume, shutdown.

:class:`Lifecycle` drives any objects that fulfil the :class:`~kvmlib.vcpu.Vcpu` contract (KVM's, or
a test's fake), so the state machine can be exercised without ``/dev/kvm``. It follows rust-vmm's
vmm-reference ``KvmVm``: ``run`` starts one thread per vCPU, the threads wait on a barrier until all
exist, and each, when its vCPU's loop ends, kicks the exit handler and marks the VM exiting;
``shutdown`` sets ``EXITING``, kicks every vCPU and joins every thread. It finishes what the reference
left as ``todo!()``: ``pause`` and ``resume``.

Every call checks and changes the one :class:`~kvmlib.runstate.LifecycleState` under the run
state's lock; see :data:`CALLS` for which call is allowed where.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence

from kvmlib.errors import VcpuError, VmError
from kvmlib.exit_handler import ExitHandler
from kvmlib.memory import GuestAddress
from kvmlib.runstate import LifecycleState, VcpuRunState, VmRunState
from kvmlib.vcpu import Vcpu

log = logging.getLogger(__name__)

_C, _R, _PG, _PD, _SG, _SD, _X = LifecycleState

#: Which public call is allowed in which state (a call not listed for a state raises
#: :class:`~kvmlib.VmError`, or :class:`~kvmlib.ClosedError` once closed). ``shutdown`` and
#: ``close`` are allowed everywhere.
CALLS: Mapping[str, frozenset[LifecycleState]] = {
    "run": frozenset({_C}),
    "pause": frozenset({_R, _PG, _PD}),
    "resume": frozenset({_R, _PD}),
    "wait": frozenset({_C, _R, _PG, _PD, _SG, _SD}),
    "inspect": frozenset({_C, _PD, _SD}),
    "save": frozenset({_C, _PD}),
    "dirty pages": frozenset({_C, _R, _PG, _PD, _SG, _SD}),
}


class Lifecycle:
    """Threads, state and errors of a VM's vCPUs.

    Args:
        num_vcpus: how many vCPUs :meth:`attach` will be given.
        exit_handler: kicked by each vCPU thread as it ends.
        thread_name: the vCPU threads' name, formatted with the vCPU ``id``.
    """

    def __init__(self, num_vcpus: int, exit_handler: ExitHandler,
                 thread_name: str = "vcpu_{id}") -> None:
        self.run_state = VcpuRunState()
        #: Passed by every vCPU before its first guest instruction (vmm-reference's barrier).
        self.barrier = threading.Barrier(num_vcpus)
        self.exit_handler = exit_handler
        self._num_vcpus = num_vcpus
        self._thread_name = thread_name
        self._vcpus: tuple[Vcpu, ...] = ()
        self._threads: tuple[threading.Thread, ...] = ()
        # Identities of the live vCPU threads: calls from them must not wait for themselves.
        self._idents: set[int] = set()
        self._errors: list[tuple[int, BaseException]] = []
        self._errors_raised = False
        # Held by whatever needs the vCPUs out of KVM_RUN for its whole length (save, reset,
        # register access) and by the calls that could end that (run, resume, the final release);
        # taken before the run state's lock, never after it.
        self._ops = threading.RLock()
        self._close_lock = threading.Lock()
        # The thread running the guest inline (exclusive()), if one is.
        self._busy: int | None = None

    # ---- state ----------------------------------------------------------------------------------

    @property
    def state(self) -> LifecycleState:
        """The current lifecycle state."""
        return self.run_state.lifecycle

    @property
    def vcpus(self) -> tuple[Vcpu, ...]:
        """The attached vCPUs, in id order."""
        return self._vcpus

    def attach(self, vcpus: Sequence[Vcpu]) -> None:
        """Give the lifecycle its vCPUs (once, before :meth:`run`)."""
        with self._ops, self.run_state.condition:
            self.run_state.require(frozenset({_C}), "attach vCPUs")
            if self._vcpus:
                raise VmError("the vCPUs are already attached")
            self._vcpus = tuple(vcpus)

    def on_vcpu_thread(self) -> bool:
        """Whether the caller runs on one of this VM's vCPU threads (a device, an exit handler)."""
        return threading.get_ident() in self._idents

    @contextlib.contextmanager
    def holding(self, call: str, action: str | None = None) -> Iterator[LifecycleState]:
        """Hold the VM in a state where ``call`` is allowed (see :data:`CALLS`) for a block.

        Nothing can start or resume the vCPUs meanwhile; ``shutdown()`` still can (it only makes
        parked vCPUs end), and ``close()`` waits for the block to end.
        """
        self._not_busy(action or call)
        with self._ops:
            with self.run_state.condition:
                state = self.run_state.require(CALLS[call], action or call)
            yield state

    @contextlib.contextmanager
    def exclusive(self, call: str, action: str) -> Iterator[LifecycleState]:
        """:meth:`holding` for a block that runs the guest on the calling thread (inline).

        Other threads' calls that would wait for the block (save, reset, run, resume) are refused
        at once instead: the block lasts as long as the guest runs.
        """
        with self.holding(call, action) as state:
            self._busy = threading.get_ident()
            try:
                yield state
            finally:
                self._busy = None

    def _not_busy(self, action: str) -> None:
        busy = self._busy
        if busy is not None and busy != threading.get_ident():
            raise VmError(f"cannot {action}: the VM is running inline on another thread")

    # ---- run / pause / resume -------------------------------------------------------------------

    def run(self, instruction_pointer: GuestAddress | int | None = None) -> None:
        """Start one thread per vCPU and return at once; they enter the guest together."""
        rs = self.run_state
        self._not_busy("run")
        with self._ops, rs.condition:
            rs.require(CALLS["run"], "run")
            if len(self._vcpus) != self._num_vcpus:
                raise VmError(f"{len(self._vcpus)} vCPUs were created but the configuration "
                              f"asks for {self._num_vcpus}")
            address = None if instruction_pointer is None else GuestAddress(instruction_pointer)
            rs.begin(len(self._vcpus))
            started: list[threading.Thread] = []
            # Threads start under the lock: a concurrent shutdown() then sees all of them or none.
            try:
                for vcpu in self._vcpus:
                    thread = threading.Thread(target=self._vcpu_thread, args=(vcpu, address),
                                              name=self._thread_name.format(id=vcpu.id),
                                              daemon=True)
                    thread.start()
                    started.append(thread)
            except BaseException:
                # The started vCPUs would wait on the barrier forever.
                self.barrier.abort()
                rs.not_started(len(self._vcpus) - len(started))
                raise
            finally:
                self._threads = tuple(started)
        log.info("VM running: %d vCPU thread(s) started", len(started))

    def _vcpu_thread(self, vcpu: Vcpu, address: GuestAddress | None) -> None:
        ident = threading.get_ident()
        self._idents.add(ident)
        try:
            # The reference's order: run the vCPU, kick the exit handler, then mark the VM exiting.
            try:
                vcpu.run(address)
            except BaseException as e:
                log.debug("vCPU %d thread ended: it failed", vcpu.id, exc_info=True)
                self._errors.append((vcpu.id, e))
            else:
                stopped = getattr(vcpu, "exit_reason", None)
                log.debug("vCPU %d thread ended: %s", vcpu.id, f"the guest stopped ({stopped!r})"
                          if stopped is not None else "the VM is stopping")
            try:
                self.exit_handler.kick()
            except BaseException as e:
                self._errors.append((vcpu.id, e))
        finally:
            self._idents.discard(ident)
            self.run_state.vcpu_ended()
            # The VM is stopping now: the other vCPUs must leave the guest too, or they would
            # run on in a VM that says it stops.
            self.kick_all()

    def kick_all(self) -> None:
        """Kick every vCPU (each then consults the run state)."""
        for vcpu in self._vcpus:
            vcpu.kick()

    def threads_alive(self) -> bool:
        """Whether any vCPU thread is still running."""
        return any(t.is_alive() for t in self._threads)

    def pause(self, timeout: float | None = None) -> None:
        """Stop every vCPU where it is and return once all are parked (or ended).

        Idempotent: pausing a paused VM returns at once, and a call made while another thread's
        pause is in progress waits for that one.

        Args:
            timeout: give up after this many seconds; the VM then runs on.

        Raises:
            VmError: the VM is not running; the call was made on a vCPU thread (that vCPU could
                never park); the VM began stopping, or was resumed, before every vCPU parked;
                or the timeout passed.
        """
        if self.on_vcpu_thread():
            raise VmError("pause() cannot be called on a vCPU thread (from a device or the exit "
                          "handler): that vCPU could never park; pause from another thread")
        rs = self.run_state
        with rs.condition:
            state = rs.require(CALLS["pause"], "pause")
            if state is _PD:
                return
            pauses = rs.pauses
            if state is _R:
                rs.move(_PG)
        self.kick_all()
        with rs.condition:
            if rs.condition.wait_for(lambda: rs.lifecycle is not _PG, timeout):
                if rs.pauses != pauses:
                    log.info("VM paused: every vCPU parked")
                    return
                raise VmError(f"the VM became {rs.lifecycle.value} before every vCPU had parked")
            rs.move(_R)
            log.info("pause timed out after %s s; the VM runs on", timeout)
            raise VmError(f"pause() timed out after {timeout} s with {rs.running_vcpus} vCPU(s) "
                          "still running (is a device handler blocking?); the VM runs on")

    def resume(self) -> None:
        """Let paused vCPUs continue exactly where they stopped; a no-op while running.

        Raises:
            VmError: the VM is not paused or running (a pause in progress included).
        """
        rs = self.run_state
        self._not_busy("resume")
        with self._ops, rs.condition:
            if rs.require(CALLS["resume"], "resume") is _PD:
                rs.move(_R)
                log.info("VM resumed")

    # ---- stop -----------------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Stop every vCPU and join its thread; from any thread, any number of times.

        On a vCPU thread (a device or the exit handler deciding the guest is done) it only asks
        the vCPUs to stop and returns: the owner's ``shutdown()``, ``wait()`` or ``close()`` joins.

        Raises:
            VcpuError: a vCPU thread failed (raised once, by the first call that sees it).
        """
        rs = self.run_state
        with rs.condition:
            if rs.lifecycle is _X:
                return
            rs.set_and_notify(VmRunState.EXITING)
            threads = self._threads
        # vCPUs still waiting for their peers would wait forever.
        self.barrier.abort()
        self.kick_all()
        if self.on_vcpu_thread():
            return
        for thread in threads:
            thread.join()
        self._stopped()
        if threads:
            log.info("VM shut down: %d vCPU thread(s) joined", len(threads))
        self._raise_errors()

    def _stopped(self) -> None:
        rs = self.run_state
        with rs.condition:
            if rs.lifecycle is _SG and rs.all_ended:
                rs.move(_SD)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until every vCPU thread has ended; True if they have, False on timeout.

        Raises:
            VmError: called on a vCPU thread (it would wait for itself), or the VM is closed.
            VcpuError: a vCPU thread failed (raised once).
        """
        if self.on_vcpu_thread():
            raise VmError("wait() cannot be called on a vCPU thread: it would wait for itself")
        rs = self.run_state
        with rs.condition:
            rs.require(CALLS["wait"], "wait")
            finished = rs.condition.wait_for(lambda: rs.all_ended, timeout)
            threads = self._threads
        if finished:
            for thread in threads:
                thread.join()
            self._stopped()
        self._raise_errors()
        return finished

    def close(self, release: Callable[[], None]) -> None:
        """Shut down, then call ``release`` once every thread has ended, and become CLOSED.

        Idempotent; a concurrent call waits for the first. A vCPU failure not yet reported is
        raised after everything is released.

        Raises:
            VmError: called on a vCPU thread (it cannot join itself; call ``shutdown()`` there).
        """
        if self.on_vcpu_thread():
            raise VmError("close() cannot be called on a vCPU thread: call shutdown() there and "
                          "close the VM from its owner")
        with self._close_lock:
            if self.state is _X:
                return
            try:
                self.shutdown()
            finally:
                if not self.threads_alive():
                    self._stopped()
                    with self._ops:
                        with self.run_state.condition:
                            self.run_state.move(_X)
                        release()

    # ---- errors ---------------------------------------------------------------------------------

    @property
    def errors(self) -> list[tuple[int, BaseException]]:
        """Every ``(vcpu_id, exception)`` a vCPU thread ended with."""
        return list(self._errors)

    def _raise_errors(self) -> None:
        with self.run_state.condition:
            if not self._errors or self._errors_raised:
                return
            self._errors_raised = True
            errors = list(self._errors)
        vcpu_id, first = errors[0]
        more = f" (and {len(errors) - 1} more; see KvmVm.errors)" if len(errors) > 1 else ""
        # A VcpuError already names its vCPU and says what happened.
        text = str(first) if isinstance(first, VcpuError) else f"vCPU {vcpu_id} failed: {first!r}"
        raise VcpuError(f"{text}{more}", vcpu_id=vcpu_id, exit=getattr(first, "exit", None),
                        rip=getattr(first, "rip", None)) from first


class Watchdog:
    """Calls a function once a deadline passes, unless disarmed first; one thread, reused.

    For timeouts of inline runs: arming and disarming take a lock and, only when the new
    deadline comes before the one the thread sleeps towards, wake it; a fuzzer arming the same
    timeout thousands of times a second wakes it about once per timeout. :meth:`close` ends the
    thread.
    """

    def __init__(self, name: str) -> None:
        self._cond = threading.Condition()
        self._deadline: float | None = None
        # When the thread will look again by itself (inf: only when notified).
        self._wakes_at = float("inf")
        self._action: Callable[[], None] | None = None
        self._generation = 0
        self._closed = False
        self._thread = threading.Thread(target=self._watch, name=name, daemon=True)
        self._thread.start()

    def arm(self, timeout: float, action: Callable[[], None]) -> None:
        """Call ``action`` (on the watchdog's thread) ``timeout`` seconds from now."""
        with self._cond:
            self._deadline = deadline = time.monotonic() + timeout
            self._action = action
            self._generation += 1
            if deadline < self._wakes_at:
                self._cond.notify_all()

    def disarm(self) -> None:
        """Forget the pending action, if it has not run yet."""
        with self._cond:
            # No wake-up: the thread finds nothing due when its current wait ends.
            self._deadline = self._action = None
            self._generation += 1

    def close(self) -> None:
        """End the thread (joined); idempotent."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join()

    def _watch(self) -> None:
        with self._cond:
            while not self._closed:
                deadline, generation = self._deadline, self._generation
                if deadline is None:
                    self._wakes_at = float("inf")
                    self._cond.wait()
                    continue
                left = deadline - time.monotonic()
                if left > 0:
                    self._wakes_at = deadline
                    self._cond.wait(left)
                    continue
                action = self._action
                self._deadline = self._action = None
                if action is not None and generation == self._generation:
                    action()


__all__ = ["CALLS", "Lifecycle", "Watchdog"]
