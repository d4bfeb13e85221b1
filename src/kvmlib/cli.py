"""The ``kvmlib`` command (also ``python -m kvmlib``): ``run``, ``info`` and ``hello``.

``kvmlib run`` boots a Linux kernel with its serial console on this terminal, ``kvmlib info``
shows what this host's KVM offers, and ``kvmlib hello`` (also ``kvmlib`` alone) boots the
built-in demo guest. :func:`main` is the entry point and returns the exit status;
:func:`build_parser` is the argument parser.

Every refusal is one of two kinds: bad usage, found while parsing, is argparse's ``kvmlib run:
error: argument --memory: ...`` naming the flag, with status 2; anything found later (an image
that is not a kernel, KVM missing) is one line ``kvmlib: error: ...`` with status 1. Messages go
to standard error through a handler on the ``kvmlib`` logger that :func:`main` installs for its
call and removes after; the root logger is left alone.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import grp
import json
import logging
import math
import os
import pwd
import select
import signal
import stat
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from types import FrameType, TracebackType
from typing import Any, TextIO

from typing_extensions import Self, override

from kvmlib import __version__
from kvmlib._sigaction import SIG_IGN, get_sigaction, set_sigaction, signal_disposition
from kvmlib.arch.x86_64.cpuid import entries_from_kvm_cpuid2
from kvmlib.arch.x86_64.cpuid_features import FEATURES, UnknownCpuFeatureError, parse_feature_list
from kvmlib.disasm import FailedInstruction, describe_failure
from kvmlib.errors import KvmError
from kvmlib.ioctl import Cap, Kvm
from kvmlib.vcpu import MAX_VCPUS
from kvmlib.vmm import MAX_MEMORY_MIB, MIN_MEMORY_MIB, Vmm, VmmConfig, VmmExitReason, VmmResult

log = logging.getLogger(__name__)

#: Exit statuses. 0: done (for ``run``, the guest stopped itself); 1: an error a person can fix,
#: said in one ``kvmlib: error:`` line; 2: bad usage (argparse); 3: the guest failed (a KVM
#: internal error ...); 4: ``--timeout`` passed.
EXIT_OK, EXIT_SETUP, EXIT_USAGE, EXIT_GUEST_ERROR, EXIT_TIMEOUT = 0, 1, 2, 3, 4
#: Stopped by a signal: 128 + its number, as a shell reports a command it killed (SIGINT: 130,
#: SIGTERM: 143, SIGHUP: 129), after the VM was shut down and the terminal restored.
EXIT_SIGNAL_BASE = 128
#: SIGINT's status.
EXIT_INTERRUPTED = EXIT_SIGNAL_BASE + signal.SIGINT
#: The standard output pipe was closed by its reader (``kvmlib run ... | head``): 128 + SIGPIPE,
#: the status of any command a closed pipe ends. Nothing is printed.
EXIT_BROKEN_PIPE = EXIT_SIGNAL_BASE + signal.SIGPIPE

#: ``kvmlib hello``'s vCPUs when not told.
DEFAULT_HELLO_VCPUS = 2
#: On a terminal, the status line shows once the guest has printed nothing for this long (s) ...
STATUS_AFTER = 3.0
#: ... and is redrawn this often (s).
STATUS_EVERY = 1.0
#: The signals that stop ``kvmlib run`` cleanly.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

_DESCRIPTION = """\
Drive Linux KVM: boot a Linux kernel with a serial console, show what this host's KVM offers, or
boot the built-in demo guest."""

_STATUSES = """\
exit status:
  0    done; for run, the guest stopped itself (a reboot, a triple fault)
  1    an error to fix, said in one line: "kvmlib: error: ..."
  2    bad usage, said as "kvmlib run: error: argument --FLAG: ..."
  3    run: the guest failed (a KVM internal error ...); the instruction and a hint follow
  4    run: --timeout passed
  130  stopped by a signal: 128 + its number (129 SIGHUP, 130 SIGINT, 143 SIGTERM), once the VM
       is shut down and the terminal restored
  141  the output pipe was closed (128 + SIGPIPE, as for any command in a pipe); nothing more is
       said"""

_EPILOG = f"""\
Without a command, kvmlib runs hello. "kvmlib COMMAND --help" explains each command.

