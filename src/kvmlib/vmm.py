"""A VMM that boots a Linux kernel with a serial console, like rust-vmm's vmm-reference ``Vmm``.

:class:`VmmConfig` says what to boot (kernel, initrd, command line, memory, vCPUs, serial input and
output, CPUID template). :meth:`Vmm.start` builds guest memory with the 32-bit MMIO gap, a
:class:`~kvmlib.KvmVm`, the 16550A UART at COM1 (IRQ 4 through an irqfd) and the i8042 on the bus,
loads the kernel, starts the vCPUs and returns with the guest running; an event loop
(``selectors``) on its own thread feeds console input to the UART and notices when the guest stops.
A program then drives the guest through :attr:`Vmm.console` (:meth:`Console.expect`,
:meth:`Console.send`) and :attr:`Vmm.vm`, and :meth:`Vmm.close` releases everything.

A CPUID flag named in ``hide_cpuid`` that the guest still sees once KVM has taken the CPUID (the
host's KVM forces some on) is logged as a warning and listed in :attr:`Vmm.forced_cpuid`.

:meth:`Vmm.run` is the same parts with the event loop on the caller's thread, for a person at a
terminal: a terminal given as serial input is put in raw mode for the guest and restored as it was
found, whatever happens.
"""

from __future__ import annotations

import codecs
import contextlib
import enum
import logging
import os
import re
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

from kvmlib._kvm_stats import VcpuCounters
from kvmlib.arch.x86_64.cpuid import CpuidEntry, entries_from_kvm_cpuid2
from kvmlib.arch.x86_64.cpuid_features import CpuidTemplate, HideFeatures, feature_bit
from kvmlib.bus import IoManager, PioRange
from kvmlib.devices import (
    COM1_IRQ,
    COM1_PORT,
    I8042_COMMAND_PORT,
    I8042_DATA_PORT,
    SERIAL_PORT_COUNT,
    EventFdTrigger,
    I8042Device,
    Serial,
)
from kvmlib.errors import ClosedError, KvmError, VcpuError, VmError
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
#: The guest RAM :class:`VmmConfig` accepts, in MiB.
MIN_MEMORY_MIB, MAX_MEMORY_MIB = 16, 1 << 20
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
    memory_mib: int = attrs.field(default=256, validator=_in_range(MIN_MEMORY_MIB, MAX_MEMORY_MIB))
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
    """Why the guest stopped (:attr:`VmmResult.reason`)."""

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
    #: :meth:`Vmm.stop` or :meth:`Vmm.close` was called, or Ctrl-A x was typed on the console.
    STOPPED = "stopped by the host"
    #: The ``timeout`` given to :meth:`Vmm.run` passed.
    TIMEOUT = "timed out"


