"""Guest memory: guest-physical addresses, mmap-backed regions, and bounds-checked access.

In the spirit of rust-vmm's vm-memory: a :class:`GuestMemoryMmap` is a sorted set of
non-overlapping :class:`GuestRegionMmap`, each an ``mmap`` of host memory registered with KVM as one
slot. Every access is checked against the regions as a whole before any byte moves, so a guest-
supplied address can never make the host touch memory outside the guest's.
"""

from __future__ import annotations

import bisect
import ctypes
import mmap
import os
import struct
import threading
import warnings
from collections.abc import Iterable
from itertools import pairwise
from typing import TypeVar

from typing_extensions import Buffer, Self

from kvmlib._platform import libc
from kvmlib.errors import ClosedError, GuestMemoryError, GuestMemoryMapError
from kvmlib.resources import Closeable

PAGE_SIZE = mmap.PAGESIZE
HUGE_PAGE_SIZE = 2 << 20
_ADDR_LIMIT = 1 << 64

#: ``KVM_MEM_*`` slot flags (the same values as in ``<linux/kvm.h>``).
KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1

_MAP_HUGETLB = 0x40000
_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)
_MADV_DONTNEED = 4
_MADV_POPULATE_WRITE = 23  # Linux 5.14

# madvise through ctypes rather than mmap.madvise: ctypes releases the GIL for the call, so a
# helper thread can populate memory while another thread works.
_libc = libc()
_madvise = _libc.madvise
_madvise.restype = ctypes.c_int
_madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)


class GuestAddress(int):
    """A guest-physical address: an ``int`` in ``0 .. 2**64 - 1``."""

    __slots__ = ()

    def __new__(cls, value: int = 0) -> Self:
        v = int(value)
        if not 0 <= v < _ADDR_LIMIT:
            raise GuestMemoryError(f"guest address {v:#x} is outside 0..2**64-1")
        return super().__new__(cls, v)

    def __repr__(self) -> str:
        return f"GuestAddress({int(self):#x})"

    @property
    def raw_value(self) -> int:
        """The address as a plain int."""
        return int(self)

    def checked_add(self, offset: int) -> GuestAddress | None:
        """``self + offset``, or None past the end of the address space."""
        v = int(self) + offset
        return GuestAddress(v) if 0 <= v < _ADDR_LIMIT else None

    def unchecked_add(self, offset: int) -> GuestAddress:
        """``self + offset``; raises GuestMemoryError past the end of the address space."""
        return GuestAddress(int(self) + offset)


