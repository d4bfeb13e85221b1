"""One vCPU: its configuration, creation on x86-64, the exit loop, and the shared run state.

The shape follows rust-vmm's vmm-reference ``KvmVcpu``: every vCPU thread waits on a barrier until all
exist, then calls KVM_RUN in a loop, handing port and MMIO exits to the bus. A VM-wide
:class:`VcpuRunState` (a state under a condition variable) tells each vCPU, when a signal or
``immediate_exit`` kicks it out of KVM_RUN, whether to go back in, park, or return.
"""

from __future__ import annotations

import collections
import ctypes
import enum
import errno
import logging
import signal
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from types import FrameType
from typing import Protocol, runtime_checkable

import attrs
from typing_extensions import Unpack

from kvmlib._platform import SIGRTMIN
from kvmlib._sigaction import SIG_DFL, SIG_IGN, signal_disposition
from kvmlib.arch.x86_64.cpuid import (
    CpuidEntry,
    entries_from_kvm_cpuid2,
    filter_cpuid,
    to_kvm_cpuid2,
)
from kvmlib.arch.x86_64.cpuid_features import CpuidTemplate
from kvmlib.arch.x86_64.msrs import boot_msr_entries
from kvmlib.arch.x86_64.regs import BootState, set_boot_registers, setup_fpu, setup_lapic
from kvmlib.bus import IoManager
from kvmlib.disasm import instruction_bytes
from kvmlib.errors import KvmIoctlError, VcpuError, VmError
from kvmlib.exit_handler import ExitHandler
from kvmlib.ioctl import (
    KVM_EXIT_IO,
    KVM_RUN,
    KVM_SYNC_X86_EVENTS,
    KVM_SYNC_X86_REGS,
    KVM_SYNC_X86_SREGS,
    Cap,
    GuestDebug,
    Hlt,
    InternalError,
    Intr,
    IoIn,
    IoOut,
    Kvm,
    MmioRead,
    MmioWrite,
    PreparedIoctl,
    RegsFields,
    Shutdown,
    SregsFields,
    SystemEvent,
    VcpuExit,
    VcpuFd,
    VmFd,
    io_exit_key,
    kvm_cpuid_entry2,
    kvm_debugregs,
    kvm_guest_debug,
    kvm_lapic_state,
    kvm_mp_state,
    kvm_regs,
    kvm_sregs,
    kvm_vcpu_events,
    kvm_xcrs,
    kvm_xsave,
    make_kvm_cpuid2,
    make_kvm_guest_debug,
    make_kvm_msrs,
)
from kvmlib.ioctl.fd import run_ioctl
from kvmlib.memory import GuestAddress
from kvmlib.runstate import VcpuRunState, VmRunState
from kvmlib.state import VcpuState

log = logging.getLogger(__name__)

#: The signal that kicks a vCPU thread out of KVM_RUN (``SIGRTMIN + 0``, as in vmm-reference).
VCPU_KICK_SIGNAL = SIGRTMIN

#: The MP table (and so an x86 VM) addresses at most this many vCPUs.
MAX_VCPUS = 254


# signal.getsignal wraps the answer in an enum (an exception for every function handler, ~2 µs);
# _signal's is the same look-up without it.
_raw_getsignal: Callable[[int], object] = getattr(getattr(signal, "_signal", signal), "getsignal",
                                                  signal.getsignal)
_KICK_SIGNUM = int(VCPU_KICK_SIGNAL)


def _kick_handler(signum: int, frame: FrameType | None) -> None:
    """Nothing to do: the signal's only job is to make KVM_RUN return EINTR."""


def setup_signal_handler() -> None:
    """Install the handler for :data:`VCPU_KICK_SIGNAL` (idempotent).

    Its default action would kill the process and ignoring it would not interrupt KVM_RUN, so
    some handler must be in place before any vCPU is kicked. Python installs handlers only from the
    main thread: call this (or :meth:`kvmlib.KvmVm.run`) there first when driving VMs elsewhere.
    A handler already installed is kept, whoever installed it: the disposition is read with
    ``sigaction`` itself, which also sees handlers installed by C code (``signal.getsignal`` does
    not).
    """
    # Our own handler, still in place: no system call (inline runs check this every time).
    if _raw_getsignal(_KICK_SIGNUM) is _kick_handler:
        return
    if signal_disposition(VCPU_KICK_SIGNAL) not in (SIG_DFL, SIG_IGN):
        return
    if threading.current_thread() is not threading.main_thread():
        raise VmError(
            f"the vCPU kick signal {VCPU_KICK_SIGNAL!r} has no handler and Python can install one "
            "only from the main thread: call kvmlib.vcpu.setup_signal_handler() there first"
        )
    signal.signal(VCPU_KICK_SIGNAL, _kick_handler)


