"""Decoded exits: what :meth:`kvmlib.ioctl.VcpuFd.run` returns for each ``exit_reason``.

One immutable object per exit, in the manner of rust-vmm's ``VcpuExit``: port and MMIO I/O carry
a view of their data in ``kvm_run`` (to answer a read in place), the rest their decoded fields.
:class:`Unknown` is what KVM calls unknown (``KVM_EXIT_UNKNOWN``); :class:`Undecoded` is an exit
reason this kvmlib does not decode.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from ctypes import sizeof
from enum import IntEnum
from typing import Any, NamedTuple
from typing import Union as TUnion

from kvmlib.ioctl.numbers import (
    KVM_EXIT_DEBUG,
    KVM_EXIT_EXCEPTION,
    KVM_EXIT_FAIL_ENTRY,
    KVM_EXIT_HLT,
    KVM_EXIT_HYPERCALL,
    KVM_EXIT_INTERNAL_ERROR,
    KVM_EXIT_INTR,
    KVM_EXIT_IRQ_WINDOW_OPEN,
    KVM_EXIT_SHUTDOWN,
    KVM_EXIT_SYSTEM_EVENT,
    KVM_EXIT_UNKNOWN,
    KVM_EXIT_X86_RDMSR,
    KVM_EXIT_X86_WRMSR,
    KVM_SYSTEM_EVENT_CRASH,
    KVM_SYSTEM_EVENT_RESET,
    KVM_SYSTEM_EVENT_SEV_TERM,
    KVM_SYSTEM_EVENT_SHUTDOWN,
    KVM_SYSTEM_EVENT_SUSPEND,
    KVM_SYSTEM_EVENT_WAKEUP,
)
from kvmlib.ioctl.structs import (
    _kvm_run_exit,
    _kvm_run_hypercall,
    _kvm_run_mmio,
    _kvm_run_msr,
    field_offset,
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


class IrqWindowOpen(_Singleton):
    """KVM_EXIT_IRQ_WINDOW_OPEN: the guest can take an interrupt (after ``request_interrupt_window``)."""

    __slots__ = ()


class SystemEventKind(IntEnum):
    """``KVM_SYSTEM_EVENT_*``: what a :class:`SystemEvent` reports."""

    SHUTDOWN = KVM_SYSTEM_EVENT_SHUTDOWN
    RESET = KVM_SYSTEM_EVENT_RESET
    CRASH = KVM_SYSTEM_EVENT_CRASH
    WAKEUP = KVM_SYSTEM_EVENT_WAKEUP
    SUSPEND = KVM_SYSTEM_EVENT_SUSPEND
    SEV_TERM = KVM_SYSTEM_EVENT_SEV_TERM


class SystemEvent(NamedTuple):
    """KVM_EXIT_SYSTEM_EVENT: ``type`` is a ``KVM_SYSTEM_EVENT_*`` value (see :attr:`kind`)."""

    type: int
    data: tuple[int, ...]

    @property
    def kind(self) -> SystemEventKind | None:
        """``type`` as a :class:`SystemEventKind`; None for a value this kvmlib does not know."""
        try:
            return SystemEventKind(self.type)
        except ValueError:
            return None


class InternalError(NamedTuple):
    """KVM_EXIT_INTERNAL_ERROR: KVM could not handle the guest (e.g. emulation failed)."""

    suberror: int
    data: tuple[int, ...]


class FailEntry(NamedTuple):
    """KVM_EXIT_FAIL_ENTRY: the hardware refused to enter the guest."""

    reason: int
    cpu: int = 0


class ExceptionExit(NamedTuple):
    """KVM_EXIT_EXCEPTION: a guest exception KVM hands to user space (``exception`` is the vector)."""

    exception: int
    error_code: int


class Debug(NamedTuple):
    """KVM_EXIT_DEBUG: a guest-debug event (``struct kvm_debug_exit_arch``)."""

    #: The vector: 1 (#DB: single step, hardware breakpoint) or 3 (#BP: ``int3``).
    exception: int
    #: The guest RIP of the event.
    pc: int
    #: DR6, saying which hardware breakpoint or single step fired.
    dr6: int
    #: DR7.
    dr7: int


class Hypercall(NamedTuple):
    """KVM_EXIT_HYPERCALL: a hypercall KVM forwards to user space; :meth:`answer` sets its result."""

    #: The hypercall number.
    nr: int
    #: Its six arguments.
    args: tuple[int, ...]
    #: Whether the guest was in long mode (newer kernels: the low half of ``flags``).
    longmode: int
    #: The exit's bytes in ``kvm_run`` (writable; valid until the next run).
    raw: memoryview

    def answer(self, ret: int) -> None:
        """Give the guest ``ret`` as the hypercall's result (before the next run)."""
        _U64.pack_into(self.raw, _HYPERCALL_RET, ret & _U64_MASK)


