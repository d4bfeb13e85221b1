"""A VMM that boots a Linux kernel with a serial console, like rust-vmm's vmm-reference ``Vmm``.

:class:`VmmConfig` says what to boot (kernel, initrd, command line, memory, vCPUs, serial input and
output, CPUID template); :meth:`Vmm.run` builds guest memory with the 32-bit MMIO gap, a
:class:`~kvmlib.KvmVm`, the 16550A UART at COM1 (IRQ 4 through an irqfd) and the i8042 on the bus,
loads the kernel, starts the vCPUs and runs an event loop (``selectors``) over the serial input and
the VM's exit notifications until the guest stops, then shuts the VM down and releases everything.
A terminal given as serial input is put in raw mode for the guest and restored as it was found,
whatever happens.
"""

from __future__ import annotations

import enum
import logging
import os
import selectors
import termios
import threading
import time
import tty
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Union

import attrs
from typing_extensions import Self, override

from kvmlib.arch.x86_64.cpuid import CpuidEntry
from kvmlib.arch.x86_64.cpuid_features import CpuidTemplate, HideFeatures
from kvmlib.bus import IoManager, PioRange
from kvmlib.devices import (
    COM1_IRQ,
    COM1_PORT,
    I8042_COMMAND_PORT,
    I8042_DATA_PORT,
    EventFdTrigger,
    I8042Device,
    Serial,
)
from kvmlib.errors import KvmError, VcpuError
from kvmlib.exit_handler import ExitHandler
from kvmlib.ioctl import Hlt, Kvm, Shutdown, SystemEvent
from kvmlib.loader import (
    BootSetup,
    LoadedKernel,
    boot_state,
    configure_boot,
    guest_ram_ranges,
    load_kernel,
)
from kvmlib.memory import GuestMemoryMmap
from kvmlib.vcpu import MAX_VCPUS
from kvmlib.vm import KvmVm, VmConfig

log = logging.getLogger(__name__)

#: What the serial console writes to: a binary stream (flushed per write) or a callable.
SerialOutput = Union[BinaryIO, Callable[[bytes], None], None]
#: What the serial console reads from: a binary stream with a file descriptor, or a raw fd.
SerialInput = Union[BinaryIO, int, None]

#: Ctrl-A then ``x`` on a terminal stops the VM (the guest gets every other key, Ctrl-C included).
ESCAPE_CHAR = 0x01
_MIB = 1 << 20


class VmmConfigError(KvmError):
    """A :class:`VmmConfig` value is invalid; the message says which and why."""


def _existing_file(_inst: object, attribute: attrs.Attribute[Path], value: Path) -> None:
    if not value.is_file():
        raise VmmConfigError(f"{attribute.name} {value} is not a file")
    if not os.access(value, os.R_OK):
        raise VmmConfigError(f"{attribute.name} {value} is not readable (permissions)")


def _in_range(low: int, high: int) -> Callable[[object, attrs.Attribute[int], int], None]:
    def check(_inst: object, attribute: attrs.Attribute[int], value: int) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise VmmConfigError(f"{attribute.name} must be in {low}..{high}, not {value!r}")
    return check


def _optional_path(value: str | os.PathLike[str] | None) -> Path | None:
    return None if value is None else Path(value)