def _valid_vcpu_id(_inst: object, attribute: attrs.Attribute[int], value: int) -> None:
    if not isinstance(value, int) or not 0 <= value < MAX_VCPUS:
        raise VmError(f"{attribute.name} must be an int in 0..{MAX_VCPUS - 1}, not {value!r}")


def _cpuid_tuple(entries: Iterable[CpuidEntry]) -> tuple[CpuidEntry, ...]:
    return tuple(entries)


def _int_tuple(values: Iterable[int]) -> tuple[int, ...]:
    return tuple(values)


def _config_tuple(configs: Iterable[VcpuConfig]) -> tuple[VcpuConfig, ...]:
    return tuple(configs)


@attrs.define(frozen=True, slots=True)
class VcpuConfig:
    """What one vCPU is created with.

    Attributes:
        id: the vCPU id (also its APIC id).
        cpuid: the CPUID entries it is given (filtered per vCPU at creation).
        msrs: the MSR indices that make up its saveable state.
    """

    id: int = attrs.field(validator=_valid_vcpu_id)
    cpuid: tuple[CpuidEntry, ...] = attrs.field(converter=_cpuid_tuple)
    msrs: tuple[int, ...] = attrs.field(converter=_int_tuple)


@attrs.define(frozen=True, slots=True)
class VcpuConfigList:
    """The configurations of every vCPU of a VM, ids 0..n-1 in order."""

    configs: tuple[VcpuConfig, ...] = attrs.field(converter=_config_tuple)

    @configs.validator
    def _check(self, _attribute: attrs.Attribute[tuple[VcpuConfig, ...]],
               value: tuple[VcpuConfig, ...]) -> None:
        if not value:
            raise VmError("a VM needs at least one vCPU")
        ids = [c.id for c in value]
        if ids != list(range(len(ids))):
            raise VmError(f"vCPU ids must be 0..{len(ids) - 1} in order, not {ids}")

    @classmethod
    def from_kvm(cls, kvm: Kvm, num_vcpus: int,
                 cpuid_template: CpuidTemplate | None = None) -> VcpuConfigList:
        """One configuration per vCPU from the host's supported CPUID and saveable MSRs.

        Args:
            kvm: the host.
            num_vcpus: how many vCPUs.
            cpuid_template: adapts the supported CPUID first, e.g.
                :class:`~kvmlib.arch.x86_64.cpuid_features.HideFeatures`.
        """
        if not isinstance(num_vcpus, int) or not 1 <= num_vcpus <= MAX_VCPUS:
            raise VmError(f"num_vcpus must be in 1..{MAX_VCPUS}, not {num_vcpus!r}")
        cpuid = entries_from_kvm_cpuid2(kvm.get_supported_cpuid())
        if cpuid_template is not None:
            cpuid = tuple(cpuid_template(cpuid))
        msrs = tuple(kvm.get_msr_index_list())
        return cls(VcpuConfig(i, cpuid, msrs) for i in range(num_vcpus))

    def __len__(self) -> int:
        return len(self.configs)

    def __iter__(self) -> Iterator[VcpuConfig]:
        return iter(self.configs)

    def __getitem__(self, index: int) -> VcpuConfig:
        return self.configs[index]


@runtime_checkable
class Vcpu(Protocol):
    """The contract of a vCPU as a VM's lifecycle drives it (see :class:`kvmlib.lifecycle.Lifecycle`).

    A vCPU is created with the VM's barrier and :class:`VcpuRunState`. Its :meth:`run` is called
    once, on the vCPU's own thread; every other method may be called from any thread.
    """

    @property
    def id(self) -> int:
        """The vCPU id."""

    def run(self, instruction_pointer: GuestAddress | None = None) -> None:
        """Run the guest on the calling thread until it stops or the run state says EXITING.

        Waits on the VM's barrier first (returning at once if the barrier is broken). Whenever it
        is kicked it consults the run state soon: it calls :meth:`VcpuRunState.park` while the
        state is SUSPENDING, and returns when it is EXITING. An exception ends the vCPU; the VM
        records it and raises it from its owner's ``shutdown()`` / ``wait()`` / ``close()``.
        """

    def kick(self) -> None:
        """Make :meth:`run` consult the run state soon; never blocks.

        Safe at any time: before :meth:`run`, after it returned, and after :meth:`close`.
        """

    def get_regs(self) -> kvm_regs:
        """The general-purpose registers (only while the vCPU is not running)."""

    def close(self) -> None:
        """Release the vCPU's resources (called once its thread has ended); idempotent."""


