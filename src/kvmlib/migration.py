r"""Live migration: move a running VM to another process or host over a stream socket.

:func:`migrate` (the source) and :func:`receive` (the destination) speak over any connected stream
socket, UNIX or TCP. The source copies memory while the guest runs (pre-copy):

1. a handshake: the source describes the VM (memory layout, vCPU count, stateful devices); the
   receiver checks it can host it, maps the memory, and accepts or refuses. Nothing is paused yet.
2. round 0 sends every page of every region that logs dirty pages; each later round sends the
   pages dirtied since the previous round began (guest writes from ``KVM_GET_DIRTY_LOG``, host
   writes through :class:`~kvmlib.GuestMemoryMmap`, under the dirty-tracking cursor
   :data:`MIGRATION_CURSOR`).
3. once the dirty pages fit ``max_downtime`` at the bandwidth measured so far, or the dirty set
   stops shrinking, or ``max_rounds`` is reached, the source pauses the VM and sends the last
   dirty pages, every region that does *not* log dirty pages (whole: this is the only time they
   are sent), then the :class:`~kvmlib.VmState` (vCPUs, in-kernel devices, clock, bus devices).
4. the receiver builds the VM, starts its vCPU threads parked, and acknowledges. Only then does
   :func:`migrate` return, leaving the source paused for its owner to shut down.

Until the acknowledgement arrives nothing is lost: if the receiver refuses, dies, or the connection
breaks, or anything fails on the source, :func:`migrate` resumes the source (if it paused it) and
raises :class:`MigrationError`; the guest runs on where it was. A receiver that finds the stream
corrupted, truncated or not what it can host refuses with :class:`MigrationError` too, closes what
it built, and tells the source why.

Pages are read straight from guest memory (no copy but the kernel's) while the guest may be writing
them, so a page can change between its checksum and its transmission. Such a page was written after
its round began, so it is dirty and is sent again in a later round. Every page therefore carries its
own checksum; the receiver remembers the pages whose checksum failed and refuses the stream only if
one of them is still unverified when the source says it is done (in the final round, with the guest
paused, a failed page is always corruption). The CRC-32 is zlib's.

The page checksums are the costliest part of a migration: computing them on the source and checking
them on the receiver each take about as much CPU as moving the pages through the socket (see the
benchmarks). ``migrate(..., page_checksums=False)`` leaves them out for transports that cannot
corrupt data, such as a UNIX socket on one host; frame headers and every other payload keep theirs,
and a receiver can refuse such a stream (``receive(..., require_page_checksums=True)``).

The receiver populates the memory it maps in a helper thread just ahead of the stream
(``MADV_POPULATE_WRITE``), so the page faults of fresh memory do not slow the receiving thread.

Wire format (version :data:`VERSION`; integers little-endian)
-----------------------------------------------------------------

The source first sends a preamble (:data:`PREAMBLE`)::

    magic    8 bytes   MAGIC (b"KVMLMIG\n")
    version  u32       VERSION
    crc      u32       CRC-32 of the 12 bytes before it

then both sides exchange frames. Every frame starts with a 32-byte header (:data:`FRAME_HEADER`)::

    type         u16   a FrameType
    flags        u16   0 (reserved)
    slot         u32   PAGES / ZEROS: the region's index (in ascending guest address order)
    first        u64   PAGES / ZEROS: the region's first page in the run
    count        u64   PAGES / ZEROS: pages in the run; other frames: payload bytes
    payload_crc  u32   CRC-32 (zlib.crc32) of the payload (0 without one)
    header_crc   u32   CRC-32 of the 28 bytes before it

followed by the payload: for PAGES, ``count * page_size`` bytes of guest memory then, if the hello
says ``page_checksums``, ``count`` u32 CRC-32s, one per page (``payload_crc`` covers that table;
without page checksums it is 0); nothing for ZEROS (the pages are all zero); ``count`` bytes for
the others. The conversation::

    source                                        receiver
    preamble, HELLO {JSON: page_size, regions
      [{start, size, log_dirty_pages, read_only}],
      num_vcpus, devices [{space, base, kind}],
      page_checksums}                             ->
                                                  <-  ACCEPT {JSON: version}  or  REFUSE reason
    PAGES / ZEROS ... (round 0, 1, ... while the guest runs; the final round while it is paused)
    STATE (VmState.to_bytes()), END {JSON: frames, pages}  ->
                                                  <-  DONE  or  REFUSE reason
    (ABORT reason may replace any source frame; REFUSE may come at any time)

Text payloads (REFUSE, ABORT) are UTF-8. A PAGES frame carries at most :data:`MAX_FRAME_PAGES`
pages; every other payload at most :data:`MAX_MESSAGE` bytes.
"""

from __future__ import annotations

import collections
import ctypes
import enum
import json
import logging
import math
import select
import socket
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NoReturn

import attrs
from typing_extensions import Buffer

from kvmlib._platform import libc
from kvmlib.bus import IoManager
from kvmlib.dirty import DirtyBitmap
from kvmlib.errors import GuestMemoryError, KvmError
from kvmlib.exit_handler import ExitHandler
from kvmlib.ioctl import KVM_MP_STATE_UNINITIALIZED, Cap, Kvm, kvm_mp_state
from kvmlib.memory import PAGE_SIZE, GuestMemoryMmap, GuestRegionMmap
from kvmlib.memory_image import layout_of
from kvmlib.runstate import LifecycleState
from kvmlib.state import VmState
from kvmlib.vcpu import MAX_VCPUS
from kvmlib.vm import KvmVm

log = logging.getLogger(__name__)

#: The first bytes of every migration stream.
MAGIC = b"KVMLMIG\n"
#: The stream version this library sends and receives; a receiver refuses any other.
VERSION = 1
#: magic, version, CRC-32 of both.
PREAMBLE = struct.Struct("<8sII")
#: type, flags, slot, first page, count, payload CRC-32, header CRC-32.
FRAME_HEADER = struct.Struct("<HHIQQII")
_HEADER_BODY = struct.Struct("<HHIQQI")
#: The most pages one PAGES frame carries (256 KiB with 4 KiB pages: small enough that sending,
#: receiving and checksumming overlap, large enough that per-frame work does not show).
MAX_FRAME_PAGES = 64
#: The largest payload of any other frame (the VM state of many vCPUs fits easily).
MAX_MESSAGE = 64 << 20
#: The dirty-tracking cursor migration reads (see :class:`kvmlib.dirty.DirtyTracker`).
MIGRATION_CURSOR = "migration"

