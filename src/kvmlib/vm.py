"""A VM: memory slots, the in-kernel irqchip, its vCPUs and their threads; run, pause, shutdown.

The lifecycle is rust-vmm vmm-reference's ``KvmVm``: :meth:`KvmVm.new` creates the VM, registers
guest memory, writes the MP table, creates the irqchip and PIT, then the vCPUs; :meth:`KvmVm.run`
starts one thread per vCPU and returns; :meth:`KvmVm.shutdown` sets ``EXITING``, kicks every vCPU
and joins every thread. :meth:`KvmVm.pause` / :meth:`KvmVm.resume` finish what the reference left as
``todo!()``.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
import warnings
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import attrs
from typing_extensions import Unpack

from kvmlib.arch.x86_64.cpuid import CpuidEntry
from kvmlib.arch.x86_64.cpuid_features import CpuidTemplate
from kvmlib.arch.x86_64.mptable import MpTable
from kvmlib.arch.x86_64.regs import BootProtocol, BootState, write_boot_tables
from kvmlib.bus import IoManager
from kvmlib.dirty import DirtyBitmap, DirtyTracker
from kvmlib.errors import SnapshotError, VmError
from kvmlib.exit_handler import ExitHandler
from kvmlib.ioctl import (
    KVM_CLOCK_REALTIME,
    KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
    Cap,
    Kvm,
    RegsFields,
    SregsFields,
    VmFd,
    kvm_clock_data,
    kvm_cpuid_entry2,
    kvm_irqchip,
    kvm_pit_state2,
    kvm_regs,
    kvm_sregs,
)
from kvmlib.lifecycle import Lifecycle, Watchdog
from kvmlib.memory import GuestAddress, GuestMemoryMmap, GuestRegionMmap
from kvmlib.memory_image import layout_of
from kvmlib.reset import FastReset, ResetTimings, VmSnapshot
from kvmlib.resources import Closeable
from kvmlib.runstate import LifecycleState, VcpuRunState, VmRunState
from kvmlib.state import DeviceState, VmState
from kvmlib.vcpu import (
    MAX_VCPUS,
    InlineResult,
    KvmVcpu,
    StopReason,
    VcpuConfig,
    VcpuConfigList,
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


@runtime_checkable
class Vm(Protocol):
    """The contract of a VM: a lifecycle callers can drive without knowing the backend.

    Every method may be called from any thread, any number of times; see
    :data:`kvmlib.lifecycle.CALLS` for which is allowed in which :class:`LifecycleState`.
    """

    @property
    def vcpu_run_state(self) -> VcpuRunState:
        """The run state shared with the vCPUs (it holds the lifecycle state)."""

    @property
    def lifecycle(self) -> LifecycleState:
        """Where the VM is in its lifecycle."""

    def run(self, vcpu_run_addr: GuestAddress | int | None = None) -> None:
        """Start every vCPU in its own thread and return."""

    def pause(self, timeout: float | None = None) -> None:
        """Stop every vCPU and return once all are parked."""

    def resume(self) -> None:
        """Let parked vCPUs continue where they stopped."""

    def shutdown(self) -> None:
        """Stop every vCPU and join its thread (only ask, on a vCPU thread)."""

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until every vCPU thread has ended."""

    def close(self) -> None:
        """Release every resource."""


#: The dirty-tracking reader behind :meth:`KvmVm.dirty_pages` (see :class:`kvmlib.dirty.DirtyTracker`).
USER_DIRTY_CURSOR = "user"