{_STATUSES}
"""

_RUN_DESCRIPTION = """\
Boot a Linux kernel under KVM with its serial console (COM1, ttyS0) on this terminal. The guest
gets every key, Ctrl-C included; type Ctrl-A then x to stop the VM. The guest ends the VM by
rebooting (i8042 reset) or triple-faulting.

On a terminal, a status line (time running, guest exits per second) shows while the guest has
been quiet for a few seconds; it goes as soon as the guest prints. It is never written to a pipe
or a file."""

_RUN_EPILOG = f"""\
examples:
  kvmlib run --kernel /boot/vmlinuz-6.1.0-50-cloud-amd64 --cmdline "console=ttyS0 earlyprintk=serial"
  kvmlib run --kernel bzImage --initrd initramfs.cpio.gz --memory 512 --vcpus 2 \\
             --cmdline "console=ttyS0 rdinit=/bin/sh reboot=k panic=-1"
  kvmlib run --kernel bzImage --hide-cpuid cx16,xsave     # when the host's KVM cannot run them

{_STATUSES}
"""

_INFO_DESCRIPTION = """\
Show what this host's KVM offers: the kernel release, /dev/kvm's permissions and whether this
user can open it, the KVM API version, each capability kvmlib uses (present or not, with its
value), and the CPUID features KVM can give a guest, named as in /proc/cpuinfo. Without a usable
/dev/kvm it shows what it can and exits with status 1."""

_HELLO_DESCRIPTION = """\
Boot the built-in demo guest: vCPU 0 prints a greeting through port I/O and wakes the other vCPUs
with INIT/SIPI, as firmware does; each prints its number, and the guest ends the VM."""


# ---- arguments --------------------------------------------------------------------------------

def _whole_number(text: str, unit: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of {unit}") from None


def host_ram_mib(meminfo: str = "/proc/meminfo") -> int | None:
    """The host's RAM in MiB (``MemTotal`` of ``/proc/meminfo``), or None if it cannot be read."""
    try:
        with open(meminfo, encoding="ascii") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) // 1024  # the file's unit is KiB
    except (OSError, ValueError, IndexError):
        pass
    return None


def _memory(text: str) -> int:
    value = _whole_number(text, "MiB")
    if not MIN_MEMORY_MIB <= value <= MAX_MEMORY_MIB:
        raise argparse.ArgumentTypeError(
            f"{value} MiB is out of range: give {MIN_MEMORY_MIB} to {MAX_MEMORY_MIB} MiB")
    total = host_ram_mib()
    if total is not None and value > total:
        raise argparse.ArgumentTypeError(
            f"{value} MiB is more than this host's RAM ({total} MiB, MemTotal in /proc/meminfo)")
    return value


def _vcpus(text: str) -> int:
    value = _whole_number(text, "vCPUs")
    if not 1 <= value <= MAX_VCPUS:
        raise argparse.ArgumentTypeError(f"{value} vCPUs is out of range: give 1 to {MAX_VCPUS}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(
            f"{text} s: give a number of seconds greater than 0 (leave it out to run until the "
            "guest stops)")
    return value


def _features(text: str) -> tuple[str, ...]:
    try:
        names = parse_feature_list(text)
    except UnknownCpuFeatureError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if not names:
        raise argparse.ArgumentTypeError(
            f"{text!r} names no flag: give flags as /proc/cpuinfo names them, e.g. cx16,xsave")
    return names