class GuestRegionMmap:
    """One contiguous guest-physical range backed by an ``mmap``.

    Build one with :meth:`anonymous` or :meth:`from_file`.
    """

    def __init__(self, mapping: mmap.mmap, guest_base: GuestAddress, *, read_only: bool = False,
                 log_dirty_pages: bool = False) -> None:
        size = len(mapping)
        base = GuestAddress(guest_base)
        if base % PAGE_SIZE or size % PAGE_SIZE or size == 0:
            raise GuestMemoryError(
                f"region [{base:#x}, +{size:#x}) must be non-empty and page aligned ({PAGE_SIZE:#x})")
        if base + size > _ADDR_LIMIT:
            raise GuestMemoryError(f"region [{base:#x}, +{size:#x}) ends past 2**64")
        self._map: mmap.mmap | None = mapping
        self._view = memoryview(mapping)
        # Users that gave host_address to KVM (a VM's memory slot): while any holds the region,
        # close() only forbids access and the unmap waits for the last release().
        self._lock = threading.Lock()
        self._users = 0
        self._closing = False
        self.start_addr = base
        self.size = size
        self.read_only = read_only
        self.log_dirty_pages = log_dirty_pages
        # KVM's dirty log sees only guest writes; writes made through GuestMemoryMmap are
        # recorded here so that dirty tracking (diff snapshots, fast reset) sees them too.
        self._host_dirty = 0
        self._anonymous = False
        # The address is read once from a temporary export, which is then dropped so close() works.
        holder = ctypes.c_char.from_buffer(mapping)
        #: The host virtual address of the region's first byte (what a KVM memory slot is given).
        self.host_address: int = ctypes.addressof(holder)
        del holder

    @classmethod
    def anonymous(cls, guest_base: GuestAddress | int, size: int, *, hugepages: bool = False,
                  read_only: bool = False, log_dirty_pages: bool = False) -> GuestRegionMmap:
        """Private anonymous memory (huge pages on request; ``size`` then a 2 MiB multiple)."""
        _check_range(int(guest_base), size)
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
        if hugepages:
            if size % HUGE_PAGE_SIZE:
                raise GuestMemoryError(f"huge-page region size {size:#x} is not 2 MiB aligned")
            # No MAP_NORESERVE here: huge pages must be reserved when mapping, or a shortage
            # would surface as SIGBUS on the first touch (by us or by the guest) instead of an error.
            flags |= _MAP_HUGETLB
        else:
            flags |= _MAP_NORESERVE
        try:
            mapping = mmap.mmap(-1, size, flags=flags)
        except OSError as e:
            hint = " (are huge pages reserved? see /proc/sys/vm/nr_hugepages)" if hugepages else ""
            raise GuestMemoryMapError(f"cannot map {size:#x} bytes: {e.strerror}{hint}", e.errno) \
                from e
        region = cls(mapping, GuestAddress(guest_base), read_only=read_only,
                     log_dirty_pages=log_dirty_pages)
        # Private anonymous 4 KiB pages read as zero once returned to the kernel (see discard).
        region._anonymous = not hugepages
        return region

    @classmethod
    def from_file(cls, guest_base: GuestAddress | int, size: int, file: int | str | os.PathLike[str],
                  offset: int = 0, *, read_only: bool = False, log_dirty_pages: bool = False,
                  private: bool = False) -> GuestRegionMmap:
        """Memory mapped from a file (``fd`` or path) at ``offset``.

        Shared by default: guest writes reach the file. With ``private=True`` the mapping is
        copy-on-write: pages are read from the file when first touched and writes stay in this
        process (the file may then be read-only).
        """
        _check_range(int(guest_base), size)
        mode = os.O_RDONLY if private else os.O_RDWR
        try:
            fd = file if isinstance(file, int) else os.open(file, mode | os.O_CLOEXEC)
        except OSError as e:
            raise GuestMemoryMapError(f"cannot open {file!r} for guest memory: {e.strerror}",
                                      e.errno) from e
        try:
            if os.fstat(fd).st_size < offset + size:
                raise GuestMemoryError(f"{file!r} is shorter than the {size:#x} bytes at {offset:#x} "
                                       "to map (a mapping past the end would fault on access)")
            mapping = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE if private else mmap.MAP_SHARED,
                                prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=offset)
        except OSError as e:
            raise GuestMemoryMapError(f"cannot map {size:#x} bytes of {file!r} at {offset:#x}: "
                                      f"{e.strerror}", e.errno) from e
        except ValueError as e:
            raise GuestMemoryError(f"cannot map {size:#x} bytes of {file!r} at {offset:#x}: {e}") \
                from e
        finally:
            if not isinstance(file, int):
                os.close(fd)
        return cls(mapping, GuestAddress(guest_base), read_only=read_only,
                   log_dirty_pages=log_dirty_pages)

    @property
    def len(self) -> int:
        """The region's size in bytes."""
        return self.size

    @property
    def num_pages(self) -> int:
        """The region's size in pages."""
        return self.size // PAGE_SIZE

    def mark_dirty(self, offset: int, length: int) -> None:
        """Record a host write to ``[offset, offset + length)`` (for regions that log dirty pages).

        :meth:`GuestMemoryMmap.write` calls this; code writing through :attr:`host_address` or
        :meth:`as_memoryview` directly must call it too, or fast reset will not undo its writes.
        """
        if self.log_dirty_pages and length > 0:
            first, last = offset // PAGE_SIZE, (offset + length - 1) // PAGE_SIZE
            self._host_dirty |= ((1 << (last - first + 1)) - 1) << first

    def populate(self, offset: int = 0, size: int | None = None) -> None:
        """Fault in ``[offset, offset + size)`` (default: to the end) as if written, unchanged.

        One ``madvise(MADV_POPULATE_WRITE)`` (Linux 5.14 and later) takes the page faults that
        the first writes would otherwise take one trap at a time, and allocates the memory. The
        GIL is released meanwhile, so a helper thread can populate memory ahead of a thread
        writing it (:func:`kvmlib.migration.receive` does). Contents never change. Safe against
        a concurrent :meth:`close`, which waits for the call to finish.

        Raises:
            GuestMemoryError: the range is not page aligned or not inside the region.
            ClosedError: the region is closed.
            GuestMemoryMapError: the kernel refused (``errno``: EINVAL before Linux 5.14, ENOMEM
                when memory ran out, EFAULT past what a file mapping's file holds).
        """
        size = self._page_range(offset, size)
        self.acquire()
        try:
            if _madvise(self.host_address + offset, size, _MADV_POPULATE_WRITE) != 0:
                errno = ctypes.get_errno()
                raise GuestMemoryMapError(
                    f"cannot populate {size:#x} bytes at offset {offset:#x} of the region at "
                    f"{self.start_addr:#x}: {os.strerror(errno)}", errno)
        finally:
            self.release()

    def discard(self, offset: int = 0, size: int | None = None) -> None:
        """Make ``[offset, offset + size)`` (default: to the end) read as zero.

        Private anonymous memory (:meth:`anonymous`, not huge pages) gives the pages back to the
        kernel (``MADV_DONTNEED``), which is cheaper than writing zeros and frees the memory;
        other mappings are zero-filled. Recorded as a host write (:meth:`mark_dirty`).

        Raises:
            GuestMemoryError: the range is not page aligned or not inside the region.
            ClosedError: the region is closed.
        """
        size = self._page_range(offset, size)
        self.acquire()
        try:
            if not self._anonymous or _madvise(self.host_address + offset, size,
                                               _MADV_DONTNEED) != 0:
                ctypes.memset(self.host_address + offset, 0, size)
        finally:
            self.release()
        self.mark_dirty(offset, size)

    def _page_range(self, offset: int, size: int | None) -> int:
        if size is None:
            size = self.size - offset
        if offset % PAGE_SIZE or size % PAGE_SIZE or not 0 <= offset <= offset + size <= self.size:
            raise GuestMemoryError(f"range +{offset:#x} of {size:#x} bytes is not page aligned "
                                   f"inside the region at {self.start_addr:#x} ({self.size:#x} bytes)")
        return size

    def take_host_dirty(self) -> int:
        """The pages written by the host since the last call, as an int bitmask (bit n = page n)."""
        bits, self._host_dirty = self._host_dirty, 0
        return bits

    @property
    def flags(self) -> int:
        """The ``KVM_MEM_*`` flags for this region's slot."""
        return (KVM_MEM_LOG_DIRTY_PAGES if self.log_dirty_pages else 0) | (
            KVM_MEM_READONLY if self.read_only else 0)

    @property
    def end(self) -> int:
        """The first guest address past the region."""
        return self.start_addr + self.size

    def last_addr(self) -> GuestAddress:
        """The region's last guest address (inclusive)."""
        return GuestAddress(self.start_addr + self.size - 1)

    def as_memoryview(self) -> memoryview:
        """A view of the whole region (valid until :meth:`close`)."""
        if self._closing:
            raise ClosedError(f"guest memory region at {self.start_addr:#x} is closed")
        return self._view

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called (the unmap itself may still wait for a user)."""
        return self._closing

    def acquire(self) -> None:
        """Keep the mapping alive for a user that handed :attr:`host_address` to KVM.

        Until the matching :meth:`release`, :meth:`close` only forbids access through this
        object; the memory stays mapped, so a guest can never reach host memory reused after an
        unmap.

        Raises:
            ClosedError: the region is already closed.
        """
        with self._lock:
            if self._closing:
                raise ClosedError(f"guest memory region at {self.start_addr:#x} is closed")
            self._users += 1

    def release(self) -> None:
        """End one :meth:`acquire`; the last release of a closed region unmaps it."""
        with self._lock:
            if self._users <= 0:
                raise GuestMemoryError("release() without a matching acquire()")
            self._users -= 1
            unmap = self._closing and self._users == 0
        if unmap:
            self._unmap()

    def close(self) -> None:
        """Forbid further access and unmap the region (once no user holds it); idempotent."""
        with self._lock:
            self._closing = True
            unmap = self._users == 0
        if unmap:
            self._unmap()

    def _unmap(self) -> None:
        with self._lock:
            mapping, self._map = self._map, None
        if mapping is not None:
            self._view.release()
            try:
                mapping.close()
            except BufferError:
                pass  # a caller's view is alive: the mapping goes with the last such view

    def __repr__(self) -> str:
        return f"GuestRegionMmap({self.start_addr:#x}, size={self.size:#x}, flags={self.flags})"


def _check_range(base: int, size: int) -> None:
    if not isinstance(size, int) or size <= 0:
        raise GuestMemoryError(f"region at {base:#x} has size {size!r}; it must be > 0")
    if base % PAGE_SIZE or size % PAGE_SIZE:
        raise GuestMemoryError(
            f"region [{base:#x}, {base + size:#x}) is not page aligned ({PAGE_SIZE:#x})")
    if base < 0 or base + size > _ADDR_LIMIT:
        raise GuestMemoryError(f"region [{base:#x}, {base + size:#x}) is outside 0..2**64")


_C = TypeVar("_C")
_UNSIGNED = {1: struct.Struct("<B"), 2: struct.Struct("<H"), 4: struct.Struct("<I"),
             8: struct.Struct("<Q")}


class GuestMemoryMmap(Closeable):
    """The guest's physical memory: sorted, non-overlapping regions, bounds-checked access."""

    def __init__(self, regions: Iterable[GuestRegionMmap]) -> None:
        ordered = sorted(regions, key=lambda r: r.start_addr)
        if not ordered:
            raise GuestMemoryError("guest memory needs at least one region")
        for prev, cur in pairwise(ordered):
            if cur.start_addr < prev.end:
                raise GuestMemoryError(
                    f"regions [{prev.start_addr:#x}, {prev.end:#x}) and "
                    f"[{cur.start_addr:#x}, {cur.end:#x}) overlap")
        self._regions = tuple(ordered)
        self._starts = [r.start_addr for r in ordered]
        self._closed = False

    @classmethod
    def from_ranges(cls, ranges: Iterable[tuple[GuestAddress | int, int]], *,
                    hugepages: bool = False, log_dirty_pages: bool = False) -> GuestMemoryMmap:
        """Anonymous regions for ``(base, size)`` pairs; page aligned, non-empty, disjoint."""
        pairs = [(int(b), s) for b, s in ranges]
        for base, size in pairs:
            _check_range(base, size)
        made: list[GuestRegionMmap] = []
        try:
            # Validate the layout before mapping anything.
            ordered = sorted(pairs)
            for (b0, s0), (b1, s1) in pairwise(ordered):
                if b1 < b0 + s0:
                    raise GuestMemoryError(f"ranges [{b0:#x}, {b0 + s0:#x}) and "
                                           f"[{b1:#x}, {b1 + s1:#x}) overlap")
            for base, size in pairs:
                made.append(GuestRegionMmap.anonymous(base, size, hugepages=hugepages,
                                                      log_dirty_pages=log_dirty_pages))
            return cls(made)
        except BaseException:
            for r in made:
                r.close()
            raise

    @classmethod
    def from_regions(cls, regions: Iterable[GuestRegionMmap]) -> GuestMemoryMmap:
        """Take ownership of already-built regions."""
        return cls(regions)

    @property
    def regions(self) -> tuple[GuestRegionMmap, ...]:
        """The regions, by ascending guest address."""
        return self._regions

    def num_regions(self) -> int:
        """How many regions there are."""
        return len(self._regions)

    def last_addr(self) -> GuestAddress:
        """The highest guest address backed by memory."""
        return self._regions[-1].last_addr()

    def find_region(self, addr: int) -> GuestRegionMmap | None:
        """The region containing ``addr``, if any."""
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0 and addr < self._regions[i].end:
            return self._regions[i]
        return None

    def address_in_range(self, addr: int) -> bool:
        """Whether ``addr`` is backed by memory."""
        return self.find_region(addr) is not None

    def host_address(self, addr: int) -> int:
        """The host virtual address backing guest address ``addr``."""
        region = self._region_or_raise(addr)
        return region.host_address + (addr - region.start_addr)

    def _region_or_raise(self, addr: int) -> GuestRegionMmap:
        if self._closed:
            raise ClosedError("guest memory is closed")
        region = self.find_region(addr)
        if region is None:
            raise GuestMemoryError(f"guest address {int(addr):#x} is not backed by memory")
        return region

    def _spans(self, addr: int, size: int) -> list[tuple[GuestRegionMmap, int, int]]:
        """(region, offset, length) pieces covering [addr, addr+size), or raise first."""
        if self._closed:
            raise ClosedError("guest memory is closed")
        if size < 0:
            raise GuestMemoryError(f"access size {size} is negative")
        if not 0 <= addr < _ADDR_LIMIT:
            raise GuestMemoryError(f"guest address {addr:#x} is outside 0..2**64-1")
        pieces = []
        cur, left = addr, size
        while left > 0:
            region = self.find_region(cur)
            if region is None:
                raise GuestMemoryError(
                    f"access [{addr:#x}, {addr + size:#x}) reaches unbacked address {cur:#x}")
            off = cur - region.start_addr
            n = min(left, region.size - off)
            pieces.append((region, off, n))
            cur += n
            left -= n
        return pieces

    def read(self, address: int, size: int) -> bytes:
        """``size`` bytes from guest address ``address`` (a :class:`GuestAddress` or an int)."""
        pieces = self._spans(int(address), size)
        if len(pieces) == 1:
            region, off, n = pieces[0]
            return bytes(region.as_memoryview()[off:off + n])
        return b"".join(bytes(r.as_memoryview()[o:o + n]) for r, o, n in pieces)

    def read_into(self, address: int, buf: Buffer) -> None:
        """Fill the writable buffer ``buf`` from guest address ``address``."""
        out = memoryview(buf).cast("B")
        pos = 0
        for region, off, n in self._spans(int(address), len(out)):
            out[pos:pos + n] = region.as_memoryview()[off:off + n]
            pos += n

    def write(self, address: int, data: Buffer) -> None:
        """Write the bytes-like ``data`` at guest address ``address`` (all or nothing)."""
        src = memoryview(data).cast("B")
        pos = 0
        for region, off, n in self._spans(int(address), len(src)):
            region.as_memoryview()[off:off + n] = src[pos:pos + n]
            region.mark_dirty(off, n)
            pos += n

    def read_obj(self, address: int, ctype: type[_C]) -> _C:
        """A ctypes object of type ``ctype`` copied from guest address ``address``."""
        size = ctypes.sizeof(ctype)  # type: ignore[arg-type]
        return ctype.from_buffer_copy(self.read(address, size))  # type: ignore[attr-defined, no-any-return]

    def write_obj(self, address: int, obj: Buffer) -> None:
        """Write a ctypes object's bytes at guest address ``address``."""
        self.write(address, bytes(memoryview(obj).cast("B")))

    def _read_uint(self, address: int, width: int) -> int:
        return int(_UNSIGNED[width].unpack(self.read(address, width))[0])

    def _write_uint(self, address: int, value: int, width: int) -> None:
        if not 0 <= value < 1 << (8 * width):
            raise GuestMemoryError(f"{value:#x} does not fit in {width} bytes")
        self.write(address, _UNSIGNED[width].pack(value))

    def read_u8(self, address: int) -> int:
        """One byte at ``address``."""
        return self._read_uint(address, 1)

    def read_u16(self, address: int) -> int:
        """A little-endian 16-bit value at ``address``."""
        return self._read_uint(address, 2)

    def read_u32(self, address: int) -> int:
        """A little-endian 32-bit value at ``address``."""
        return self._read_uint(address, 4)

    def read_u64(self, address: int) -> int:
        """A little-endian 64-bit value at ``address``."""
        return self._read_uint(address, 8)

    def write_u8(self, address: int, value: int) -> None:
        """Write one byte at ``address``."""
        self._write_uint(address, value, 1)

    def write_u16(self, address: int, value: int) -> None:
        """Write a little-endian 16-bit value at ``address``."""
        self._write_uint(address, value, 2)

    def write_u32(self, address: int, value: int) -> None:
        """Write a little-endian 32-bit value at ``address``."""
        self._write_uint(address, value, 4)

    def write_u64(self, address: int, value: int) -> None:
        """Write a little-endian 64-bit value at ``address``."""
        self._write_uint(address, value, 8)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def acquire(self) -> None:
        """Keep every region mapped for a user that gave their addresses to KVM (a VM).

        See :meth:`GuestRegionMmap.acquire`: until :meth:`release`, closing only forbids access.

        Raises:
            ClosedError: the memory is already closed.
        """
        if self._closed:
            raise ClosedError("guest memory is closed")
        taken: list[GuestRegionMmap] = []
        try:
            for region in self._regions:
                region.acquire()
                taken.append(region)
        except BaseException:
            for region in taken:
                region.release()
            raise

    def release(self) -> None:
        """End one :meth:`acquire`; closed regions are unmapped by their last release."""
        for region in self._regions:
            region.release()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self._regions)} regions"
        return f"<GuestMemoryMmap {state}>"

    def __del__(self) -> None:
        # A safety net, like a file's: say the memory was never closed, then close it.
        if getattr(self, "_closed", True):
            return
        try:
            warnings.warn(f"unclosed {self!r}", ResourceWarning, source=self, stacklevel=2)
            self.close()
        except Exception:
            pass

    def close(self) -> None:
        """Forbid further access and unmap every region (once no VM uses it); idempotent.

        While a VM built on this memory exists, the unmap waits until the VM is closed: the
        guest keeps valid memory, and nothing of the host's can be placed at its addresses.
        """
        self._closed = True
        for r in self._regions:
            r.close()



__all__ = [
    "HUGE_PAGE_SIZE", "KVM_MEM_LOG_DIRTY_PAGES", "KVM_MEM_READONLY", "PAGE_SIZE", "GuestAddress",
    "GuestMemoryMmap", "GuestRegionMmap",
]