# Zero pages are detected per 64 KiB block: one memcmp call each, cheap against sending them.
_ZERO_BLOCK_PAGES = 16
# The receiver populates its fresh memory 2 MiB at a time, at most 16 MiB ahead of the stream.
_PREFAULT_CHUNK_PAGES = 512
_PREFAULT_AHEAD_PAGES = 4096
# Frames the source makes ready ahead while the socket is full (1 MiB of pages at most).
_READY_FRAMES = 4
# Frames the receiver leaves unchecked while more arrive (it checks them when the socket is empty).
_UNCHECKED_FRAMES = 4
_MAX_TEXT = 64 << 10
# Waits that only collect a reason (a refusal already sent, a best-effort notice) stay short.
_NOTICE_TIMEOUT = 1.0
# A round must shrink the dirty set below the smallest seen so far, or it counts as a stall.
_MAX_STALLS = 2


class FrameType(enum.IntEnum):
    """The kinds of frame in a migration stream (see the module's wire format)."""

    #: source -> receiver: what the VM is (JSON), right after the preamble.
    HELLO = 1
    #: receiver -> source: the receiver can host it (JSON ``{"version": 1}``).
    ACCEPT = 2
    #: receiver -> source: the receiver will not or cannot go on (UTF-8 reason).
    REFUSE = 3
    #: source -> receiver: ``count`` pages of region ``slot`` from page ``first``.
    PAGES = 4
    #: source -> receiver: the same run, all zero (no payload).
    ZEROS = 5
    #: source -> receiver: :meth:`kvmlib.VmState.to_bytes` of the paused VM.
    STATE = 6
    #: source -> receiver: the stream is complete (JSON ``{"frames": n, "pages": n}``).
    END = 7
    #: source -> receiver: the source gives up (UTF-8 reason).
    ABORT = 8
    #: receiver -> source: the VM is built and parked; the source may stop.
    DONE = 9


class MigrationError(KvmError):
    """A migration failed, was refused, or received a corrupted or truncated stream.

    Raised by :func:`migrate` after the source VM was resumed (if it had been paused): the guest
    keeps running on the source. Raised by :func:`receive` after everything it built was closed.

    Attributes:
        uncertain: only from :func:`migrate`: the whole stream had been sent and the connection
            failed while waiting for the acknowledgement, so the receiver may have built the VM
            (it returns it paused). The source was resumed; do not also resume the destination.
    """

    def __init__(self, message: str, *, uncertain: bool = False) -> None:
        super().__init__(message)
        self.uncertain = uncertain

    def __reduce__(self) -> tuple[object, ...]:
        return _rebuild_error, (str(self), self.uncertain)


def _rebuild_error(message: str, uncertain: bool) -> MigrationError:
    return MigrationError(message, uncertain=uncertain)


@attrs.define(frozen=True, slots=True)
class RoundStats:
    """One round of a migration, as the source sent it.

    Attributes:
        index: 0 for the first round (all memory), then 1, 2, ...
        pages: the pages sent (zero pages included).
        zero_pages: of those, the pages sent as all zero (a header, no data).
        bytes: what the round wrote to the socket, headers included.
        seconds: how long sending the round took.
        final: whether it was sent with the VM paused (the last round).
    """

    index: int
    pages: int
    zero_pages: int
    bytes: int
    seconds: float
    final: bool


@attrs.define(frozen=True, slots=True)
class MigrationStats:
    """What :func:`migrate` did.

    Attributes:
        downtime: seconds from pausing the source to the receiver's acknowledgement, as the
            source measured them (for a VM that was not running, the length of the final phase).
        total_time: seconds from the start of the handshake to the acknowledgement.
        iterations: the rounds sent, the final one included.
        bytes_sent: everything written to the socket.
        pages_per_round: ``pages`` of each round, in order.
        rounds: each round's details.
        bandwidth: the sending rate pre-copy measured, in bytes per second (0 without pre-copy).
    """

    downtime: float
    total_time: float
    iterations: int
    bytes_sent: int
    pages_per_round: tuple[int, ...]
    rounds: tuple[RoundStats, ...]
    bandwidth: float


#: Called by :func:`migrate` after each round is sent (the final one while the VM is paused).
ProgressCallback = Callable[[RoundStats], None]


# ---- framing --------------------------------------------------------------------------------------


@attrs.define(frozen=True, slots=True)
class _Header:
    kind: FrameType
    slot: int
    first: int
    count: int
    crc: int


class _PeerClosedError(Exception):
    """The other side closed the connection (recv returned nothing)."""


def _pack_header(kind: FrameType, slot: int, first: int, count: int, crc: int) -> bytes:
    body = _HEADER_BODY.pack(kind, 0, slot, first, count, crc)
    return body + zlib.crc32(body).to_bytes(4, "little")


def _pack_preamble() -> bytes:
    body = MAGIC + VERSION.to_bytes(4, "little")
    return body + zlib.crc32(body).to_bytes(4, "little")


