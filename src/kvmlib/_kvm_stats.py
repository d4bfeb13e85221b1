"""KVM's binary statistics (``KVM_GET_STATS_FD``, Linux 5.14+): vCPU counters read while it runs.

Each vCPU fd hands out a read-only statistics fd (:meth:`kvmlib.ioctl.VcpuFd.get_stats_fd`): a
:class:`~kvmlib.ioctl.kvm_stats_header`, descriptors (:class:`~kvmlib.ioctl.kvm_stats_desc`, each
followed by its name) naming each counter (``exits``, ``io_exits``, ``halt_exits`` ...) with its
offset, and the values, which the kernel keeps current. Reading it never stops or kicks the vCPU,
which is what a status line polled once a second needs.
"""

from __future__ import annotations

import ctypes
import os
import struct
import threading
from collections.abc import Iterable

from kvmlib.errors import KvmIoctlError
from kvmlib.ioctl import VcpuFd, kvm_stats_desc, kvm_stats_header

_U64 = struct.Struct("<Q")


def counter_offsets(fd: int) -> dict[str, int]:
    """Each single-valued counter's file offset in the statistics fd ``fd``, by name."""
    header = kvm_stats_header.from_buffer_copy(
        os.pread(fd, ctypes.sizeof(kvm_stats_header), 0))
    stride = ctypes.sizeof(kvm_stats_desc) + header.name_size
    table = os.pread(fd, stride * header.num_desc, header.desc_offset)
    offsets = {}
    for i in range(header.num_desc):
        at = i * stride
        desc = kvm_stats_desc.from_buffer_copy(table, at)
        start = at + ctypes.sizeof(kvm_stats_desc)
        name = table[start:start + header.name_size].split(b"\0", 1)[0].decode("ascii", "replace")
        if desc.size == 1:
            offsets[name] = header.data_offset + desc.offset
    return offsets


class VcpuCounters:
    """One counter summed over vCPUs, read from their statistics fds; safe from any thread.

    Args:
        vcpu_fds: the vCPUs (only used here, to ask each for its statistics fd).
        name: the counter, as KVM names it (``exits``).

    :attr:`available` is False where KVM has no binary statistics or no such counter; then
    :meth:`read` returns None.
    """

    def __init__(self, vcpu_fds: Iterable[VcpuFd], name: str = "exits") -> None:
        self._lock = threading.Lock()
        self._fds: list[tuple[int, int]] = []
        try:
            for vcpu_fd in vcpu_fds:
                fd = vcpu_fd.get_stats_fd()
                try:
                    offset = counter_offsets(fd).get(name)
                except (OSError, ValueError):  # a short read: from_buffer_copy's ValueError
                    offset = None
                if offset is None:
                    os.close(fd)
                    break
                self._fds.append((fd, offset))
            else:
                return
        except KvmIoctlError:
            pass  # ENOTTY / EINVAL: a kernel older than 5.14
        self.close()

    @property
    def available(self) -> bool:
        """Whether :meth:`read` can answer."""
        with self._lock:
            return bool(self._fds)

    def read(self) -> int | None:
        """The counter's sum over the vCPUs now; None when unavailable or closed."""
        with self._lock:
            if not self._fds:
                return None
            try:
                values: list[int] = [_U64.unpack(os.pread(fd, 8, offset))[0]
                                     for fd, offset in self._fds]
            except OSError:
                return None
        return sum(values)

    def close(self) -> None:
        """Close the statistics fds; idempotent."""
        with self._lock:
            fds, self._fds = self._fds, []
        for fd, _ in fds:
            os.close(fd)
