"""What the three fd wrappers share: one owned fd, a lock against a concurrent close, ioctl calls."""

from __future__ import annotations

import ctypes
import errno as _errno
import os
import threading
import warnings
from collections.abc import Callable, Sequence
from ctypes import c_uint64, sizeof
from typing import Any, NamedTuple, TypeVar
from typing import Union as TUnion

from kvmlib._platform import ioctl, libc
from kvmlib.errors import ClosedError, KernelBufferError, KvmIoctlError
from kvmlib.ioctl.numbers import (
    _IOC_SIZEBITS,
    _IOC_SIZESHIFT,
)
from kvmlib.ioctl.structs import KernelStruct, KernelUnion, kvm_enable_cap
from kvmlib.resources import Closeable

# --------------------------------------------------------------------------------------------------
# fd wrappers
# --------------------------------------------------------------------------------------------------
_Buf = TUnion[KernelStruct, KernelUnion, "ctypes.Array[Any]", "ctypes._SimpleCData[Any]", bytearray]

_libc = libc()
_libc_ioctl = _libc.ioctl
_libc_ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong)
_libc_ioctl.restype = ctypes.c_int
#: KVM_RUN's call: ``fcntl.ioctl(fd, request)`` with the argument left out is the cheapest call
#: Python can make to ioctl(2) (it skips trying the argument as a buffer, and ctypes' argument
#: conversion), and it releases the GIL for as long as the guest runs. EINTR comes back as an
#: OSError: fcntl.ioctl does not retry it, so a kick reaches the caller.
run_ioctl = ioctl


_T = TypeVar("_T", bound=KernelStruct)
_IOC_SIZEMASK = (1 << _IOC_SIZEBITS) - 1


# (ctypes type, request) pairs already found big enough: a type's size never changes.
_BIG_ENOUGH: set[tuple[type, int]] = set()


def _buffer_size(buf: _Buf) -> int:
    return len(buf) if isinstance(buf, bytearray) else sizeof(buf)


def _check_size(name: str, request: int, buf: _Buf) -> None:
    # The size encoded in the request is what the kernel copies for a fixed-size argument, and
    # the header it reads first for a variable one: a smaller buffer would be overrun.
    kind = type(buf)
    if (kind, request) not in _BIG_ENOUGH:
        need = (request >> _IOC_SIZESHIFT) & _IOC_SIZEMASK
        have = _buffer_size(buf)
        if have < need:
            raise KernelBufferError(f"{name} needs a buffer of at least {need} bytes, not {have}")
        if kind is not bytearray:  # a ctypes type's size is fixed: check it once
            _BIG_ENOUGH.add((kind, request))


class PreparedIoctl(NamedTuple):
    """One ioctl with its argument checked once, to be issued again and again.

    Made by the fd wrappers' ``prepare_*`` methods and issued in order by ``issue``: what a fast
    reset does with the same structures after every run, without re-checking them each time.
    """

    #: The request's name, for errors.
    name: str
    request: int
    #: The argument; the kernel reads it when the call is issued, so it may change in between.
    buffer: _Buf
    #: What the kernel must return (e.g. how many MSRs it wrote), or -1 for any success.
    result: int


def _enable_cap(cap: int, args: tuple[int, ...], flags: int) -> kvm_enable_cap:
    if len(args) > 4:
        raise ValueError(f"KVM_ENABLE_CAP takes at most 4 arguments, not {len(args)}")
    return kvm_enable_cap(cap=int(cap), flags=flags, args=(c_uint64 * 4)(*args))