class _Channel:
    """The socket, framed sends and receives, and what to do while the socket would block.

    The socket is non-blocking for the duration. When a send finds it full or a receive finds it
    empty, :attr:`idle` (if set) is called first: it does one piece of deferred work (computing
    the next frames' page checksums on the source, checking received pages on the receiver) and
    returns True, or returns False when it has none, and only then does the channel wait, at most
    ``timeout`` seconds. Each side thus checksums while the other moves bytes through the socket,
    instead of both taking turns.
    """

    def __init__(self, sock: socket.socket, timeout: float | None) -> None:
        self.sock = sock
        self.timeout = timeout
        self.idle: Callable[[], bool] | None = None
        self._saved_timeout = sock.gettimeout()
        sock.setblocking(False)
        self._poller = select.poll()
        self._poller.register(sock.fileno(), select.POLLIN)
        self._events = select.POLLIN
        self.sent = 0
        self.received = 0
        # Set while a frame is partly written: nothing else may be sent after it.
        self.torn = False
        self._header = bytearray(FRAME_HEADER.size)
        self._header_view = memoryview(self._header)

    def restore(self) -> None:
        try:
            self.sock.settimeout(self._saved_timeout)
        except OSError:
            pass

    def shutdown(self) -> None:
        """End the connection both ways, so a peer blocked on it fails at once."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _blocked(self, events: int) -> None:
        """The socket would block: do deferred work, or wait for ``events`` (within the timeout)."""
        if self.idle is not None and self.idle():
            return
        if events != self._events:
            self._poller.modify(self.sock.fileno(), events)
            self._events = events
        ms = None if self.timeout is None else max(0, math.ceil(self.timeout * 1000))
        if not self._poller.poll(ms):
            raise TimeoutError("timed out")

    # ---- sending ----

    def send(self, parts: Sequence[Buffer]) -> None:
        views = [memoryview(p).cast("B") for p in parts]
        views = [v for v in views if len(v)]
        self.torn = True
        while views:
            try:
                n = self.sock.sendmsg(views)
            except BlockingIOError:
                self._blocked(select.POLLOUT)
                continue
            self.sent += n
            while views and n >= len(views[0]):
                n -= len(views[0])
                views.pop(0)
            if n:
                views[0] = views[0][n:]
        self.torn = False

    def send_frame(self, kind: FrameType, payload: bytes = b"") -> None:
        self.send([_pack_header(kind, 0, 0, len(payload), zlib.crc32(payload)), payload])

    def send_json(self, kind: FrameType, doc: dict[str, Any]) -> None:
        self.send_frame(kind, json.dumps(doc, sort_keys=True).encode())

    def send_pages(self, slot: int, first: int, data: memoryview, table: bytes | None) -> None:
        """Pages with their CRC-32 table (:func:`_page_crcs`), or without page checksums."""
        count = len(data) // PAGE_SIZE
        if table is not None:
            self.send([_pack_header(FrameType.PAGES, slot, first, count, zlib.crc32(table)), data,
                       table])
        else:
            self.send([_pack_header(FrameType.PAGES, slot, first, count, 0), data])

    def send_zeros(self, slot: int, first: int, count: int) -> None:
        self.send([_pack_header(FrameType.ZEROS, slot, first, count, 0)])

    def try_send_text(self, kind: FrameType, text: str) -> None:
        """Best effort, briefly: tell the peer why this side stops (it may be gone already)."""
        if self.torn:
            return
        data = text.encode("utf-8", "replace")[:_MAX_TEXT]
        self.idle = None
        self.timeout = _NOTICE_TIMEOUT
        try:
            self.send_frame(kind, data)
        except OSError:
            pass

    # ---- receiving ----

    def recv_exact(self, view: memoryview) -> None:
        size = len(view)
        got = 0
        while got < size:
            try:
                n = self.sock.recv_into(view[got:])
            except BlockingIOError:
                self._blocked(select.POLLIN)
                continue
            if n == 0:
                raise _PeerClosedError
            got += n
        self.received += size

    def recv_preamble(self) -> tuple[bytes, int, int, int]:
        raw = bytearray(PREAMBLE.size)
        self.recv_exact(memoryview(raw))
        magic, version, crc = PREAMBLE.unpack(raw)
        return magic, version, crc, zlib.crc32(raw[:12])

    def recv_header(self) -> _Header:
        offset = self.received
        self.recv_exact(self._header_view)
        kind, flags, slot, first, count, crc, header_crc = FRAME_HEADER.unpack(self._header)
        if zlib.crc32(self._header_view[:_HEADER_BODY.size]) != header_crc:
            raise MigrationError(f"the stream is corrupted: the frame header at byte {offset} fails "
                                 "its checksum")
        try:
            frame_type = FrameType(kind)
        except ValueError:
            raise MigrationError(f"the stream is corrupted: unknown frame type {kind} at byte "
                                 f"{offset}") from None
        if flags:
            raise MigrationError(f"frame at byte {offset} has flags {flags:#x}; version {VERSION} "
                                 "defines none")
        return _Header(frame_type, slot, first, count, crc)

    def recv_payload(self, header: _Header, what: str, limit: int = MAX_MESSAGE) -> bytes:
        if header.count > limit:
            raise MigrationError(f"the {what} is {header.count} bytes; at most {limit} are accepted")
        data = bytearray(header.count)
        self.recv_exact(memoryview(data))
        if zlib.crc32(data) != header.crc:
            raise MigrationError(f"the stream is corrupted: the {what} fails its checksum")
        return bytes(data)

    def recv_text(self, header: _Header, what: str) -> str:
        return self.recv_payload(header, what, _MAX_TEXT).decode("utf-8", "replace")

    def recv_json(self, header: _Header, what: str, limit: int = MAX_MESSAGE) -> dict[str, Any]:
        data = self.recv_payload(header, what, limit)
        try:
            doc = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise MigrationError(f"the {what} is not valid JSON") from None
        if not isinstance(doc, dict):
            raise MigrationError(f"the {what} is not a JSON object")
        return doc

    def readable(self) -> bool:
        """Whether the peer sent something (or closed) that has not been read; never blocks."""
        poller = select.poll()
        poller.register(self.sock.fileno(), select.POLLIN | select.POLLHUP | select.POLLERR)
        return bool(poller.poll(0))


# ---- zero detection -------------------------------------------------------------------------------

_libc = libc()
_memcmp = _libc.memcmp
_memcmp.restype = ctypes.c_int
_memcmp.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
_ZERO_BYTES = _ZERO_BLOCK_PAGES * PAGE_SIZE
_ZERO = ctypes.create_string_buffer(_ZERO_BYTES)
_ZERO_ADDR = ctypes.addressof(_ZERO)


def _segments(host: int, first: int, count: int) -> Iterator[tuple[bool, int, int]]:
    """Split a run of pages into ``(all_zero, first, count)`` pieces to send.

    Zero pieces are maximal (one ZEROS frame covers any length); data pieces are at most
    :data:`MAX_FRAME_PAGES` pages.
    """
    end = first + count
    start = first
    zero: bool | None = None
    page = first
    while page < end:
        n = min(_ZERO_BLOCK_PAGES, end - page)
        block_zero = _memcmp(host + page * PAGE_SIZE, _ZERO_ADDR, n * PAGE_SIZE) == 0
        if block_zero is not zero:
            if zero is not None:
                yield from _split(zero, start, page - start)
            zero, start = block_zero, page
        page += n
    if zero is not None:
        yield from _split(zero, start, end - start)


def _split(zero: bool, first: int, count: int) -> Iterator[tuple[bool, int, int]]:
    if zero:
        yield True, first, count
        return
    for f in range(first, first + count, MAX_FRAME_PAGES):
        yield False, f, min(MAX_FRAME_PAGES, first + count - f)


def _page_crcs(data: memoryview) -> bytes:
    """One CRC-32 per page of ``data``, as little-endian u32s."""
    crc32 = zlib.crc32
    crcs = [crc32(data[off:off + PAGE_SIZE]) for off in range(0, len(data), PAGE_SIZE)]
    return struct.pack(f"<{len(crcs)}I", *crcs)


class _Prefaulter:
    """Populates the receiver's fresh memory in a helper thread, just ahead of the stream.

    Receiving into fresh anonymous memory otherwise takes one page fault per page inside
    ``recv_into``, on the receiving thread's time: for 256 MiB, longer than checking the pages'
    checksums. Populated in 2 MiB calls (:meth:`GuestRegionMmap.populate`, with the GIL released),
    the faults cost about half as much and overlap the receiving. The helper stays at most
    :data:`_PREFAULT_AHEAD_PAGES` ahead of the furthest page received, so runs of zero pages (sent
    as ZEROS, never written) are not allocated in advance beyond that window, and whatever of them
    was is given back when the ZEROS frame arrives (:meth:`GuestRegionMmap.discard`). Round 0
    arrives in address order, which is what the helper follows; later rounds find the memory
    populated. Failing to populate (an older kernel, memory running out) only stops the helper:
    the receiving thread then takes the faults itself.
    """

    def __init__(self, regions: Sequence[GuestRegionMmap]) -> None:
        self._regions = regions
        # Pages are numbered across regions, in the order round 0 sends them.
        self._bases: list[int] = []
        total = 0
        for region in regions:
            self._bases.append(total)
            total += region.num_pages
        self._total = total
        self._cond = threading.Condition()
        # Stored by the receiving thread without the lock; the helper reads it before each chunk.
        self._cursor = 0
        self._wake_at = total + 1
        self._stopping = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="kvmlib-migration-prefault",
                                        daemon=True)
        self._thread.start()

    def advance(self, slot: int, end: int) -> None:
        """The stream has reached page ``end`` (exclusive) of region ``slot``."""
        cursor = self._bases[slot] + end
        if cursor > self._cursor:
            self._cursor = cursor
            # Waking the helper costs a GIL hand-over: only once it has half a window to do.
            if cursor >= self._wake_at:
                with self._cond:
                    self._cond.notify()

    def stop(self) -> BaseException | None:
        """Stop and join the helper (within one chunk); return what it raised, if anything."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join()
        return self._error

    def _run(self) -> None:
        try:
            self._populate()
        except BaseException as e:
            self._error = e

    def _populate(self) -> None:
        page = 0
        slot = 0
        while page < self._total:
            with self._cond:
                while not self._stopping:
                    # Published before the cursor is read: advance() stores the cursor before
                    # it reads this, so one of the two sees the other's write.
                    self._wake_at = page - _PREFAULT_AHEAD_PAGES // 2
                    if page < self._cursor + _PREFAULT_AHEAD_PAGES:
                        break
                    self._cond.wait()
                self._wake_at = self._total + 1
                if self._stopping:
                    return
                # Never behind the stream: what it already wrote needs no populating.
                page = max(page, self._cursor)
            while slot + 1 < len(self._bases) and self._bases[slot + 1] <= page:
                slot += 1
            region = self._regions[slot]
            first = page - self._bases[slot]
            count = min(_PREFAULT_CHUNK_PAGES, region.num_pages - first)
            try:
                region.populate(first * PAGE_SIZE, count * PAGE_SIZE)
            except GuestMemoryError as e:
                log.debug("migration: populating received memory stopped: %s", e)
                return
            page += count


