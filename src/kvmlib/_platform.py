"""What kvmlib needs from the operating system, reachable from an import on any platform.

kvmlib drives KVM, so it works only on Linux on x86-64; but ``import kvmlib`` must still succeed
elsewhere (documentation builds, type checking, a tool that merely lists what it could do), and
the first real use, :class:`kvmlib.Kvm`, says what is missing. The few system interfaces bound at
import time (``fcntl``, the C library, the real-time signals) come from here, with stand-ins off
Linux that raise :class:`~kvmlib.KvmUnavailableError` when called.
"""

from __future__ import annotations

import ctypes
import platform
import signal
import sys
from collections.abc import Callable
from typing import Any

from kvmlib.errors import KvmUnavailableError

#: What kvmlib runs on.
REQUIREMENT = "kvmlib needs Linux on x86-64 (it drives KVM through /dev/kvm)"


def unsupported_platform() -> str | None:
    """Why this host cannot run kvmlib (its OS and machine), or None on Linux x86-64."""
    machine = platform.machine().lower()
    if sys.platform.startswith("linux") and machine in ("x86_64", "amd64"):
        return None
    return f"{REQUIREMENT}; this is {sys.platform} on {machine or 'an unknown machine'}"


def _unavailable(what: str) -> Callable[..., Any]:
    def call(*args: object, **kwargs: object) -> Any:
        raise KvmUnavailableError(f"{what} is not available here: {unsupported_platform()}")
    return call


class _NoLibrary:
    """Stands in for the C library where ``ctypes.CDLL(None)`` cannot load it (Windows)."""

    def __getattr__(self, name: str) -> Any:
        function = _unavailable(f"the C library's {name}()")
        setattr(self, name, function)
        return function


def libc() -> Any:
    """A fresh handle on the C library (``errno`` kept), so prototypes set on it stay private."""
    try:
        return ctypes.CDLL(None, use_errno=True)
    except (OSError, TypeError):  # Windows: no "main program" library to open
        return _NoLibrary()


try:
    import fcntl as _fcntl
except ImportError:  # not POSIX
    #: ``fcntl.ioctl``, or a stand-in that refuses.
    ioctl: Callable[..., Any] = _unavailable("ioctl()")
    #: ``fcntl.flock``, or a stand-in that refuses.
    flock: Callable[..., Any] = _unavailable("flock()")
    LOCK_EX = LOCK_NB = 0
else:
    ioctl = _fcntl.ioctl
    flock = _fcntl.flock
    LOCK_EX, LOCK_NB = _fcntl.LOCK_EX, _fcntl.LOCK_NB

#: The first real-time signal: the vCPU kick (as in vmm-reference). Off Linux, where there is
#: none, a placeholder that is never sent (no VM can be made there).
SIGRTMIN: signal.Signals = getattr(signal, "SIGRTMIN", signal.SIGTERM)

__all__ = ["REQUIREMENT", "SIGRTMIN", "flock", "ioctl", "libc", "unsupported_platform"]
