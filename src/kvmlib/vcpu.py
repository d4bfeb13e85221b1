"""One vCPU: its configuration, creation on x86-64, the exit loop, and the shared run state.

The shape follows rust-vmm's vmm-reference ``KvmVcpu``: every vCPU thread waits on a barrier until all
exist, then calls KVM_RUN in a loop, handing port and MMIO exits to the bus. A VM-wide
:class:`VcpuRunState` (a state under a condition variable) tells each vCPU, when a signal or
``immediate_exit`` kicks it out of KVM_RUN, whether to go back in, park, or return.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import signal
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from types import FrameType
from typing import Protocol, runtime_checkable

import attrs
from typing_extensions import Unpack

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
from kvmlib.errors import KvmIoctlError, VcpuError, VmError
from kvmlib.exit_handler import ExitHandler
from kvmlib.ioctl import (
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
    RegsFields,
    Shutdown,
    SregsFields,
    SystemEvent,
    VcpuExit,
    VmFd,
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
)
from kvmlib.memory import GuestAddress
from kvmlib.runstate import VcpuRunState, VmRunState
from kvmlib.state import VcpuState

log = logging.getLogger(__name__)

#: The signal that kicks a vCPU thread out of KVM_RUN (``SIGRTMIN + 0``, as in vmm-reference).
VCPU_KICK_SIGNAL = signal.SIGRTMIN

#: The MP table (and so an x86 VM) addresses at most this many vCPUs.
MAX_VCPUS = 254


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
        self._thread_ident: int | None = None
        self.vcpu_fd = vm_fd.create_vcpu(config.id)
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

    def _loop(self) -> None:
        # The hot path: names bound once, exit types compared by identity.
        run = self.vcpu_fd.run
        bus = self.bus
        pio_write, pio_read = bus.pio_write, bus.pio_read
        state = self.run_state
        owner = self.exit_handler
        # Skip the call per exit when the handler keeps the default (handles nothing).
        handle_exit = None if owner is None or type(owner).handle_exit is ExitHandler.handle_exit \
            else owner.handle_exit
        while True:
            try:
                exit_ = run()
            except KvmIoctlError as e:
                if e.errno == errno.EAGAIN:
                    continue
                raise
            # Most frequent first: port and MMIO exits are the hot path. Exact type checks (the
            # exits are final) and single accesses dispatched inline save calls per exit.
            kind = type(exit_)
            if kind is IoOut or kind is IoIn:
                io: IoOut = exit_  # type: ignore[assignment]  # IoIn has the same fields
                port, size, count, data = io
                handler = pio_write if kind is IoOut else pio_read
                if count == 1:
                    handler(port, data)
                else:
                    _dispatch(handler, port, size, count, data)
            elif isinstance(exit_, MmioWrite):
                bus.mmio_write(exit_.address, exit_.data)
            elif isinstance(exit_, MmioRead):
                bus.mmio_read(exit_.address, exit_.data)
            elif isinstance(exit_, Intr):
                self.vcpu_fd.set_immediate_exit(False)
                current = state.state
                if current is VmRunState.SUSPENDING:
                    current = state.park()
                if current is VmRunState.EXITING:
                    return
            else:
                # Every other exit is offered to the exit handler first: a harness may handle
                # breakpoints, MSR accesses or hypercalls and keep the guest running.
                if handle_exit is not None and handle_exit(self, exit_):
                    continue
                if isinstance(exit_, (Hlt, Shutdown, SystemEvent)):
                    self.exit_reason = exit_
                    log.debug("vCPU %d stopped: %r", self.id, exit_)
                    state.set_and_notify(VmRunState.EXITING)
                    return
                # Errors and exits nobody handled: never retried, never spun on.
                raise self._exit_error(exit_)

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
            insn = _failed_instruction(exit_)
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


def _failed_instruction(exit_: InternalError) -> bytes | None:
    """The bytes KVM could not emulate, when it reported them.

    With ``KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES`` in ``data[0]``, the next 16 bytes
    of the data hold the instruction's length, then the instruction.
    """
    if exit_.suberror != 1 or len(exit_.data) < 3 or not exit_.data[0] & 1:
        return None
    raw = b"".join((word & (1 << 64) - 1).to_bytes(8, "little") for word in exit_.data[1:3])
    return raw[1:1 + min(raw[0], 15)]


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
