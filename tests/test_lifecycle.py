"""The lifecycle state machine, driven with fake vCPUs: no /dev/kvm, every race forced by events."""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from kvmlib import ClosedError, VcpuError, VmError
from kvmlib.exit_handler import EventExitHandler
from kvmlib.ioctl import kvm_regs
from kvmlib.lifecycle import CALLS, Lifecycle
from kvmlib.memory import GuestAddress
from kvmlib.runstate import TRANSITIONS, LifecycleState, VcpuRunState, VmRunState
from kvmlib.vcpu import Vcpu

from .concurrency import DEADLINE, bounded, together

S = LifecycleState


class FakeVcpu:
    """A vCPU whose "guest" runs until kicked, and whose "devices" are calls queued to its thread.

    It keeps the :class:`~kvmlib.vcpu.Vcpu` contract as KvmVcpu does: barrier first, then on every
    kick consult the run state (park while SUSPENDING, return when EXITING).
    """

    def __init__(self, vcpu_id: int, barrier: threading.Barrier, run_state: VcpuRunState) -> None:
        self._id = vcpu_id
        self.barrier = barrier
        self.run_state = run_state
        self._kicked = threading.Event()
        self._calls: collections.deque[tuple[Callable[[], Any], list[Any], threading.Event]] = \
            collections.deque()
        self.entered = threading.Event()
        self.address: GuestAddress | None = None
        self.closed = False
        self.kicks = 0

    @property
    def id(self) -> int:
        return self._id

    def run(self, instruction_pointer: GuestAddress | None = None) -> None:
        self.address = instruction_pointer
        try:
            self.barrier.wait()
        except threading.BrokenBarrierError:
            return
        self.entered.set()
        while True:
            while self._calls:  # a device exit: the call runs on this vCPU's thread
                fn, result, done = self._calls.popleft()
                try:
                    result.append(fn())
                except BaseException as e:
                    result.append(e)
                    if getattr(e, "fatal", False):
                        raise
                finally:
                    done.set()
            self._kicked.wait()  # the guest runs until something kicks it out
            self._kicked.clear()
            state = self.run_state.state
            if state is VmRunState.SUSPENDING:
                state = self.run_state.park()
            if state is VmRunState.EXITING:
                return

    def busy_until(self, release: threading.Event) -> None:
        """Enter a device call that blocks until ``release``; return once it is running."""
        busy = threading.Event()

        def device() -> None:
            busy.set()
            release.wait(DEADLINE)

        self.on_thread(device)
        assert busy.wait(DEADLINE)

    def on_thread(self, fn: Callable[[], Any]) -> tuple[list[Any], threading.Event]:
        """Queue ``fn`` to run on this vCPU's thread, as a device handler would."""
        result: list[Any] = []
        done = threading.Event()
        self._calls.append((fn, result, done))
        self._kicked.set()
        return result, done

    def kick(self) -> None:
        self.kicks += 1
        self._kicked.set()

    def get_regs(self) -> kvm_regs:
        return kvm_regs()

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def make() -> Iterator[Callable[..., tuple[Lifecycle, list[FakeVcpu]]]]:
    made: list[Lifecycle] = []

    def build(num_vcpus: int = 2) -> tuple[Lifecycle, list[FakeVcpu]]:
        life = Lifecycle(num_vcpus, EventExitHandler())
        vcpus = [FakeVcpu(i, life.barrier, life.run_state) for i in range(num_vcpus)]
        life.attach(vcpus)
        made.append(life)
        return life, vcpus

    yield build
    for life in made:
        try:
            bounded(lambda life=life: life.close(lambda: None), what="close")  # type: ignore[misc]
        except VcpuError:
            pass


def state_of(life: Lifecycle) -> LifecycleState:
    """The state, read through a call (so a type checker does not narrow it across calls)."""
    return life.state


def started(make: Callable[..., tuple[Lifecycle, list[FakeVcpu]]],
            num_vcpus: int = 2) -> tuple[Lifecycle, list[FakeVcpu]]:
    life, vcpus = make(num_vcpus)
    life.run(0x1000)
    for v in vcpus:
        assert v.entered.wait(DEADLINE)
    return life, vcpus