class StopReason(enum.Enum):
    """Why :meth:`KvmVcpu.run_inline` (and :meth:`kvmlib.KvmVm.run_inline`) returned."""

    #: ``stop_inline()`` was called: by a device, the exit handler, or another thread.
    REQUESTED = "requested"
    #: The run's timeout passed.
    TIMEOUT = "timeout"
    #: The guest stopped: ``hlt`` without an in-kernel irqchip, a shutdown, a system event.
    GUEST_STOPPED = "guest stopped"
    #: The VM began stopping (``shutdown()`` or ``close()`` from another thread).
    VM_STOPPING = "VM stopping"


@attrs.define(frozen=True, slots=True)
class InlineResult:
    """What ended an inline run: the reason, and the exit when the guest stopped."""

    reason: StopReason
    exit: VcpuExit | None


class KvmVcpu:
    """A KVM vCPU configured for a 64-bit x86 boot, with the vmm-reference run loop.

    Args:
        vm_fd: the VM to create the vCPU in.
        bus: where port and MMIO exits go.
        config: id, CPUID and MSR list.
        num_vcpus: how many vCPUs the VM has (CPUID topology).
        run_barrier: passed by every vCPU before its first KVM_RUN.
        run_state: the VM-wide run state.
        state: a saved state to put the vCPU in instead of the reset state.
        exit_handler: offered every exit the bus does not handle, on the vCPU's thread.

    Creating a vCPU writes nothing into guest memory: the boot state (tables and registers) is
    loaded by :meth:`kvmlib.KvmVm.run` given an address, or by the kernel loader.
    """

    def __init__(self, vm_fd: VmFd, bus: IoManager, config: VcpuConfig, num_vcpus: int,
                 run_barrier: threading.Barrier, run_state: VcpuRunState,
                 state: VcpuState | None = None, exit_handler: ExitHandler | None = None) -> None:
        self.config = config
        self.bus = bus
        self.run_barrier = run_barrier
        self.run_state = run_state
        #: Offered every exit the bus does not take (:meth:`ExitHandler.handle_exit`).
        self.exit_handler = exit_handler
        #: The exit that ended the loop normally (Hlt, Shutdown or SystemEvent), if one did.
        self.exit_reason: VcpuExit | None = None
        self._kick_lock = threading.Lock()
        self._closed = False
        self._fed: collections.deque[VcpuExit] = collections.deque()
        # Why run_inline() should return, once asked (None: not asked).
        self._stop_requested: StopReason | None = None
        self._thread_ident: int | None = None
        # What the loop calls for each port exit seen, and the bus table it was worked out from.
        self._pio_targets: dict[int, _PioTarget] = {}
        self._targets_for: object = None
        # The thread in run_inline(), if one is: a stop asked from it needs no kick.
        self._inline_ident: int | None = None
        self.vcpu_fd = vm_fd.create_vcpu(config.id)
        # Registers, special registers and events staged in kvm_run instead of three ioctls.
        self._sync_regs = vm_fd.check_extension(Cap.KVM_CAP_SYNC_REGS) & _SYNC_ALL == _SYNC_ALL
        # Guests with AMX or other large XSAVE features need more than struct kvm_xsave's 4 KiB.
        self._xsave_size = max(vm_fd.check_extension(Cap.KVM_CAP_XSAVE2), ctypes.sizeof(kvm_xsave))
        try:
            if state is None:
                self._configure(num_vcpus)
            else:
                self.restore_state(state)
        except BaseException:
            self.vcpu_fd.close()
            raise

    def _configure(self, num_vcpus: int) -> None:
        fd = self.vcpu_fd
        fd.set_cpuid2(to_kvm_cpuid2(filter_cpuid(self.config.cpuid, self.config.id, num_vcpus)))
        fd.set_msrs(boot_msr_entries())
        setup_fpu(fd)
        # The LAPIC exists only once the VM has an in-kernel irqchip.
        try:
            setup_lapic(fd)
        except KvmIoctlError as e:
            if e.errno != errno.ENXIO:
                raise

    @property
    def id(self) -> int:
        """The vCPU id."""
        return self.config.id

    def get_regs(self) -> kvm_regs:
        """KVM_GET_REGS; only meaningful while the vCPU is parked or not started."""
        return self.vcpu_fd.get_regs()

    def set_regs(self, regs: kvm_regs | None = None, /, **fields: Unpack[RegsFields]) -> kvm_regs:
        """KVM_SET_REGS: ``regs`` (by default the current registers) with ``fields`` changed.

        ``vcpu.set_regs(rip=0x1000, rax=1)`` changes two registers and keeps the others. The
        caller's ``regs`` is not modified. Returns what was set.

        Raises:
            AttributeError: a field name ``kvm_regs`` does not have (a type checker catches it too).
        """
        new = self.vcpu_fd.get_regs() if regs is None else kvm_regs.from_buffer_copy(regs)
        for name, value in fields.items():
            setattr(new, name, value)
        self.vcpu_fd.set_regs(new)
        return new

    def load_boot_state(self, state: BootState) -> None:
        """Load ``state``'s segment, control and general registers (not while in KVM_RUN).

        The boot tables must be in guest memory too (:meth:`kvmlib.KvmVm.load_boot_state` writes
        them).
        """
        set_boot_registers(self.vcpu_fd, state)

    def set_guest_debug(self, flags: GuestDebug, breakpoints: Sequence[int] = ()) -> None:
        """KVM_SET_GUEST_DEBUG: single-step, ``int3`` exits, or up to four hardware breakpoints.

        ``vcpu.set_guest_debug(GuestDebug.SINGLESTEP)`` makes every instruction a
        :class:`~kvmlib.Debug` exit; ``set_guest_debug(GuestDebug.USE_SW_BP)`` makes ``int3`` one;
        ``set_guest_debug(GuestDebug(0), [0x10000])`` breaks on execution at 0x10000.
        :meth:`clear_guest_debug` turns it all off. Debug exits reach
        :meth:`ExitHandler.handle_exit`; one nobody handles stops the vCPU with a VcpuError.
        Call it before :meth:`run`, while paused, or from the exit handler.
        """
        self.vcpu_fd.set_guest_debug(make_kvm_guest_debug(flags, breakpoints))

    def clear_guest_debug(self) -> None:
        """KVM_SET_GUEST_DEBUG with nothing enabled: the guest runs undisturbed again."""
        self.vcpu_fd.set_guest_debug(kvm_guest_debug())

    def get_sregs(self) -> kvm_sregs:
        """KVM_GET_SREGS; only meaningful while the vCPU is parked or not started."""
        return self.vcpu_fd.get_sregs()

    def set_sregs(self, sregs: kvm_sregs | None = None, /,
                  **fields: Unpack[SregsFields]) -> kvm_sregs:
        """KVM_SET_SREGS: ``sregs`` (by default the current ones) with ``fields`` changed.

        Raises:
            AttributeError: a field name ``kvm_sregs`` does not have.
        """
        new = self.vcpu_fd.get_sregs() if sregs is None else kvm_sregs.from_buffer_copy(sregs)
        for name, value in fields.items():
            setattr(new, name, value)
        self.vcpu_fd.set_sregs(new)
        return new

    def save_state(self) -> VcpuState:
        """Everything KVM holds for this vCPU; call only while it is not in KVM_RUN (parked).

        Raises:
            KvmIoctlError: a GET ioctl failed, or fewer MSRs than the saveable list were read.
        """
        fd = self.vcpu_fd
        # MP state first, as Firecracker does: reading it lets KVM complete a pending INIT/SIPI,
        # which rewrites the registers read below.
        mp_state = fd.get_mp_state().mp_state
        cpuid = fd.get_cpuid2()
        entries = b"".join(bytes(cpuid.entries[i]) for i in range(cpuid.nent))
        if self._xsave_size > ctypes.sizeof(kvm_xsave):
            xsave = bytes(fd.get_xsave2(self._xsave_size))
        else:
            xsave = bytes(fd.get_xsave())
        return VcpuState(
            id=self.id, cpuid=entries, mp_state=mp_state,
            regs=bytes(fd.get_regs()), sregs=bytes(fd.get_sregs()), xsave=xsave,
            xcrs=bytes(fd.get_xcrs()), debugregs=bytes(fd.get_debugregs()),
            lapic=bytes(fd.get_lapic()), msrs=tuple(fd.get_msrs(self.config.msrs).items()),
            vcpu_events=bytes(fd.get_vcpu_events()))

    def restore_state(self, state: VcpuState) -> None:
        """Put the vCPU back in ``state``; call only while it is not in KVM_RUN.

        Raises:
            VmError: the state belongs to another vCPU id.
            KvmIoctlError: KVM refused part of the state.
        """
        if state.id != self.id:
            raise VmError(f"the state of vCPU {state.id} cannot be given to vCPU {self.id}")
        fd = self.vcpu_fd
        entry = ctypes.sizeof(kvm_cpuid_entry2)
        # The order is KVM's, not ours to choose:
        # - CPUID first: KVM derives from it which MSRs, XSAVE features and XCR0 bits are valid.
        fd.set_cpuid2(make_kvm_cpuid2(
            kvm_cpuid_entry2.from_buffer_copy(state.cpuid, off)
            for off in range(0, len(state.cpuid), entry)))
        # - MP state before registers: accepting an INIT/SIPI state may reset parts of them.
        fd.set_mp_state(kvm_mp_state(state.mp_state))
        fd.set_regs(kvm_regs.from_buffer_copy(state.regs))
        # - sregs (CR4.OSXSAVE) before XSAVE and XCRs, which KVM checks against it.
        fd.set_sregs(kvm_sregs.from_buffer_copy(state.sregs))
        if len(state.xsave) > ctypes.sizeof(kvm_xsave):
            fd.set_xsave(bytearray(state.xsave))
        else:
            fd.set_xsave(kvm_xsave.from_buffer_copy(state.xsave))
        fd.set_xcrs(kvm_xcrs.from_buffer_copy(state.xcrs))
        fd.set_debugregs(kvm_debugregs.from_buffer_copy(state.debugregs))
        # - LAPIC before MSRs: the TSC-deadline MSR is dropped unless the LAPIC timer is already in
        #   TSC-deadline mode.
        fd.set_lapic(kvm_lapic_state.from_buffer_copy(state.lapic))
        fd.set_msrs(state.msrs)
        # - Events last: setting registers clears pending exceptions, which the events carry.
        fd.set_vcpu_events(kvm_vcpu_events.from_buffer_copy(state.vcpu_events))

    def plan_reset(self, state: VcpuState) -> VcpuResetPlan:
        """Prepare :meth:`reset` to ``state``: every structure built and checked once."""
        if state.id != self.id:
            raise VmError(f"the state of vCPU {state.id} cannot be given to vCPU {self.id}")
        fd = self.vcpu_fd
        xsave: kvm_xsave | bytearray = bytearray(state.xsave) if len(
            state.xsave) > ctypes.sizeof(kvm_xsave) else kvm_xsave.from_buffer_copy(state.xsave)
        sregs = kvm_sregs.from_buffer_copy(state.sregs)
        # Not restored: CPUID. Only KVM_SET_CPUID2 from user space changes it, never the guest,
        # and setting it again is the most expensive vCPU ioctl there is.
        # MP state first (halting, INIT and SIPI change it), before the registers as in
        # restore_state. Then the FPU/SSE/AVX state, XCR0 (XSETBV), the debug registers (MOV DR),
        # the LAPIC (timer, TPR, interrupts in service) and the MSRs (WRMSR, the TSC ticking):
        # all guest-writable. LAPIC before MSRs: the TSC-deadline MSR is dropped unless the timer
        # is in that mode.
        rest = (
            fd.prepare_set("xsave", xsave),
            fd.prepare_set("xcrs", kvm_xcrs.from_buffer_copy(state.xcrs)),
            fd.prepare_set("debugregs", kvm_debugregs.from_buffer_copy(state.debugregs)),
            fd.prepare_set("lapic", kvm_lapic_state.from_buffer_copy(state.lapic)),
            fd.prepare_set("msrs", make_kvm_msrs(state.msrs)),
        )
        mp_state = fd.prepare_set("mp_state", kvm_mp_state(state.mp_state))
        return VcpuResetPlan(
            state=state, apic_base=sregs.apic_base, staged_sregs=(mp_state, *rest),
            with_sregs=(mp_state, fd.prepare_set("sregs", sregs), *rest))

    def reset(self, plan: VcpuResetPlan) -> None:
        """Put the vCPU back in ``plan``'s state, restoring only what can have changed since.

        What the fast reset of a VM (:meth:`kvmlib.KvmVm.reset_to`) does per vCPU; call it only
        while the vCPU is not in KVM_RUN. Registers, special registers and events go through
        ``kvm_run`` (KVM_CAP_SYNC_REGS) when the host has it: KVM loads them at the next KVM_RUN,
        saving three ioctls, and reading them before that still sees the restored values.
        """
        fd = self.vcpu_fd
        state = plan.state
        # Special registers by ioctl when the APIC base (its mode: xAPIC or x2APIC) differs from
        # the saved one: the LAPIC state is read in the format of the current mode. kvm_run
        # reports the current base after every exit, so comparing costs no ioctl.
        staged_sregs = self._sync_regs and fd.kvm_run.apic_base == plan.apic_base
        fd.issue(plan.staged_sregs if staged_sregs else plan.with_sregs)
        # Registers, and events last (setting registers clears pending exceptions): staged, KVM
        # applies them in that order at the next KVM_RUN.
        if self._sync_regs:
            fd.set_sync_regs(state.regs, state.sregs if staged_sregs else None, state.vcpu_events)
        else:
            fd.set_regs(kvm_regs.from_buffer_copy(state.regs))
            fd.set_vcpu_events(kvm_vcpu_events.from_buffer_copy(state.vcpu_events))

    def kick(self) -> None:
        """Set ``immediate_exit`` and signal the vCPU's thread, if it is in its loop.

        ``immediate_exit`` covers a vCPU that is between two KVM_RUNs when the signal lands. A
        no-op once the vCPU is closed.
        """
        with self._kick_lock:
            # Holding the lock keeps the thread alive (it clears the ident under the same lock
            # before it ends), so the pthread id cannot be stale, and keeps close() from unmapping
            # kvm_run under the write.
            if self._closed:
                return
            self.vcpu_fd.set_immediate_exit(True)
            if self._thread_ident is not None:
                signal.pthread_kill(self._thread_ident, VCPU_KICK_SIGNAL)

    def run(self, instruction_pointer: GuestAddress | None = None) -> None:
        """The vCPU loop; returns when the guest halts or shuts down, or the VM exits.

        Raises:
            VcpuError: KVM reported an internal error, a failed entry or an unknown exit.
        """
        if instruction_pointer is not None:
            # The tables were written by whoever chose the address (KvmVm.run).
            self.load_boot_state(BootState.long_mode(instruction_pointer))
        with self._kick_lock:
            self._thread_ident = threading.get_ident()
        try:
            try:
                self.run_barrier.wait()
            except threading.BrokenBarrierError:
                return  # the VM was shut down before every vCPU had started
            self._loop()
        finally:
            with self._kick_lock:
                self._thread_ident = None

    def run_inline(self) -> InlineResult:
        """Run the guest on the calling thread until something says stop; return what did.

        The synchronous loop for fuzzers and harnesses (what :meth:`kvmlib.KvmVm.run_inline`
        drives): the same exit loop as :meth:`run`, with no barrier and no parking, and ``hlt`` or
        a shutdown ending this run rather than the VM. It returns when :meth:`stop_inline` is
        called (by a device, the exit handler or another thread), when the guest stops, or when
        the VM begins stopping; an error or a device's exception is raised here.
        """
        ident = threading.get_ident()
        with self._kick_lock:
            self._thread_ident = self._inline_ident = ident
        try:
            return self._loop(inline=True) or InlineResult(StopReason.VM_STOPPING, None)
        finally:
            with self._kick_lock:
                self._thread_ident = self._inline_ident = None
            self._stop_requested = None

    def clear_stop(self) -> None:
        """Forget a stop request (and its pending kick) that came too late for the last run."""
        self._stop_requested = None
        self.vcpu_fd.set_immediate_exit(False)

    def stop_inline(self, reason: StopReason = StopReason.REQUESTED) -> None:
        """Make :meth:`run_inline` return soon with ``reason``; from any thread, never blocks.

        From a device or the exit handler (on the running thread) it costs nothing more: the loop
        looks after every exit it hands out. From another thread it is a kick.
        """
        if self._stop_requested is None:
            self._stop_requested = reason
        if self._inline_ident != threading.get_ident():
            self.kick()

    def feed_exit(self, exit_: VcpuExit) -> None:
        """Queue an exit for the vCPU loop to handle before its next KVM_RUN, as if KVM returned it.

        For testing exit handling a host cannot produce (a debug exit, a hypercall): the loop
        treats it exactly as a real one. Thread-safe; takes effect at the loop's next turn (kick
        the vCPU to make that soon).
        """
        self._fed.append(exit_)

    def _loop(self, inline: bool = False) -> InlineResult | None:
        # The hot path. After a KVM_RUN every Python operation runs on cold caches, so a single
        # port access (the most frequent exit by far) costs three reads of kvm_run, one dictionary
        # look-up and the call into the device: no exit object, no unpacking. What to call for
        # each distinct port exit is worked out once and kept, until the bus's devices change.
        vcpu_fd = self.vcpu_fd
        fd = vcpu_fd.fd
        u32, u64 = vcpu_fd.run_words
        ioctl, request = run_ioctl, KVM_RUN
        current_exit, run_failed = vcpu_fd.current_exit, vcpu_fd.run_failed
        bus = self.bus
        fed = self._fed
        owner = self.exit_handler
        # Skip the call per exit when the handler keeps the default (handles nothing).
        handle_exit = None if owner is None or type(owner).handle_exit is ExitHandler.handle_exit \
            else owner.handle_exit
        # Kept across runs (an inline run is one short call per fuzz execution), and dropped
        # whenever devices come or go.
        targets = self._pio_targets
        exit_io = KVM_EXIT_IO
        handlers = bus.pio_handlers
        if self._targets_for is not handlers:
            targets.clear()
            self._targets_for = handlers
        while True:
            if fed:
                exit_ = fed.popleft()
            else:
                try:
                    ioctl(fd, request)
                except OSError as e:
                    if e.errno == errno.EAGAIN:
                        continue
                    exit_ = run_failed(e)  # a kick (Intr); anything else raises
                else:
                    if u32[2] == exit_io:  # exit_reason; see io_exit_key for the other words
                        target = targets.get(u32[8] | u32[9] << 32 | u64[5] << 64)
                        if target is not None and handlers is bus.pio_handlers:
                            target[0](target[1], target[2], target[3])
                            if inline and self._stop_requested is not None:
                                return InlineResult(self._stop_requested, None)
                            continue
                    exit_ = current_exit()
                    if type(exit_) is IoOut or type(exit_) is IoIn:
                        if handlers is not bus.pio_handlers:  # devices came or went
                            handlers = self._targets_for = bus.pio_handlers
                            targets.clear()
                        target = self._pio_target(exit_)
                        if target is not None:
                            if len(targets) < _PIO_TARGETS_CACHED:
                                targets[io_exit_key(*_io_words(vcpu_fd))] = target
                            target[0](target[1], target[2], target[3])
                            if inline and self._stop_requested is not None:
                                return InlineResult(self._stop_requested, None)
                            continue
            done = self._handle(exit_, handle_exit, inline)
            if done:
                return done if isinstance(done, InlineResult) else None
            if inline and self._stop_requested is not None:
                return InlineResult(self._stop_requested, None)

    def _pio_target(self, exit_: IoIn | IoOut) -> _PioTarget | None:
        """What a single port access calls, and with what; None for string I/O.

        The device's method and its arguments, or the bus's answer for an unclaimed port. String
        I/O (several accesses per exit) is dispatched one access at a time instead.
        """
        port, size, count, data = exit_
        if count != 1:
            return None
        bus = self.bus
        entry = bus.pio_handlers.get(port)
        if entry is not None and port + size <= entry[1]:
            return (entry[3] if type(exit_) is IoOut else entry[2]), entry[0], port - entry[0], data
        if type(exit_) is IoOut:
            return bus.unclaimed_write, port, size, data
        return bus.unclaimed_read_at, port, size, data

    def _handle(self, exit_: VcpuExit, handle_exit: Callable[[KvmVcpu, VcpuExit], bool] | None,
                inline: bool) -> InlineResult | bool:
        """Handle an exit the loop's fast path did not; what ends the loop, or False."""
        bus, state = self.bus, self.run_state
        if isinstance(exit_, (IoOut, IoIn)):  # string I/O (rep outs / ins), or a fed exit
            handler = bus.pio_write if isinstance(exit_, IoOut) else bus.pio_read
            _dispatch(handler, exit_.port, exit_.size, exit_.count, exit_.data)
        elif isinstance(exit_, MmioWrite):
            bus.mmio_write(exit_.address, exit_.data)
        elif isinstance(exit_, MmioRead):
            bus.mmio_read(exit_.address, exit_.data)
        elif isinstance(exit_, Intr):
            self.vcpu_fd.set_immediate_exit(False)
            current = state.state
            if inline:
                # No parking on the caller's own thread: a requested stop, or a VM that is
                # stopping, ends the run; anything else was a stale kick.
                if self._stop_requested is not None:
                    return InlineResult(self._stop_requested, None)
                return InlineResult(StopReason.VM_STOPPING, None) \
                    if current is VmRunState.EXITING else False
            if current is VmRunState.SUSPENDING:
                current = state.park()
            return current is VmRunState.EXITING
        # Every other exit is offered to the exit handler first: a harness may handle
        # breakpoints, MSR accesses or hypercalls and keep the guest running.
        elif handle_exit is not None and handle_exit(self, exit_):
            pass
        elif isinstance(exit_, (Hlt, Shutdown, SystemEvent)):
            self.exit_reason = exit_
            log.debug("vCPU %d stopped: %r", self.id, exit_)
            if inline:  # the guest stopped this run: the VM lives on, to be reset
                return InlineResult(StopReason.GUEST_STOPPED, exit_)
            state.set_and_notify(VmRunState.EXITING)
            return True
        else:
            # Errors and exits nobody handled: never retried, never spun on.
            raise self._exit_error(exit_)
        return False

    def _exit_error(self, exit_: VcpuExit) -> VcpuError:
        try:
            rip: int | None = self.vcpu_fd.get_regs().rip
        except KvmIoctlError:
            rip = None
        where = f" at RIP {rip:#x}" if rip is not None else ""
        what = repr(exit_)
        if isinstance(exit_, InternalError):
            name = _INTERNAL_ERRORS.get(exit_.suberror, "unknown suberror")
            what = f"KVM internal error {exit_.suberror} ({name})"
            insn = instruction_bytes(exit_)
            what += f", instruction bytes {insn.hex(' ')}" if insn else f", data {list(map(hex, exit_.data))}"
        return VcpuError(f"vCPU {self.id} stopped{where}: {what}", vcpu_id=self.id, exit=exit_,
                         rip=rip)

    def close(self) -> None:
        """Close the vCPU fd and unmap its ``kvm_run``; idempotent."""
        with self._kick_lock:
            self._closed = True
            self.vcpu_fd.close()