def _run_mask(first: int, count: int) -> int:
    return ((1 << count) - 1) << first


def _fmt_layout(layout: Sequence[tuple[int, int]]) -> str:
    return "[" + ", ".join(f"{start:#x}+{size:#x}" for start, size in layout) + "]"


def _fmt_devices(devices: Sequence[tuple[str, int, str]]) -> str:
    return ", ".join(f"{kind} at {space} {base:#x}" for space, base, kind in sorted(devices)) or "none"


def _describe(error: BaseException) -> str:
    if isinstance(error, MigrationError):
        return str(error)
    if isinstance(error, _PeerClosedError):
        return "the peer closed the connection"
    if isinstance(error, TimeoutError):
        return "the peer did not answer in time (socket timeout)"
    if isinstance(error, OSError):
        return f"the connection failed ({error.strerror or error})"
    return f"{type(error).__name__}: {error}"


def _stateful_devices(bus: IoManager) -> list[tuple[str, int, str]]:
    return sorted((space, base, type(device).__qualname__)
                  for (space, base), device in bus.stateful_devices().items())


# ---- the source -----------------------------------------------------------------------------------

# A frame to send: (slot, first page, pages, data, its page checksums); data is None for ZEROS, the
# checksums None for ZEROS and without page checksums.
_OutFrame = tuple[int, int, int, memoryview | None, bytes | None]


def migrate(vm: KvmVm, sock: socket.socket, *, max_downtime: float = 0.05, max_rounds: int = 30,
            timeout: float | None = 60.0, progress: ProgressCallback | None = None,
            page_checksums: bool = True) -> MigrationStats:
    """Send ``vm`` over ``sock`` to a :func:`receive` and leave it paused here once it is there.

    The guest keeps running while memory is copied (pre-copy, see the module documentation). It
    is paused only for the final round: the pages dirtied since the previous round, every region
    without dirty logging (sent whole, only then: create memory with ``log_dirty_pages=True``
    for a short downtime), and the VM and device state. A VM that is paused (or not yet run)
    when called is sent in one final round and stays as it is.

    Do not pause, resume or stop the VM from another thread meanwhile, and do not write guest
    memory from the host once the final round has begun (writes before are tracked and sent).

    Args:
        vm: the VM to send: running, paused, or not yet run.
        sock: a connected stream socket (UNIX or TCP); its timeout is restored afterwards. On
            failure it is shut down (close it); on success it stays open.
        max_downtime: seconds of sending that the final round may take, judged from the
            bandwidth measured; the pause also covers saving and rebuilding the VM.
        max_rounds: pre-copy rounds at most before the final one, however the dirty set evolves.
        timeout: seconds any single send or receive may wait (None: forever); the receiver's
            answers, the acknowledgement included, must come within it.
        progress: called with each round's :class:`RoundStats` once it is sent; the final
            round's call happens while the VM is paused. Raising in it aborts the migration.
        page_checksums: send a CRC-32 of every page, which the receiver checks (the default).
            Computing and checking them costs each side about as much CPU as moving the pages
            through the socket; without them only the frame headers and every other payload are
            checked, so pass False only where the transport cannot corrupt data (a UNIX socket
            on one host). A receiver may insist on them (see :func:`receive`).

    Returns:
        What was sent, and the downtime as the source measured it.

    Raises:
        MigrationError: the receiver refused, the connection failed, the stream could not be
            produced, or the VM could not be paused or saved. The source VM was resumed if this
            call had paused it, so the guest keeps running here.
    """
    if not max_downtime > 0 or not math.isfinite(max_downtime):
        raise MigrationError(f"max_downtime must be a positive number of seconds, not {max_downtime!r}")
    if max_rounds < 0:
        raise MigrationError(f"max_rounds must be >= 0, not {max_rounds!r}")
    return _Sender(vm, sock, timeout, progress, page_checksums).run(max_downtime, max_rounds)