def test_a_fake_vcpu_fulfils_the_vcpu_contract() -> None:
    life = Lifecycle(1, EventExitHandler())
    vcpu: Vcpu = FakeVcpu(0, life.barrier, life.run_state)
    assert isinstance(vcpu, Vcpu)


def test_the_whole_life_of_a_vm(make: Callable[..., tuple[Lifecycle, list[FakeVcpu]]]) -> None:
    life, vcpus = make(3)
    assert state_of(life) is S.CREATED
    life.run(0x1000)
    assert state_of(life) is S.RUNNING
    assert all(v.entered.wait(DEADLINE) for v in vcpus)
    assert [v.address for v in vcpus] == [0x1000] * 3
    assert {t.name for t in threading.enumerate()} >= {"vcpu_0", "vcpu_1", "vcpu_2"}
    bounded(life.pause)
    assert state_of(life) is S.PAUSED and life.run_state.parked == 3
    bounded(life.pause)  # idempotent
    life.resume()
    assert state_of(life) is S.RUNNING
    life.resume()  # a no-op while running
    bounded(life.shutdown)
    assert state_of(life) is S.STOPPED
    assert not any(t.name.startswith("vcpu_") for t in threading.enumerate())
    life.close(lambda: None)
    assert state_of(life) is S.CLOSED


def test_every_transition_is_in_the_table() -> None:
    # The diagram in docs/lifecycle.rst is drawn from this table; it must stay this shape.
    expected = {
        S.CREATED: {S.RUNNING, S.STOPPED},
        S.RUNNING: {S.PAUSING, S.STOPPING},
        S.PAUSING: {S.PAUSED, S.RUNNING, S.STOPPING},
        S.PAUSED: {S.RUNNING, S.STOPPING},
        S.STOPPING: {S.STOPPED},
        S.STOPPED: {S.CLOSED},
        S.CLOSED: set(),
    }
    assert expected == TRANSITIONS
    run_state = VcpuRunState()
    with run_state.condition, pytest.raises(VmError, match="no transition from created to paused"):
        run_state.move(S.PAUSED)


def test_run_refuses_until_every_vcpu_is_attached() -> None:
    life = Lifecycle(2, EventExitHandler())
    life.attach([FakeVcpu(0, life.barrier, life.run_state)])
    with pytest.raises(VmError, match="1 vCPUs were created but the configuration asks for 2"):
        life.run(None)
    assert state_of(life) is S.CREATED


def test_calls_refused_before_run(make: Callable[..., tuple[Lifecycle, list[FakeVcpu]]]) -> None:
    life, _ = make()
    with pytest.raises(VmError, match="cannot pause: the VM is created; run"):
        life.pause()
    with pytest.raises(VmError, match="cannot resume: the VM is created; run"):
        life.resume()
    assert life.wait(0) is True  # nothing runs


def test_stopping_is_final(make: Callable[..., tuple[Lifecycle, list[FakeVcpu]]]) -> None:
    life, _ = started(make)
    bounded(life.shutdown)
    for call in (life.pause, life.resume, lambda: life.run(None)):
        with pytest.raises(VmError, match="stopped"):
            call()
    with pytest.raises(VmError, match="cannot set the run state to running: the VM is stopped"):
        life.run_state.set_and_notify(VmRunState.RUNNING)
    life.run_state.set_and_notify(VmRunState.EXITING)  # always accepted
    assert state_of(life) is S.STOPPED
    bounded(life.shutdown)  # any number of times
    assert state_of(life) is S.STOPPED


def test_shutdown_before_run_stops_the_vm_for_good(
        make: Callable[..., tuple[Lifecycle, list[FakeVcpu]]]) -> None:
    life, _ = make()
    life.shutdown()
    assert state_of(life) is S.STOPPED
    with pytest.raises(VmError, match="cannot run: the VM is stopped"):
        life.run(None)


def test_everything_after_close_raises_closed_error(
        make: Callable[..., tuple[Lifecycle, list[FakeVcpu]]]) -> None:
    life, _ = started(make)
    released: list[bool] = []
    bounded(lambda: life.close(lambda: released.append(True)))
    assert released == [True] and life.state is S.CLOSED
    for call in (life.pause, life.resume, lambda: life.run(None), life.wait):
        with pytest.raises(ClosedError, match="closed"):
            call()
    with pytest.raises(ValueError, match="closed"):  # as for a closed file
        life.pause()
    life.close(lambda: released.append(True))  # idempotent: released once
    life.shutdown()
    assert released == [True]