def _names(value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        value = value.split(",")
    return tuple(str(n).strip().lower() for n in value if str(n).strip())  # type: ignore[attr-defined]


@attrs.define(frozen=True, slots=True)
class VmmConfig:
    """What :class:`Vmm` boots.

    Attributes:
        kernel: a bzImage or ELF vmlinux.
        initrd: an initramfs / initrd image, or None.
        cmdline: the kernel command line.
        memory_mib: guest RAM in MiB (split around the MMIO gap below 4 GiB when large).
        num_vcpus: how many vCPUs.
        serial_input: where the console's input comes from (None: no input).
        serial_output: where the console's output goes (None: discarded).
        hide_cpuid: CPUID feature flags to hide from the guest, named as in /proc/cpuinfo.
        cpuid_template: any further CPUID adaptation, applied after ``hide_cpuid``.
    """

    kernel: Path = attrs.field(converter=Path, validator=_existing_file)
    initrd: Path | None = attrs.field(default=None, converter=_optional_path,
                                      validator=attrs.validators.optional(_existing_file))
    cmdline: str = "console=ttyS0 reboot=k panic=1"
    memory_mib: int = attrs.field(default=256, validator=_in_range(16, 1 << 20))
    num_vcpus: int = attrs.field(default=1, validator=_in_range(1, MAX_VCPUS))
    serial_input: SerialInput = None
    serial_output: SerialOutput = None
    hide_cpuid: tuple[str, ...] = attrs.field(default=(), converter=_names)
    cpuid_template: CpuidTemplate | None = None

    @hide_cpuid.validator
    def _known_flags(self, _attribute: attrs.Attribute[tuple[str, ...]],
                     value: tuple[str, ...]) -> None:
        try:
            HideFeatures(value)
        except ValueError as e:
            raise VmmConfigError(str(e)) from None

    def template(self) -> CpuidTemplate | None:
        """The CPUID template the VM is built with: ``hide_cpuid``, then ``cpuid_template``."""
        hide = HideFeatures(self.hide_cpuid) if self.hide_cpuid else None
        extra = self.cpuid_template
        if hide is None or extra is None:
            return hide or extra

        def both(entries: tuple[CpuidEntry, ...]) -> tuple[CpuidEntry, ...]:
            return extra(hide(entries))
        return both


class VmmExitReason(enum.Enum):
    """Why :meth:`Vmm.run` returned."""

    #: The guest reset the machine through the i8042 (``reboot`` on Linux).
    RESET = "reset by the guest (i8042 CPU reset)"
    #: A vCPU triple-faulted (KVM_EXIT_SHUTDOWN), which also ends a ``reboot=t`` guest.
    TRIPLE_FAULT = "triple fault (KVM_EXIT_SHUTDOWN)"
    #: A vCPU halted and KVM returned it (only without an in-kernel irqchip).
    HALT = "halted"
    #: KVM reported a system event (shutdown / reset / crash).
    SYSTEM_EVENT = "system event"
    #: A vCPU failed: a KVM internal error, a failed entry, a device exception.
    ERROR = "vCPU error"
    #: :meth:`Vmm.stop` was called, or Ctrl-A x was typed on the console.
    STOPPED = "stopped by the host"
    #: The ``timeout`` given to :meth:`Vmm.run` passed.
    TIMEOUT = "timed out"


@attrs.define(frozen=True, slots=True)
class VmmResult:
    """What :meth:`Vmm.run` returns.

    Attributes:
        reason: why the VM stopped.
        seconds: how long the guest ran.
        error: the vCPU error when ``reason`` is ERROR (exit, RIP, vCPU id are on it).
        kernel: the kernel as loaded.
        boot: where the boot put things.
    """

    reason: VmmExitReason
    seconds: float
    error: VcpuError | None
    kernel: LoadedKernel
    boot: BootSetup

    def describe(self) -> str:
        """One line for a person."""
        text = f"guest stopped after {self.seconds:.1f} s: {self.reason.value}"
        if self.error is not None:
            text += f": {self.error}"
        return text


class _Wakeup(ExitHandler):
    """The exit handler: wakes the event loop through an eventfd."""

    def __init__(self) -> None:
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    @override
    def kick(self) -> None:
        """A vCPU ended (or someone wants the loop to look): wake the loop."""
        os.eventfd_write(self.fd, 1)

    def drain(self) -> None:
        try:
            os.eventfd_read(self.fd)
        except BlockingIOError:
            pass

    def close(self) -> None:
        os.close(self.fd)


class Vmm:
    """Boots :class:`VmmConfig`'s kernel; :meth:`run` returns when the guest stops.

    Args:
        config: what to boot.
        kvm: an open ``/dev/kvm`` to use (one is opened and closed otherwise).
    """

    def __init__(self, config: VmmConfig, kvm: Kvm | None = None) -> None:
        self.config = config
        self._kvm = kvm
        self._reason: VmmExitReason | None = None
        self._reason_lock = threading.Lock()
        self._wakeup: _Wakeup | None = None
        #: The serial console device, once :meth:`run` has built it.
        self.serial: Serial | None = None

    def _finish(self, reason: VmmExitReason) -> None:
        with self._reason_lock:
            if self._reason is None:
                self._reason = reason
        if self._wakeup is not None:
            self._wakeup.kick()

    def stop(self) -> None:
        """Make :meth:`run` stop the VM and return (thread-safe; a no-op once it has)."""
        self._finish(VmmExitReason.STOPPED)

    def run(self, timeout: float | None = None) -> VmmResult:
        """Boot the kernel and serve the console until the guest stops, then release everything.

        Args:
            timeout: stop the VM after this many seconds (None: never).

        Raises:
            LoaderError: the kernel or initrd cannot be loaded (nothing was started).
            KvmError: KVM refused to build the VM.
        """
        cfg = self.config
        kvm = self._kvm if self._kvm is not None else Kvm()
        try:
            with GuestMemoryMmap.from_ranges(guest_ram_ranges(cfg.memory_mib * _MIB)) as memory:
                kernel = load_kernel(memory, cfg.kernel)
                boot = configure_boot(memory, kernel, cfg.cmdline, initrd=cfg.initrd)
                log.info("loaded %s kernel at %#x, entry %#x", kernel.kind.value, kernel.load_addr,
                         kernel.entry)
                return self._boot(kvm, memory, kernel, boot, timeout)
        finally:
            if self._kvm is None:
                kvm.close()

    def _boot(self, kvm: Kvm, memory: GuestMemoryMmap, kernel: LoadedKernel, boot: BootSetup,
              timeout: float | None) -> VmmResult:
        cfg = self.config
        self._reason = None
        wakeup = self._wakeup = _Wakeup()
        trigger = EventFdTrigger()
        bus = IoManager()
        self.serial = serial = Serial(trigger, cfg.serial_output)
        bus.register_pio(PioRange(COM1_PORT, 8), serial)
        i8042 = I8042Device(lambda: self._finish(VmmExitReason.RESET))
        bus.register_pio(PioRange(I8042_DATA_PORT, 1), i8042)
        bus.register_pio(PioRange(I8042_COMMAND_PORT, 1), i8042)
        try:
            vm_config = VmConfig.from_kvm(kvm, cfg.num_vcpus, cfg.template())
            with KvmVm.new(kvm, vm_config, memory, wakeup, bus) as vm:
                vm.fd.register_irqfd(trigger.fd, COM1_IRQ)
                vm.load_boot_state(boot_state(boot))
                with _Console(cfg.serial_input, serial, self.stop) as console:
                    started = time.monotonic()
                    vm.run()
                    self._loop(vm, wakeup, console, timeout, started)
                    error = self._shutdown(vm)
                    seconds = time.monotonic() - started
                reason = self._reason or VmmExitReason.STOPPED
                return VmmResult(reason, seconds, error, kernel, boot)
        finally:
            self._wakeup = None
            wakeup.close()
            trigger.close()

    def _loop(self, vm: KvmVm, wakeup: _Wakeup, console: _Console, timeout: float | None,
              started: float) -> None:
        with selectors.DefaultSelector() as sel:
            sel.register(wakeup.fd, selectors.EVENT_READ, "wakeup")
            # A regular file or /dev/null cannot be polled (epoll refuses it) but never blocks:
            # it is read on every turn of the loop until its end.
            unpollable = False
            if console.fd is not None:
                try:
                    sel.register(console.fd, selectors.EVENT_READ, "input")
                except PermissionError:
                    unpollable = True
            while self._reason is None:
                if unpollable:
                    unpollable = console.read()
                wait = None if timeout is None else max(0.0, started + timeout - time.monotonic())
                if console.pending or unpollable:  # offer the rest again soon
                    wait = 0.01 if wait is None else min(wait, 0.01)
                events = sel.select(wait)
                for key, _ in events:
                    if key.data == "wakeup":
                        # Only a vCPU that ended or _finish (which sets the reason first) wakes us.
                        wakeup.drain()
                        self._finish(self._vcpu_reason(vm))
                    elif not console.read():
                        sel.unregister(key.fd)  # end of input
                console.flush_pending()
                if timeout is not None and time.monotonic() >= started + timeout:
                    self._finish(VmmExitReason.TIMEOUT)

    @staticmethod
    def _vcpu_reason(vm: KvmVm) -> VmmExitReason:
        if vm.errors:
            return VmmExitReason.ERROR
        for vcpu in vm.vcpus:
            if isinstance(vcpu.exit_reason, Shutdown):
                return VmmExitReason.TRIPLE_FAULT
            if isinstance(vcpu.exit_reason, SystemEvent):
                return VmmExitReason.SYSTEM_EVENT
            if isinstance(vcpu.exit_reason, Hlt):
                return VmmExitReason.HALT
        return VmmExitReason.STOPPED

    def _shutdown(self, vm: KvmVm) -> VcpuError | None:
        try:
            vm.shutdown()
        except VcpuError as e:
            with self._reason_lock:
                self._reason = VmmExitReason.ERROR
            return e
        return None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


class _Console:
    """The serial input side: raw terminal mode while running, stdin bytes into the UART."""

    def __init__(self, source: SerialInput, serial: Serial, stop: Callable[[], None]) -> None:
        self.fd: int | None = None if source is None else (
            source if isinstance(source, int) else source.fileno())
        self._serial = serial
        self._stop = stop
        self._saved: list[Any] | None = None
        self._escape = False
        self.pending = b""

    def __enter__(self) -> Self:
        if self.fd is not None and os.isatty(self.fd):
            self._saved = termios.tcgetattr(self.fd)
            tty.setraw(self.fd, termios.TCSANOW)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._saved is not None and self.fd is not None:
            termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)

    def read(self) -> bool:
        """Move available input into the UART; False at end of input."""
        assert self.fd is not None
        try:
            data = os.read(self.fd, 4096)
        except BlockingIOError:
            return True
        if not data:
            return False
        if self._saved is not None:
            data = self._filter_escape(data)
        self.pending += data
        self.flush_pending()
        return True

    def _filter_escape(self, data: bytes) -> bytes:
        out = bytearray()
        for byte in data:
            if self._escape:
                self._escape = False
                if byte in (ord("x"), ord("X")):
                    self._stop()
                    continue
                if byte != ESCAPE_CHAR:
                    out.append(ESCAPE_CHAR)
            elif byte == ESCAPE_CHAR:
                self._escape = True
                continue
            out.append(byte)
        return bytes(out)

    def flush_pending(self) -> None:
        if self.pending:
            taken = self._serial.enqueue_input(self.pending)
            self.pending = self.pending[taken:]


__all__ = [
    "ESCAPE_CHAR", "SerialInput", "SerialOutput", "Vmm", "VmmConfig", "VmmConfigError",
    "VmmExitReason", "VmmResult",
]
