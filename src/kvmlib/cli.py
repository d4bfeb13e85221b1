"""``kvmlib run`` (also ``python -m kvmlib run``): boot a Linux kernel with its console here."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence

from kvmlib.arch.x86_64.cpuid_features import UnknownCpuFeatureError, parse_feature_list
from kvmlib.errors import KvmError
from kvmlib.vmm import Vmm, VmmConfig, VmmExitReason

_EPILOG = """\
The serial console (COM1, ttyS0) is this terminal: the guest gets every key; type Ctrl-A then x to
stop the VM. The guest ends the VM by rebooting (i8042 reset) or triple-faulting.

examples:
  kvmlib run --kernel /boot/vmlinuz-6.1.0-50-cloud-amd64 --cmdline "console=ttyS0 earlyprintk=serial"
  kvmlib run --kernel bzImage --initrd initramfs.cpio.gz --memory 512 --vcpus 2 \\
             --cmdline "console=ttyS0 rdinit=/bin/sh reboot=k panic=-1"
  kvmlib run --kernel bzImage --hide-cpuid cx16,xsave     # when the host's KVM cannot run them
"""

#: Exit statuses: 0 the guest stopped itself (reset, triple fault), 1 a setup error a person can
#: fix, 2 bad usage (argparse), 3 the guest failed (KVM internal error ...), 4 timeout.
EXIT_OK, EXIT_SETUP, EXIT_GUEST_ERROR, EXIT_TIMEOUT = 0, 1, 3, 4


def _features(text: str) -> tuple[str, ...]:
    try:
        return parse_feature_list(text)
    except UnknownCpuFeatureError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _positive(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be greater than 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The ``run`` command's argument parser."""
    parser = argparse.ArgumentParser(
        prog="kvmlib run", description="Boot a Linux kernel under KVM with a serial console.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kernel", required=True, metavar="PATH",
                        help="the kernel: a bzImage (e.g. /boot/vmlinuz-*) or an ELF vmlinux "
                             "(entered through PVH when it has the note)")
    parser.add_argument("--initrd", metavar="PATH",
                        help="an initramfs or initrd, placed page-aligned as high as the kernel "
                             "allows below 4 GiB")
    parser.add_argument("--cmdline", default="console=ttyS0 reboot=k panic=1", metavar="STR",
                        help="the kernel command line (default: %(default)r); add "
                             "'earlyprintk=serial' to see the earliest messages")
    parser.add_argument("--memory", type=_positive, default=256, metavar="MiB",
                        help="guest RAM in MiB (default: %(default)s); above 3.25 GiB the rest "
                             "is placed from 4 GiB, past the MMIO gap")
    parser.add_argument("--vcpus", type=_positive, default=1, metavar="N",
                        help="number of vCPUs (default: %(default)s)")
    parser.add_argument("--hide-cpuid", type=_features, default=(), metavar="FLAG,FLAG...",
                        help="CPUID feature flags to hide from the guest, named as in "
                             "/proc/cpuinfo (e.g. cx16,xsave)")
    parser.add_argument("--timeout", type=float, metavar="SECONDS",
                        help="stop the VM after this long (default: run until the guest stops)")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log what the VMM does to stderr")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``run`` command; returns the process exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="kvmlib: %(message)s")
    stdin = sys.stdin.fileno() if sys.stdin is not None and not sys.stdin.closed else None
    try:
        config = VmmConfig(kernel=args.kernel, initrd=args.initrd, cmdline=args.cmdline,
                           memory_mib=args.memory, num_vcpus=args.vcpus, hide_cpuid=args.hide_cpuid,
                           serial_input=stdin, serial_output=_stdout_sink())
        _progress(f"booting {config.kernel} with {config.memory_mib} MiB, {config.num_vcpus} "
                  f"vCPU{'s' if config.num_vcpus > 1 else ''}"
                  + (f", initrd {config.initrd}" if config.initrd else "")
                  + (f", hiding CPUID {','.join(config.hide_cpuid)}" if config.hide_cpuid else ""))
        result = Vmm(config).run(timeout=args.timeout)
    except KvmError as e:
        _progress(f"error: {e}")
        return EXIT_SETUP
    except OSError as e:
        _progress(f"error: {e.strerror or e}"
                  + (f": {e.filename}" if e.filename else ""))
        return EXIT_SETUP
    except KeyboardInterrupt:
        _progress("interrupted")
        return EXIT_SETUP
    _progress(result.describe())
    if result.reason is VmmExitReason.ERROR:
        return EXIT_GUEST_ERROR
    if result.reason is VmmExitReason.TIMEOUT:
        return EXIT_TIMEOUT
    return EXIT_OK


def _stdout_sink() -> Callable[[bytes], None]:
    fd = sys.stdout.fileno()

    def write(data: bytes) -> None:
        # Straight to the fd: the console must not wait in Python's buffer.
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    return write


def _progress(message: str) -> None:
    # On a raw terminal a bare "\n" does not return the carriage.
    print(f"\r\nkvmlib: {message}", file=sys.stderr, flush=True)


__all__ = ["EXIT_GUEST_ERROR", "EXIT_OK", "EXIT_SETUP", "EXIT_TIMEOUT", "build_parser", "main"]