def test_the_table_of_calls_is_what_is_enforced(
        make: Callable[..., tuple[Lifecycle, list[FakeVcpu]]]) -> None:
    life, _ = started(make)
    bounded(life.pause)
    with life.holding("save") as state:
        assert state is S.PAUSED
    life.resume()
    with pytest.raises(VmError, match="cannot save: the VM is running; pause"), life.holding("save"):
        pass
    assert CALLS["save"] == {S.CREATED, S.PAUSED}


def test_pause_on_a_vcpu_thread_raises_instead_of_freezing(
        make: Callable[..., tuple[Lifecycle, list[FakeVcpu]]]) -> None:
    life, vcpus = started(make)
    result, done = vcpus[0].on_thread(life.pause)
    assert done.wait(DEADLINE)
    assert isinstance(result[0], VmError) and "vCPU thread" in str(result[0])
    assert state_of(life) is S.RUNNING
    bounded(life.pause)  # from another thread it works, vCPU 0 included
    assert life.run_state.parked == 2


def test_wait_and_close_on_a_vcpu_thread_raise(
        make: Callable[..., tuple[Lifecycle, list[FakeVcpu]]]) -> None:
    life, vcpus = started(make)
    for call, text in ((life.wait, "wait for itself"),
                       (lambda: life.close(lambda: None), "call shutdown")):
        result, done = vcpus[1].on_thread(call)
        assert done.wait(DEADLINE)
        assert isinstance(result[0], VmError) and text in str(result[0])
    assert state_of(life) is S.RUNNING


def test_two_devices_both_calling_shutdown_do_not_deadlock(
        make: Callable[..., tuple[Lifecycle, list[FakeVcpu]]]) -> None:
    life, vcpus = started(make)
    # Both vCPU threads run their "device" at once; each asks the VM to stop.
    gate = threading.Barrier(2)

    def device() -> None:
        gate.wait(DEADLINE)
        life.shutdown()

    waits = [v.on_thread(device)[1] for v in vcpus]
    assert all(w.wait(DEADLINE) for w in waits)
    assert bounded(lambda: life.wait(DEADLINE))
    assert state_of(life) is S.STOPPED


def test_shutdown_on_a_vcpu_thread_returns_without_joining(
        make: Callable[..., tuple[Lifecycle, list[FakeVcpu]]]) -> None:
    life, vcpus = started(make)
    result, done = vcpus[0].on_thread(life.shutdown)
    assert done.wait(DEADLINE)
    assert result == [None]
    assert life.state in (S.STOPPING, S.STOPPED)  # the owner joins
    bounded(life.shutdown)
    assert state_of(life) is S.STOPPED


def test_resume_while_a_pause_is_in_progress_is_refused(
        make: Callable[..., tuple[Lifecycle, list[FakeVcpu]]]) -> None:
    life, vcpus = started(make)
    # vCPU 1 is busy in a device, so the pause cannot complete until the device returns.
    release = threading.Event()
    vcpus[1].busy_until(release)
    pauser = threading.Thread(target=life.pause)
    pauser.start()
    assert life.run_state.wait_until(lambda rs: rs.lifecycle is S.PAUSING, DEADLINE)
    with pytest.raises(VmError, match="a pause\\(\\) is in progress"):
        life.resume()
    release.set()
    pauser.join(DEADLINE)
    assert not pauser.is_alive() and life.state is S.PAUSED


def test_shutdown_during_a_pause_makes_the_pause_raise(
        make: Callable[..., tuple[Lifecycle, list[FakeVcpu]]]) -> None:
    life, vcpus = started(make)
    release = threading.Event()
    vcpus[1].busy_until(release)
    outcome: list[BaseException] = []

    def pause() -> None:
        try:
            life.pause()
        except VmError as e:
            outcome.append(e)

    pauser = threading.Thread(target=pause)
    pauser.start()
    assert life.run_state.wait_until(lambda rs: rs.lifecycle is S.PAUSING, DEADLINE)
    stopper = threading.Thread(target=life.shutdown)
    stopper.start()
    pauser.join(DEADLINE)
    assert not pauser.is_alive()
    assert "stopping before every vCPU had parked" in str(outcome[0])
    release.set()
    stopper.join(DEADLINE)
    assert not stopper.is_alive() and life.state is S.STOPPED


