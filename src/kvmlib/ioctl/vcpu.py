"""A vCPU's fd wrapper, :class:`VcpuFd`: KVM_RUN with its decoded exit, and the vCPU state."""

from __future__ import annotations

import errno as _errno
import mmap
from collections.abc import Iterable, Sequence
from ctypes import sizeof
from typing import Literal

from typing_extensions import Buffer

from kvmlib.errors import KernelBufferError, KvmIoctlError
from kvmlib.ioctl.exits import (
    _EXIT_OFF,
    _EXIT_REASON_OFF,
    _HEAD_UNPACK,
    _IMMEDIATE_EXIT_OFF,
    _INTR,
    _MMIO_DATA_OFF,
    _MMIO_UNPACK,
    EXIT_SIZE,
    IoIn,
    IoOut,
    MmioRead,
    MmioWrite,
    Undecoded,
    VcpuExit,
    _tuple_new,
    decode_exit,
)
from kvmlib.ioctl.fd import (
    PreparedIoctl,
    _Buf,
    _buffer_size,
    _enable_cap,
    _FdOwner,
    run_ioctl,
)
from kvmlib.ioctl.numbers import (
    KVM_ENABLE_CAP,
    KVM_EXIT_IO,
    KVM_EXIT_IO_OUT,
    KVM_EXIT_MMIO,
    KVM_GET_CPUID2,
    KVM_GET_DEBUGREGS,
    KVM_GET_FPU,
    KVM_GET_LAPIC,
    KVM_GET_MP_STATE,
    KVM_GET_MSRS,
    KVM_GET_REGS,
    KVM_GET_SREGS,
    KVM_GET_STATS_FD,
    KVM_GET_VCPU_EVENTS,
    KVM_GET_XCRS,
    KVM_GET_XSAVE,
    KVM_GET_XSAVE2,
    KVM_RUN,
    KVM_SET_CPUID2,
    KVM_SET_DEBUGREGS,
    KVM_SET_FPU,
    KVM_SET_GUEST_DEBUG,
    KVM_SET_LAPIC,
    KVM_SET_MP_STATE,
    KVM_SET_MSRS,
    KVM_SET_REGS,
    KVM_SET_SREGS,
    KVM_SET_VCPU_EVENTS,
    KVM_SET_XCRS,
    KVM_SET_XSAVE,
    KVM_SYNC_X86_EVENTS,
    KVM_SYNC_X86_REGS,
    KVM_SYNC_X86_SREGS,
)
from kvmlib.ioctl.structs import (
    field_offset,
    kvm_cpuid2,
    kvm_cpuid_entry2,
    kvm_debugregs,
    kvm_fpu,
    kvm_guest_debug,
    kvm_lapic_state,
    kvm_mp_state,
    kvm_msrs,
    kvm_regs,
    kvm_run,
    kvm_sregs,
    kvm_sync_regs,
    kvm_vcpu_events,
    kvm_xcrs,
    kvm_xsave,
    make_kvm_cpuid2,
    make_kvm_msrs,
)

_SYNC_OFF = field_offset(kvm_run, "s")
_SYNC_REGS_OFF = _SYNC_OFF + field_offset(kvm_sync_regs, "regs")
_SYNC_SREGS_OFF = _SYNC_OFF + field_offset(kvm_sync_regs, "sregs")
_SYNC_EVENTS_OFF = _SYNC_OFF + field_offset(kvm_sync_regs, "events")
_REGS_SIZE, _SREGS_SIZE, _EVENTS_SIZE = sizeof(kvm_regs), sizeof(kvm_sregs), sizeof(kvm_vcpu_events)
_DIRTY_REGS_WORD = field_offset(kvm_run, "kvm_dirty_regs") // 8

#: Port exit objects kept for reuse per vCPU: far more than the distinct ports, sizes and string
#: counts a guest uses, and a bound on what a guest can make the host keep.
_IO_EXITS_CACHED = 1024