def _readable_file(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("an empty path: give a file")
    try:
        st = os.stat(text)
    except OSError as e:
        raise argparse.ArgumentTypeError(f"{text}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise argparse.ArgumentTypeError(f"{text} is not a regular file")
    if not os.access(text, os.R_OK):
        raise argparse.ArgumentTypeError(f"{text} is not readable (permissions)")
    return text


def _add_logging_options(parser: argparse.ArgumentParser, prefix: str) -> None:
    # Given before or after the command: each place has its own destinations, added up in
    # _log_level (a subcommand's values would otherwise replace the top level's).
    group = parser.add_argument_group("messages")
    group.add_argument("-v", "--verbose", action="count", default=0, dest=f"{prefix}verbose",
                       help="say more: -v what kvmlib does (INFO), -vv everything (DEBUG)")
    group.add_argument("-q", "--quiet", action="count", default=0, dest=f"{prefix}quiet",
                       help="say less: only errors")
    group.add_argument("--log-level", type=str.lower, dest=f"{prefix}log_level", metavar="LEVEL",
                       choices=("debug", "info", "warning", "error", "critical"),
                       help="the least severe message to show: debug, info, warning (the "
                            "default), error or critical; overrides -v and -q")


def build_parser() -> argparse.ArgumentParser:
    """The ``kvmlib`` command's argument parser, with the ``run``, ``info`` and ``hello`` commands."""
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="kvmlib", description=_DESCRIPTION, epilog=_EPILOG,
                                     formatter_class=raw)
    parser.add_argument("--version", action="version", version=f"kvmlib {__version__}")
    _add_logging_options(parser, "")
    commands = parser.add_subparsers(title="commands", dest="command", metavar="COMMAND")

    run = commands.add_parser("run", help="boot a Linux kernel with its serial console here",
                              description=_RUN_DESCRIPTION, epilog=_RUN_EPILOG, formatter_class=raw)
    run.add_argument("--kernel", required=True, type=_readable_file, metavar="PATH",
                     help="the kernel: a bzImage (e.g. /boot/vmlinuz-*) or an ELF vmlinux "
                          "(entered through PVH when it has the note)")
    run.add_argument("--initrd", type=_readable_file, metavar="PATH",
                     help="an initramfs or initrd, placed page-aligned as high as the kernel "
                          "allows below 4 GiB")
    run.add_argument("--cmdline", default="console=ttyS0 reboot=k panic=1", metavar="STR",
                     help="the kernel command line (default: %(default)r); add "
                          "'earlyprintk=serial' to see the earliest messages")
    run.add_argument("--memory", type=_memory, default=256, metavar="MiB",
                     help=f"guest RAM in MiB, {MIN_MEMORY_MIB} up to this host's RAM (default: "
                          "%(default)s); above 3.25 GiB the rest is placed from 4 GiB, past the "
                          "MMIO gap")
    run.add_argument("--vcpus", type=_vcpus, default=1, metavar="N",
                     help=f"number of vCPUs, 1 to {MAX_VCPUS} (default: %(default)s)")
    run.add_argument("--hide-cpuid", type=_features, default=(), metavar="FLAG,FLAG...",
                     help="CPUID feature flags to hide from the guest, named as in "
                          "/proc/cpuinfo (e.g. cx16,xsave); a warning says when this host's KVM "
                          "forces one on anyway")
    run.add_argument("--timeout", type=_seconds, metavar="SECONDS",
                     help="stop the VM after this many seconds, more than 0 (default: run until "
                          "the guest stops)")
    _add_logging_options(run, "sub_")
    run.set_defaults(handler=_run)

    info = commands.add_parser("info", help="show what this host's KVM offers",
                               description=_INFO_DESCRIPTION, formatter_class=raw)
    info.add_argument("--json", action="store_true", help="print it as one JSON object")
    info.add_argument("--device", default="/dev/kvm", metavar="PATH",
                      help="the KVM device (default: %(default)s)")
    _add_logging_options(info, "sub_")
    info.set_defaults(handler=_info)

    hello = commands.add_parser("hello", help="boot the built-in demo guest (the default)",
                                description=_HELLO_DESCRIPTION, formatter_class=raw)
    hello.add_argument("--vcpus", type=_vcpus, default=DEFAULT_HELLO_VCPUS, metavar="N",
                       help=f"number of vCPUs, 1 to {MAX_VCPUS} (default: %(default)s)")
    _add_logging_options(hello, "sub_")
    hello.set_defaults(handler=_hello)

    parser.set_defaults(handler=_hello, vcpus=DEFAULT_HELLO_VCPUS, sub_verbose=0, sub_quiet=0,
                        sub_log_level=None)
    return parser


def _log_level(args: argparse.Namespace) -> int:
    name = args.sub_log_level or args.log_level
    if name:
        return {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
                "error": logging.ERROR, "critical": logging.CRITICAL}[name]
    steps: int = args.quiet + args.sub_quiet - args.verbose - args.sub_verbose
    return max(logging.DEBUG, min(logging.CRITICAL, logging.WARNING + 10 * steps))


# ---- standard error ---------------------------------------------------------------------------

def _isatty(stream: object) -> bool:
    try:
        return bool(stream.isatty())  # type: ignore[attr-defined]
    except (AttributeError, ValueError, OSError):
        return False


def _fileno(stream: object) -> int | None:
    try:
        return int(stream.fileno())  # type: ignore[attr-defined]
    except (AttributeError, ValueError, OSError):  # io.UnsupportedOperation is both
        return None


class _Screen:
    """Standard error as the command writes to it: ``kvmlib:`` lines, and a status line.

    On a terminal each line ends in CR LF (the console's raw mode does not turn LF into both) and
    starts on a fresh line even after a guest's unfinished line; elsewhere lines are plain,
    LF-terminated text. Safe from any thread.
    """

    def __init__(self, stream: TextIO, *, show_notes: bool, guest_on_terminal: bool) -> None:
        self.stream = stream
        self.tty = _isatty(stream)
        self.show_notes = show_notes
        # Whether the guest's output lands on the same screen and moves its cursor.
        self._guest_on_terminal = guest_on_terminal and self.tty
        # Reentrant: a log record emitted while a line is being written must not deadlock.
        self._lock = threading.RLock()
        self._status_shown = False
        self._at_line_start = True
        #: When the guest last printed (``time.monotonic()``).
        self.last_output = time.monotonic()

    def line(self, text: str) -> None:
        """Write ``text`` as a line of its own."""
        with self._lock:
            if self.tty:
                lead = "\r\033[K" if self._status_shown else "" if self._at_line_start else "\r\n"
                data = lead + text.replace("\n", "\r\n") + "\r\n"
            else:
                data = text + "\n"
            self._status_shown = False
            self._at_line_start = True
            self._write(data)

    def note(self, text: str) -> None:
        """``kvmlib: text``, unless asked to be quiet."""
        if self.show_notes:
            self.line(f"kvmlib: {text}")

    def error(self, text: str) -> None:
        """``kvmlib: error: text``, always, on one line."""
        self.line("kvmlib: error: " + " ".join(text.split("\n")))

    def status(self, text: str) -> None:
        """Show ``text`` as the status line (on a terminal, with the cursor at a line's start)."""
        with self._lock:
            if not self.tty or not (self._status_shown or self._at_line_start):
                return
            try:
                width = os.get_terminal_size(self.stream.fileno()).columns
            except (OSError, ValueError):
                width = 0
            # One character short of the width: a full row would wrap, and "\r" would then
            # return to the wrong row. A terminal that does not say (0) is taken as 80 wide.
            self._write("\r\033[K" + text[:(width or 80) - 1])
            self._status_shown = True

    def clear_status(self) -> None:
        """Erase the status line if it is shown."""
        with self._lock:
            if self._status_shown:
                self._write("\r\033[K")
                self._status_shown = False

    @contextlib.contextmanager
    def guest_output(self, data: bytes) -> Iterator[None]:
        """Around the guest's output: no status line in its way, and the cursor tracked."""
        if not self.tty:
            self.last_output = time.monotonic()
            yield
            return
        with self._lock:
            self.clear_status()
            try:
                yield
            finally:
                self.last_output = time.monotonic()
                if self._guest_on_terminal and data:
                    self._at_line_start = data.endswith(b"\n")

    def _write(self, data: str) -> None:
        try:
            self.stream.write(data)
            self.stream.flush()
        except (OSError, ValueError):
            pass  # standard error is gone (a closed pipe, a hung-up terminal): no one to tell


class _ScreenHandler(logging.Handler):
    """The ``kvmlib`` logger's records as ``kvmlib:`` lines on a :class:`_Screen`."""

    def __init__(self, screen: _Screen) -> None:
        super().__init__()
        self._screen = screen

    @override
    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
        except Exception:
            self.handleError(record)
            return
        if record.levelno >= logging.WARNING:
            prefix = f"{record.levelname.lower()}: "
        elif record.levelno < logging.INFO:
            prefix = f"debug: {record.name}: "
        else:
            prefix = ""
        self._screen.line(f"kvmlib: {prefix}{message}")


@contextlib.contextmanager
def _messages_to(screen: _Screen, level: int) -> Iterator[None]:
    """The ``kvmlib`` logger writes to ``screen`` at ``level``; all as it was afterwards."""
    logger = logging.getLogger("kvmlib")
    handler = _ScreenHandler(screen)
    saved = logger.level, logger.propagate
    logger.setLevel(level)
    # The command's own handler says it all: a handler an embedding program put on the root
    # logger would print each message a second time.
    logger.propagate = False
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


# ---- run ----------------------------------------------------------------------------------------

class _GuestOutput:
    """The serial console's output, straight to standard output's fd.

    A failed write (the reader of a pipe went away: EPIPE; a hung-up terminal: EIO) stops the VM
    through ``stop`` instead of failing the vCPU, and the rest of the output is dropped.
    """

    def __init__(self, stream: TextIO, screen: _Screen) -> None:
        self._fd = _fileno(stream)
        self._stream = stream
        self._screen = screen
        self.stop: Callable[[], object] = lambda: None
        #: The write that failed, if one did.
        self.error: OSError | None = None

    def __call__(self, data: bytes) -> None:
        if self.error is not None:
            return
        try:
            with self._screen.guest_output(data):
                self._write(data)
        except OSError as e:
            self.error = e
            self.stop()

    def _write(self, data: bytes) -> None:
        if self._fd is None:
            # No fd (standard output replaced by a Python object): through the stream.
            self._stream.write(data.decode("utf-8", "replace"))
            self._stream.flush()
            return
        # Straight to the fd: the console must not wait in Python's buffer.
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self._fd, view):]
            except BlockingIOError:
                # An fd left non-blocking by whoever shares it: wait until it takes more.
                select.select([], [self._fd], [])

    @property
    def broken_pipe(self) -> bool:
        """Whether the output was a pipe its reader closed."""
        return isinstance(self.error, BrokenPipeError) or \
            (self.error is not None and self.error.errno == errno.EPIPE)