def test_a_pause_that_times_out_leaves_the_vm_running(
        make: Callable[..., tuple[Lifecycle, list[FakeVcpu]]]) -> None:
    life, vcpus = started(make)
    release = threading.Event()
    vcpus[0].busy_until(release)
    with pytest.raises(VmError, match=r"timed out .* 1 vCPU\(s\) still running"):
        life.pause(timeout=0.05)
    assert state_of(life) is S.RUNNING
    release.set()
    bounded(life.pause)
    assert state_of(life) is S.PAUSED


def test_a_second_pauser_waits_for_the_first(
        make: Callable[..., tuple[Lifecycle, list[FakeVcpu]]]) -> None:
    life, _ = started(make, 4)
    outcomes = together([life.pause, life.pause, life.pause])
    assert [o.error for o in outcomes] == [None, None, None]
    assert state_of(life) is S.PAUSED and life.run_state.parked == 4


def test_pause_racing_resume_returns_or_raises_never_hangs(
        make: Callable[..., tuple[Lifecycle, list[FakeVcpu]]]) -> None:
    life, _ = started(make)
    for _ in range(200):
        for o in together([life.pause, life.resume]):
            assert o.error is None or isinstance(o.error, VmError), o.error
        assert life.state in (S.RUNNING, S.PAUSED)
    bounded(life.shutdown)


def _churn_then_stop(life: Lifecycle, delay: int) -> None:
    """Three threads pause and resume while a fourth shuts the VM down after ``delay`` turns."""
    stop = threading.Event()

    def churn() -> None:
        while not stop.is_set():
            try:
                life.pause()
                life.resume()
            except VmError:
                if life.state in (S.STOPPING, S.STOPPED):
                    return

    def stopper() -> None:
        for _ in range(delay):  # vary where in the churn the shutdown lands
            threading.Event().wait(0)
        life.shutdown()
        stop.set()

    outcomes = together([churn, churn, churn, stopper])
    assert [o.error for o in outcomes] == [None] * 4


def test_pause_resume_from_three_threads_and_shutdown_from_a_fourth(
        make: Callable[..., tuple[Lifecycle, list[FakeVcpu]]]) -> None:
    for trial in range(50):
        life, _ = started(make, 2)
        _churn_then_stop(life, trial % 7 * 20)
        assert state_of(life) is S.STOPPED
        assert not any(t.name.startswith("vcpu_") for t in threading.enumerate())


def test_a_vcpu_exception_surfaces_from_wait(
        make: Callable[..., tuple[Lifecycle, list[FakeVcpu]]]) -> None:
    life, vcpus = started(make)

    class FireError(RuntimeError):
        fatal = True

    def device() -> None:
        raise FireError("device on fire")

    vcpus[0].on_thread(device)
    with pytest.raises(VcpuError, match="device on fire") as info:
        bounded(lambda: life.wait(DEADLINE))
    assert isinstance(info.value.__cause__, FireError)
    assert state_of(life) is S.STOPPED
    bounded(life.shutdown)  # quiet: reported once


def test_a_vcpu_that_ends_stops_the_vm(
        make: Callable[..., tuple[Lifecycle, list[FakeVcpu]]]) -> None:
    life, vcpus = started(make)
    handler = life.exit_handler
    assert isinstance(handler, EventExitHandler)

    class HaltedError(Exception):
        fatal = True

    vcpus[0].on_thread(lambda: (_ for _ in ()).throw(HaltedError()))
    assert handler.wait(DEADLINE)
    assert life.run_state.wait_until(lambda rs: rs.state is VmRunState.EXITING, DEADLINE)
    with pytest.raises(VmError, match=r"stopping|stopped"):
        life.pause()
    with pytest.raises(VcpuError):
        bounded(life.shutdown)