# KVM_INTERNAL_ERROR_* suberrors, as <linux/kvm.h> names them.
_INTERNAL_ERRORS = {
    1: "EMULATION: KVM could not emulate an instruction",
    2: "SIMUL_EX: an exception occurred while delivering another",
    3: "DELIVERY_EV: an event could not be delivered",
    4: "UNEXPECTED_EXIT_REASON",
}


_SYNC_ALL = KVM_SYNC_X86_REGS | KVM_SYNC_X86_SREGS | KVM_SYNC_X86_EVENTS


@attrs.define(frozen=True, slots=True, eq=False)
class VcpuResetPlan:
    """A vCPU state with its kernel structures built once: what :meth:`KvmVcpu.reset` applies.

    Made by :meth:`KvmVcpu.plan_reset`; the structures are never modified, so one plan serves
    any number of resets.
    """

    state: VcpuState
    #: The special registers' APIC base: when the vCPU's differs, sregs cannot be staged.
    apic_base: int
    #: The ioctls of a reset that stages the special registers in ``kvm_run``.
    staged_sregs: tuple[PreparedIoctl, ...]
    #: The same with KVM_SET_SREGS after the MP state.
    with_sregs: tuple[PreparedIoctl, ...]


#: What a single port access calls: ``(device method, base, offset, data)``.
_PioTarget = tuple[Callable[[int, int, memoryview], object], int, int, memoryview]
#: Port exits whose dispatch the loop keeps per vCPU: a bound on what a guest can make it keep.
_PIO_TARGETS_CACHED = 1024


def _io_words(vcpu_fd: VcpuFd) -> tuple[int, int, int, int, int]:
    """The port exit now in ``kvm_run``: direction, size, port, count, data offset."""
    u32, u64 = vcpu_fd.run_words
    header = u32[8]
    return header & 0xFF, header >> 8 & 0xFF, header >> 16, u32[9], u64[5]


def _dispatch(handler: Callable[[int, memoryview], bool], port: int, size: int, count: int,
              data: memoryview) -> None:
    """Hand a port access to the bus, one element at a time for a string (``rep ins/outs``) one."""
    if count == 1:
        handler(port, data)
        return
    for i in range(0, size * count, size):
        handler(port, data[i:i + size])


__all__ = [
    "MAX_VCPUS", "VCPU_KICK_SIGNAL", "KvmVcpu", "Vcpu", "VcpuConfig", "VcpuConfigList",
    "VcpuRunState", "VmRunState", "setup_signal_handler",
]
