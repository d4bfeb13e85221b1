"""A vCPU's fd wrapper, :class:`VcpuFd`: KVM_RUN with its decoded exit, and the vCPU state."""

from __future__ import annotations

import errno as _errno
import mmap
from collections.abc import Iterable
from ctypes import sizeof

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
    _buffer_size,
    _enable_cap,
    _FdOwner,
    _get_errno,
    _run_ioctl,
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
)
from kvmlib.ioctl.structs import (
    kvm_cpuid2,
    kvm_cpuid_entry2,
    kvm_debugregs,
    kvm_fpu,
    kvm_guest_debug,
    kvm_lapic_state,
    kvm_mp_state,
    kvm_regs,
    kvm_run,
    kvm_sregs,
    kvm_vcpu_events,
    kvm_xcrs,
    kvm_xsave,
    make_kvm_cpuid2,
    make_kvm_msrs,
)


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
                for view in (*views.values(), self._exit_view, self._run_view):
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
        if _run_ioctl(self._fd, KVM_RUN, 0) < 0:
            err = _get_errno()
            if err == _errno.EINTR:
                return _INTR
            if self._fd < 0:
                raise self._closed_error("KVM_RUN")
            raise KvmIoctlError("KVM_RUN", err)
        try:
            reason, direction, size, port, count, offset = _HEAD_UNPACK(self._run_view,
                                                                        _EXIT_REASON_OFF)
            if reason == KVM_EXIT_IO:
                length = size * count
                data = self._views.get((offset << 32) | length)
                if data is None:
                    data = self._view(offset, length)
                    if data is None:  # the kernel's offset leaves the page: never trust it
                        return Undecoded(reason, bytes(self._exit_view))
                if direction == KVM_EXIT_IO_OUT:
                    return _tuple_new(IoOut, (port, size, count, data))
                return _tuple_new(IoIn, (port, size, count, data))
            if reason == KVM_EXIT_MMIO:
                addr, _data, length, is_write = _MMIO_UNPACK(self._run_view, _EXIT_OFF)
                data = self._views.get((_MMIO_DATA_OFF << 32) | length)
                if data is None:
                    data = self._view(_MMIO_DATA_OFF, min(length, 8))
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

    def get_regs(self) -> kvm_regs:
        """KVM_GET_REGS."""
        return self._get("KVM_GET_REGS", KVM_GET_REGS, kvm_regs)

    def set_regs(self, regs: kvm_regs) -> None:
        """KVM_SET_REGS."""
        self._ioctl_buf("KVM_SET_REGS", KVM_SET_REGS, regs)

    def get_sregs(self) -> kvm_sregs:
        """KVM_GET_SREGS."""
        return self._get("KVM_GET_SREGS", KVM_GET_SREGS, kvm_sregs)

    def set_sregs(self, sregs: kvm_sregs) -> None:
        """KVM_SET_SREGS."""
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

    def set_msrs(self, msrs: dict[int, int] | Iterable[tuple[int, int]]) -> None:
        """KVM_SET_MSRS; raises if the kernel accepts fewer than given."""
        pairs = list(msrs.items() if isinstance(msrs, dict) else msrs)
        obj = make_kvm_msrs(pairs)
        got = self._ioctl_buf("KVM_SET_MSRS", KVM_SET_MSRS, obj)
        if got != len(pairs):
            bad = f"{pairs[got][0]:#x}" if 0 <= got < len(pairs) else "?"
            raise KvmIoctlError("KVM_SET_MSRS", _errno.EINVAL,
                                f"wrote {got} of {len(pairs)} MSRs; first refused: {bad}")

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
        known = self._xsave2_size
        have = _buffer_size(xsave)
        if known is not None and sizeof(kvm_xsave) <= have < known:
            padded = bytearray(known)
            padded[:have] = bytes(xsave)
            xsave = padded
        self._ioctl_buf("KVM_SET_XSAVE", KVM_SET_XSAVE, xsave)

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
        return self._get("KVM_GET_VCPU_EVENTS", KVM_GET_VCPU_EVENTS, kvm_vcpu_events)

    def set_vcpu_events(self, events: kvm_vcpu_events) -> None:
        """KVM_SET_VCPU_EVENTS."""
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