class _FdOwner(Closeable):
    """Owns one fd: ``close()`` is idempotent and the object is a context manager.

    A per-object lock is held across every ioctl (but KVM_RUN, see :meth:`VcpuFd.run`) and across
    :meth:`close`: without it, a ``close()`` between reading the fd and the ioctl would let the ioctl
    reach whatever file the kernel next gave that fd number.
    """

    _fd: int

    def __init__(self, fd: int) -> None:
        self._fd = fd
        # Reentrant: a method holding it may call another ioctl method, and a signal handler that
        # runs on a thread holding it may still use the object.
        self._lock = threading.RLock()

    @property
    def fd(self) -> int:
        """The raw file descriptor (-1 once closed)."""
        return self._fd

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has run."""
        return self._fd < 0

    def close(self) -> None:
        """Close the file descriptor; calling it again does nothing.

        Waits for an ioctl another thread is making on this object (never for a KVM_RUN).
        """
        with self._lock:
            fd, self._fd = self._fd, -1
            if fd >= 0:
                os.close(fd)

    def __del__(self) -> None:
        # A safety net only: owners are expected to be closed explicitly, and told when they
        # were not (as Python's files do).
        if getattr(self, "_fd", -1) < 0:
            return
        try:
            warnings.warn(f"unclosed {self._describe()} (fd {self._fd})", ResourceWarning,
                          source=self, stacklevel=2)
            self.close()
        except Exception:
            pass

    def _describe(self) -> str:
        return f"this {type(self).__name__}"

    def _closed_error(self, name: str) -> ClosedError:
        return ClosedError(f"{name}: {self._describe()} is closed")

    def _check_open(self, name: str) -> int:
        """The fd, or ClosedError; call with the lock held, and keep it across the fd's use."""
        fd = self._fd
        if fd < 0:
            raise self._closed_error(name)
        return fd

    def _ioctl_int(self, name: str, request: int, arg: int = 0) -> int:
        with self._lock:
            fd = self._check_open(name)
            # libc's ioctl, not fcntl.ioctl: the latter passes a C int, and some arguments (guest
            # addresses) are unsigned longs above 2**31.
            ret: int = _libc_ioctl(fd, request, arg)
            if ret < 0:
                raise KvmIoctlError(name, ctypes.get_errno())
        return ret

    def _prepare(self, name: str, request: int, buf: _Buf, result: int = -1) -> PreparedIoctl:
        _check_size(name, request, buf)
        return PreparedIoctl(name, request, buf, result)

    def issue(self, calls: Sequence[PreparedIoctl]) -> None:
        """Issue prepared ioctls in order, under one hold of the lock; stop at the first failure.

        Raises:
            KvmIoctlError: a call failed (it names which), or returned other than its ``result``.
            ClosedError: the fd is closed.
        """
        call = ioctl
        with self._lock:
            fd = self._check_open(calls[0].name if calls else "ioctl")
            # The hot part of a fast reset: nothing per call but the call and its check.
            for name, request, buf, result in calls:
                try:
                    ret = call(fd, request, buf, True)
                except OSError as e:
                    raise KvmIoctlError(name, e.errno or 0) from e
                if result >= 0 and ret != result:
                    raise KvmIoctlError(name, _errno.EINVAL,
                                        f"handled {ret} of the {result} entries given")

    def _ioctl_buf(self, name: str, request: int, buf: _Buf) -> int:
        _check_size(name, request, buf)
        with self._lock:
            fd = self._check_open(name)
            try:
                ret: int = ioctl(fd, request, buf, True)
            except OSError as e:
                raise KvmIoctlError(name, e.errno or 0) from e
        return ret

    def _get(self, name: str, request: int, cls: type[_T]) -> _T:
        obj = cls()
        self._ioctl_buf(name, request, obj)
        return obj

    def _get_growing(self, name: str, request: int, make: Callable[[int], _T], count_field: str,
                     start: int) -> _T:
        # The list ioctls write at most as many entries as the count field allows and answer E2BIG
        # when that is too few (KVM_GET_MSR_INDEX_LIST also writes back the count it needs).
        n = max(start, 1)
        while True:
            obj = make(n)
            try:
                self._ioctl_buf(name, request, obj)
            except KvmIoctlError as e:
                if e.errno != _errno.E2BIG or n >= 1 << 16:
                    raise
                needed = getattr(obj, count_field)
                n = needed if needed > n else n * 2
                continue
            return obj