class X86Rdmsr(NamedTuple):
    """KVM_EXIT_X86_RDMSR: a guest ``rdmsr`` for user space to answer (KVM_CAP_X86_USER_SPACE_MSR).

    Call :meth:`answer` with the value, or :meth:`fail` to inject a #GP, before the next run.
    """

    #: The MSR (ECX).
    index: int  # type: ignore[assignment]  # the kernel's name, shadowing tuple.index on purpose
    #: Why it reached user space (``KVM_MSR_EXIT_REASON_*``).
    reason: int
    #: The exit's bytes in ``kvm_run`` (writable; valid until the next run).
    raw: memoryview

    def answer(self, value: int) -> None:
        """The guest reads ``value`` (EDX:EAX)."""
        _U64.pack_into(self.raw, _MSR_DATA, value & _U64_MASK)
        self.raw[_MSR_ERROR] = 0

    def fail(self) -> None:
        """The guest's ``rdmsr`` faults (#GP)."""
        self.raw[_MSR_ERROR] = 1


class X86Wrmsr(NamedTuple):
    """KVM_EXIT_X86_WRMSR: a guest ``wrmsr`` for user space to take; :meth:`fail` refuses it (#GP)."""

    #: The MSR (ECX).
    index: int  # type: ignore[assignment]  # the kernel's name, shadowing tuple.index on purpose
    #: Why it reached user space (``KVM_MSR_EXIT_REASON_*``).
    reason: int
    #: The value written (EDX:EAX).
    data: int
    #: The exit's bytes in ``kvm_run`` (writable; valid until the next run).
    raw: memoryview

    def fail(self) -> None:
        """The guest's ``wrmsr`` faults (#GP)."""
        self.raw[_MSR_ERROR] = 1


class Unknown(NamedTuple):
    """KVM_EXIT_UNKNOWN: KVM itself did not know the exit; ``hardware_exit_reason`` is the CPU's."""

    hardware_exit_reason: int


class Undecoded(NamedTuple):
    """An exit reason kvmlib does not decode; ``data`` holds the exit's bytes of ``kvm_run``."""

    reason: int
    data: bytes


def _eq_same_type(self: tuple[Any, ...], other: object) -> bool:
    return type(other) is type(self) and tuple.__eq__(self, other) is True


def _ne_same_type(self: tuple[Any, ...], other: object) -> bool:
    return not _eq_same_type(self, other)


def _hash_with_type(self: tuple[Any, ...]) -> int:
    return hash((type(self), tuple(self)))


VcpuExit = TUnion[IoIn, IoOut, MmioRead, MmioWrite, Hlt, Shutdown, Intr, IrqWindowOpen, SystemEvent,
                  InternalError, FailEntry, ExceptionExit, Debug, Hypercall, X86Rdmsr, X86Wrmsr,
                  Unknown, Undecoded]
"""The decoded result of :meth:`VcpuFd.run`."""

# Exits with the same fields must still differ by kind: IoIn(...) never equals IoOut(...).
for _cls in (IoIn, IoOut, MmioRead, MmioWrite, SystemEvent, InternalError, FailEntry, ExceptionExit,
             Debug, Hypercall, X86Rdmsr, X86Wrmsr, Unknown, Undecoded):
    _cls.__eq__ = _eq_same_type  # type: ignore[method-assign]
    _cls.__ne__ = _ne_same_type  # type: ignore[method-assign, assignment]
    _cls.__hash__ = _hash_with_type  # type: ignore[method-assign]
del _cls

_HLT = Hlt()
_SHUTDOWN = Shutdown()
_INTR = Intr()

# Offsets inside kvm_run that the hot path reads with precompiled unpackers instead of ctypes
# attribute access (which allocates and is several times slower).
_EXIT_REASON_OFF = field_offset(kvm_run, "exit_reason")
_EXIT_OFF = field_offset(kvm_run, "_exit")
# exit_reason and, when it is KVM_EXIT_IO, the io header, in one unpack.
_HEAD_UNPACK = struct.Struct(f"<I{_EXIT_OFF - _EXIT_REASON_OFF - 4}xBBHIQ").unpack_from
_MMIO_UNPACK = struct.Struct("<Q8sIB").unpack_from
_MMIO_DATA_OFF = _EXIT_OFF + field_offset(_kvm_run_mmio, "data")
# tuple.__new__ skips the Python-level __new__ NamedTuple generates: the exit loop's largest cost.
_tuple_new = tuple.__new__
_IMMEDIATE_EXIT_OFF = field_offset(kvm_run, "immediate_exit")



