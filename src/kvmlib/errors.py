"""The kvmlib exception hierarchy, rooted at :class:`KvmError`."""

from __future__ import annotations

import errno as _errno
import os


class KvmError(Exception):
    """Root of every error kvmlib raises."""


class _OsOriginatedError(OSError):
    """An error the OS reported: an :class:`OSError` with ``errno`` set, and kvmlib's message.

    ``str()`` is kvmlib's message (what failed and what to do); ``strerror`` stays the OS's own.
    """

    def __init__(self, message: str, errno: int | None = None) -> None:
        if errno is None:
            super().__init__(message)
        else:
            super().__init__(errno, os.strerror(errno))
        self.message = message

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple[object, ...]:
        return type(self), (self.message, self.errno)


class KvmUnavailableError(KvmError, _OsOriginatedError):
    """``/dev/kvm`` is missing, not permitted, or speaks an unsupported API.

    An :class:`OSError`: ``errno`` is the open's when the device could not be opened (None for an
    unsupported API version or platform).
    """


class KvmIoctlError(KvmError, _OsOriginatedError):
    """An ioctl failed; an :class:`OSError` carrying the ioctl's name and the errno.

    Attributes:
        ioctl: the ioctl's name as in ``<linux/kvm.h>`` (e.g. ``"KVM_RUN"``).
        errno: the errno the kernel returned.
        detail: what else kvmlib knows (e.g. the first MSR refused), or "".
    """

    def __init__(self, ioctl: str, errno: int, detail: str = "") -> None:
        name = _errno.errorcode.get(errno, str(errno))
        msg = f"{ioctl} failed: [{name}] {os.strerror(errno)}"
        if detail:
            msg += f" ({detail})"
        super().__init__(msg, errno)
        self.ioctl = ioctl
        self.detail = detail

    def __reduce__(self) -> tuple[object, ...]:
        return type(self), (self.ioctl, self.errno, self.detail)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.ioctl!r}, {self.errno!r}, {self.detail!r})"


class ClosedError(KvmError, ValueError):
    """The object was closed: a VM, vCPU, file descriptor or guest memory used after ``close()``.

    A :class:`ValueError` too, as for a closed Python file.
    """


class KernelBufferError(KvmError, ValueError):
    """A buffer does not fit what the kernel will read or write through it, or that size is unknown.

    Raised before the ioctl, where the kernel would otherwise write past the buffer (or read past
    it). A :class:`ValueError` too: the argument that sized the buffer was wrong.
    """


class GuestMemoryError(KvmError):
    """A guest memory access or layout is invalid (out of bounds, overlap, misalignment)."""


class GuestMemoryMapError(GuestMemoryError, _OsOriginatedError):
    """The OS refused to map guest memory (``mmap``, ``open``): an :class:`OSError` with ``errno``."""


class VmError(KvmError):
    """A VM or vCPU lifecycle operation was used wrongly or failed."""


class VcpuError(VmError):
    """A vCPU ended with an error (internal error, failed entry, unknown exit, device exception).

    Attributes:
        vcpu_id: the vCPU, when known.
        exit: the exit that stopped it (an :class:`~kvmlib.InternalError`, ...), when one did.
        rip: the guest instruction pointer at that exit, when it could be read.
    """

    def __init__(self, message: str, *, vcpu_id: int | None = None, exit: object = None,
                 rip: int | None = None) -> None:
        super().__init__(message)
        self.vcpu_id = vcpu_id
        self.exit = exit
        self.rip = rip


class SnapshotError(KvmError):
    """A VM state or snapshot cannot be taken, does not fit the VM, or is malformed or corrupted."""