def io_exit_key(direction: int, size: int, port: int, count: int, offset: int) -> int:
    """A port exit's identity as one int: its words of ``kvm_run``, as :meth:`VcpuFd.run` reads them.

    ``u32[8] | u32[9] << 32 | u64[5] << 64`` of :attr:`VcpuFd.run_words` when ``u32[2]``
    (``exit_reason``) is ``KVM_EXIT_IO``: the io header (direction, size, port), the count and the
    data offset.
    """
    return (direction | size << 8 | port << 16) | count << 32 | offset << 64


#: The vCPU state :meth:`VcpuFd.prepare_set` prepares a ``KVM_SET_*`` call for.
VcpuSetter = Literal["mp_state", "regs", "sregs", "fpu", "vcpu_events", "xsave", "xcrs",
                     "debugregs", "lapic", "msrs"]

_SETTERS: dict[str, tuple[str, int]] = {
    "mp_state": ("KVM_SET_MP_STATE", KVM_SET_MP_STATE),
    "regs": ("KVM_SET_REGS", KVM_SET_REGS),
    "sregs": ("KVM_SET_SREGS", KVM_SET_SREGS),
    "fpu": ("KVM_SET_FPU", KVM_SET_FPU),
    "vcpu_events": ("KVM_SET_VCPU_EVENTS", KVM_SET_VCPU_EVENTS),
    "xsave": ("KVM_SET_XSAVE", KVM_SET_XSAVE),
    "xcrs": ("KVM_SET_XCRS", KVM_SET_XCRS),
    "debugregs": ("KVM_SET_DEBUGREGS", KVM_SET_DEBUGREGS),
    "lapic": ("KVM_SET_LAPIC", KVM_SET_LAPIC),
    "msrs": ("KVM_SET_MSRS", KVM_SET_MSRS),
}


