"""A VM: memory slots, the in-kernel irqchip, its vCPUs and their threads; run, pause, shutdown.

The lifecycle is rust-vmm vmm-reference's ``KvmVm``: :meth:`KvmVm.new` creates the VM, registers
guest memory, writes the MP table, creates the irqchip and PIT, then the vCPUs; :meth:`KvmVm.run`
starts one thread per vCPU and returns; :meth:`KvmVm.shutdown` sets ``EXITING``, kicks every vCPU
and joins every thread. :meth:`KvmVm.pause` / :meth:`KvmVm.resume` finish what the reference left as
``todo!()``.
"""

from __future__ import annotations

import ctypes
import enum
import logging
import threading
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import attrs

from kvmlib.arch.x86_64.cpuid import CpuidEntry
from kvmlib.arch.x86_64.cpuid_features import CpuidTemplate
from kvmlib.arch.x86_64.mptable import MpTable
from kvmlib.bus import IoManager
from kvmlib.dirty import DirtyBitmap, DirtyTracker
from kvmlib.errors import SnapshotError, VcpuError, VmError
from kvmlib.exit_handler import ExitHandler
from kvmlib.ioctl import (
    KVM_CLOCK_REALTIME,
    KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
    Cap,
    Kvm,
    VmFd,
    kvm_clock_data,
    kvm_cpuid_entry2,
    kvm_irqchip,
    kvm_pit_state2,
    kvm_regs,
    kvm_sregs,
)
from kvmlib.memory import GuestAddress, GuestMemoryMmap, GuestRegionMmap
from kvmlib.memory_image import MemoryImage, layout_of
from kvmlib.resources import Closeable
from kvmlib.state import DeviceState, VmState
from kvmlib.vcpu import (
    MAX_VCPUS,
    KvmVcpu,
    VcpuConfig,
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
    def from_kvm(cls, kvm: Kvm, num_vcpus: int,
                 cpuid_template: CpuidTemplate | None = None) -> VmConfig:
        """A configuration of ``num_vcpus`` vCPUs from what the host supports.

        ``cpuid_template``, when given, adapts the CPUID first (see
        :class:`~kvmlib.arch.x86_64.cpuid_features.HideFeatures`).
        """
        return cls(num_vcpus, VcpuConfigList.from_kvm(kvm, num_vcpus, cpuid_template))

    @classmethod
    def from_state(cls, state: VmState) -> VmConfig:
        """The configuration a saved VM had: its vCPUs' CPUID and saved MSR lists."""
        entry = ctypes.sizeof(kvm_cpuid_entry2)
        configs = []
        for v in state.vcpus:
            cpuid = tuple(CpuidEntry.from_kvm(kvm_cpuid_entry2.from_buffer_copy(v.cpuid, off))
                          for off in range(0, len(v.cpuid), entry))
            configs.append(VcpuConfig(v.id, cpuid, tuple(index for index, _ in v.msrs)))
        return cls(state.num_vcpus, VcpuConfigList(configs))


@attrs.define(frozen=True, slots=True, eq=False)
class Snapshot(Closeable):
    """A VM's state and a copy of its memory, held in this process.

    What :meth:`KvmVm.reset_to` goes back to. Take one with :meth:`KvmVm.snapshot`; :meth:`close`
    frees the memory copy.
    """

    state: VmState
    memory: MemoryImage

    def close(self) -> None:
        """Free the memory copy; idempotent."""
        self.memory.close()



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


#: Dirty-tracking readers of a VM (see :class:`kvmlib.dirty.DirtyTracker`).
USER_DIRTY_CURSOR = "user"
RESET_DIRTY_CURSOR = "reset"


class KvmVm(Closeable):
    """A KVM virtual machine; create it with :meth:`new` or :meth:`from_state`.

    Use it as a context manager. Guest memory stays the caller's: the VM registers it with KVM
    but does not close it.
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
        #: Where the vCPUs send port and MMIO exits (set by :meth:`create_vcpus`).
        self.bus: IoManager | None = None
        self.dirty_tracker = DirtyTracker(guest_memory.regions, self._fetch_dirty_log)
        # The snapshot guest memory equalled when the reset cursor was last restarted.
        self._synced: Snapshot | None = None

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
        self.dirty_tracker.start(USER_DIRTY_CURSOR)

    def _fetch_dirty_log(self, slot: int, region: GuestRegionMmap) -> bytes:
        return bytes(self.fd.get_dirty_log(slot, region.size))

    def dirty_pages(self) -> list[DirtyBitmap]:
        """The pages written since the previous call (or since the VM was created).

        One bitmap per region created with ``log_dirty_pages``, holding guest writes
        (``KVM_GET_DIRTY_LOG``) and host writes through :class:`~kvmlib.GuestMemoryMmap`.
        Snapshots and fast reset track dirty pages separately, so calling this does not disturb
        them.
        """
        if self._phase is _Phase.CLOSED:
            raise VmError("the VM is closed")
        return self.dirty_tracker.take(USER_DIRTY_CURSOR)

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
                     memory: GuestMemoryMmap, state: VmState | None = None) -> None:
        """Create every vCPU, in its boot state or in its state from ``state``."""
        self._require(_Phase.CREATED, "create vCPUs")
        self.bus = bus
        for config in vcpus_config:
            saved = state.vcpus[config.id] if state is not None else None
            self._vcpus.append(KvmVcpu(self.fd, bus, config, self.config.num_vcpus,
                                       self.vcpu_barrier, self.vcpu_run_state, memory, saved))

    # ---- state ----------------------------------------------------------------------------------

    @classmethod
    def from_state(cls, kvm: Kvm, state: VmState, guest_memory: GuestMemoryMmap,
                   exit_handler: ExitHandler, bus: IoManager) -> KvmVm:
        """A VM that continues exactly where the saved one stopped once :meth:`run` is called.

        ``guest_memory`` must already hold the saved VM's memory (see :mod:`kvmlib.snapshot`), and
        ``bus`` the same stateful devices at the same places; their state is restored too.

        Raises:
            SnapshotError: the state does not fit (memory layout, devices); checked before any
                KVM object is created.
        """
        _check_fits(state, guest_memory, bus)
        config = VmConfig.from_state(state)
        vm = cls.create_vm(kvm, config, exit_handler, guest_memory)
        try:
            vm.setup_irq_controller()
            vm._restore_vm_state(state)
            vm.create_vcpus(bus, config.vcpus_config, guest_memory, state)
            _restore_devices(state, bus)
        except BaseException:
            vm.close()
            raise
        return vm

    def _require_quiescent(self, action: str) -> None:
        if self._phase is _Phase.CREATED or self.paused:
            return
        if self._phase is _Phase.STARTED:
            raise VmError(f"cannot {action}: the VM is running; pause() it first")
        raise VmError(f"cannot {action}: the VM is {self._phase.value}")

    def save_state(self) -> VmState:
        """The whole VM state, while paused (or before :meth:`run`).

        Raises:
            VmError: the VM is running, stopped or closed.
            KvmIoctlError: KVM refused a GET ioctl (including a short MSR read).
        """
        self._require_quiescent("save the state")
        if self.bus is None or len(self._vcpus) != self.config.num_vcpus:
            raise VmError("cannot save the state of a VM whose vCPUs were not all created")
        clock = self.fd.get_clock()
        # KVM_SET_CLOCK accepts only KVM_CLOCK_REALTIME; the other flags describe the host.
        clock.flags &= KVM_CLOCK_REALTIME
        return VmState(
            memory=layout_of(self.guest_memory),
            vcpus=[vcpu.save_state() for vcpu in self._vcpus],
            pit2=bytes(self.fd.get_pit2()), clock=bytes(clock),
            pic_master=bytes(self.fd.get_irqchip(KVM_IRQCHIP_PIC_MASTER)),
            pic_slave=bytes(self.fd.get_irqchip(KVM_IRQCHIP_PIC_SLAVE)),
            ioapic=bytes(self.fd.get_irqchip(KVM_IRQCHIP_IOAPIC)),
            devices=[DeviceState(space, base, type(device).__qualname__, device.save_state())
                     for (space, base), device in self.bus.stateful_devices().items()])

    def _restore_vm_state(self, state: VmState) -> None:
        self.fd.set_pit2(kvm_pit_state2.from_buffer_copy(state.pit2))
        self.fd.set_clock(kvm_clock_data.from_buffer_copy(state.clock))
        for blob in (state.pic_master, state.pic_slave, state.ioapic):
            self.fd.set_irqchip(kvm_irqchip.from_buffer_copy(blob))

    def snapshot(self) -> Snapshot:
        """The VM state and a copy of guest memory, while paused: a point to :meth:`reset_to`.

        From here on the VM tracks the pages written in regions created with ``log_dirty_pages``,
        so that resetting to this snapshot copies back only those.
        """
        state = self.save_state()
        self.dirty_tracker.start(RESET_DIRTY_CURSOR)
        image = MemoryImage.capture(self.guest_memory)
        snap = Snapshot(state, image)
        self._synced = snap
        return snap

    def reset_to(self, snapshot: Snapshot) -> int:
        """Put memory, vCPUs, in-kernel devices and bus devices back to ``snapshot``, while paused.

        When guest memory last equalled this snapshot (it was taken or last reset to here),
        only pages dirtied since are copied back in regions that log dirty pages; other regions,
        and every region after a reset to another snapshot, are copied whole. :meth:`resume`
        then runs the guest from the snapshot at once.

        Returns:
            How many pages were copied.

        Raises:
            VmError: the VM is running, stopped or closed.
            SnapshotError: the snapshot belongs to a VM of another shape.
        """
        self._require_quiescent("reset")
        _check_fits(snapshot.state, self.guest_memory, self.bus)
        if snapshot.state.num_vcpus != len(self._vcpus):
            raise SnapshotError(f"the snapshot has {snapshot.state.num_vcpus} vCPUs, the VM "
                                f"{len(self._vcpus)}")
        incremental = self._synced is snapshot and self.dirty_tracker.tracking(RESET_DIRTY_CURSOR)
        dirty = {d.slot: d for d in self.dirty_tracker.take(RESET_DIRTY_CURSOR)} \
            if incremental else {}
        copied = 0
        for slot in range(len(self.guest_memory.regions)):
            runs = dirty[slot].runs() if slot in dirty else None
            copied += snapshot.memory.copy_to(self.guest_memory, slot, runs)
        if not incremental:
            self.dirty_tracker.start(RESET_DIRTY_CURSOR)
            self._synced = snapshot
        self._restore_vm_state(snapshot.state)
        for vcpu, saved in zip(self._vcpus, snapshot.state.vcpus, strict=True):
            vcpu.restore_state(saved)
        if self.bus is not None:
            _restore_devices(snapshot.state, self.bus)
        return copied

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
            # A VcpuError already names its vCPU and says what happened.
            text = str(first) if isinstance(first, VcpuError) else f"vCPU {vcpu_id} failed: {first!r}"
            raise VcpuError(f"{text}{more}", vcpu_id=vcpu_id,
                            exit=getattr(first, "exit", None),
                            rip=getattr(first, "rip", None)) from first

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



def _check_fits(state: VmState, memory: GuestMemoryMmap, bus: IoManager | None) -> None:
    """Raise SnapshotError unless ``state`` fits this memory layout and these bus devices."""
    layout = layout_of(memory)
    if layout != state.memory:
        raise SnapshotError(f"the state's memory layout [{_fmt_layout(state.memory)}] differs from "
                            f"guest memory's [{_fmt_layout(layout)}]")
    if not 1 <= state.num_vcpus <= MAX_VCPUS:
        raise SnapshotError(f"the state has {state.num_vcpus} vCPUs; a VM has 1..{MAX_VCPUS}")
    devices = bus.stateful_devices() if bus is not None else {}
    saved = {d.key: d.kind for d in state.devices}
    present = {key: type(device).__qualname__ for key, device in devices.items()}
    if saved != present:
        raise SnapshotError(f"the state has devices [{_fmt_devices(saved)}] but the bus has "
                            f"[{_fmt_devices(present)}]")


def _fmt_layout(regions: Sequence[tuple[int, int]]) -> str:
    return ", ".join(f"{start:#x}+{size:#x}" for start, size in regions)


def _fmt_devices(devices: dict[tuple[str, int], str]) -> str:
    return ", ".join(f"{kind} at {space} {base:#x}"
                     for (space, base), kind in sorted(devices.items())) or "none"


def _restore_devices(state: VmState, bus: IoManager) -> None:
    devices = bus.stateful_devices()
    for saved in state.devices:
        devices[saved.key].restore_state(saved.data)


__all__ = [
    "KVM_IDENTITY_MAP_ADDRESS", "KVM_TSS_ADDRESS", "KvmVm", "Snapshot", "Vm", "VmConfig",
]