class _Sender:
    def __init__(self, vm: KvmVm, sock: socket.socket, timeout: float | None,
                 progress: ProgressCallback | None, page_checksums: bool) -> None:
        self.vm = vm
        self.page_checksums = bool(page_checksums)
        self.sock = sock
        self.timeout = timeout
        self.progress = progress
        self.regions: tuple[GuestRegionMmap, ...] = vm.guest_memory.regions
        self.rounds: list[RoundStats] = []
        self.frames = 0
        self.pages = 0
        # Pages dirtied but not yet sent when pre-copy ended, per slot (bit n = page n).
        self.pending: dict[int, int] = {}
        self.paused_here = False
        self.refused = False
        self.stream_sent = False
        self.where = "in the handshake"

    def run(self, max_downtime: float, max_rounds: int) -> MigrationStats:
        state = self.vm.lifecycle
        if state not in (LifecycleState.RUNNING, LifecycleState.PAUSED, LifecycleState.CREATED):
            raise MigrationError(f"cannot migrate a VM that is {state.value}")
        live = state is LifecycleState.RUNNING
        channel = _Channel(self.sock, self.timeout)
        started = time.perf_counter()
        try:
            self._handshake(channel)
            tracked = [slot for slot, r in enumerate(self.regions) if r.log_dirty_pages]
            bandwidth = 0.0
            if live and tracked:
                bandwidth = self._precopy(channel, tracked, max_downtime, max_rounds)
            paused_at = self._final(channel, live, tracked)
            done = time.perf_counter()
        except BaseException as e:
            self._fail(channel, e, live)
        finally:
            channel.restore()
        stats = MigrationStats(
            downtime=done - paused_at, total_time=done - started, iterations=len(self.rounds),
            bytes_sent=channel.sent, pages_per_round=tuple(r.pages for r in self.rounds),
            rounds=tuple(self.rounds), bandwidth=bandwidth)
        log.debug("migration done: %s", stats)
        return stats

    def _handshake(self, channel: _Channel) -> None:
        hello = {
            "page_size": PAGE_SIZE,
            "regions": [{"start": int(r.start_addr), "size": r.size,
                         "log_dirty_pages": r.log_dirty_pages, "read_only": r.read_only}
                        for r in self.regions],
            "num_vcpus": self.vm.config.num_vcpus,
            "devices": [{"space": s, "base": b, "kind": k} for s, b, k in _stateful_devices(self.vm.bus)],
            "page_checksums": self.page_checksums,
        }
        channel.send([_pack_preamble()])
        channel.send_json(FrameType.HELLO, hello)
        header = self._recv_answer(channel)
        if header.kind is not FrameType.ACCEPT:
            raise MigrationError(f"the receiver answered the hello with {header.kind.name}")
        channel.recv_json(header, "receiver's acceptance", _MAX_TEXT)

    def _recv_answer(self, channel: _Channel) -> _Header:
        """The receiver's next frame; its refusal, or its hanging up, as a MigrationError."""
        try:
            header = channel.recv_header()
        except _PeerClosedError:
            raise MigrationError("the receiver closed the connection") from None
        if header.kind is FrameType.REFUSE:
            self.refused = True
            raise MigrationError(f"the receiver refused: {channel.recv_text(header, 'refusal')}")
        return header

    def _check_receiver(self, channel: _Channel) -> None:
        """Between rounds: stop if the receiver refused or hung up meanwhile."""
        if channel.readable():
            header = self._recv_answer(channel)
            raise MigrationError(f"the receiver sent {header.kind.name} in the middle of the stream")

    def _send_round(self, channel: _Channel, index: int, runs: dict[int, list[tuple[int, int]]],
                    final: bool) -> RoundStats:
        t0 = time.perf_counter()
        sent0 = channel.sent
        pages = zero_pages = 0
        frames = self._frames(runs)
        # Frames made ready (zero runs found, page checksums computed) while the socket was full.
        ready: collections.deque[_OutFrame] = collections.deque()

        def prepare() -> bool:
            if len(ready) >= _READY_FRAMES:
                return False
            frame = next(frames, None)
            if frame is None:
                return False
            ready.append(frame)
            return True

        channel.idle = prepare
        try:
            while ready or prepare():
                slot, first, count, data, table = ready.popleft()
                if data is None:
                    channel.send_zeros(slot, first, count)
                    zero_pages += count
                else:
                    channel.send_pages(slot, first, data, table)
                pages += count
                self.frames += 1
        finally:
            channel.idle = None
        self.pages += pages
        stats = RoundStats(index, pages, zero_pages, channel.sent - sent0,
                           time.perf_counter() - t0, final)
        self.rounds.append(stats)
        log.debug("migration round %d: %d pages (%d zero), %d bytes in %.3f s%s", index, pages,
                  zero_pages, stats.bytes, stats.seconds, " (final)" if final else "")
        if self.progress is not None:
            self.progress(stats)
        return stats

    def _frames(self, runs: dict[int, list[tuple[int, int]]]) -> Iterator[_OutFrame]:
        """The round's frames in order, each ready to send."""
        checksums = self.page_checksums
        for slot in sorted(runs):
            region = self.regions[slot]
            view = region.as_memoryview()
            host = region.host_address
            for first, count in runs[slot]:
                for zero, f, n in _segments(host, first, count):
                    if zero:
                        yield slot, f, n, None, None
                    else:
                        data = view[f * PAGE_SIZE:(f + n) * PAGE_SIZE]
                        yield slot, f, n, data, _page_crcs(data) if checksums else None

    def _precopy(self, channel: _Channel, tracked: list[int], max_downtime: float,
                 max_rounds: int) -> float:
        """Rounds while the guest runs; returns the bandwidth measured (bytes per second)."""
        tracker = self.vm.dirty_tracker
        # Started before round 0 reads anything: a write racing that read is dirty for round 1.
        tracker.start(MIGRATION_CURSOR)
        untracked = sum(r.size for slot, r in enumerate(self.regions) if slot not in tracked)
        # Everything is pending at first; what each round leaves is what the tracker saw meanwhile.
        self.pending = {slot: (1 << self.regions[slot].num_pages) - 1 for slot in tracked}
        runs = {slot: [(0, self.regions[slot].num_pages)] for slot in tracked}
        best = math.inf
        stalls = 0
        sent = seconds = 0.0
        bandwidth = 0.0
        for index in range(max_rounds):
            self.where = f"in pre-copy round {index}"
            stats = self._send_round(channel, index, runs, final=False)
            sent += stats.bytes
            seconds += stats.seconds
            bandwidth = sent / seconds if seconds > 0 else math.inf
            self._check_receiver(channel)
            dirty = [d for d in tracker.take(MIGRATION_CURSOR) if d.bits]
            runs = {d.slot: d.runs() for d in dirty}
            self.pending = {d.slot: d.bits for d in dirty}
            pending = sum(len(d) for d in dirty)
            expected = (pending * PAGE_SIZE + untracked) / bandwidth if bandwidth else math.inf
            if expected <= max_downtime:
                break
            # Converging means each round leaves fewer dirty pages than any before it.
            stalls = stalls + 1 if pending >= best else 0
            best = min(best, pending)
            if stalls >= _MAX_STALLS:
                log.debug("migration: the dirty set stopped shrinking at %d pages", pending)
                break
        return bandwidth

    def _final(self, channel: _Channel, live: bool, tracked: list[int]) -> float:
        """Pause, send what is left and the state, wait for the acknowledgement."""
        self.where = "before pausing"
        self._check_receiver(channel)
        if live:
            self.vm.pause(self.timeout)
            self.paused_here = True
        paused_at = time.perf_counter()
        self.where = "in the final round (source paused)" if live else "in the final round"
        if live and tracked:
            # What the last pre-copy round left unsent, and what was dirtied since it was measured.
            final_runs = {
                d.slot: DirtyBitmap(d.slot, d.start_addr, d.num_pages,
                                    d.bits | self.pending.get(d.slot, 0)).runs()
                for d in self.vm.dirty_tracker.take(MIGRATION_CURSOR)}
        else:
            final_runs = {}
        for slot, region in enumerate(self.regions):
            if not live or slot not in tracked:
                final_runs[slot] = [(0, region.num_pages)]
        self._send_round(channel, len(self.rounds), final_runs, final=True)
        self.where = "sending the VM state"
        state = self.vm.save_state()
        channel.send_frame(FrameType.STATE, state.to_bytes())
        channel.send_json(FrameType.END, {"frames": self.frames, "pages": self.pages})
        self.stream_sent = True
        self.where = "waiting for the receiver's acknowledgement"
        header = self._recv_answer(channel)
        if header.kind is not FrameType.DONE:
            raise MigrationError(f"the receiver answered the stream with {header.kind.name}")
        channel.recv_payload(header, "acknowledgement", _MAX_TEXT)
        return paused_at

    def _fail(self, channel: _Channel, error: BaseException, live: bool) -> NoReturn:
        connection = isinstance(error, (OSError, _PeerClosedError))
        what = _describe(error)
        if connection and not isinstance(error, TimeoutError):
            # The receiver may have refused and hung up: its reason is worth more than EPIPE.
            reason = self._pending_refusal(channel)
            if reason is not None:
                what = f"the receiver refused: {reason}"
        if not connection and not self.refused:
            channel.try_send_text(FrameType.ABORT, what)
        channel.shutdown()
        outcome = ""
        if self.paused_here:
            try:
                self.vm.resume()
                outcome = "; the source VM was resumed"
            except KvmError as e:
                outcome = f"; resuming the source VM failed too: {e}"
        elif live:
            state = self.vm.lifecycle
            outcome = ("; the source VM kept running" if state is LifecycleState.RUNNING
                       else f"; the source VM is {state.value}")
        uncertain = self.stream_sent and connection
        if uncertain:
            outcome += (" (the whole stream was sent: the receiver may hold the VM, paused; do not "
                        "resume it there)")
        if not isinstance(error, Exception):
            raise error
        raise MigrationError(f"migration failed {self.where}: {what}{outcome}",
                             uncertain=uncertain) from error

    def _pending_refusal(self, channel: _Channel) -> str | None:
        try:
            channel.idle = None
            channel.timeout = _NOTICE_TIMEOUT
            while True:
                header = channel.recv_header()
                if header.kind is FrameType.REFUSE:
                    return channel.recv_text(header, "refusal")
                channel.recv_payload(header, header.kind.name)
        except (OSError, _PeerClosedError, MigrationError):
            return None