class VcpuFd(_FdOwner):
    """A vCPU's fd, from :meth:`VmFd.create_vcpu`; ``kvm_run`` is mapped once for its lifetime.

    Args:
        fd: the fd KVM_CREATE_VCPU returned; the object owns it.
        mmap_size: KVM_GET_VCPU_MMAP_SIZE.
        vcpu_id: the vCPU's id, for messages.
        xsave2_size: the bytes KVM_GET_XSAVE2 writes (``KVM_CAP_XSAVE2`` on the VM fd, asked after
            the VM's first vCPU exists). Without it :meth:`get_xsave2` refuses to run.
    """

    def __init__(self, fd: int, mmap_size: int, *, vcpu_id: int | None = None,
                 xsave2_size: int | None = None) -> None:
        super().__init__(fd)
        self._vcpu_id = vcpu_id
        self._xsave2_size = xsave2_size
        self._run_map: mmap.mmap | None = None
        try:
            self._run_map = mmap.mmap(fd, mmap_size, mmap.MAP_SHARED,
                                      mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as e:
            self.close()
            raise KvmIoctlError("mmap(kvm_run)", e.errno or 0) from e
        self._run_view = memoryview(self._run_map)
        self._exit_view = self._run_view[_EXIT_OFF:_EXIT_OFF + EXIT_SIZE]
        self._views: dict[int, memoryview] = {}
        # kvm_run as 32- and 64-bit words: a port exit's header, count and data offset are three
        # indexings, cheaper than any unpacking right after KVM_RUN, when every Python operation
        # runs on cold caches.
        self._u32 = self._run_view.cast("I")
        self._u64 = self._run_view.cast("Q")
        # A port exit is immutable and its data a view that stays put: one object per distinct
        # (header, count, data offset) is reused, and a port exit allocates nothing.
        self._io_exits: dict[int, IoIn | IoOut] = {}
        self._run_size = mmap_size
        self._run = kvm_run.from_buffer(self._run_map)

    @property
    def kvm_run(self) -> kvm_run:
        """The mapped ``struct kvm_run`` (valid until :meth:`close`)."""
        return self._run

    @property
    def xsave2_size(self) -> int | None:
        """The bytes KVM_GET_XSAVE2 writes for this vCPU (None when not known)."""
        return self._xsave2_size

    def _describe(self) -> str:
        return "this VcpuFd" if self._vcpu_id is None else f"the VcpuFd of vCPU {self._vcpu_id}"

    def close(self) -> None:
        """Unmap ``kvm_run`` and close the fd; safe to call twice.

        It does not wait for a KVM_RUN in progress on another thread: the kernel keeps the vCPU
        until that returns, and :meth:`run` then raises :class:`~kvmlib.errors.ClosedError`.
        """
        with self._lock:
            run_map, self._run_map = self._run_map, None
            if run_map is not None:
                del self._run
                views, self._views = self._views, {}
                self._io_exits = {}
                for view in (*views.values(), self._exit_view, self._u32, self._u64,
                             self._run_view):
                    try:
                        view.release()
                    except BufferError:
                        pass  # something acquired a buffer from it; see below
                try:
                    run_map.close()
                except BufferError:
                    # A caller still holds a view of its own making: the mapping is released with
                    # the last such view instead, so no view ever points at unmapped memory.
                    pass
            super().close()

    def set_immediate_exit(self, value: bool) -> None:
        """Set ``kvm_run.immediate_exit``: the next (or interrupted) KVM_RUN returns EINTR at once.

        Does nothing once the vCPU is closed, also when :meth:`close` runs concurrently.
        """
        # No lock: a kick must never wait behind an ioctl that itself waits for KVM_RUN to return.
        try:
            self._run_view[_IMMEDIATE_EXIT_OFF] = 1 if value else 0
        except ValueError:
            pass  # close() released the view: no KVM_RUN is left to stop

    @property
    def run_view(self) -> memoryview:
        """The whole ``kvm_run`` mapping as a writable view (valid until :meth:`close`).

        For loops that decode exits themselves (as :class:`kvmlib.KvmVcpu`'s does); most callers
        want :meth:`run`.
        """
        return self._run_view

    @property
    def run_words(self) -> tuple[memoryview, memoryview]:
        """``kvm_run`` as arrays of 32-bit and of 64-bit words (valid until :meth:`close`).

        With :func:`io_exit_key`, what a loop decoding port exits itself reads after each KVM_RUN.
        """
        return self._u32, self._u64

    def run(self) -> VcpuExit:
        """KVM_RUN, decoded. EINTR is not an error but :class:`Intr`.

        Port and MMIO exits carry ``data`` as a view into ``kvm_run``: write into it the answer to an
        :class:`IoIn` or :class:`MmioRead` before the next :meth:`run`. Like the page it shows, a
        view is only meaningful until the next :meth:`run`, and it is released by :meth:`close`.

        Unlike the other methods it takes no lock (it is the hot path, and it blocks for as long as
        the guest runs): it is the vCPU thread's to call, and a :meth:`close` from elsewhere should
        come only once that thread has left its loop. Run on a closed vCPU, or closed while it
        ran, it raises :class:`~kvmlib.errors.ClosedError`.
        """
        # The hot path: one ioctl, one unpack of the exit's header, one cached view, one tuple.
        try:
            run_ioctl(self._fd, KVM_RUN)
        except OSError as e:
            return self.run_failed(e)
        except ValueError:  # fcntl refuses the -1 a closed object holds
            raise self._closed_error("KVM_RUN") from None
        try:
            u32 = self._u32
            # exit_reason (offset 8) is KVM_EXIT_IO (2): the io header (32), count (36) and
            # data_offset (40), as words 8 and 9 of 32 bits and 5 of 64; see io_exit_key.
            if u32[2] == 2:
                exit_ = self._io_exits.get(u32[8] | u32[9] << 32 | self._u64[5] << 64)
                if exit_ is not None:
                    return exit_
        except (ValueError, IndexError):
            pass  # released by a concurrent close(): current_exit() says so
        return self.current_exit()

    def current_exit(self) -> VcpuExit:
        """Decode the exit the last KVM_RUN left in ``kvm_run`` (what :meth:`run` returns)."""
        try:
            reason, direction, size, port, count, offset = _HEAD_UNPACK(self._run_view,
                                                                        _EXIT_REASON_OFF)
            if reason == KVM_EXIT_IO:
                data = self.io_data(offset, size * count)
                if data is None:  # the kernel's offset leaves the page: never trust it
                    return Undecoded(reason, bytes(self._exit_view))
                kind = IoOut if direction == KVM_EXIT_IO_OUT else IoIn
                exit_: IoIn | IoOut = kind(port, size, count, data)
                if len(self._io_exits) < _IO_EXITS_CACHED:
                    self._io_exits[io_exit_key(direction, size, port, count, offset)] = exit_
                return exit_
            if reason == KVM_EXIT_MMIO:
                addr, _data, length, is_write = _MMIO_UNPACK(self._run_view, _EXIT_OFF)
                data = self.io_data(_MMIO_DATA_OFF, min(length, 8))
                assert data is not None
                if is_write:
                    return _tuple_new(MmioWrite, (addr, data))
                return _tuple_new(MmioRead, (addr, data))
            return decode_exit(reason, self._exit_view)
        except ValueError:
            # close() released the kvm_run views while KVM_RUN ran: the exit is lost with the vCPU.
            if self._fd < 0:
                raise self._closed_error("KVM_RUN") from None
            raise

    def run_failed(self, error: OSError) -> VcpuExit:
        """What a failed KVM_RUN means: :class:`Intr` for EINTR (a kick), else the error raised."""
        if error.errno == _errno.EINTR:
            return _INTR
        if self._fd < 0:
            raise self._closed_error("KVM_RUN") from error
        raise KvmIoctlError("KVM_RUN", error.errno or 0) from error

    def io_data(self, offset: int, length: int) -> memoryview | None:
        """The view of ``kvm_run[offset:offset + length]`` an I/O exit's data is in, or None.

        Views are made once per (offset, length) the kernel uses (a handful) and reused. None when
        the span leaves the mapping: the offset comes from the kernel, but a view past the mapping
        would silently be shorter than the access.
        """
        view = self._views.get(offset << 32 | length)
        return view if view is not None else self._view(offset, length)

    def _view(self, offset: int, length: int) -> memoryview | None:
        """A cached view of ``kvm_run[offset:offset+length]``; None if it leaves the mapping.

        The offset comes from the kernel, but it is checked anyway: a view past the mapping would
        silently be shorter than the access.
        """
        if offset < 0 or offset + length > self._run_size:
            return None
        view = self._run_view[offset:offset + length]
        # Every distinct (offset, length) the kernel uses is a handful: I/O data sits at one offset.
        self._views[(offset << 32) | length] = view
        return view

    def set_sync_regs(self, regs: Buffer | None = None, sregs: Buffer | None = None,
                      events: Buffer | None = None) -> None:
        """Stage registers in ``kvm_run`` (KVM_CAP_SYNC_REGS): KVM loads them at the next KVM_RUN.

        Each of ``regs``, ``sregs`` and ``events`` is the bytes of its structure, or None to leave
        it. This saves the ioctls of setting them now; until KVM_RUN takes them, this object's
        register methods (``get_regs``, ``set_sregs``, ...) first load the staged values with the
        ioctls, so nothing ever reads or overwrites stale registers. Check ``KVM_CAP_SYNC_REGS``
        first: without it KVM refuses the next run.
        """
        view, dirty = self._run_view, 0
        for data, offset, size, bit in ((regs, _SYNC_REGS_OFF, _REGS_SIZE, KVM_SYNC_X86_REGS),
                                        (sregs, _SYNC_SREGS_OFF, _SREGS_SIZE, KVM_SYNC_X86_SREGS),
                                        (events, _SYNC_EVENTS_OFF, _EVENTS_SIZE,
                                         KVM_SYNC_X86_EVENTS)):
            if data is not None:
                # bytes (what a saved state holds) go in as they are; anything else is viewed as
                # bytes first (a slice takes only same-format buffers).
                raw = data if type(data) is bytes else memoryview(data).cast("B")
                if len(raw) != size:
                    raise KernelBufferError(f"a staged structure is {size} bytes, not {len(raw)}")
                view[offset:offset + size] = raw
                dirty |= bit
        self._u64[_DIRTY_REGS_WORD] |= dirty

    def _load_staged(self) -> None:
        # The registers set_sync_regs staged go in now, with their ioctls, in KVM's own order.
        if self._run_map is None:
            return  # closed: the ioctl that follows says so
        dirty = self._u64[_DIRTY_REGS_WORD]
        if not dirty:
            return
        self._u64[_DIRTY_REGS_WORD] = 0
        view = self._run_view
        if dirty & KVM_SYNC_X86_REGS:
            self._ioctl_buf("KVM_SET_REGS", KVM_SET_REGS, kvm_regs.from_buffer_copy(
                view, _SYNC_REGS_OFF))
        if dirty & KVM_SYNC_X86_SREGS:
            self._ioctl_buf("KVM_SET_SREGS", KVM_SET_SREGS, kvm_sregs.from_buffer_copy(
                view, _SYNC_SREGS_OFF))
        if dirty & KVM_SYNC_X86_EVENTS:
            self._ioctl_buf("KVM_SET_VCPU_EVENTS", KVM_SET_VCPU_EVENTS,
                            kvm_vcpu_events.from_buffer_copy(view, _SYNC_EVENTS_OFF))

    def get_regs(self) -> kvm_regs:
        """KVM_GET_REGS."""
        self._load_staged()
        return self._get("KVM_GET_REGS", KVM_GET_REGS, kvm_regs)

    def set_regs(self, regs: kvm_regs) -> None:
        """KVM_SET_REGS."""
        self._load_staged()
        self._ioctl_buf("KVM_SET_REGS", KVM_SET_REGS, regs)

    def get_sregs(self) -> kvm_sregs:
        """KVM_GET_SREGS."""
        self._load_staged()
        return self._get("KVM_GET_SREGS", KVM_GET_SREGS, kvm_sregs)

    def set_sregs(self, sregs: kvm_sregs) -> None:
        """KVM_SET_SREGS."""
        self._load_staged()
        self._ioctl_buf("KVM_SET_SREGS", KVM_SET_SREGS, sregs)

    def get_fpu(self) -> kvm_fpu:
        """KVM_GET_FPU."""
        return self._get("KVM_GET_FPU", KVM_GET_FPU, kvm_fpu)

    def set_fpu(self, fpu: kvm_fpu) -> None:
        """KVM_SET_FPU."""
        self._ioctl_buf("KVM_SET_FPU", KVM_SET_FPU, fpu)

    def get_msrs(self, indices: Iterable[int]) -> dict[int, int]:
        """KVM_GET_MSRS for ``indices``; raises if the kernel returns fewer than asked."""
        idx = list(indices)
        obj = make_kvm_msrs((i, 0) for i in idx)
        got = self._ioctl_buf("KVM_GET_MSRS", KVM_GET_MSRS, obj)
        if got != len(idx):
            bad = idx[got] if 0 <= got < len(idx) else None
            raise KvmIoctlError("KVM_GET_MSRS", _errno.EINVAL,
                                f"read {got} of {len(idx)} MSRs; first refused: {bad:#x}"
                                if bad is not None else f"read {got} of {len(idx)} MSRs")
        return {obj.entries[i].index: obj.entries[i].data for i in range(len(idx))}

    def set_msrs(self, msrs: dict[int, int] | Iterable[tuple[int, int]] | kvm_msrs) -> None:
        """KVM_SET_MSRS; raises if the kernel accepts fewer than given.

        ``msrs`` is ``{index: value}``, ``(index, value)`` pairs, or a ``kvm_msrs`` already built
        (:func:`make_kvm_msrs`; what a caller setting the same MSRs again and again keeps).
        """
        if isinstance(msrs, kvm_msrs):
            obj = msrs
        else:
            obj = make_kvm_msrs(msrs.items() if isinstance(msrs, dict) else msrs)
        count = obj.nmsrs
        got = self._ioctl_buf("KVM_SET_MSRS", KVM_SET_MSRS, obj)
        if got != count:
            bad = f"{obj.entries[got].index:#x}" if 0 <= got < count else "?"
            raise KvmIoctlError("KVM_SET_MSRS", _errno.EINVAL,
                                f"wrote {got} of {count} MSRs; first refused: {bad}")

    def set_cpuid2(self, cpuid: kvm_cpuid2) -> None:
        """KVM_SET_CPUID2 with a ``kvm_cpuid2`` from :func:`make_kvm_cpuid2`.

        Raises:
            KernelBufferError: ``nent`` counts more entries than the structure holds (the kernel
                reads ``nent`` of them).
        """
        have = sizeof(cpuid)
        need = sizeof(kvm_cpuid2) + cpuid.nent * sizeof(kvm_cpuid_entry2)
        if need > have:
            raise KernelBufferError(f"KVM_SET_CPUID2: nent is {cpuid.nent} but the structure holds "
                                    f"{(have - sizeof(kvm_cpuid2)) // sizeof(kvm_cpuid_entry2)} "
                                    "entries")
        self._ioctl_buf("KVM_SET_CPUID2", KVM_SET_CPUID2, cpuid)

    def get_cpuid2(self, max_entries: int = 256) -> kvm_cpuid2:
        """KVM_GET_CPUID2: the CPUID this vCPU was given.

        ``max_entries`` is only the first guess: a larger table is fetched whole.
        """
        obj = self._get_growing("KVM_GET_CPUID2", KVM_GET_CPUID2, make_kvm_cpuid2, "nent",
                                max_entries)
        return make_kvm_cpuid2(obj.entries[i] for i in range(obj.nent))

    def get_lapic(self) -> kvm_lapic_state:
        """KVM_GET_LAPIC."""
        return self._get("KVM_GET_LAPIC", KVM_GET_LAPIC, kvm_lapic_state)

    def set_lapic(self, lapic: kvm_lapic_state) -> None:
        """KVM_SET_LAPIC."""
        self._ioctl_buf("KVM_SET_LAPIC", KVM_SET_LAPIC, lapic)

    def get_xsave(self) -> kvm_xsave:
        """KVM_GET_XSAVE."""
        return self._get("KVM_GET_XSAVE", KVM_GET_XSAVE, kvm_xsave)

    def set_xsave(self, xsave: kvm_xsave | bytearray) -> None:
        """KVM_SET_XSAVE; a ``bytearray`` when the area is larger than 4 KiB (see :meth:`get_xsave2`).

        The kernel reads as many bytes as KVM_GET_XSAVE2 writes, whatever it is given: an area
        shorter than that (but at least ``struct kvm_xsave``) is zero-extended first, so the kernel
        never reads past it.
        """
        self._ioctl_buf("KVM_SET_XSAVE", KVM_SET_XSAVE, self._padded_xsave(xsave))

    def _padded_xsave(self, xsave: kvm_xsave | bytearray) -> kvm_xsave | bytearray:
        known = self._xsave2_size
        have = _buffer_size(xsave)
        if known is not None and sizeof(kvm_xsave) <= have < known:
            padded = bytearray(known)
            padded[:have] = bytes(xsave)
            return padded
        return xsave

    def prepare_set(self, what: VcpuSetter, value: _Buf) -> PreparedIoctl:
        """``KVM_SET_<WHAT>`` with ``value``, checked now, to :meth:`issue` as often as needed.

        ``value`` is the structure the matching ``set_*`` method takes (a ``kvm_msrs`` for
        ``"msrs"``, which must then all be accepted). The kernel reads it at each issue, so
        changing it in between changes what is set. Registers staged with
        :meth:`set_sync_regs` are loaded before a batch is issued, as before any ``set_*``.
        """
        name, request = _SETTERS[what]
        if what == "xsave":
            value = self._padded_xsave(value)  # type: ignore[arg-type]
        count = value.nmsrs if isinstance(value, kvm_msrs) else -1
        return self._prepare(name, request, value, count)

    def issue(self, calls: Sequence[PreparedIoctl]) -> None:
        """Issue prepared ioctls in order (see :meth:`prepare_set`), after any staged registers."""
        self._load_staged()
        super().issue(calls)

    def get_stats_fd(self) -> int:
        """KVM_GET_STATS_FD (Linux 5.14+): a new read-only fd of the vCPU's binary statistics.

        The caller owns the fd (close it with :func:`os.close`). Its layout: a
        :class:`kvm_stats_header`, then ``num_desc`` :class:`kvm_stats_desc` each followed by its
        name, then the values, which the kernel keeps current (reading never stops the vCPU).

        Raises:
            KvmIoctlError: the kernel has no binary statistics (ENOTTY / EINVAL).
        """
        return self._ioctl_int("KVM_GET_STATS_FD", KVM_GET_STATS_FD)

    def get_xsave2(self, size: int | None = None) -> bytearray:
        """KVM_GET_XSAVE2: the whole XSAVE area, :attr:`xsave2_size` bytes by default.

        The kernel writes as much as the VM's permitted XSAVE features need (``KVM_CAP_XSAVE2``
        on the VM fd), which may exceed the 4 KiB of ``struct kvm_xsave``. A larger ``size`` gives
        a zero-padded area.

        Raises:
            KernelBufferError: ``size`` is smaller than what the kernel writes, or this VcpuFd was
                not made by :meth:`VmFd.create_vcpu` and does not know that size. Raised before the
                ioctl.
        """
        known = self._xsave2_size
        if known is None:
            raise KernelBufferError(
                f"KVM_GET_XSAVE2: the size the kernel writes is unknown for {self._describe()} "
                "(only a VcpuFd from VmFd.create_vcpu knows its VM's KVM_CAP_XSAVE2)")
        if size is None:
            size = known
        elif size < known:
            raise KernelBufferError(
                f"KVM_GET_XSAVE2 writes {known} bytes (KVM_CAP_XSAVE2) for {self._describe()}, "
                f"more than the {size} asked for")
        area = bytearray(size)
        self._ioctl_buf("KVM_GET_XSAVE2", KVM_GET_XSAVE2, area)
        return area

    def get_xcrs(self) -> kvm_xcrs:
        """KVM_GET_XCRS."""
        return self._get("KVM_GET_XCRS", KVM_GET_XCRS, kvm_xcrs)

    def set_xcrs(self, xcrs: kvm_xcrs) -> None:
        """KVM_SET_XCRS."""
        self._ioctl_buf("KVM_SET_XCRS", KVM_SET_XCRS, xcrs)

    def get_debugregs(self) -> kvm_debugregs:
        """KVM_GET_DEBUGREGS."""
        return self._get("KVM_GET_DEBUGREGS", KVM_GET_DEBUGREGS, kvm_debugregs)

    def set_debugregs(self, regs: kvm_debugregs) -> None:
        """KVM_SET_DEBUGREGS."""
        self._ioctl_buf("KVM_SET_DEBUGREGS", KVM_SET_DEBUGREGS, regs)

    def get_vcpu_events(self) -> kvm_vcpu_events:
        """KVM_GET_VCPU_EVENTS."""
        self._load_staged()
        return self._get("KVM_GET_VCPU_EVENTS", KVM_GET_VCPU_EVENTS, kvm_vcpu_events)

    def set_vcpu_events(self, events: kvm_vcpu_events) -> None:
        """KVM_SET_VCPU_EVENTS."""
        self._load_staged()
        self._ioctl_buf("KVM_SET_VCPU_EVENTS", KVM_SET_VCPU_EVENTS, events)

    def get_mp_state(self) -> kvm_mp_state:
        """KVM_GET_MP_STATE."""
        return self._get("KVM_GET_MP_STATE", KVM_GET_MP_STATE, kvm_mp_state)

    def set_mp_state(self, state: kvm_mp_state) -> None:
        """KVM_SET_MP_STATE."""
        self._ioctl_buf("KVM_SET_MP_STATE", KVM_SET_MP_STATE, state)

    def enable_cap(self, cap: int, *args: int, flags: int = 0) -> None:
        """KVM_ENABLE_CAP on the vCPU: turn on ``cap`` with up to four arguments."""
        self._ioctl_buf("KVM_ENABLE_CAP", KVM_ENABLE_CAP, _enable_cap(cap, args, flags))

    def set_guest_debug(self, debug: kvm_guest_debug) -> None:
        """KVM_SET_GUEST_DEBUG (see :meth:`kvmlib.KvmVcpu.set_guest_debug` for the typed form)."""
        self._ioctl_buf("KVM_SET_GUEST_DEBUG", KVM_SET_GUEST_DEBUG, debug)


