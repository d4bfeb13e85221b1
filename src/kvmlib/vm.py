"""A VM: memory slots, the in-kernel irqchip, its vCPUs and their threads; run, pause, shutdown.

The lifecycle is rust-vmm vmm-reference's ``KvmVm``: :meth:`KvmVm.new` creates the VM, registers
guest memory, writes the MP table, creates the irqchip and PIT, then the vCPUs; :meth:`KvmVm.run`
starts one thread per vCPU and returns; :meth:`KvmVm.shutdown` sets ``EXITING``, kicks every vCPU
and joins every thread. :meth:`KvmVm.pause` / :meth:`KvmVm.resume` finish what the reference left as
``todo!()``.
"""

from __future__ import annotations

import enum
import logging
import threading
from collections.abc import Sequence
from types import TracebackType
from typing import Protocol, runtime_checkable

import attrs
from typing_extensions import Self

from kvmlib.arch.x86_64.mptable import MpTable
from kvmlib.bus import IoManager
from kvmlib.errors import VcpuError, VmError
from kvmlib.exit_handler import ExitHandler
from kvmlib.ioctl import Cap, Kvm, VmFd, kvm_regs, kvm_sregs
from kvmlib.memory import GuestAddress, GuestMemoryMmap
from kvmlib.vcpu import (
    MAX_VCPUS,
    KvmVcpu,
    VcpuConfigList,
    VcpuRunState,
    VmRunState,
    setup_signal_handler,
)

log = logging.getLogger(__name__)

#: Where KVM's real-mode TSS (three pages) and identity-map page go: just below the 4 GiB BIOS
#: area, out of the way of RAM and of the LAPIC / IOAPIC windows.
KVM_TSS_ADDRESS = 0xFFFBD000
KVM_IDENTITY_MAP_ADDRESS = 0xFFFBC000


