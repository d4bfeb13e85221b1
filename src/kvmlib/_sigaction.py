"""A signal's disposition as the C library has it, which :func:`signal.getsignal` cannot tell.

Python remembers only the handlers it installed itself: for a signal whose handler C code installed
(a library, an embedding application), :func:`signal.getsignal` answers ``None`` or ``SIG_DFL``, so
code that "installs a handler unless one exists" would silently replace it. :func:`signal_disposition`
asks ``sigaction(2)`` instead.

:class:`sigaction` mirrors glibc's x86-64 ``struct sigaction`` (``<bits/sigaction.h>``) under
glibc's own member names; tests/test_layout.py proves its size and offsets against ``<signal.h>``.
This is the user-space structure glibc's ``sigaction()`` takes, not the kernel's ``struct
kernel_sigaction``, whose mask is 64 bits.
"""

from __future__ import annotations

import ctypes
import os
from ctypes import POINTER, Structure, Union, c_int, c_ulong, c_void_p

from kvmlib._platform import libc

#: ``SIG_DFL`` and ``SIG_IGN`` as the raw handler values :func:`signal_disposition` returns.
SIG_DFL = 0
SIG_IGN = 1

# glibc's sigset_t has room for 1024 signals, far more than the kernel's 64.
_SIGSET_NWORDS = 1024 // (8 * ctypes.sizeof(c_ulong))


class sigset_t(Structure):
    """glibc's ``sigset_t`` (``__sigset_t``): a 1024-bit signal mask."""

    _fields_ = [("__val", c_ulong * _SIGSET_NWORDS)]


class _sigaction_handler(Union):
    # Both are function pointers; as addresses, SIG_DFL (0) and SIG_IGN (1) read the same way.
    _fields_ = [("sa_handler", c_void_p), ("sa_sigaction", c_void_p)]


class sigaction(Structure):
    """glibc's ``struct sigaction``; ``sa_handler`` and ``sa_sigaction`` share their storage."""

    _anonymous_ = ("__sigaction_handler",)
    _fields_ = [
        ("__sigaction_handler", _sigaction_handler),
        ("sa_mask", sigset_t),
        ("sa_flags", c_int),
        ("sa_restorer", c_void_p),
    ]


#: The structures whose layout tests/test_layout.py checks against ``<signal.h>``.
GLIBC_STRUCTS: tuple[type[Structure], ...] = (sigaction,)

# An own handle: the prototype set here must not clash with one another module sets on sigaction.
_libc_sigaction = libc().sigaction
_libc_sigaction.argtypes = (c_int, POINTER(sigaction), POINTER(sigaction))
_libc_sigaction.restype = c_int


def _call(signum: int, new: sigaction | None) -> sigaction:
    old = sigaction()
    if _libc_sigaction(signum, None if new is None else ctypes.byref(new), ctypes.byref(old)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"sigaction({signum}): {os.strerror(err)}")
    return old


def get_sigaction(signum: int) -> sigaction:
    """The current ``struct sigaction`` of ``signum`` (``sigaction(signum, NULL, &old)``).

    Raises:
        OSError: ``sigaction`` failed (EINVAL for a signal number the C library refuses).
    """
    return _call(signum, None)


def set_sigaction(signum: int, new: sigaction) -> sigaction:
    """Install ``new`` for ``signum`` and return the ``struct sigaction`` it replaced.

    Meant to put back exactly what :func:`get_sigaction` saved, C handler or Python's own.

    Raises:
        OSError: ``sigaction`` failed.
    """
    return _call(signum, new)


def signal_disposition(signum: int) -> int:
    """The raw handler of ``signum``: :data:`SIG_DFL` (0), :data:`SIG_IGN` (1), else its address.

    Unlike :func:`signal.getsignal` this sees a handler installed by C code. A handler Python
    installed shows as the address of the interpreter's own C-level handler.

    Raises:
        OSError: ``sigaction`` failed (EINVAL for a signal number the C library refuses).
    """
    handler: int | None = get_sigaction(signum).sa_handler  # c_void_p reads NULL as None
    return handler or SIG_DFL


__all__ = [
    "GLIBC_STRUCTS", "SIG_DFL", "SIG_IGN", "get_sigaction", "set_sigaction", "sigaction",
    "signal_disposition", "sigset_t",
]