class _StopOnSignals:
    """For a ``with`` block: SIGINT, SIGTERM and SIGHUP call ``stop`` and are remembered.

    The previous dispositions (Python's or a C library's) are restored on leaving. A signal that
    was ignored stays ignored (``nohup`` asks for that); off the main thread nothing is installed,
    as Python allows signal handlers only there.
    """

    def __init__(self, stop: Callable[[], None]) -> None:
        self._stop = stop
        self._saved: list[tuple[int, Any, Any]] = []
        #: The first stop signal received, if one was.
        self.received: int | None = None

    def __enter__(self) -> Self:
        if threading.current_thread() is not threading.main_thread():
            return self
        for signum in STOP_SIGNALS:
            try:
                if signal_disposition(signum) == SIG_IGN:
                    continue
                saved = get_sigaction(signum)
            except OSError:
                continue
            previous = signal.getsignal(signum)
            signal.signal(signum, self._handle)
            self._saved.append((signum, previous, saved))
        return self

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        # Runs on the main thread between two bytecodes, maybe inside the VMM's locks: only
        # the lock-free stop is allowed here.
        if self.received is None:
            self.received = signum
        self._stop()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for signum, previous, saved in reversed(self._saved):
            if previous is None:
                # Installed by C code, which Python cannot name: put its sigaction back whole.
                signal.signal(signum, signal.SIG_DFL)
                set_sigaction(signum, saved)
            else:
                signal.signal(signum, previous)
        self._saved.clear()