# ---- the destination ------------------------------------------------------------------------------


def receive(kvm: Kvm, sock: socket.socket, exit_handler: ExitHandler, bus: IoManager, *,
            memory: GuestMemoryMmap | None = None, num_vcpus: int | None = None,
            max_memory: int | None = None, require_page_checksums: bool = False,
            timeout: float | None = 60.0) -> tuple[KvmVm, GuestMemoryMmap]:
    """Receive a VM that :func:`migrate` sends over ``sock``; return it paused, with its memory.

    The VM's vCPU threads are started and parked before this returns, so ``vm.resume()``
    continues the guest exactly where the source stopped (``vm.run()`` is not called again).
    The caller owns both results: close the VM, then the memory, as after
    :func:`kvmlib.snapshot.restore_snapshot`.

    Before the source pauses anything, the receiver checks the VM it is offered and refuses
    (the source keeps running) a stream of another version or page size, a memory layout other
    than ``memory``'s (when given) or above ``max_memory``, more memory slots or vCPUs than KVM
    offers here, a vCPU count other than ``num_vcpus`` (when given), read-only memory KVM cannot
    provide, stateful devices other than those on ``bus`` (same classes at the same places), or
    pages without checksums when ``require_page_checksums`` is set.

    Args:
        kvm: an open ``/dev/kvm``.
        sock: a connected stream socket; its timeout is restored afterwards. On failure it is shut
            down (close it).
        exit_handler: the new VM's exit handler.
        bus: the new VM's bus, with the same stateful devices as the source's; their state is
            restored from the stream.
        memory: receive into this guest memory (its layout must be the source's); by default
            memory of the source's layout is created, each region with the source's dirty
            logging and read-only flags.
        num_vcpus: refuse a VM with another number of vCPUs.
        max_memory: refuse a VM with more guest memory than this many bytes.
        require_page_checksums: refuse (before the source pauses) a source that sends pages
            without checksums (``migrate(..., page_checksums=False)``).
        timeout: seconds any single receive or send may wait (None: forever).

    Raises:
        MigrationError: the stream was refused (what the source offered cannot be hosted here),
            is corrupted, truncated or of another version, the source aborted, or the VM could
            not be built. Everything built was closed; ``memory``, when given, stays open.
    """
    return _Receiver(kvm, sock, exit_handler, bus, memory, num_vcpus, max_memory,
                     require_page_checksums, timeout).run()