#: The size of ``kvm_run``'s exit union, what :func:`decode_exit` reads.
EXIT_SIZE = sizeof(_kvm_run_exit)

_U64 = struct.Struct("<Q")
_U64_MASK = (1 << 64) - 1
_HYPERCALL_RET = field_offset(_kvm_run_hypercall, "ret")
_MSR_ERROR = field_offset(_kvm_run_msr, "error")
_MSR_DATA = field_offset(_kvm_run_msr, "data")

#: How to decode each exit reason but port and MMIO I/O (which VcpuFd.run decodes inline):
#: ``reason -> decode(exit_union_view)``. Adding an exit kind is a class above and a line here.
_DECODERS: dict[int, Callable[[memoryview], VcpuExit]] = {}


def _unpacker(fmt: str) -> Callable[[memoryview], tuple[Any, ...]]:
    unpack = struct.Struct(fmt).unpack_from
    return lambda view: unpack(view, 0)


def _counted(fmt: str, make: Callable[[int, tuple[int, ...]], VcpuExit]) -> Callable[[memoryview], VcpuExit]:
    # A u32 code, a u32 count, then up to 16 u64 of data of which the count are valid.
    unpack = _unpacker(fmt)

    def decode(view: memoryview) -> VcpuExit:
        code, ndata, *data = unpack(view)
        return make(code, tuple(data[:min(ndata, 16)]))
    return decode


def _hypercall(view: memoryview) -> VcpuExit:
    nr, *args, _ret, longmode = _HYPERCALL_UNPACK(view)
    return Hypercall(nr, tuple(args), longmode, view)


def _rdmsr(view: memoryview) -> VcpuExit:
    reason, index, _data = _MSR_UNPACK(view)
    return X86Rdmsr(index, reason, view)


def _wrmsr(view: memoryview) -> VcpuExit:
    reason, index, data = _MSR_UNPACK(view)
    return X86Wrmsr(index, reason, data, view)


_HYPERCALL_UNPACK = _unpacker("<Q6QQI")
_MSR_UNPACK = _unpacker("<8xIIQ")
_DEBUG_UNPACK = _unpacker("<I4xQQQ")
_EX_UNPACK = _unpacker("<II")
_FAIL_UNPACK = _unpacker("<QI")
_HW_UNPACK = _unpacker("<Q")
_IRQ_WINDOW_OPEN = IrqWindowOpen()

_DECODERS.update({
    KVM_EXIT_UNKNOWN: lambda v: Unknown(*_HW_UNPACK(v)),
    KVM_EXIT_EXCEPTION: lambda v: ExceptionExit(*_EX_UNPACK(v)),
    KVM_EXIT_HYPERCALL: _hypercall,
    KVM_EXIT_DEBUG: lambda v: Debug(*_DEBUG_UNPACK(v)),
    KVM_EXIT_HLT: lambda v: _HLT,
    KVM_EXIT_IRQ_WINDOW_OPEN: lambda v: _IRQ_WINDOW_OPEN,
    KVM_EXIT_SHUTDOWN: lambda v: _SHUTDOWN,
    KVM_EXIT_FAIL_ENTRY: lambda v: FailEntry(*_FAIL_UNPACK(v)),
    KVM_EXIT_INTR: lambda v: _INTR,
    KVM_EXIT_INTERNAL_ERROR: _counted("<II16Q", InternalError),
    KVM_EXIT_SYSTEM_EVENT: _counted("<II16Q", SystemEvent),
    KVM_EXIT_X86_RDMSR: _rdmsr,
    KVM_EXIT_X86_WRMSR: _wrmsr,
})


def decode_exit(reason: int, view: memoryview) -> VcpuExit:
    """Decode an exit other than port or MMIO I/O from ``view``, the exit union of ``kvm_run``.

    Exits that the VMM answers (:class:`Hypercall`, :class:`X86Rdmsr`) keep ``view`` to write into.
    """
    decode = _DECODERS.get(reason)
    if decode is None:
        return Undecoded(reason, bytes(view))
    return decode(view)