def _valid_num_vcpus(_inst: object, _attribute: attrs.Attribute[int], value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_VCPUS:
        raise VmError(f"num_vcpus must be in 1..{MAX_VCPUS} (the MP table's limit), not {value!r}")


@attrs.define(frozen=True, slots=True)
class VmConfig:
    """How many vCPUs a VM has and how each is configured; the two must agree."""

    num_vcpus: int = attrs.field(validator=_valid_num_vcpus)
    vcpus_config: VcpuConfigList = attrs.field(
        validator=attrs.validators.instance_of(VcpuConfigList))

    def __attrs_post_init__(self) -> None:
        if len(self.vcpus_config) != self.num_vcpus:
            raise VmError(f"num_vcpus is {self.num_vcpus} but vcpus_config configures "
                          f"{len(self.vcpus_config)} vCPUs")

    @classmethod
    def from_kvm(cls, kvm: Kvm, num_vcpus: int) -> VmConfig:
        """A configuration of ``num_vcpus`` vCPUs from what the host supports."""
        return cls(num_vcpus, VcpuConfigList.from_kvm(kvm, num_vcpus))


@runtime_checkable
class Vm(Protocol):
    """The contract of a VM: a lifecycle callers can drive without knowing the backend."""

    @property
    def vcpu_run_state(self) -> VcpuRunState:
        """The run state shared with the vCPUs."""

    def run(self, vcpu_run_addr: GuestAddress | None = None) -> None:
        """Start every vCPU in its own thread and return."""

    def pause(self) -> None:
        """Stop every vCPU and return once all are parked."""

    def resume(self) -> None:
        """Let parked vCPUs continue where they stopped."""

    def shutdown(self) -> None:
        """Stop every vCPU and join its thread."""

    def close(self) -> None:
        """Release every resource."""


class _Phase(enum.Enum):
    """Where the VM is in its one-way lifecycle.

    The reference keeps either a vCPU list or a thread-handle list and calls for a better
    abstraction; here the vCPUs always stay with the VM and the phase says what may be done with
    them: configure and inspect while CREATED, drive while STARTED, only inspect and close after.
    """

    CREATED = "created"
    STARTED = "started"
    STOPPED = "stopped"
    CLOSED = "closed"


class KvmVm:
    """A KVM virtual machine; create it with :meth:`new`. Use it as a context manager.

    Guest memory stays the caller's: the VM registers it with KVM but does not close it.
    """

    def __init__(self, fd: VmFd, config: VmConfig, exit_handler: ExitHandler,
                 guest_memory: GuestMemoryMmap) -> None:
        self.fd = fd
        #: The guest memory registered with KVM (still owned and closed by the caller).
        self.guest_memory = guest_memory
        self.config = config
        self.exit_handler = exit_handler
        self.vcpu_run_state = VcpuRunState()
        self.vcpu_barrier = threading.Barrier(config.num_vcpus)
        self._vcpus: list[KvmVcpu] = []
        self._threads: list[threading.Thread] = []
        self._phase = _Phase.CREATED
        self._lock = threading.Lock()
        self._errors: list[tuple[int, BaseException]] = []
        self._errors_raised = False

    # ---- creation -------------------------------------------------------------------------------

    @classmethod
    def new(cls, kvm: Kvm, vm_config: VmConfig, guest_memory: GuestMemoryMmap,
            exit_handler: ExitHandler, bus: IoManager) -> KvmVm:
        """Create a VM ready to :meth:`run`: memory, MP table, irqchip, PIT and vCPUs."""
        vm = cls.create_vm(kvm, vm_config, exit_handler, guest_memory)
        try:
            MpTable(vm_config.num_vcpus).write(guest_memory)
            vm.setup_irq_controller()
            vm.create_vcpus(bus, vm_config.vcpus_config, guest_memory)
        except BaseException:
            vm.close()
            raise
        return vm

    @classmethod
    def create_vm(cls, kvm: Kvm, config: VmConfig, exit_handler: ExitHandler,
                  guest_memory: GuestMemoryMmap) -> KvmVm:
        """KVM_CREATE_VM and the memory slots: what a fresh and a restored VM share."""
        vm = cls(kvm.create_vm(), config, exit_handler, guest_memory)
        try:
            vm.configure_memory_regions(guest_memory, kvm)
        except BaseException:
            vm.close()
            raise
        return vm

    def configure_memory_regions(self, guest_memory: GuestMemoryMmap, kvm: Kvm) -> None:
        """One KVM slot per region, with its read-only and dirty-logging flags."""
        regions = guest_memory.regions
        max_slots = kvm.check_extension(Cap.KVM_CAP_NR_MEMSLOTS)
        if len(regions) > max_slots:
            raise VmError(f"guest memory has {len(regions)} regions but KVM offers only "
                          f"{max_slots} memory slots")
        if any(r.read_only for r in regions) and not kvm.check_extension(Cap.KVM_CAP_READONLY_MEM):
            raise VmError("a read-only region was requested but KVM lacks KVM_CAP_READONLY_MEM")
        for slot, region in enumerate(regions):
            self.fd.set_user_memory_region(slot, int(region.start_addr), region.size,
                                           region.host_address, region.flags)

    def setup_irq_controller(self) -> None:
        """The TSS and identity-map pages, then the in-kernel irqchip and PIT.

        KVM wants the TSS and identity map placed before any vCPU exists (Intel needs them for
        real mode), and the irqchip before the vCPUs so that each gets an in-kernel LAPIC.
        """
        self.fd.set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
        self.fd.set_tss_address(KVM_TSS_ADDRESS)
        self.fd.create_irqchip()
        self.fd.create_pit2()

    def create_vcpus(self, bus: IoManager, vcpus_config: VcpuConfigList,
                     memory: GuestMemoryMmap) -> None:
        """Create and configure every vCPU."""
        self._require(_Phase.CREATED, "create vCPUs")
        for config in vcpus_config:
            self._vcpus.append(KvmVcpu(self.fd, bus, config, self.config.num_vcpus,
                                       self.vcpu_barrier, self.vcpu_run_state, memory))

    # ---- lifecycle ------------------------------------------------------------------------------

    @property
    def vcpus(self) -> Sequence[KvmVcpu]:
        """The vCPUs, in id order."""
        return tuple(self._vcpus)

    @property
    def running(self) -> bool:
        """Whether the vCPU threads have been started and not yet shut down."""
        return self._phase is _Phase.STARTED

    def _require(self, phase: _Phase, action: str) -> None:
        if self._phase is not phase:
            raise VmError(f"cannot {action}: the VM is {self._phase.value}")

    def run(self, vcpu_run_addr: GuestAddress | None = None) -> None:
        """Start one thread per vCPU, named ``vcpu_{id}``, and return at once.

        Args:
            vcpu_run_addr: where every vCPU starts; None keeps the RIP already set.
        """
        with self._lock:
            self._require(_Phase.CREATED, "run")
            if len(self._vcpus) != self.config.num_vcpus:
                raise VmError(f"{len(self._vcpus)} vCPUs were created but the configuration "
                              f"asks for {self.config.num_vcpus}")
            setup_signal_handler()
            self._phase = _Phase.STARTED
            for vcpu in self._vcpus:
                thread = threading.Thread(target=self._vcpu_thread, args=(vcpu, vcpu_run_addr),
                                          name=f"vcpu_{vcpu.id}", daemon=True)
                try:
                    thread.start()
                except BaseException:
                    # The started vCPUs would wait on the barrier forever.
                    self.vcpu_barrier.abort()
                    raise
                self._threads.append(thread)

    def _vcpu_thread(self, vcpu: KvmVcpu, vcpu_run_addr: GuestAddress | None) -> None:
        # The reference's order: run the vCPU, kick the exit handler, then mark the VM exiting.
        try:
            vcpu.run(vcpu_run_addr)
        except BaseException as e:
            log.debug("vCPU %d failed", vcpu.id, exc_info=True)
            self._errors.append((vcpu.id, e))
        try:
            self.exit_handler.kick()
        except BaseException as e:
            self._errors.append((vcpu.id, e))
        self.vcpu_run_state.set_and_notify(VmRunState.EXITING)

    def _kick_all(self) -> None:
        for vcpu in self._vcpus:
            vcpu.kick()

    def pause(self) -> None:
        """Stop every vCPU where it is; return once all are parked (a ``todo!()`` in the reference).

        Raises:
            VmError: the VM is not running, or it began exiting while pausing.
        """
        self._require(_Phase.STARTED, "pause")
        state = self.vcpu_run_state
        before = state.state
        if before is VmRunState.EXITING:
            raise VmError("cannot pause: the VM is exiting")
        state.set_and_notify(VmRunState.SUSPENDING)
        self._kick_all()
        alive = sum(t.is_alive() for t in self._threads)
        state.wait_until(lambda s: s.state is VmRunState.EXITING or s.parked >= alive)
        if state.state is VmRunState.EXITING:
            raise VmError("the VM began exiting while it was being paused")

    def resume(self) -> None:
        """Let paused vCPUs continue exactly where they stopped."""
        self._require(_Phase.STARTED, "resume")
        state = self.vcpu_run_state
        if state.state is not VmRunState.SUSPENDING:
            raise VmError(f"cannot resume: the VM is not paused but {state.state.value}")
        state.set_and_notify(VmRunState.RUNNING)

    @property
    def paused(self) -> bool:
        """Whether :meth:`pause` has returned and :meth:`resume` not yet been called."""
        return self._phase is _Phase.STARTED and self.vcpu_run_state.state is VmRunState.SUSPENDING

    def shutdown(self) -> None:
        """Stop every vCPU and join its thread; idempotent and safe from any thread.

        Raises:
            VcpuError: a vCPU thread failed (raised once, by the first call that sees it).
        """
        with self._lock:
            if self._phase is _Phase.STARTED:
                self._phase = _Phase.STOPPED
        self.vcpu_run_state.set_and_notify(VmRunState.EXITING)
        # vCPUs still waiting for their peers would wait forever.
        self.vcpu_barrier.abort()
        self._kick_all()
        me = threading.current_thread()
        for thread in self._threads:
            if thread is not me:
                thread.join()
        self._raise_errors()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until every vCPU thread has ended; True if they have, False on timeout.

        Raises:
            VcpuError: a vCPU thread failed (raised once).
        """
        finished = self.vcpu_run_state.wait_until(
            lambda _s: not any(t.is_alive() for t in self._threads), timeout)
        if finished:
            for thread in self._threads:
                thread.join()
        self._raise_errors()
        return finished

    @property
    def errors(self) -> list[tuple[int, BaseException]]:
        """Every ``(vcpu_id, exception)`` a vCPU thread ended with."""
        return list(self._errors)

    def _raise_errors(self) -> None:
        if self._errors and not self._errors_raised:
            self._errors_raised = True
            vcpu_id, first = self._errors[0]
            more = f" (and {len(self._errors) - 1} more; see KvmVm.errors)" if len(
                self._errors) > 1 else ""
            raise VcpuError(f"vCPU {vcpu_id} failed: {first!r}{more}") from first

    # ---- inspection -----------------------------------------------------------------------------

    def _stopped_vcpu(self, index: int) -> KvmVcpu:
        if self._phase is _Phase.STARTED and not self.paused:
            raise VmError("vCPU registers can be read only while the VM is paused or not running")
        if self._phase is _Phase.CLOSED:
            raise VmError("the VM is closed")
        try:
            return self._vcpus[index]
        except IndexError:
            raise VmError(f"no vCPU {index}: the VM has {len(self._vcpus)}") from None

    def vcpu_regs(self, index: int) -> kvm_regs:
        """VCPU ``index``'s general registers, while paused, before :meth:`run` or after shutdown."""
        return self._stopped_vcpu(index).get_regs()

    def vcpu_sregs(self, index: int) -> kvm_sregs:
        """VCPU ``index``'s special registers, under the same conditions as :meth:`vcpu_regs`."""
        return self._stopped_vcpu(index).get_sregs()

    # ---- resources ------------------------------------------------------------------------------

    def close(self) -> None:
        """Shut down if running, then close every vCPU and the VM fd. Idempotent.

        A vCPU failure not yet reported is raised here, after everything is released.
        """
        if self._phase is _Phase.CLOSED:
            return
        try:
            if self._threads:
                self.shutdown()
        finally:
            self._phase = _Phase.CLOSED
            for vcpu in self._vcpus:
                vcpu.close()
            self.fd.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


__all__ = ["KVM_IDENTITY_MAP_ADDRESS", "KVM_TSS_ADDRESS", "KvmVm", "Vm", "VmConfig"]
