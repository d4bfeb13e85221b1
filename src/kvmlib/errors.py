"""The kvmlib exception hierarchy, rooted at :class:`KvmError`."""

from __future__ import annotations

import errno as _errno
import os


class KvmError(Exception):
    """Root of every error kvmlib raises."""


class KvmUnavailableError(KvmError):
    """``/dev/kvm`` is missing, not permitted, or speaks an unsupported API."""


class KvmIoctlError(KvmError):
    """An ioctl failed; carries the ioctl's name and the errno.

    Attributes:
        ioctl: the ioctl's name as in ``<linux/kvm.h>`` (e.g. ``"KVM_RUN"``).
        errno: the errno the kernel returned.
    """

    def __init__(self, ioctl: str, errno: int, detail: str = "") -> None:
        self.ioctl = ioctl
        self.errno = errno
        name = _errno.errorcode.get(errno, str(errno))
        msg = f"{ioctl} failed: [{name}] {os.strerror(errno)}"
        if detail:
            msg += f" ({detail})"
        super().__init__(msg)


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
