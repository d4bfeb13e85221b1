"""The fd wrappers against a close() from another thread: each call succeeds or raises ClosedError."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterator
from types import FrameType

import pytest

from kvmlib import ClosedError, GuestAddress, GuestRegionMmap, Intr, Kvm, KvmError, VcpuFd, VmFd

from .guest import new_vm, real_mode_vcpu

THREADS = 8
#: Bounds every loop: far more calls than a worker makes before the closer gets its turn.
MAX_CALLS = 200_000
JOIN_TIMEOUT = 60.0


def test_use_after_close_raises_closed_error_naming_the_object(kvm: Kvm) -> None:
    vm = kvm.create_vm()
    vcpu = vm.create_vcpu(3)
    vcpu.close()
    vm.close()
    calls: list[tuple[Callable[[], object], str]] = [
        (vcpu.get_regs, "KVM_GET_REGS: the VcpuFd of vCPU 3 is closed"),
        (vcpu.get_xsave2, "KVM_GET_XSAVE2: the VcpuFd of vCPU 3 is closed"),
        (vcpu.get_cpuid2, "KVM_GET_CPUID2: the VcpuFd of vCPU 3 is closed"),
        (vcpu.run, "KVM_RUN: the VcpuFd of vCPU 3 is closed"),
        (lambda: vm.check_extension(0), "KVM_CHECK_EXTENSION: this VmFd is closed"),
        (lambda: vm.create_vcpu(1), "KVM_CREATE_VCPU: this VmFd is closed"),
        (lambda: vm.get_dirty_log(0), "KVM_GET_DIRTY_LOG: this VmFd is closed"),
        (lambda: vm.set_user_memory_region(0, 0, 0x1000, 0),
         "KVM_SET_USER_MEMORY_REGION: this VmFd is closed"),
    ]
    for call, message in calls:
        with pytest.raises(ClosedError, match=message) as info:
            call()
        assert isinstance(info.value, KvmError) and isinstance(info.value, ValueError)
    vcpu.set_immediate_exit(True)  # a kick after close is harmless


def test_a_closed_kvm_handle_raises_closed_error() -> None:
    try:
        kvm = Kvm()
    except KvmError as e:
        pytest.skip(f"KVM is unusable here: {e}")
    kvm.close()
    for call in (kvm.get_api_version, kvm.create_vm, kvm.get_supported_cpuid,
                 kvm.get_msr_index_list):
        with pytest.raises(ClosedError, match="the Kvm handle on /dev/kvm is closed"):
            call()


def _race_close(owner: VmFd | VcpuFd | Kvm, call: Callable[[], object]) -> list[str]:
    """Run ``call`` on THREADS threads until ``owner`` is closed; each thread's outcome.

    The close comes only once every thread has succeeded at least once, so all of them are
    mid-loop; right after it, the freed fd number is taken by other files, so a call that still
    reached it would hit one of those (ENOTTY) instead of raising ClosedError.
    """
    barrier = threading.Barrier(THREADS + 1)
    started = [threading.Event() for _ in range(THREADS)]
    outcomes = ["did not run"] * THREADS

    def worker(i: int) -> None:
        barrier.wait(JOIN_TIMEOUT)
        for _ in range(MAX_CALLS):
            try:
                call()
            except ClosedError:
                outcomes[i] = "closed" if started[i].is_set() else "closed before any success"
                return
            except BaseException as e:
                outcomes[i] = f"unexpected {type(e).__name__}: {e}"
                return
            started[i].set()
        outcomes[i] = "never saw the close"

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(THREADS)]
    for t in threads:
        t.start()
    barrier.wait(JOIN_TIMEOUT)
    spares: list[int] = []
    try:
        assert all(e.wait(JOIN_TIMEOUT) for e in started), outcomes
        owner.close()
        spares = [os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC) for _ in range(4)]
        for t in threads:
            t.join(JOIN_TIMEOUT)
        assert not any(t.is_alive() for t in threads)
    finally:
        owner.close()  # also when an assertion above failed: the workers then stop at once
        for fd in spares:
            os.close(fd)
    return outcomes


def test_vcpu_ioctls_racing_close(kvm: Kvm) -> None:
    with kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        assert _race_close(vcpu, vcpu.get_regs) == ["closed"] * THREADS


def test_vm_ioctls_racing_close(kvm: Kvm) -> None:
    vm = kvm.create_vm()
    assert _race_close(vm, lambda: vm.check_extension(0)) == ["closed"] * THREADS


def test_dirty_log_racing_close(kvm: Kvm) -> None:
    region = GuestRegionMmap.anonymous(GuestAddress(0), 1 << 20, log_dirty_pages=True)
    try:
        vm = kvm.create_vm()
        vm.set_user_memory_region(0, 0, region.size, region.host_address, region.flags)
        assert _race_close(vm, lambda: vm.get_dirty_log(0)) == ["closed"] * THREADS
    finally:
        region.close()


def test_system_ioctls_racing_close() -> None:
    try:
        kvm = Kvm()
    except KvmError as e:
        pytest.skip(f"KVM is unusable here: {e}")
    assert _race_close(kvm, kvm.get_vcpu_mmap_size) == ["closed"] * THREADS


def test_immediate_exit_racing_close(kvm: Kvm) -> None:
    # A kick (another thread setting immediate_exit) may land while the vCPU is being closed: it
    # must neither raise nor write through a released view of kvm_run.
    with kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        barrier = threading.Barrier(THREADS + 1)
        started = [threading.Event() for _ in range(THREADS)]
        outcomes = ["did not run"] * THREADS

        def worker(i: int) -> None:
            barrier.wait(JOIN_TIMEOUT)
            try:
                # A kick costs a fraction of an ioctl: many more fit before the closer's turn.
                for n in range(100 * MAX_CALLS):
                    vcpu.set_immediate_exit(n % 2 == 0)
                    started[i].set()
                    if vcpu.closed:
                        for _ in range(100):
                            vcpu.set_immediate_exit(True)
                        outcomes[i] = "ok"
                        return
                outcomes[i] = "never saw the close"
            except BaseException as e:
                outcomes[i] = f"unexpected {type(e).__name__}: {e}"

        threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(THREADS)]
        for t in threads:
            t.start()
        barrier.wait(JOIN_TIMEOUT)
        assert all(e.wait(JOIN_TIMEOUT) for e in started), outcomes
        vcpu.close()
        for t in threads:
            t.join(JOIN_TIMEOUT)
        assert not any(t.is_alive() for t in threads)
        assert outcomes == ["ok"] * THREADS


@pytest.fixture
def kick_handler() -> Iterator[None]:
    """A no-op Python handler for SIGRTMIN, so that a signal makes KVM_RUN return EINTR."""

    def handler(signum: int, frame: FrameType | None) -> None:
        pass

    previous = signal.signal(signal.SIGRTMIN, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGRTMIN, previous)


@pytest.mark.usefixtures("kick_handler")
def test_close_does_not_wait_for_a_running_vcpu(kvm: Kvm) -> None:
    vm, memory = new_vm(kvm)
    with vm, memory:
        vcpu = real_mode_vcpu(vm, memory, bytes([0xEB, 0xFE]))  # jmp $: runs until kicked
        entering = threading.Event()
        outcome: list[str] = []

        def vcpu_thread() -> None:
            entering.set()
            for _ in range(MAX_CALLS):
                try:
                    exit_ = vcpu.run()
                except ClosedError as e:
                    outcome.append(f"closed: {e}")
                    return
                except BaseException as e:
                    outcome.append(f"unexpected {type(e).__name__}: {e}")
                    return
                if exit_ != Intr():
                    outcome.append(f"unexpected exit {exit_!r}")
                    return
            outcome.append("never saw the close")

        runner = threading.Thread(target=vcpu_thread, daemon=True)
        runner.start()
        assert entering.wait(JOIN_TIMEOUT)
        # close() runs on a third thread so that a close that waited for KVM_RUN fails the test
        # instead of hanging it.
        closer = threading.Thread(target=vcpu.close, daemon=True)
        closer.start()
        closer.join(JOIN_TIMEOUT)
        assert not closer.is_alive(), "close() waited for KVM_RUN"
        assert vcpu.closed
        # The guest spins until a signal interrupts KVM_RUN; one sent before the thread entered
        # KVM_RUN is lost, hence the repeats.
        for _ in range(int(JOIN_TIMEOUT / 0.01)):
            if not runner.is_alive():
                break
            signal.pthread_kill(runner.ident or 0, signal.SIGRTMIN)
            runner.join(0.01)
        assert not runner.is_alive()
        assert outcome == ["closed: KVM_RUN: the VcpuFd of vCPU 0 is closed"]