def _duration(seconds: float) -> str:
    whole = int(seconds)
    if whole < 60:
        return f"{whole} s"
    minutes, secs = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes}:{secs:02d}"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def _rate(per_second: float) -> str:
    for scale, suffix in ((1e6, "M"), (1e3, "k")):
        if per_second >= scale:
            return f"{per_second / scale:.1f}{suffix}"
    return f"{per_second:.0f}"


class _StatusLine:
    """On a terminal, while the guest is quiet: how long it has run, and its exits per second."""

    def __init__(self, screen: _Screen, vmm: Vmm, *, escape_hint: bool) -> None:
        self._screen = screen
        self._vmm = vmm
        self._escape_hint = escape_hint
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self._start = time.monotonic()

    def __enter__(self) -> Self:
        if self._screen.tty:
            self._thread = threading.Thread(target=self._serve, name="kvmlib-status", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join()
        self._screen.clear_status()

    def _serve(self) -> None:
        previous: tuple[float, int] | None = None
        while not self._done.wait(STATUS_EVERY):
            now = time.monotonic()
            exits = self._vmm.exit_count()
            rate = None
            if exits is not None:
                if previous is not None and now > previous[0]:
                    rate = (exits - previous[1]) / (now - previous[0])
                previous = (now, exits)
            quiet = now - self._screen.last_output
            if quiet >= STATUS_AFTER:
                self._screen.status(self.text(now - self._start, quiet, rate))

    def text(self, running: float, quiet: float, rate: float | None) -> str:
        """The status line's text."""
        text = f"kvmlib: running {_duration(running)}, guest quiet for {_duration(quiet)}"
        if rate is not None:
            text += f", {_rate(rate)} exits/s"
        if self._escape_hint:
            text += " (Ctrl-A x stops)"
        return text


def _hint(failed: FailedInstruction, hidden: Sequence[str], forced: Sequence[str]) -> str | None:
    flag, parameter = failed.feature, failed.kernel_parameter
    what = f"this host's KVM cannot emulate {failed.mnemonic}"
    if flag is None:
        return f"{what}, {failed.note}" if failed.note else None
    instead = f"add {parameter} to --cmdline (Linux 5.19 and later)" if parameter else ""
    if flag in forced:
        return (f"{what}, and hiding CPUID flag {flag} has no effect here (this host's KVM "
                f"forces it on)" + (f": {instead}" if instead else ""))
    if flag in hidden:
        return f"{what}, although CPUID flag {flag} is hidden" + (
            f": {instead}" if instead else "")
    return f"{what}: try --hide-cpuid {flag}" + (f", or {instead}" if instead else "")


def _report(screen: _Screen, result: VmmResult, vmm: Vmm) -> int:
    if result.reason is VmmExitReason.ERROR:
        screen.line(f"kvmlib: {result.describe()}")
        failed = describe_failure(result.error)
        if failed is not None:
            screen.line(f"kvmlib: the instruction KVM could not emulate: {failed.describe()}")
            hint = _hint(failed, vmm.config.hide_cpuid, vmm.forced_cpuid)
            if hint is not None:
                screen.line(f"kvmlib: hint: {hint}")
        return EXIT_GUEST_ERROR
    screen.note(result.describe())
    return EXIT_TIMEOUT if result.reason is VmmExitReason.TIMEOUT else EXIT_OK


def _stdin_fd() -> int | None:
    stdin = sys.stdin
    if stdin is None or stdin.closed:
        return None
    return _fileno(stdin)


def _run(args: argparse.Namespace, screen: _Screen) -> int:
    stdin = _stdin_fd()
    output = _GuestOutput(sys.stdout, screen)
    try:
        config = VmmConfig(kernel=args.kernel, initrd=args.initrd, cmdline=args.cmdline,
                           memory_mib=args.memory, num_vcpus=args.vcpus,
                           hide_cpuid=args.hide_cpuid, serial_input=stdin, serial_output=output)
        vmm = Vmm(config)
        output.stop = vmm.stop  # from a vCPU thread it only asks, which is what is wanted
        screen.note(f"booting {config.kernel} with {config.memory_mib} MiB, {config.num_vcpus} "
                    f"vCPU{'s' if config.num_vcpus > 1 else ''}"
                    + (f", initrd {config.initrd}" if config.initrd else "")
                    + (f", hiding CPUID {','.join(config.hide_cpuid)}" if config.hide_cpuid
                       else ""))
        escape = stdin is not None and os.isatty(stdin)
        with _StopOnSignals(vmm._stop_from_signal) as signals, \
                _StatusLine(screen, vmm, escape_hint=escape):
            result = vmm.run(timeout=args.timeout)
    except KvmError as e:
        screen.error(str(e))
        return EXIT_SETUP
    except OSError as e:
        screen.error((e.strerror or str(e)) + (f": {e.filename}" if e.filename else ""))
        return EXIT_SETUP
    if signals.received is not None:
        name = signal.Signals(signals.received).name
        screen.note(f"{name}: the guest was stopped after {result.seconds:.1f} s")
        return EXIT_SIGNAL_BASE + signals.received
    if output.broken_pipe:
        log.info("the output pipe was closed: the guest was stopped after %.1f s", result.seconds)
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    if output.error is not None:
        screen.error(f"cannot write the guest's output: {output.error.strerror or output.error}"
                     "; the guest was stopped")
        return EXIT_SETUP
    return _report(screen, result, vmm)


# ---- info ---------------------------------------------------------------------------------------

def _device_report(path: str) -> dict[str, Any]:
    report: dict[str, Any] = {"path": path}
    try:
        st = os.stat(path)
    except OSError as e:
        report.update(exists=not isinstance(e, FileNotFoundError), error=e.strerror)
        return report
    try:
        owner: str | None = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        owner = None
    try:
        group: str | None = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = None
    report.update(exists=True, character_device=stat.S_ISCHR(st.st_mode),
                  mode=stat.filemode(st.st_mode), permissions=f"{stat.S_IMODE(st.st_mode):04o}",
                  uid=st.st_uid, owner=owner, gid=st.st_gid, group=group)
    try:
        os.close(os.open(path, os.O_RDWR | os.O_CLOEXEC))
        report.update(can_open=True, error=None)
    except OSError as e:
        report.update(can_open=False, error=e.strerror)
    return report


def _supported_features(kvm: Kvm) -> list[str]:
    entries = entries_from_kvm_cpuid2(kvm.get_supported_cpuid())
    found = []
    for name, where in FEATURES.items():
        for entry in entries:
            if (entry.function, entry.index) == (where.leaf, where.subleaf) and \
                    getattr(entry, where.register) >> where.bit & 1:
                found.append(name)
                break
    return found


def host_report(device: str = "/dev/kvm") -> tuple[dict[str, Any], str | None]:
    """What ``kvmlib info`` shows, as a JSON-ready dict, and why KVM is unusable (None if it is not).

    Keys: ``kvmlib`` (version), ``kernel`` (``sysname``, ``release``, ``machine``), ``device``
    (``path``, ``exists``, ``character_device``, ``mode``, ``permissions``, ``uid``, ``owner``,
    ``gid``, ``group``, ``can_open``, ``error``), ``api_version``, ``capabilities`` (each
    ``KVM_CAP_*`` kvmlib uses -> ``KVM_CHECK_EXTENSION``'s answer, 0 when absent) and
    ``cpuid_features`` (``/proc/cpuinfo`` names); the last three are None without a usable KVM.
    """
    uname = os.uname()
    report: dict[str, Any] = {
        "kvmlib": __version__,
        "kernel": {"sysname": uname.sysname, "release": uname.release, "machine": uname.machine},
        "device": _device_report(device),
        "api_version": None, "capabilities": None, "cpuid_features": None,
    }
    try:
        with Kvm(device) as kvm:
            report["api_version"] = kvm.get_api_version()
            report["capabilities"] = {cap.name: kvm.check_extension(cap) for cap in Cap}
            report["cpuid_features"] = _supported_features(kvm)
    except KvmError as e:
        return report, str(e)
    return report, None


def _format_report(report: dict[str, Any]) -> str:
    kernel, device = report["kernel"], report["device"]
    lines = [f"kvmlib {report['kvmlib']} on {kernel['sysname']} {kernel['release']} "
             f"({kernel['machine']})"]
    if not device.get("exists"):
        lines.append(f"{device['path']}: {device.get('error') or 'missing'}")
    else:
        kind = "character device" if device["character_device"] else "not a character device"
        can = "this user can open it" if device["can_open"] else \
            f"this user cannot open it ({device['error']})"
        lines.append(f"{device['path']}: {kind}, {device['mode']} ({device['permissions']}), "
                     f"owner {device['owner'] or device['uid']}, group "
                     f"{device['group'] or device['gid']}; {can}")
    if report["api_version"] is not None:
        lines.append(f"KVM API version: {report['api_version']}")
    capabilities = report["capabilities"]
    if capabilities is not None:
        lines.append("capabilities kvmlib uses (KVM_CHECK_EXTENSION):")
        width = max(map(len, capabilities))
        lines.extend(f"  {name:<{width}}  {'yes' if value else 'no'}"
                     + (f" ({value})" if value else "") for name, value in capabilities.items())
    features = report["cpuid_features"]
    if features is not None:
        lines.append(f"CPUID features KVM can give a guest (KVM_GET_SUPPORTED_CPUID), named as in "
                     f"/proc/cpuinfo ({len(features)}):")
        lines.append(textwrap.fill(" ".join(features), width=100, initial_indent="  ",
                                   subsequent_indent="  ", break_on_hyphens=False))
    return "\n".join(lines)


def _info(args: argparse.Namespace, screen: _Screen) -> int:
    report, problem = host_report(args.device)
    text = json.dumps(report, indent=2) if args.json else _format_report(report)
    sys.stdout.write(text + "\n")
    sys.stdout.flush()
    if problem is not None:
        screen.error(problem)
        return EXIT_SETUP
    return EXIT_OK


# ---- hello --------------------------------------------------------------------------------------

def _hello(args: argparse.Namespace, screen: _Screen) -> int:
    from kvmlib.demo import run_hello

    try:
        output = run_hello(args.vcpus)
    except KvmError as e:
        screen.error(str(e))
        return EXIT_SETUP
    sys.stdout.write(output.decode("ascii", "replace"))
    sys.stdout.flush()
    return EXIT_OK


# ---- main ---------------------------------------------------------------------------------------

def _silence_stdout() -> None:
    # Python flushes standard output once more on the way out; with the pipe closed that would
    # print "Exception ignored ... BrokenPipeError". The documented cure: point it at /dev/null.
    fd = _fileno(sys.stdout)
    if fd is None:
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


def _status(code: object) -> int:
    if code is None:
        return EXIT_OK
    return code if isinstance(code, int) else EXIT_SETUP


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``kvmlib`` command with ``argv`` (default: ``sys.argv[1:]``); its exit status.

    Usage errors, ``--help`` and ``--version`` return their status too (2, 0, 0) rather than
    raising :class:`SystemExit`.
    """
    try:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as e:
            sys.stdout.flush()  # --help, --version: a closed pipe shows here
            return _status(e.code)
    except BrokenPipeError:  # kvmlib --help | head -1
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    level = _log_level(args)
    screen = _Screen(sys.stderr, show_notes=level <= logging.WARNING,
                     guest_on_terminal=_isatty(sys.stdout))
    handler: Callable[[argparse.Namespace, _Screen], int] = args.handler
    with _messages_to(screen, level):
        try:
            return handler(args, screen)
        except KeyboardInterrupt:
            screen.note("interrupted")
            return EXIT_INTERRUPTED
        except BrokenPipeError:
            _silence_stdout()
            return EXIT_BROKEN_PIPE


__all__ = [
    "DEFAULT_HELLO_VCPUS", "EXIT_BROKEN_PIPE", "EXIT_GUEST_ERROR", "EXIT_INTERRUPTED", "EXIT_OK",
    "EXIT_SETUP", "EXIT_SIGNAL_BASE", "EXIT_TIMEOUT", "EXIT_USAGE", "STATUS_AFTER", "STATUS_EVERY",
    "STOP_SIGNALS", "build_parser", "host_ram_mib", "host_report", "main",
]