class _Receiver:
    def __init__(self, kvm: Kvm, sock: socket.socket, exit_handler: ExitHandler, bus: IoManager,
                 memory: GuestMemoryMmap | None, num_vcpus: int | None, max_memory: int | None,
                 require_page_checksums: bool, timeout: float | None) -> None:
        self.kvm = kvm
        self.sock = sock
        self.exit_handler = exit_handler
        self.bus = bus
        self.given_memory = memory
        self.memory: GuestMemoryMmap | None = memory
        self.expect_vcpus = num_vcpus
        self.max_memory = max_memory
        self.timeout = timeout
        self.num_vcpus = 0
        self.frames = 0
        self.pages = 0
        # Per region: pages whose last copy failed its checksum.
        self.suspect: list[int] = []
        self.prefaulter: _Prefaulter | None = None
        # PAGES frames received but not yet checked: (header, the pages in memory, checksums).
        self.unchecked: collections.deque[tuple[_Header, memoryview, bytearray]] = \
            collections.deque()
        self.require_page_checksums = require_page_checksums
        self.page_checksums = True

    def run(self) -> tuple[KvmVm, GuestMemoryMmap]:
        channel = _Channel(self.sock, self.timeout)
        vm: KvmVm | None = None
        try:
            self._handshake(channel)
            state = self._receive_stream(channel)
            self._stop_prefaulter()
            vm = self._build(state)
            channel.send_frame(FrameType.DONE)
        except BaseException as e:
            self._fail(channel, e, vm)
        finally:
            channel.restore()
        assert self.memory is not None
        return vm, self.memory

    def _stop_prefaulter(self) -> None:
        prefaulter, self.prefaulter = self.prefaulter, None
        if prefaulter is not None:
            error = prefaulter.stop()
            if error is not None:
                raise MigrationError(f"populating the received memory failed: "
                                     f"{_describe(error)}") from error

    def _fail(self, channel: _Channel, error: BaseException, vm: KvmVm | None) -> NoReturn:
        try:
            # Before anything is closed: the helper uses the memory.
            self._stop_prefaulter()
        except MigrationError as e:
            log.warning("migration receive: %s (while failing: %s)", e, _describe(error))
        # Views into the memory: dropped, so that closing it unmaps it now.
        self.unchecked.clear()
        what = _describe(error)
        if isinstance(error, _PeerClosedError):
            what = (f"the stream ended after {channel.received} bytes, before the source finished "
                    "(truncated: the source stopped, died or was cut off)")
        channel.try_send_text(FrameType.REFUSE, what)
        channel.shutdown()
        try:
            if vm is not None:
                vm.close()
        finally:
            if self.memory is not None and self.given_memory is None:
                self.memory.close()
        if not isinstance(error, Exception):
            raise error
        raise MigrationError(f"migration receive failed: {what}") from error

    def _handshake(self, channel: _Channel) -> None:
        magic, version, crc, actual = channel.recv_preamble()
        if magic != MAGIC:
            raise MigrationError(f"not a kvmlib migration stream (it starts with {magic!r})")
        if crc != actual:
            raise MigrationError("the stream is corrupted: its preamble fails its checksum")
        if version != VERSION:
            raise MigrationError(f"the source sends stream version {version}; this kvmlib receives "
                                 f"version {VERSION}")
        header = channel.recv_header()
        if header.kind is not FrameType.HELLO:
            raise MigrationError(f"expected the source's hello, got {header.kind.name}")
        hello = channel.recv_json(header, "hello", 1 << 20)
        if hello.get("page_size") != PAGE_SIZE:
            raise MigrationError(f"the source's page size is {hello.get('page_size')!r}, this "
                                 f"host's {PAGE_SIZE}")
        try:
            regions, self.num_vcpus, devices, self.page_checksums = _parse_hello(hello)
        except (KeyError, TypeError, ValueError) as e:
            raise MigrationError(f"the hello is malformed: {type(e).__name__}: {e}") from None
        self._check_hostable(regions, devices)
        self._map_memory(regions)
        channel.send_json(FrameType.ACCEPT, {"version": VERSION})
        if self.given_memory is None:
            assert self.memory is not None
            self.prefaulter = _Prefaulter(self.memory.regions)

    def _check_hostable(self, regions: list[tuple[int, int, bool, bool]],
                        devices: list[tuple[str, int, str]]) -> None:
        if self.require_page_checksums and not self.page_checksums:
            raise MigrationError("the source sends pages without checksums; this receiver "
                                 "requires them")
        layout = [(start, size) for start, size, _, _ in regions]
        if self.given_memory is not None and tuple(layout) != layout_of(self.given_memory):
            raise MigrationError(f"the source's memory layout {_fmt_layout(layout)} differs from the "
                                 f"receiver's {_fmt_layout(layout_of(self.given_memory))}")
        total = sum(size for _, size in layout)
        if self.max_memory is not None and total > self.max_memory:
            raise MigrationError(f"the source has {total:#x} bytes of memory; this receiver takes at "
                                 f"most {self.max_memory:#x}")
        slots = self.kvm.check_extension(Cap.KVM_CAP_NR_MEMSLOTS)
        if len(layout) > slots:
            raise MigrationError(f"the source has {len(layout)} memory regions; KVM here offers "
                                 f"{slots} slots")
        if any(ro for _, _, _, ro in regions) and not self.kvm.check_extension(Cap.KVM_CAP_READONLY_MEM):
            raise MigrationError("the source has read-only memory; KVM here lacks KVM_CAP_READONLY_MEM")
        limit = min(MAX_VCPUS, self.kvm.check_extension(Cap.KVM_CAP_MAX_VCPUS)
                    or self.kvm.check_extension(Cap.KVM_CAP_NR_VCPUS) or 4)
        if not 1 <= self.num_vcpus <= limit:
            raise MigrationError(f"the source has {self.num_vcpus} vCPUs; a VM here has 1..{limit}")
        if self.expect_vcpus is not None and self.num_vcpus != self.expect_vcpus:
            raise MigrationError(f"the source has {self.num_vcpus} vCPUs; this receiver hosts "
                                 f"{self.expect_vcpus}")
        present = _stateful_devices(self.bus)
        if sorted(devices) != present:
            raise MigrationError(f"the source has devices [{_fmt_devices(devices)}] but this bus has "
                                 f"[{_fmt_devices(present)}]")

    def _map_memory(self, regions: list[tuple[int, int, bool, bool]]) -> None:
        if self.memory is None:
            made: list[GuestRegionMmap] = []
            try:
                for start, size, dirty, read_only in regions:
                    made.append(GuestRegionMmap.anonymous(start, size, read_only=read_only,
                                                          log_dirty_pages=dirty))
                self.memory = GuestMemoryMmap.from_regions(made)
            except KvmError as e:
                for r in made:
                    r.close()
                raise MigrationError(f"cannot map the source's memory here: {e}") from e
        self.suspect = [0] * len(regions)

    def _receive_stream(self, channel: _Channel) -> VmState:
        assert self.memory is not None
        regions = self.memory.regions
        state: bytes | None = None
        channel.idle = self._check_one
        while True:
            header = channel.recv_header()
            kind = header.kind
            if kind is not FrameType.PAGES:
                # Checked in stream order: a page's last copy decides whether it is suspect.
                while self._check_one():
                    pass
            if kind is FrameType.PAGES or kind is FrameType.ZEROS:
                if state is not None:
                    raise MigrationError("the source sent pages after the VM state")
                region = self._run_region(regions, header)
                self._apply_run(channel, region, header)
            elif kind is FrameType.STATE:
                if state is not None:
                    raise MigrationError("the source sent the VM state twice")
                state = channel.recv_payload(header, "VM state")
            elif kind is FrameType.END:
                end = channel.recv_json(header, "end of stream", _MAX_TEXT)
                break
            elif kind is FrameType.ABORT:
                raise MigrationError(f"the source aborted: {channel.recv_text(header, 'abort reason')}")
            else:
                raise MigrationError(f"unexpected {kind.name} frame in the stream")
        channel.idle = None
        if state is None:
            raise MigrationError("the stream ended without the VM state")
        if end.get("frames") != self.frames or end.get("pages") != self.pages:
            raise MigrationError(f"the source sent {end.get('frames')} frames of {end.get('pages')} "
                                 f"pages but {self.frames} frames of {self.pages} pages arrived")
        for slot, bits in enumerate(self.suspect):
            if bits:
                first = (bits & -bits).bit_length() - 1
                raise MigrationError(f"the stream is corrupted: {bits.bit_count()} page(s) of region "
                                     f"{slot} (the first is page {first:#x}) failed their checksum "
                                     "and were not sent again")
        try:
            decoded = VmState.from_bytes(state)
        except KvmError as e:
            raise MigrationError(f"the VM state is unusable: {e}") from e
        if decoded.num_vcpus != self.num_vcpus:
            raise MigrationError(f"the VM state has {decoded.num_vcpus} vCPUs; the hello said "
                                 f"{self.num_vcpus}")
        return decoded

    def _run_region(self, regions: Sequence[GuestRegionMmap], header: _Header) -> GuestRegionMmap:
        slot, first, count = header.slot, header.first, header.count
        if slot >= len(regions):
            raise MigrationError(f"a page run names region {slot}; there are {len(regions)}")
        region = regions[slot]
        limit = MAX_FRAME_PAGES if header.kind is FrameType.PAGES else region.num_pages
        if not 1 <= count <= limit or first + count > region.num_pages:
            raise MigrationError(f"page run {first:#x}+{count} of region {slot} is outside it "
                                 f"({region.num_pages} pages) or too long")
        return region

    def _apply_run(self, channel: _Channel, region: GuestRegionMmap, header: _Header) -> None:
        slot, first, count = header.slot, header.first, header.count
        if self.prefaulter is not None:
            self.prefaulter.advance(slot, first + count)
        mask = _run_mask(first, count)
        lo, hi = first * PAGE_SIZE, (first + count) * PAGE_SIZE
        if header.kind is FrameType.PAGES:
            # Straight into guest memory: the kernel's copy is the only one.
            view = region.as_memoryview()[lo:hi]
            channel.recv_exact(view)
            if self.page_checksums:
                table = bytearray(count * 4)
                channel.recv_exact(memoryview(table))
                # Checked when the socket has nothing to read, or once a few frames wait.
                self.unchecked.append((header, view, table))
                if len(self.unchecked) > _UNCHECKED_FRAMES:
                    self._check_one()
            elif header.crc:
                raise MigrationError("the stream is corrupted: a page run has a checksum in a "
                                     "stream without page checksums")
        else:
            # Cheap where nothing is mapped yet; frees what was (given memory: zero-filled).
            region.discard(lo, hi - lo)
            self.suspect[slot] &= ~mask
        self.frames += 1
        self.pages += count

    def _check_one(self) -> bool:
        """Check the oldest received frame's pages against their checksums, if one waits."""
        if not self.unchecked:
            return False
        header, view, table = self.unchecked.popleft()
        slot, first, count = header.slot, header.first, header.count
        mask = _run_mask(first, count)
        if zlib.crc32(table) != header.crc:
            self.suspect[slot] |= mask
            return True
        self.suspect[slot] &= ~mask
        actual = _page_crcs(view)
        if actual != table:
            # Torn by a write while it was sent (so it is dirty and comes again), or corrupted
            # (refused at the end unless a later copy replaces it).
            expected = struct.unpack(f"<{count}I", table)
            got_crcs = struct.unpack(f"<{count}I", actual)
            for i, (want, got) in enumerate(zip(expected, got_crcs, strict=True)):
                if want != got:
                    self.suspect[slot] |= 1 << (first + i)
        return True

    def _build(self, state: VmState) -> KvmVm:
        assert self.memory is not None
        try:
            vm = KvmVm.from_state(self.kvm, state, self.memory, self.exit_handler, self.bus)
        except KvmError as e:
            raise MigrationError(f"cannot build the VM here: {e}") from e
        try:
            # Start the vCPU threads without letting the guest execute: a vCPU whose MP state is
            # UNINITIALIZED never enters the guest (only an INIT, which no parked peer can send,
            # would make it), and immediate_exit turns its first KVM_RUN back at once. The pause
            # then parks every thread, and the saved MP state goes back, so the guest continues
            # exactly where the source stopped when the caller resumes it.
            for vcpu in vm.vcpus:
                vcpu.vcpu_fd.set_mp_state(kvm_mp_state(KVM_MP_STATE_UNINITIALIZED))
                vcpu.vcpu_fd.set_immediate_exit(True)
            vm.run()
            vm.pause(self.timeout)
            for vcpu, saved in zip(vm.vcpus, state.vcpus, strict=True):
                vcpu.vcpu_fd.set_mp_state(kvm_mp_state(saved.mp_state))
        except BaseException:
            vm.close()
            raise
        return vm


