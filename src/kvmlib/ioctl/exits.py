"""Decoded exits: what :meth:`kvmlib.ioctl.VcpuFd.run` returns for each ``exit_reason``."""

from __future__ import annotations

import struct
from typing import Any, NamedTuple
from typing import Union as TUnion

from kvmlib.ioctl.structs import (
    _kvm_run_mmio,
    kvm_run,
)

# --------------------------------------------------------------------------------------------------
# Exits
# --------------------------------------------------------------------------------------------------


class IoIn(NamedTuple):
    """A guest ``in``: write the answer into ``data`` (a writable view into ``kvm_run``)."""

    port: int
    size: int
    count: int  # type: ignore[assignment]  # the kernel's name, shadowing tuple.count on purpose
    data: memoryview


class IoOut(NamedTuple):
    """A guest ``out``: ``data`` holds ``size * count`` bytes the guest wrote."""

    port: int
    size: int
    count: int  # type: ignore[assignment]  # the kernel's name, shadowing tuple.count on purpose
    data: memoryview


class MmioRead(NamedTuple):
    """A guest read of unbacked memory: write the answer into ``data`` (a view into ``kvm_run``)."""

    address: int
    data: memoryview


class MmioWrite(NamedTuple):
    """A guest write to unbacked (or read-only) memory."""

    address: int
    data: memoryview


class _Singleton:
    """An exit with no payload: every instance equals every other of its class, and only those."""

    __slots__ = ()

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self)

    def __hash__(self) -> int:
        return hash(type(self))

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Hlt(_Singleton):
    """The guest executed ``hlt`` with no in-kernel irqchip to wait on."""

    __slots__ = ()


class Shutdown(_Singleton):
    """The guest shut down (on x86 typically a triple fault)."""

    __slots__ = ()


class Intr(_Singleton):
    """KVM_RUN returned because of a signal or ``immediate_exit`` (EINTR)."""

    __slots__ = ()


class SystemEvent(NamedTuple):
    """KVM_EXIT_SYSTEM_EVENT: ``type`` is a ``KVM_SYSTEM_EVENT_*`` value."""

    type: int
    data: tuple[int, ...]


class InternalError(NamedTuple):
    """KVM_EXIT_INTERNAL_ERROR: KVM could not handle the guest (e.g. emulation failed)."""

    suberror: int
    data: tuple[int, ...]


class FailEntry(NamedTuple):
    """KVM_EXIT_FAIL_ENTRY: the hardware refused to enter the guest."""

    reason: int
    cpu: int = 0


class Unknown(NamedTuple):
    """Any other exit reason; ``reason`` is the raw ``exit_reason``."""

    reason: int


def _eq_same_type(self: tuple[Any, ...], other: object) -> bool:
    return type(other) is type(self) and tuple.__eq__(self, other) is True


def _ne_same_type(self: tuple[Any, ...], other: object) -> bool:
    return not _eq_same_type(self, other)


def _hash_with_type(self: tuple[Any, ...]) -> int:
    return hash((type(self), tuple(self)))


# Exits with the same fields must still differ by kind: IoIn(...) never equals IoOut(...).
for _cls in (IoIn, IoOut, MmioRead, MmioWrite, SystemEvent, InternalError, FailEntry, Unknown):
    _cls.__eq__ = _eq_same_type  # type: ignore[method-assign]
    _cls.__ne__ = _ne_same_type  # type: ignore[method-assign, assignment]
    _cls.__hash__ = _hash_with_type  # type: ignore[method-assign]
del _cls

VcpuExit = TUnion[IoIn, IoOut, MmioRead, MmioWrite, Hlt, Shutdown, Intr, SystemEvent, InternalError,
                  FailEntry, Unknown]
"""The decoded result of :meth:`VcpuFd.run`."""

_HLT = Hlt()
_SHUTDOWN = Shutdown()
_INTR = Intr()

# Offsets inside kvm_run that the hot path reads with precompiled unpackers instead of ctypes
# attribute access (which allocates and is several times slower).
_EXIT_REASON_OFF = kvm_run.exit_reason.offset
_EXIT_OFF = kvm_run._exit.offset
# exit_reason and, when it is KVM_EXIT_IO, the io header, in one unpack.
_HEAD_UNPACK = struct.Struct(f"<I{_EXIT_OFF - _EXIT_REASON_OFF - 4}xBBHIQ").unpack_from
_MMIO_UNPACK = struct.Struct("<Q8sIB").unpack_from
_MMIO_DATA_OFF = _EXIT_OFF + _kvm_run_mmio.data.offset
_INTERNAL_UNPACK = struct.Struct("<II16Q").unpack_from
_SYSEV_UNPACK = struct.Struct("<II16Q").unpack_from
_FAIL_UNPACK = struct.Struct("<QI").unpack_from
# tuple.__new__ skips the Python-level __new__ NamedTuple generates: the exit loop's largest cost.
_tuple_new = tuple.__new__
_IMMEDIATE_EXIT_OFF = kvm_run.immediate_exit.offset