class KvmVm(Closeable):
    """A KVM virtual machine; create it with :meth:`new` or :meth:`from_state`.

    Use it as a context manager. Guest memory stays the caller's: the VM registers it with KVM
    but does not close it. While the VM exists, closing the memory only makes it unusable to the
    caller: the unmap waits until the VM is closed, so the guest never reaches freed host memory.

    Every method may be called from any thread; :data:`kvmlib.lifecycle.CALLS` says which is
    allowed in which :attr:`lifecycle` state.
    """

    def __init__(self, fd: VmFd, config: VmConfig, exit_handler: ExitHandler,
                 guest_memory: GuestMemoryMmap, bus: IoManager, *, own_memory: bool = False) -> None:
        # Private: build VMs with new() or from_state(), which also create the slots and vCPUs.
        self._own_memory = own_memory
        self.fd = fd
        #: The guest memory registered with KVM (still owned and closed by the caller).
        self.guest_memory = guest_memory
        self.config = config
        self.exit_handler = exit_handler
        #: Where the vCPUs send port and MMIO exits.
        self.bus = bus
        self._life = Lifecycle(config.num_vcpus, exit_handler)
        #: The run state shared with the vCPUs; it holds the :attr:`lifecycle` state.
        self.vcpu_run_state = self._life.run_state
        #: Passed by every vCPU before its first KVM_RUN.
        self.vcpu_barrier = self._life.barrier
        self._vcpus: list[KvmVcpu] = []
        guest_memory.acquire()
        #: Pages written since each reader last asked (the user's, fast reset's, snapshot files').
        self.dirty_tracker = DirtyTracker(guest_memory.regions, self._fetch_dirty_log)
        self._fast_reset = FastReset(self.dirty_tracker)
        # The vCPU running inline, and the thread timing such runs out (made on first need).
        self._inline: KvmVcpu | None = None
        self._inline_lock = threading.Lock()
        self._timer: Watchdog | None = None
        self._watchdog_lock = threading.Lock()

    # ---- creation -------------------------------------------------------------------------------

    @classmethod
    def new(cls, kvm: Kvm, vm_config: VmConfig, guest_memory: GuestMemoryMmap,
            exit_handler: ExitHandler, bus: IoManager, *, own_memory: bool = False) -> KvmVm:
        """Create a VM ready to :meth:`run`: memory slots, MP table, irqchip, PIT and vCPUs.

        With ``own_memory`` the VM takes the guest memory over: :meth:`close` closes it too (and
        so does a failure here). Otherwise it stays the caller's to close.
        """
        vm = cls._create(kvm, vm_config, exit_handler, guest_memory, bus, own_memory)
        try:
            MpTable(vm_config.num_vcpus).write(guest_memory)
            vm._create_vcpus()
        except BaseException:
            vm.close()
            raise
        vm._log_created("created")
        return vm

    def _log_created(self, how: str) -> None:
        memory = self.guest_memory
        log.info("VM %s: %d vCPU(s), %d MiB of guest memory in %d slot(s)", how,
                 len(self._vcpus), sum(r.size for r in memory.regions) >> 20, len(memory.regions))

    @classmethod
    def from_state(cls, kvm: Kvm, state: VmState, guest_memory: GuestMemoryMmap,
                   exit_handler: ExitHandler, bus: IoManager, *,
                   own_memory: bool = False) -> KvmVm:
        """A VM that continues exactly where the saved one stopped once :meth:`run` is called.

        ``guest_memory`` must already hold the saved VM's memory (see :mod:`kvmlib.snapshot`), and
        ``bus`` the same stateful devices at the same places; their state is restored too.
        ``own_memory`` as for :meth:`new`.

        Raises:
            SnapshotError: the state does not fit (memory layout, devices); checked before any
                KVM object is created.
        """
        try:
            _check_fits(state, guest_memory, bus)
        except BaseException:
            if own_memory:
                guest_memory.close()
            raise
        vm = cls._create(kvm, VmConfig.from_state(state), exit_handler, guest_memory, bus,
                         own_memory)
        try:
            vm._restore_vm_state(state)
            vm._create_vcpus(state)
            _restore_devices(state, bus)
        except BaseException:
            vm.close()
            raise
        vm._log_created("restored from a saved state")
        return vm

    @classmethod
    def _create(cls, kvm: Kvm, config: VmConfig, exit_handler: ExitHandler,
                guest_memory: GuestMemoryMmap, bus: IoManager, own_memory: bool) -> KvmVm:
        """KVM_CREATE_VM, the memory slots and the in-kernel devices: what new and restored share."""
        try:
            fd = kvm.create_vm()
        except BaseException:
            if own_memory:
                guest_memory.close()
            raise
        vm = cls(fd, config, exit_handler, guest_memory, bus, own_memory=own_memory)
        try:
            vm._register_memory(kvm)
            vm._create_irqchip()
        except BaseException:
            vm.close()
            raise
        return vm

    def _register_memory(self, kvm: Kvm) -> None:
        """One KVM slot per region, with its read-only and dirty-logging flags."""
        regions = self.guest_memory.regions
        max_slots = kvm.check_extension(Cap.KVM_CAP_NR_MEMSLOTS)
        if len(regions) > max_slots:
            raise VmError(f"guest memory has {len(regions)} regions but KVM offers only "
                          f"{max_slots} memory slots")
        if any(r.read_only for r in regions) and not kvm.check_extension(Cap.KVM_CAP_READONLY_MEM):
            raise VmError("a read-only region was requested but KVM lacks KVM_CAP_READONLY_MEM")
        for slot, region in enumerate(regions):
            self.fd.set_user_memory_region(slot, int(region.start_addr), region.size,
                                           region.host_address, region.flags)
            log.debug("memory slot %d: guest %#x-%#x at host %#x%s%s", slot,
                      int(region.start_addr), region.end - 1, region.host_address,
                      ", read-only" if region.read_only else "",
                      ", logging dirty pages" if region.log_dirty_pages else "")
        self.dirty_tracker.start(USER_DIRTY_CURSOR)

    def _create_irqchip(self) -> None:
        """The TSS and identity-map pages, then the in-kernel irqchip and PIT.

        KVM wants the TSS and identity map placed before any vCPU exists (Intel needs them for
        real mode), and the irqchip before the vCPUs so that each gets an in-kernel LAPIC.
        """
        self.fd.set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
        self.fd.set_tss_address(KVM_TSS_ADDRESS)
        self.fd.create_irqchip()
        self.fd.create_pit2()

    def _create_vcpus(self, state: VmState | None = None) -> None:
        """Create every vCPU, in its reset state or in its state from ``state``."""
        for config in self.config.vcpus_config:
            saved = state.vcpus[config.id] if state is not None else None
            self._vcpus.append(KvmVcpu(self.fd, self.bus, config, self.config.num_vcpus,
                                       self.vcpu_barrier, self.vcpu_run_state, saved,
                                       self.exit_handler))
        self._life.attach(self._vcpus)

    def _fetch_dirty_log(self, slot: int, region: GuestRegionMmap) -> bytearray:
        return self.fd.get_dirty_log(slot)

    def dirty_pages(self) -> list[DirtyBitmap]:
        """The pages written since the previous call (or since the VM was created).

        One bitmap per region created with ``log_dirty_pages``, holding guest writes
        (``KVM_GET_DIRTY_LOG``) and host writes through :class:`~kvmlib.GuestMemoryMmap`.
        Snapshots and fast reset track dirty pages separately, so calling this does not disturb
        them.
        """
        with self._life.holding("dirty pages", "read dirty pages"):
            return self.dirty_tracker.take(USER_DIRTY_CURSOR)

    def save_state(self) -> VmState:
        """The whole VM state, while paused (or before :meth:`run`).

        Raises:
            VmError: the VM is running, pausing or stopped.
            ClosedError: the VM is closed.
            KvmIoctlError: KVM refused a GET ioctl (including a short MSR read).
        """
        with self._life.holding("save", "save the state"):
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

    def snapshot(self) -> VmSnapshot:
        """The VM state and a copy of guest memory, while paused: a point to :meth:`reset_to`.

        From here on the VM tracks the pages written in regions created with ``log_dirty_pages``,
        so that resetting to this snapshot copies back only those.
        """
        with self._life.holding("save", "take a snapshot"):
            snapshot = self._fast_reset.capture(self.save_state(), self.guest_memory)
        log.debug("in-memory snapshot taken")
        return snapshot

    def reset_to(self, snapshot: VmSnapshot, *, timings: ResetTimings | None = None) -> int:
        """Put memory, vCPUs, in-kernel devices and bus devices back to ``snapshot``, while paused.

        When guest memory last equalled this snapshot (it was taken or last reset to here),
        only pages dirtied since are copied back in regions that log dirty pages; other regions,
        and every region after a reset to another snapshot, are copied whole. :meth:`resume`
        then runs the guest from the snapshot at once.

        Only what can have changed is restored, from structures built once per snapshot (see
        :meth:`KvmVcpu.reset`). ``timings``, when given, gets each phase's time added.

        Returns:
            How many pages were copied.

        Raises:
            VmError: the VM is running, pausing or stopped.
            ClosedError: the VM is closed.
            SnapshotError: the snapshot belongs to a VM of another shape.
        """
        with self._life.holding("save", "reset"):
            clock = time.perf_counter if timings is not None else None
            t0 = clock() if clock else 0.0
            fast = self._fast_reset
            plan = fast.plan(snapshot, self._vcpus, self.bus, self._check_snapshot)
            dirty = fast.harvest(snapshot)
            t1 = clock() if clock else 0.0
            copied = fast.copy_back(snapshot, self.guest_memory, dirty)
            t2 = clock() if clock else 0.0
            # The in-kernel devices all change as the guest runs (the PIT counts, the clock
            # ticks, interrupts come and go); each costs a cheap VM ioctl.
            fd = self.fd
            fd.set_pit2(plan.pit2)
            fd.set_clock(plan.clock)
            for chip in plan.irqchips:
                fd.set_irqchip(chip)
            t3 = clock() if clock else 0.0
            for vcpu, vcpu_plan in zip(self._vcpus, plan.vcpus, strict=True):
                vcpu.reset(vcpu_plan)
            t4 = clock() if clock else 0.0
            for device, data in plan.devices:
                device.restore_state(data)
            if clock and timings is not None:
                t5 = clock()
                timings.harvest += t1 - t0
                timings.copy += t2 - t1
                timings.in_kernel += t3 - t2
                timings.vcpus += t4 - t3
                timings.devices += t5 - t4
                timings.resets += 1
            log.debug("reset to a snapshot: %d page(s) copied back", copied)
            return copied

    def _check_snapshot(self, snapshot: VmSnapshot) -> None:
        _check_fits(snapshot.state, self.guest_memory, self.bus)
        if snapshot.state.num_vcpus != len(self._vcpus):
            raise SnapshotError(f"the snapshot has {snapshot.state.num_vcpus} vCPUs, the VM "
                                f"{len(self._vcpus)}")

    # ---- lifecycle ------------------------------------------------------------------------------

    @property
    def vcpus(self) -> Sequence[KvmVcpu]:
        """The vCPUs, in id order."""
        return tuple(self._vcpus)

    @property
    def lifecycle(self) -> LifecycleState:
        """Where the VM is in its lifecycle (a snapshot: another thread may change it next)."""
        return self._life.state

    @property
    def running(self) -> bool:
        """Whether the vCPU threads have been started and the VM is not stopping."""
        return self._life.state in _LIVE

    @property
    def paused(self) -> bool:
        """Whether every vCPU is parked by :meth:`pause` (and :meth:`resume` not yet called)."""
        return self._life.state is LifecycleState.PAUSED

    def run(self, vcpu_run_addr: GuestAddress | int | None = None) -> None:
        """Start one thread per vCPU, named ``vcpu_{id}``, and return at once.

        Args:
            vcpu_run_addr: where every vCPU starts, in 64-bit long mode with the first GiB
                identity-mapped (the boot tables are written below 0xc000 first); None keeps the
                registers already set (by the loader, or a restored state).

        Raises:
            VmError: the VM was already started, or not every vCPU was created.
        """
        setup_signal_handler()
        if vcpu_run_addr is not None:
            with self._life.holding("run"):
                write_boot_tables(self.guest_memory, BootProtocol.LONG_MODE)
        self._life.run(vcpu_run_addr)

    def pause(self, timeout: float | None = None) -> None:
        """Stop every vCPU where it is; return once all are parked (a ``todo!()`` in the reference).

        Pausing a paused VM returns at once; a call racing another thread's pause waits for it.

        Args:
            timeout: give up after this many seconds (the VM then runs on); None waits as long
                as the vCPUs take to reach the kick (only a blocking device handler delays them).

        Raises:
            VmError: the VM is not running, the call was made on a vCPU thread, the VM began
                stopping before every vCPU parked, or the timeout passed.
        """
        self._life.pause(timeout)

    def resume(self) -> None:
        """Let paused vCPUs continue exactly where they stopped; a no-op while running.

        Raises:
            VmError: the VM is not started, a pause is still in progress, or it is stopping.
        """
        self._life.resume()

    def shutdown(self) -> None:
        """Stop every vCPU and join its thread; idempotent, from any thread.

        On a vCPU thread (a device or the exit handler deciding the guest is done) it only tells
        every vCPU to stop and returns; the owner's :meth:`shutdown`, :meth:`wait` or
        :meth:`close` does the joining.

        Raises:
            VcpuError: a vCPU thread failed (raised once, by the first call that sees it).
        """
        self._life.shutdown()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until every vCPU thread has ended; True if they have, False on timeout.

        Raises:
            VmError: called on a vCPU thread.
            VcpuError: a vCPU thread failed (raised once).
        """
        return self._life.wait(timeout)

    def run_inline(self, *, vcpu: int = 0, timeout: float | None = None) -> InlineResult:
        """Run one vCPU on the calling thread until something says stop, and say what did.

        The synchronous loop for fuzzers and harnesses: no vCPU thread, no hand-off, no signal
        on the way; ``reset_to()`` and ``run_inline()`` again make the next execution. It
        returns when a device, the exit handler or another thread calls :meth:`stop_inline`,
        when ``timeout`` seconds pass, when the guest stops (``hlt`` without an in-kernel irqchip,
        a shutdown: this run ends, not the VM), or when the VM begins stopping. Allowed before
        :meth:`run` and while paused (other vCPUs stay parked); meanwhile other threads' calls
        that would wait for it are refused.

        Raises:
            VmError: the VM is running or stopped, ``vcpu`` does not exist, or the call was made
                on a vCPU thread.
            VcpuError: KVM reported an error, or an exit nobody handled.
            Exception: whatever a device or the exit handler raised.
        """
        if self._life.on_vcpu_thread():
            raise VmError("run_inline() cannot be called on a vCPU thread")
        setup_signal_handler()  # timeouts and other threads stop the run with the kick signal
        with self._life.exclusive("save", "run inline"):
            target = self._vcpu(vcpu)
            with self._inline_lock:
                self._inline = target
                target.clear_stop()
            try:
                if timeout is not None:
                    self._watchdog().arm(timeout, lambda: self._stop(StopReason.TIMEOUT))
                return target.run_inline()
            finally:
                if timeout is not None:
                    self._watchdog().disarm()
                # A stop that raced the end of this run must not end the next one at once.
                with self._inline_lock:
                    self._inline = None
                    target.clear_stop()

    def stop_inline(self) -> None:
        """Make the current :meth:`run_inline` return (from a device, the exit handler, any thread).

        A no-op when nothing runs inline.
        """
        self._stop(StopReason.REQUESTED)

    def _stop(self, reason: StopReason) -> None:
        with self._inline_lock:
            if self._inline is not None:
                self._inline.stop_inline(reason)

    def _watchdog(self) -> Watchdog:
        with self._watchdog_lock:
            if self._timer is None:
                self._timer = Watchdog(f"kvmlib-inline-timeout-{id(self):x}")
            return self._timer

    @property
    def errors(self) -> list[tuple[int, BaseException]]:
        """Every ``(vcpu_id, exception)`` a vCPU thread ended with."""
        return self._life.errors

    # ---- inspection -----------------------------------------------------------------------------

    def _vcpu(self, index: int) -> KvmVcpu:
        try:
            return self._vcpus[index]
        except (IndexError, TypeError):
            raise VmError(f"no vCPU {index!r}: the VM has {len(self._vcpus)}") from None

    def vcpu_regs(self, index: int) -> kvm_regs:
        """VCPU ``index``'s general registers, while paused, before :meth:`run` or after shutdown."""
        with self._life.holding("inspect", "read vCPU registers"):
            return self._vcpu(index).get_regs()

    def set_vcpu_regs(self, index: int, regs: kvm_regs | None = None, /,
                      **fields: Unpack[RegsFields]) -> kvm_regs:
        """Set vCPU ``index``'s general registers, before :meth:`run` or while paused.

        ``vm.set_vcpu_regs(0, rip=0x1000, rax=1)`` changes those and keeps the others (see
        :meth:`KvmVcpu.set_regs`). Returns what was set.

        Raises:
            VmError: the VM is running or stopped, or has no vCPU ``index``.
            AttributeError: a field ``kvm_regs`` does not have.
        """
        with self._life.holding("save", "set vCPU registers"):
            return self._vcpu(index).set_regs(regs, **fields)

    def set_vcpu_sregs(self, index: int, sregs: kvm_sregs | None = None, /,
                       **fields: Unpack[SregsFields]) -> kvm_sregs:
        """Set vCPU ``index``'s special registers, under the conditions of :meth:`set_vcpu_regs`."""
        with self._life.holding("save", "set vCPU registers"):
            return self._vcpu(index).set_sregs(sregs, **fields)

    def load_boot_state(self, state: BootState, vcpu: int = 0) -> None:
        """Put vCPU ``vcpu`` in ``state``'s boot state, so that :meth:`run` with no address starts it.

        The one writer of boot state (:mod:`kvmlib.arch.x86_64.regs`) writes the protocol's GDT
        and page tables below ``0xc000`` in guest memory, then loads the vCPU's registers. Allowed
        before :meth:`run` and while paused.

        Raises:
            GuestMemoryError: guest memory does not cover the low pages the tables go in.
            VmError: the VM is running or stopped, or has no vCPU ``vcpu``.
        """
        with self._life.holding("save", "load a boot state"):
            target = self._vcpu(vcpu)
            write_boot_tables(self.guest_memory, state.protocol)
            target.load_boot_state(state)

    def vcpu_sregs(self, index: int) -> kvm_sregs:
        """VCPU ``index``'s special registers, under the same conditions as :meth:`vcpu_regs`."""
        with self._life.holding("inspect", "read vCPU registers"):
            return self._vcpu(index).get_sregs()

    # ---- resources ------------------------------------------------------------------------------

    def close(self) -> None:
        """Shut down if running, then close every vCPU and the VM fd. Idempotent.

        A vCPU failure not yet reported is raised here, after everything is released. Guest
        memory closed while the VM existed is unmapped now.

        Raises:
            VmError: called on one of the VM's vCPU threads (call :meth:`shutdown` there).
        """
        self._life.close(self._release)

    def __repr__(self) -> str:
        return f"<KvmVm {self.config.num_vcpus} vCPUs, {self._life.state.value}>"

    def __del__(self) -> None:
        # A safety net, like a file's: say the VM was never closed, then release what can be
        # released from a finalizer, which may run on any thread and must not block on a join.
        life = getattr(self, "_life", None)
        if life is None or life.state is LifecycleState.CLOSED:
            return
        try:
            warnings.warn(f"unclosed {self!r}", ResourceWarning, source=self, stacklevel=2)
            if life.threads_alive():
                life.run_state.set_and_notify(VmRunState.EXITING)
                life.kick_all()
            else:
                self.close()
        except Exception:
            pass

    def _release(self) -> None:
        if self._timer is not None:
            self._timer.close()
        try:
            for vcpu in self._vcpus:
                vcpu.close()
            self.fd.close()
        finally:
            # Only now that KVM no longer maps it may the memory go.
            self.guest_memory.release()
            if self._own_memory:
                self.guest_memory.close()


_LIVE = frozenset({LifecycleState.RUNNING, LifecycleState.PAUSING, LifecycleState.PAUSED})


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
    "KVM_IDENTITY_MAP_ADDRESS", "KVM_TSS_ADDRESS", "USER_DIRTY_CURSOR", "KvmVm", "Vm", "VmConfig",
]