def _parse_hello(hello: dict[str, Any]) -> tuple[list[tuple[int, int, bool, bool]], int,
                                                 list[tuple[str, int, str]], bool]:
    regions = []
    for r in hello["regions"]:
        start, size = r["start"], r["size"]
        dirty, read_only = r["log_dirty_pages"], r["read_only"]
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (start, size)) \
                or not all(isinstance(v, bool) for v in (dirty, read_only)):
            raise TypeError(f"region {r!r} is not (int start, int size, bool, bool)")
        regions.append((start, size, dirty, read_only))
    if not regions:
        raise ValueError("no memory regions")
    num_vcpus = hello["num_vcpus"]
    if not isinstance(num_vcpus, int) or isinstance(num_vcpus, bool):
        raise TypeError(f"num_vcpus is {num_vcpus!r}")
    devices = [(str(d["space"]), int(d["base"]), str(d["kind"])) for d in hello["devices"]]
    page_checksums = hello["page_checksums"]
    if not isinstance(page_checksums, bool):
        raise TypeError(f"page_checksums is {page_checksums!r}")
    return regions, num_vcpus, devices, page_checksums


__all__ = [
    "FRAME_HEADER", "MAGIC", "MAX_FRAME_PAGES", "MAX_MESSAGE", "MIGRATION_CURSOR", "PREAMBLE",
    "VERSION", "FrameType", "MigrationError", "MigrationStats", "ProgressCallback", "RoundStats",
    "migrate", "receive",
]
