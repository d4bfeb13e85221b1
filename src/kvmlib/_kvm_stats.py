"""KVM's binary statistics (``KVM_GET_STATS_FD``, Linux 5.14+): vCPU counters read while it runs.

Each vCPU (and VM) fd hands out a read-only statistics fd: a header, descriptors naming each
counter (``exits``, ``io_exits``, ``halt_exits``, ``insn_emulation`` ...) with its offset, and the
values, which the kernel keeps current. Reading it never stops or kicks the vCPU, which is what a
status line polled once a second needs. The layout is ``struct kvm_stats_header`` and ``struct
kvm_stats_desc`` of ``<linux/kvm.h>``.
"""

from __future__ import annotations

import fcntl
import os
import struct
import threading
from collections.abc import Iterable

from kvmlib.ioctl.numbers import _IO, KVMIO

KVM_GET_STATS_FD = _IO(KVMIO, 0xCE)
# flags, name_size, num_desc, id_offset, desc_offset, data_offset
_HEADER = struct.Struct("<6I")
# flags, exponent, size (in u64 values), offset (from data_offset), bucket_size; the name follows
_DESC = struct.Struct("<IhHII")
_U64 = struct.Struct("<Q")


def _counter_offsets(fd: int) -> dict[str, int]:
    """Each single-valued counter's file offset, by name."""
    _flags, name_size, num_desc, _id, desc_offset, data_offset = _HEADER.unpack(
        os.pread(fd, _HEADER.size, 0))
    stride = _DESC.size + name_size
    table = os.pread(fd, stride * num_desc, desc_offset)
    offsets = {}
    for i in range(num_desc):
        _dflags, _exponent, size, offset, _bucket = _DESC.unpack_from(table, i * stride)
        start = i * stride + _DESC.size
        name = table[start:start + name_size].split(b"\0", 1)[0].decode("ascii", "replace")
        if size == 1:
            offsets[name] = data_offset + offset
    return offsets


class VcpuCounters:
    """One counter summed over vCPUs, read from their statistics fds; safe from any thread.

    Args:
        vcpu_fds: the vCPU fds (only used here, to ask each for its statistics fd).
        name: the counter, as KVM names it (``exits``).

    :attr:`available` is False where KVM has no binary statistics or no such counter; then
    :meth:`read` returns None.
    """

    def __init__(self, vcpu_fds: Iterable[int], name: str = "exits") -> None:
        self._lock = threading.Lock()
        self._fds: list[tuple[int, int]] = []
        try:
            for vcpu_fd in vcpu_fds:
                fd = fcntl.ioctl(vcpu_fd, KVM_GET_STATS_FD)
                try:
                    offset = _counter_offsets(fd).get(name)
                except (OSError, struct.error):
                    offset = None
                if offset is None:
                    os.close(fd)
                    break
                self._fds.append((fd, offset))
            else:
                return
        except OSError:
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