@attrs.define(frozen=True, slots=True)
class VmmResult:
    """How the guest ended: what :meth:`Vmm.run`, :meth:`Vmm.wait` and :meth:`Vmm.stop` return.

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


class VmmStateError(VmError):
    """A :class:`Vmm` call made at the wrong point of its life; the message says what to do.

    For example ``vm`` before :meth:`Vmm.start`, :meth:`Vmm.run` after it, or a blocking call
    from ``serial_output`` on a vCPU thread.
    """


class ConsoleError(KvmError):
    """:meth:`Console.expect` did not find its pattern; the message shows the console's last lines.

    Attributes:
        pattern: what was expected, as given.
        tail: the console's last lines when it gave up.
    """

    def __init__(self, message: str, pattern: object, tail: str) -> None:
        super().__init__(message)
        self.pattern = pattern
        self.tail = tail

    def __reduce__(self) -> tuple[object, ...]:
        return type(self), (str(self), self.pattern, self.tail)


# Named as pexpect names them (TIMEOUT, EOF): the names a test author reaches for.
class ConsoleTimeout(ConsoleError):  # noqa: N818
    """The pattern did not appear on the console within the timeout (pexpect's ``TIMEOUT``)."""


class ConsoleEOF(ConsoleError):  # noqa: N818
    """The guest stopped, or the VM was closed, before the pattern appeared (pexpect's ``EOF``).

    Also raised by :meth:`Console.send` once nothing reads the console any more.
    """


#: What :meth:`Console.expect` looks for: text or bytes (searched for literally), or a compiled
#: regular expression of either kind.
Pattern = Union[str, bytes, re.Pattern[str], re.Pattern[bytes]]

#: How many of the console's last lines a :class:`ConsoleError` message shows.
TAIL_LINES = 12

# Set while kvmlib calls the user's serial_output on a vCPU thread: a blocking Vmm call made from
# there would wait for that very thread to end.
_on_vcpu = threading.local()


class Console:
    """The guest's serial console (COM1, ``ttyS0``), kept in memory for a program to drive.

    Everything the guest writes is appended to :attr:`output` (and still goes to
    ``VmmConfig.serial_output``); :meth:`expect` waits for a pattern in what has not been consumed
    yet, and :meth:`send` types into the UART. Every method may be called from any thread.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._data = bytearray()
        # Output before this offset has been consumed by a successful expect().
        self._pos = 0
        self._ended: str | None = None
        # One expect() at a time: each consumes what it matched, so two at once would race.
        self._expect_lock = threading.Lock()
        self._input_lock = threading.Lock()
        self._input = bytearray()
        self._serial: Serial | None = None
        self._poke: Callable[[], None] | None = None

    # ---- reading ----------------------------------------------------------------------------

    @property
    def output(self) -> bytes:
        """Everything the guest has written to the console so far."""
        with self._cond:
            return bytes(self._data)

    @property
    def text(self) -> str:
        """:attr:`output` decoded as UTF-8 (undecodable bytes become U+FFFD)."""
        return self.output.decode("utf-8", "replace")

    @property
    def ended(self) -> bool:
        """Whether the guest has stopped (or the VM was closed): no more output will come."""
        return self._ended is not None

    def expect(self, pattern: Pattern, timeout: float | None = 30.0) -> re.Match[Any]:
        """Wait until ``pattern`` appears in the output not consumed yet, and consume up to it.

        The search covers the output after the previous successful match (or from the start),
        so successive calls move forward, as with pexpect; output printed before the guest
        stopped is still searched after it stopped.

        Args:
            pattern: a ``str`` or ``bytes`` is searched for literally; a compiled ``re.Pattern``
                (of ``str`` or ``bytes``) is searched as a regular expression. A ``str`` pattern
                sees the output decoded as UTF-8 (undecodable bytes as lone surrogates, as
                ``surrogateescape`` does), so its match offsets are in characters.
            timeout: how many seconds to wait; None waits until the guest stops.

        Returns:
            The match; its ``string`` is the output searched (everything after the previous
            match up to what had arrived), so ``m.string[:m.start()]`` is what came before it.

        Raises:
            ConsoleTimeout: the pattern did not appear within ``timeout``.
            ConsoleEOF: the guest stopped or the VM was closed first (raised as soon as it
                happens, not at the timeout).
            TypeError: ``pattern`` is of another type.
        """
        regex, literal = _compile(pattern)
        wait = -1.0 if timeout is None else max(0.0, timeout)
        deadline = None if timeout is None else time.monotonic() + wait
        if not self._expect_lock.acquire(timeout=wait):
            raise self._error(ConsoleTimeout, pattern, f"did not appear on the console within "
                              f"{timeout} s (another thread's expect() held the console)")
        try:
            return self._expect(pattern, regex, literal, deadline, timeout)
        finally:
            self._expect_lock.release()

    def _expect(self, pattern: Pattern, regex: re.Pattern[Any], literal: int | None,
                deadline: float | None, timeout: float | None) -> re.Match[Any]:
        text = isinstance(regex.pattern, str)
        decoder = codecs.getincrementaldecoder("utf-8")("surrogateescape") if text else None
        searched: Any = "" if text else b""
        with self._cond:
            start = seen = self._pos
        search_from = 0
        while True:
            with self._cond:
                while len(self._data) == seen and self._ended is None:
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        break
                    self._cond.wait(remaining)
                chunk = bytes(self._data[seen:])
                seen += len(chunk)
                ended = self._ended
            # Search outside the lock: vCPU threads append output under it.
            if decoder is not None:
                searched += decoder.decode(chunk, final=ended is not None)
            else:
                searched += chunk
            match = regex.search(searched, search_from)
            if match is not None:
                consumed = match.end() if decoder is None else \
                    len(searched[:match.end()].encode("utf-8", "surrogateescape"))
                with self._cond:
                    self._pos = start + consumed
                return match
            if literal is not None:
                # A literal cannot start earlier than this in a longer buffer; a regular
                # expression may (lookbehind, anchors), so it is searched whole each time.
                search_from = max(0, len(searched) - literal + 1)
            if ended is not None:
                raise self._error(ConsoleEOF, pattern, f"did not appear before {ended}")
            if deadline is not None and time.monotonic() >= deadline:
                raise self._error(ConsoleTimeout, pattern,
                                  f"did not appear on the console within {timeout} s")

    def _error(self, kind: type[ConsoleError], pattern: Pattern, what: str) -> ConsoleError:
        with self._cond:
            data = bytes(self._data)
            fresh = len(self._data) - self._pos
        tail = _tail(data)
        if not data:
            said = "the console printed nothing"
        else:
            said = (f"the {fresh} byte{'s' if fresh != 1 else ''} after the previous match were "
                    f"searched. The console's last lines:\n{_quote(tail)}")
        return kind(f"{pattern!r} {what}; {said}", pattern, tail)

    # ---- writing ----------------------------------------------------------------------------

    def send(self, data: str | bytes) -> None:
        """Type ``data`` into the UART (a ``str`` is sent as UTF-8); returns at once.

        What the UART's receive FIFO cannot take yet is kept, in order, and fed to it as the guest
        reads. Sent before :meth:`Vmm.start`, it waits for the UART.

        Raises:
            ConsoleEOF: the guest has stopped or the VM was closed.
            TypeError: ``data`` is neither ``str`` nor bytes-like.
        """
        if isinstance(data, str):
            raw = data.encode()
        elif isinstance(data, (bytes, bytearray, memoryview)):
            raw = bytes(data)
        else:
            raise TypeError(f"send() takes str or bytes, not {type(data).__name__}")
        ended = self._ended
        if ended is not None:
            raise ConsoleEOF(f"cannot send {raw!r}: {ended}", None, _tail(self.output))
        self._feed(raw)

    def _feed(self, data: bytes) -> None:
        with self._input_lock:
            self._input += data
        if self._flush_input():
            poke = self._poke
            if poke is not None:
                poke()  # the event loop offers the rest again as the guest reads

    def _flush_input(self) -> bool:
        """Offer pending input to the UART; whether some is still waiting."""
        with self._input_lock:
            serial = self._serial
            if serial is not None and self._input:
                del self._input[:serial.enqueue_input(bytes(self._input))]
            return bool(self._input)

    # ---- the Vmm's side ---------------------------------------------------------------------

    def _attach(self, serial: Serial, poke: Callable[[], None]) -> None:
        with self._input_lock:
            self._serial, self._poke = serial, poke

    def _append(self, data: bytes) -> None:
        with self._cond:
            self._data += data
            self._cond.notify_all()

    def _end(self, why: str) -> None:
        with self._cond:
            if self._ended is None:
                self._ended = why
            self._cond.notify_all()
        with self._input_lock:
            self._serial = self._poke = None
            self._input.clear()


def _compile(pattern: Pattern) -> tuple[re.Pattern[Any], int | None]:
    """The regular expression to search, and for a literal its length in the searched form."""
    if isinstance(pattern, re.Pattern):
        return pattern, None
    if isinstance(pattern, str):
        return re.compile(re.escape(pattern)), len(pattern)
    if isinstance(pattern, (bytes, bytearray)):
        return re.compile(re.escape(bytes(pattern))), len(pattern)
    raise TypeError(f"expect() takes str, bytes or a compiled re.Pattern, not "
                    f"{type(pattern).__name__}")


def _tail(data: bytes, lines: int = TAIL_LINES) -> str:
    return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])


def _quote(tail: str) -> str:
    return "\n".join(f"  | {line}" for line in tail.splitlines())


class _Wakeup(ExitHandler):
    """The exit handler: wakes the event loop through an eventfd."""

    def __init__(self) -> None:
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        # Pokes come from any thread, even after close (a late stop()): they must never write to
        # a closed fd number that the process has since reused.
        self._lock = threading.Lock()
        self._closed = False
        #: Set once a vCPU's loop has ended (rather than someone wanting the loop to look).
        self.vcpu_ended = False

    @override
    def kick(self) -> None:
        """A vCPU ended: wake the loop."""
        self.vcpu_ended = True
        self.poke()

    def poke(self) -> None:
        """Make the loop look at the VM and the console input again."""
        with self._lock:
            if not self._closed:
                os.eventfd_write(self.fd, 1)

    def poke_from_signal(self) -> None:
        """:meth:`poke` without the lock, for a signal handler on the thread that closes it.

        The handler may have interrupted that very thread inside :meth:`poke` or :meth:`close`,
        with the lock held: taking it would deadlock. Running on the closing thread, it sees
        either the fd still open or ``_closed`` already set, never a reused fd number.
        """
        if not self._closed:
            try:
                os.eventfd_write(self.fd, 1)
            except OSError:
                pass  # the counter is full: the loop has a wakeup to read anyway

    def drain(self) -> None:
        try:
            os.eventfd_read(self.fd)
        except BlockingIOError:
            pass

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                os.close(self.fd)


class _Life(enum.Enum):
    NEW = "not started"
    STARTED = "started"
    CLOSED = "closed"


class Vmm:
    """Boots :class:`VmmConfig`'s kernel with a serial console, for a program or a person.

    A program calls :meth:`start`, which returns with the guest running, then drives it through
    :attr:`console` (:meth:`Console.expect`, :meth:`Console.send`) and :attr:`vm` (pause, save,
    snapshot, registers) and ends it with :meth:`close` (or ``with``). A person uses :meth:`run`,
    which serves the console on a terminal until the guest stops.

    Every method may be called from any thread, any number of times.

    Args:
        config: what to boot.
        kvm: an open ``/dev/kvm`` to use (one is opened, and closed by :meth:`close`, otherwise).
    """

    def __init__(self, config: VmmConfig, kvm: Kvm | None = None) -> None:
        self.config = config
        self._kvm = kvm
        # Serialises start()/run()'s building and close()'s releasing; never taken on a vCPU
        # thread, so close() may hold it while the vCPUs are joined.
        self._lock = threading.Lock()
        # Guards _life and _reason: what stop() and the vCPUs' callbacks touch.
        self._state_lock = threading.Lock()
        self._life = _Life.NEW
        self._reason: VmmExitReason | None = None
        self._resources = contextlib.ExitStack()
        self._vm: KvmVm | None = None
        self._kernel: LoadedKernel | None = None
        self._boot: BootSetup | None = None
        self._wakeup: _Wakeup | None = None
        self._loop_thread: threading.Thread | None = None
        self._started = 0.0
        self._result: VmmResult | None = None
        self._done = threading.Event()
        self._console = Console()
        self._forced_cpuid: tuple[str, ...] = ()
        self._counters: VcpuCounters | None = None
        # Set by _stop_from_signal; read by the event loop on each turn.
        self._signal_stop = False
        #: The serial console device, once :meth:`start` or :meth:`run` has built it.
        self.serial: Serial | None = None

    # ---- what a program drives --------------------------------------------------------------

    @property
    def console(self) -> Console:
        """The serial console: output in memory, :meth:`~Console.expect`, :meth:`~Console.send`."""
        return self._console

    @property
    def vm(self) -> KvmVm:
        """The running :class:`~kvmlib.KvmVm`: pause, resume, save_state, snapshot, registers.

        Raises:
            VmmStateError: :meth:`start` has not built it yet.
            ClosedError: the Vmm is closed (after :meth:`close`, or once :meth:`run` returned).
        """
        vm, life = self._vm, self._life
        if life is _Life.CLOSED:
            raise ClosedError("the Vmm is closed: its VM was shut down and released")
        if vm is None:
            raise VmmStateError("the Vmm has no VM yet: call start() first")
        return vm

    @property
    def kernel(self) -> LoadedKernel:
        """Where the kernel was loaded (its entry point, load address); after :meth:`start`."""
        if self._kernel is None:
            raise VmmStateError("no kernel is loaded yet: call start() first")
        return self._kernel

    @property
    def boot(self) -> BootSetup:
        """Where the boot put the zero page, command line and initrd; after :meth:`start`."""
        if self._boot is None:
            raise VmmStateError("nothing is booted yet: call start() first")
        return self._boot

    @property
    def result(self) -> VmmResult | None:
        """How the guest ended, once it has (None while it runs or before :meth:`start`)."""
        return self._result if self._done.is_set() else None

    @property
    def forced_cpuid(self) -> tuple[str, ...]:
        """The ``hide_cpuid`` flags the guest still sees: this host's KVM forces them on.

        Read back from every vCPU once KVM has taken the CPUID (``KVM_GET_CPUID2``); each is also
        logged as a warning. Empty before :meth:`start` or :meth:`run` has built the VM.
        """
        return self._forced_cpuid

    def exit_count(self) -> int | None:
        """How many times the guest's vCPUs have exited to KVM so far, summed over the vCPUs.

        KVM's binary statistics (``KVM_GET_STATS_FD``, Linux 5.14+), read without disturbing the
        guest: two readings a second apart give the exit rate. None before the VM is built,
        after :meth:`close`, or where KVM does not offer the counter.
        """
        counters = self._counters
        return None if counters is None else counters.read()

    def start(self) -> None:
        """Build memory, load the kernel, build the VM and its devices, start the vCPUs; return.

        The guest then runs on its vCPU threads, and one more thread (``kvmlib-vmm``) feeds the
        console input to the UART and notices when the guest stops. The terminal is left alone:
        the console is in memory (:attr:`console`), and also goes to ``serial_output`` and comes
        from ``serial_input`` when the configuration names them. Calling it again does nothing.

        Raises:
            LoaderError: the kernel or initrd cannot be loaded (nothing was started).
            KvmError: KVM refused to build the VM (nothing is left open).
            ClosedError: the Vmm is closed.
        """
        with self._lock:
            if self._life is not _Life.NEW:
                self._check_open()
                return
            self._build()
            try:
                self._launch()
                thread = threading.Thread(target=self._serve_in_background, name="kvmlib-vmm",
                                          daemon=True)
                thread.start()
                self._loop_thread = thread
            except BaseException:
                self._finalize()
                raise

    def wait(self, timeout: float | None = None) -> VmmResult | None:
        """Wait until the guest stops; its result, or None if ``timeout`` seconds passed first.

        Raises:
            VmmStateError: not started, or called from ``serial_output`` on a vCPU thread (it
                would wait for itself).
        """
        self._check_blocking_allowed("wait()")
        if self._life is not _Life.STARTED and not self._done.is_set():
            raise VmmStateError("wait() without start(): there is no guest to wait for")
        return self._result if self._done.wait(timeout) else None

    def stop(self) -> VmmResult | None:
        """Stop the VM and return its result; a no-op (returning the result) once it has stopped.

        From ``serial_output`` on a vCPU thread it only asks the VM to stop and returns None
        (waiting there would deadlock); before :meth:`start` it does nothing and returns None.
        """
        with self._state_lock:
            if self._life is not _Life.STARTED and not self._done.is_set():
                return None  # never started (or closed unstarted): nothing to stop
        self._finish(VmmExitReason.STOPPED)
        if getattr(_on_vcpu, "active", False):
            return None
        self._done.wait()
        return self._result

    def close(self) -> None:
        """Stop the VM if it runs, then release everything: threads, fds, eventfds, memory.

        Idempotent; a concurrent call returns once the first has finished. A pending
        :meth:`Console.expect` raises :class:`ConsoleEOF`.

        Raises:
            VmmStateError: called from ``serial_output`` on a vCPU thread (it cannot join itself;
                call :meth:`stop` there).
        """
        self._check_blocking_allowed("close()")
        with self._lock:
            if self._life is _Life.CLOSED:
                return
            try:
                if self._life is _Life.STARTED:
                    self._finish(VmmExitReason.STOPPED)
                    self._done.wait()
                    if self._loop_thread is not None:
                        self._loop_thread.join()
            finally:
                with self._state_lock:
                    self._life = _Life.CLOSED
                self._console._end("the VM was closed")
                self._wakeup = None
                self._resources.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # ---- what a person uses -----------------------------------------------------------------

    def run(self, timeout: float | None = None) -> VmmResult:
        """Boot the kernel and serve the console until the guest stops, then release everything.

        :meth:`start`'s parts, with the event loop on the calling thread: a terminal given as
        ``serial_input`` is put in raw mode (Ctrl-A x stops the VM) and restored as it was found,
        whatever happens. :attr:`console` records the output here too.

        Args:
            timeout: stop the VM after this many seconds (None: never).

        Raises:
            LoaderError: the kernel or initrd cannot be loaded (nothing was started).
            KvmError: KVM refused to build the VM.
            VmmStateError: :meth:`start` or :meth:`run` was called before.
            ClosedError: the Vmm is closed.
        """
        with self._lock:
            if self._life is not _Life.NEW:
                self._check_open()
                raise VmmStateError("run() boots the VM itself and cannot follow start() or "
                                    "another run(): use wait() and close()")
            self._build()
        try:
            with _Terminal(self.config.serial_input, self._console,
                           lambda: self._finish(VmmExitReason.STOPPED)) as terminal:
                self._launch()
                deadline = None if timeout is None else self._started + timeout
                self._serve(terminal, deadline)
        finally:
            if not self._done.is_set():  # the terminal could not be set up, or the vCPUs started
                self._finalize()
            self.close()
        assert self._result is not None
        return self._result

    # ---- inside -----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._life is _Life.CLOSED:
            raise ClosedError("the Vmm is closed; build a new one to boot again")

    @staticmethod
    def _check_blocking_allowed(call: str) -> None:
        if getattr(_on_vcpu, "active", False):
            raise VmmStateError(f"{call} cannot be called from serial_output on a vCPU thread: "
                                "it would wait for that thread; call stop() there")

    def _build(self) -> None:
        """Memory, kernel, devices and VM, with the vCPUs created but not started."""
        self._check_open()
        cfg = self.config
        stack = contextlib.ExitStack()
        try:
            kvm = self._kvm if self._kvm is not None else stack.enter_context(Kvm())
            memory = stack.enter_context(
                GuestMemoryMmap.from_ranges(guest_ram_ranges(cfg.memory_mib * _MIB)))
            kernel = load_kernel(memory, cfg.kernel)
            boot = configure_boot(memory, kernel, cfg.cmdline, initrd=cfg.initrd)
            log.info("loaded %s kernel at %#x, entry %#x", kernel.kind.value, kernel.load_addr,
                     kernel.entry)
            wakeup = _Wakeup()
            stack.callback(wakeup.close)
            trigger = stack.enter_context(EventFdTrigger())
            bus = IoManager()
            serial = Serial(trigger, _tee(self._console, cfg.serial_output))
            bus.register_pio(PioRange(COM1_PORT, SERIAL_PORT_COUNT), serial)
            i8042 = I8042Device(lambda: self._finish(VmmExitReason.RESET))
            bus.register_pio(PioRange(I8042_DATA_PORT, 1), i8042)
            bus.register_pio(PioRange(I8042_COMMAND_PORT, 1), i8042)
            vm_config = VmConfig.from_kvm(kvm, cfg.num_vcpus, cfg.template())
            vm = stack.enter_context(KvmVm.new(kvm, vm_config, memory, wakeup, bus))
            vm.fd.register_irqfd(trigger.fd, COM1_IRQ)
            vm.load_boot_state(boot_state(boot))
            forced = _forced_cpuid(vm, cfg.hide_cpuid)
            counters = VcpuCounters(vcpu.vcpu_fd for vcpu in vm.vcpus)
            stack.callback(counters.close)
        except BaseException:
            stack.close()
            raise
        for name in forced:
            where = feature_bit(name)
            log.warning("CPUID flag %r is still visible to the guest after KVM_SET_CPUID2 (leaf "
                        "%#x, %s bit %d): this host's KVM forces it on, so hiding it has no "
                        "effect", name, where.leaf, where.register.upper(), where.bit)
        self._forced_cpuid, self._counters = forced, counters
        self._resources = stack
        self._vm, self._kernel, self._boot, self._wakeup, self.serial = vm, kernel, boot, wakeup, serial
        self._console._attach(serial, wakeup.poke)
        with self._state_lock:
            self._life = _Life.STARTED

    def _launch(self) -> None:
        assert self._vm is not None
        self._started = time.monotonic()
        self._vm.run()

    def _stop_from_signal(self) -> None:
        """Ask :meth:`run`'s event loop to stop the VM, from a signal handler on its thread.

        Takes no lock and never waits: the handler may have interrupted that thread while it
        held one. (:meth:`stop` is the call for anywhere else.)
        """
        self._signal_stop = True
        wakeup = self._wakeup
        if wakeup is not None:
            wakeup.poke_from_signal()

    def _finish(self, reason: VmmExitReason) -> None:
        """Record why the VM stops (the first reason wins) and wake the event loop."""
        with self._state_lock:
            if self._reason is None:
                self._reason = reason
            wakeup = self._wakeup
        if wakeup is not None:
            wakeup.poke()

    def _serve(self, terminal: _Terminal | None, deadline: float | None) -> None:
        try:
            self._loop(terminal, deadline)
        finally:
            self._finalize()

    def _serve_in_background(self) -> None:
        try:
            self._serve(None, None)
        except Exception:
            # Nobody is there to catch it; the VM is stopped and the result says so.
            log.exception("the VMM's event loop failed; the VM was stopped")

    def _loop(self, terminal: _Terminal | None, deadline: float | None) -> None:
        vm, wakeup = self._vm, self._wakeup
        assert vm is not None and wakeup is not None
        if terminal is None:
            source = self.config.serial_input
            terminal = _Terminal(source, self._console, lambda: None, raw=False)
        console = self._console
        with selectors.DefaultSelector() as sel:
            sel.register(wakeup.fd, selectors.EVENT_READ, "wakeup")
            # A regular file or /dev/null cannot be polled (epoll refuses it) but never blocks:
            # it is read on every turn of the loop until its end.
            unpollable = False
            if terminal.fd is not None:
                try:
                    sel.register(terminal.fd, selectors.EVENT_READ, "input")
                except PermissionError:
                    unpollable = True
            while self._reason is None:
                if self._signal_stop:
                    self._finish(VmmExitReason.STOPPED)
                    break
                if unpollable:
                    unpollable = terminal.read()
                # The UART says nothing when the guest drains its FIFO: input it could not take
                # yet is offered again soon.
                pending = console._flush_input()
                wait = None if deadline is None else max(0.0, deadline - time.monotonic())
                if pending or unpollable:
                    wait = 0.01 if wait is None else min(wait, 0.01)
                for key, _ in sel.select(wait):
                    if key.data == "wakeup":
                        wakeup.drain()
                        if wakeup.vcpu_ended:
                            self._finish(self._vcpu_reason(vm))
                    elif not terminal.read():
                        sel.unregister(key.fd)  # end of input
                if deadline is not None and time.monotonic() >= deadline:
                    self._finish(VmmExitReason.TIMEOUT)

    def _finalize(self) -> None:
        """Shut the VM down, record the result, end the console; the resources stay open."""
        vm, kernel, boot = self._vm, self._kernel, self._boot
        assert vm is not None and kernel is not None and boot is not None
        # Whatever happens here, close(), stop() and wait() must not wait forever for _done.
        try:
            error: VcpuError | None = None
            try:
                vm.shutdown()
            except VcpuError as e:
                error = e
            if error is None:
                # Someone already collected the failure through vmm.vm (shutdown raises it once).
                error = next((e for _, e in vm.errors if isinstance(e, VcpuError)), None)
            with self._state_lock:
                if error is not None or vm.errors:
                    self._reason = VmmExitReason.ERROR
                reason = self._reason or VmmExitReason.STOPPED
                self._reason = reason
            self._result = VmmResult(reason, time.monotonic() - self._started, error, kernel, boot)
        finally:
            result = self._result
            self._console._end(f"the {result.describe()}" if result is not None
                               else "the VM stopped")
            self._done.set()

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


def _forced_cpuid(vm: KvmVm, hidden: tuple[str, ...]) -> tuple[str, ...]:
    """The flags of ``hidden`` that some vCPU's CPUID, as KVM now has it, still sets."""
    names = tuple(dict.fromkeys(hidden))
    seen: set[str] = set()
    for vcpu in vm.vcpus if names else ():
        try:
            entries = entries_from_kvm_cpuid2(vcpu.vcpu_fd.get_cpuid2())
        except KvmError as e:
            # Only a diagnosis: a KVM that cannot read CPUID back still boots the guest.
            log.debug("cannot read vCPU %d's CPUID back: %s", vcpu.id, e)
            continue
        for name in names:
            where = feature_bit(name)
            for entry in entries:
                if (entry.function, entry.index) == (where.leaf, where.subleaf) and \
                        getattr(entry, where.register) >> where.bit & 1:
                    seen.add(name)
    return tuple(name for name in names if name in seen)


def _tee(console: Console, output: SerialOutput) -> Callable[[bytes], None]:
    """The UART's sink: ``serial_output``, then the console's memory."""
    if output is None:
        return console._append
    if callable(output):
        forward = output
    else:
        stream = output

        def forward(data: bytes) -> None:
            stream.write(data)
            stream.flush()

    def write(data: bytes) -> None:
        # serial_output first: whoever expect() wakes may read what serial_output collected.
        _on_vcpu.active = True
        try:
            forward(data)
        finally:
            _on_vcpu.active = False
            console._append(data)
    return write


class _Terminal:
    """The serial input: bytes from a file descriptor into the UART, in raw mode for a person.

    With ``raw``, a terminal is put in raw mode while the VM runs and Ctrl-A x calls ``stop``.
    """

    def __init__(self, source: SerialInput, console: Console, stop: Callable[[], None],
                 raw: bool = True) -> None:
        self.fd: int | None = None if source is None else (
            source if isinstance(source, int) else source.fileno())
        self._console = console
        self._stop = stop
        self._raw = raw
        self._saved: list[Any] | None = None
        self._escape = False

    def __enter__(self) -> Self:
        if self._raw and self.fd is not None and os.isatty(self.fd):
            self._saved = termios.tcgetattr(self.fd)
            tty.setraw(self.fd, termios.TCSANOW)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._saved is not None and self.fd is not None:
            try:
                termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)
            except (termios.error, OSError) as e:
                # A hung-up terminal (SIGHUP, a closed pty) has nothing left to restore.
                log.debug("could not restore the terminal: %s", e)

    def read(self) -> bool:
        """Move available input towards the UART; False at end of input."""
        assert self.fd is not None
        try:
            data = os.read(self.fd, 4096)
        except BlockingIOError:
            return True
        except OSError:
            return False  # a hung-up terminal (EIO) ends the input, not the VM
        if not data:
            return False
        if self._saved is not None:
            data = self._filter_escape(data)
        self._console._feed(data)
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


__all__ = [
    "ESCAPE_CHAR", "MAX_MEMORY_MIB", "MIN_MEMORY_MIB", "TAIL_LINES", "Console", "ConsoleEOF",
    "ConsoleError", "ConsoleTimeout", "Pattern", "SerialInput", "SerialOutput", "Vmm", "VmmConfig",
    "VmmConfigError", "VmmExitReason", "VmmResult", "VmmStateError",
]
