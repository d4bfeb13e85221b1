"""Live migration against the real /dev/kvm: the source here, the receiver in another process.

Every wait is bounded: sockets time out after TIMEOUT, child processes are waited for at most
CHILD_TIMEOUT, so a hang fails a test instead of the suite.
"""

from __future__ import annotations

import errno
import json
import random
import re
import socket
import struct
import subprocess
import sys
import threading
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kvmlib import GuestAddress, GuestRegionMmap, Kvm, LifecycleState, migration
from kvmlib.errors import GuestMemoryMapError
from kvmlib.exit_handler import EventExitHandler
from kvmlib.memory import PAGE_SIZE
from kvmlib.migration import (
    FRAME_HEADER,
    MAGIC,
    PREAMBLE,
    VERSION,
    FrameType,
    MigrationError,
    RoundStats,
    migrate,
    receive,
)

from .migration_guests import (
    HOST_NOTE,
    NOISE,
    RAM_SIZE,
    Source,
    digest,
    tape_bus,
    wait_counter_above,
)
from .snapshot_guests import Tape

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 20.0
CHILD_TIMEOUT = 60.0


class Child:
    """A receiver process (``tests.migration_child``) at the other end of a UNIX socket pair."""

    def __init__(self, mode: str = "run") -> None:
        self.sock, theirs = socket.socketpair()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.migration_child", str(theirs.fileno()), mode],
                cwd=ROOT, pass_fds=[theirs.fileno()], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                text=True)
        except BaseException:
            self.sock.close()
            raise
        finally:
            theirs.close()

    def result(self) -> dict[str, Any]:
        out, err = self.proc.communicate(timeout=CHILD_TIMEOUT)
        assert self.proc.returncode == 0, err
        doc: dict[str, Any] = json.loads(out)
        return doc

    def kill(self) -> None:
        self.proc.kill()
        self.proc.communicate(timeout=CHILD_TIMEOUT)

    def close(self) -> None:
        self.sock.close()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate(timeout=CHILD_TIMEOUT)


@pytest.fixture
def source(kvm: Kvm) -> Iterator[Source]:
    s = Source(kvm)
    yield s
    s.close()


@pytest.fixture
def child() -> Iterator[Child]:
    c = Child()
    yield c
    c.close()


def assert_still_running(source: Source) -> None:
    assert source.vm.lifecycle is LifecycleState.RUNNING
    assert wait_counter_above(source.memory, source.counter())


# ---- a migration that succeeds -------------------------------------------------------------------


def test_a_counting_guest_moves_to_another_process_and_counts_on(source: Source, child: Child) -> None:
    ran_during_precopy: list[bool] = []

    def progress(r: RoundStats) -> None:
        if r.index == 0:
            # The guest is running while memory is copied: its counter moves between rounds.
            ran_during_precopy.append(wait_counter_above(source.memory, source.counter()))
            # A host write after its page was sent is tracked and sent again (the digests agree).
            source.memory.write(HOST_NOTE, b"written by the host during pre-copy")

    stats = migrate(source.vm, child.sock, timeout=TIMEOUT, progress=progress)
    assert source.vm.lifecycle is LifecycleState.PAUSED
    last = source.vm.vcpu_regs(0).rax
    expected = digest(source.memory)
    got = child.result()
    assert ran_during_precopy == [True]
    # The destination starts exactly where the source stopped, with the same memory.
    assert (got["lifecycle"], got["rax"], got["digest"]) == ("paused", last, expected)
    assert got["consistent"] and got["noise"] and got["host_note"]
    assert got["tape"] == 0x42
    # ... and counts on from there once resumed.
    assert got["counting"] and got["rax_after"] > last and got["consistent_after"]
    assert stats.iterations == len(stats.rounds) == len(stats.pages_per_round) >= 2
    assert [r.final for r in stats.rounds] == [False] * (stats.iterations - 1) + [True]
    assert stats.pages_per_round[0] == RAM_SIZE // PAGE_SIZE
    assert stats.pages_per_round[-1] > 0  # the window the guest kept writing
    assert stats.bytes_sent > sum(r.bytes for r in stats.rounds) > 0  # + handshake, state, end
    assert 0 < stats.downtime < stats.total_time


def test_a_paused_vm_is_sent_in_one_round_and_stays_paused(source: Source, child: Child) -> None:
    source.vm.pause()
    pauses = source.vm.vcpu_run_state.pauses
    stats = migrate(source.vm, child.sock, timeout=TIMEOUT)
    assert (stats.iterations, stats.rounds[0].final) == (1, True)
    assert source.vm.vcpu_run_state.pauses == pauses and source.vm.paused
    got = child.result()
    assert (got["rax"], got["digest"]) == (source.vm.vcpu_regs(0).rax, digest(source.memory))
    assert got["counting"]


def test_with_no_pre_copy_rounds_a_running_vm_is_stopped_and_copied(source: Source,
                                                                    child: Child) -> None:
    stats = migrate(source.vm, child.sock, max_rounds=0, timeout=TIMEOUT)
    assert stats.pages_per_round == (RAM_SIZE // PAGE_SIZE,) and stats.rounds[0].final
    got = child.result()
    assert (got["rax"], got["digest"]) == (source.vm.vcpu_regs(0).rax, digest(source.memory))
    assert got["consistent"] and got["counting"]


def test_without_page_checksums_the_guest_moves_just_the_same(source: Source, child: Child) -> None:
    stats = migrate(source.vm, child.sock, timeout=TIMEOUT, page_checksums=False)
    last = source.vm.vcpu_regs(0).rax
    got = child.result()
    assert (got["lifecycle"], got["rax"], got["digest"]) == ("paused", last, digest(source.memory))
    assert got["consistent"] and got["noise"] and got["counting"] and got["consistent_after"]
    # Each page costs its bytes only: no CRC-32 table behind it.
    assert stats.rounds[0].bytes < RAM_SIZE + stats.rounds[0].pages // 64 * 40


def test_a_page_zeroed_after_it_was_sent_arrives_zero(source: Source, child: Child) -> None:
    def progress(r: RoundStats) -> None:
        if r.index == 0:
            source.memory.write(NOISE, bytes(PAGE_SIZE))  # sent as ZEROS in the next round

    migrate(source.vm, child.sock, timeout=TIMEOUT, progress=progress)
    got = child.result()
    assert (got["rax"], got["digest"]) == (source.vm.vcpu_regs(0).rax, digest(source.memory))
    assert not got["noise"]  # its first page is zero now, on both sides


def test_memory_without_dirty_logging_is_sent_whole_in_the_final_round(kvm: Kvm, child: Child) -> None:
    source = Source(kvm, log_dirty_pages=False)
    try:
        stats = migrate(source.vm, child.sock, timeout=TIMEOUT)
        assert stats.pages_per_round == (RAM_SIZE // PAGE_SIZE,)
        assert stats.rounds[0].final
        got = child.result()
        assert (got["rax"], got["digest"]) == (source.vm.vcpu_regs(0).rax, digest(source.memory))
        assert got["consistent"] and got["counting"]
    finally:
        source.close()


# ---- failures: the guest keeps running on the source ---------------------------------------------


@pytest.mark.parametrize("when", ["pre-copy", "final round"])
def test_killing_the_receiver_mid_transfer_leaves_the_source_running(
        source: Source, child: Child, when: str) -> None:
    pauses = source.vm.vcpu_run_state.pauses

    def progress(r: RoundStats) -> None:
        if r.final == (when == "final round"):
            child.kill()

    with pytest.raises(MigrationError) as info:
        migrate(source.vm, child.sock, timeout=TIMEOUT, progress=progress)
    assert_still_running(source)
    assert not info.value.uncertain
    if when == "pre-copy":
        assert source.vm.vcpu_run_state.pauses == pauses  # never paused
        assert "kept running" in str(info.value)
    else:
        assert source.vm.vcpu_run_state.pauses == pauses + 1
        assert "was resumed" in str(info.value)


def test_a_receiver_with_another_memory_layout_refuses_before_the_source_pauses(
        source: Source) -> None:
    child = Child("layout")
    try:
        pauses = source.vm.vcpu_run_state.pauses
        with pytest.raises(MigrationError, match=r"refused: .*memory layout") as info:
            migrate(source.vm, child.sock, timeout=TIMEOUT)
        assert "in the handshake" in str(info.value)
        assert source.vm.vcpu_run_state.pauses == pauses
        assert_still_running(source)
        assert "memory layout [0x0+0x1000000] differs" in child.result()["error"]
    finally:
        child.close()


def test_a_receiver_requiring_page_checksums_refuses_a_stream_without_them_before_the_pause(
        source: Source) -> None:
    child = Child("require-checksums")
    try:
        pauses = source.vm.vcpu_run_state.pauses
        with pytest.raises(MigrationError, match=r"refused: .*without checksums"):
            migrate(source.vm, child.sock, timeout=TIMEOUT, page_checksums=False)
        assert source.vm.vcpu_run_state.pauses == pauses
        assert_still_running(source)
    finally:
        child.close()


def test_a_failing_progress_callback_aborts_and_the_receiver_hears_why(
        source: Source, child: Child) -> None:
    def progress(r: RoundStats) -> None:
        raise RuntimeError("operator cancelled")

    with pytest.raises(MigrationError, match="operator cancelled") as info:
        migrate(source.vm, child.sock, timeout=TIMEOUT, progress=progress)
    assert isinstance(info.value.__cause__, RuntimeError)
    assert_still_running(source)
    assert "the source aborted: RuntimeError: operator cancelled" in child.result()["error"]


# ---- corrupted and truncated streams -------------------------------------------------------------


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    buf = bytearray()
    while len(buf) < size:
        chunk = sock.recv(size - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return bytes(buf)


class Proxy:
    """Relays a migration between the source and a receiver, frame by frame, tampering once.

    ``tamper(kind, header, payload)`` returns what to forward (or None to cut the connection).
    """

    Tamper = Callable[[FrameType, bytearray, bytearray], "tuple[bytearray, bytearray] | None"]

    def __init__(self, to_receiver: socket.socket, tamper: Tamper, *,
                 page_checksums: bool = True) -> None:
        self.source_end, self._in = socket.socketpair()
        self._page_bytes = PAGE_SIZE + 4 if page_checksums else PAGE_SIZE
        self._out = to_receiver
        self._tamper = tamper
        for s in (self._in, self._out):
            s.settimeout(TIMEOUT)
        self._threads = [threading.Thread(target=self._forward_frames, daemon=True),
                         threading.Thread(target=self._forward_back, daemon=True)]
        for t in self._threads:
            t.start()

    def _forward_frames(self) -> None:
        try:
            self._out.sendall(_recv_exact(self._in, PREAMBLE.size))
            while True:
                header = bytearray(_recv_exact(self._in, FRAME_HEADER.size))
                kind, _, _, _, count, _, _ = FRAME_HEADER.unpack(header)
                size = count * self._page_bytes if kind == FrameType.PAGES else \
                    0 if kind == FrameType.ZEROS else count
                payload = bytearray(_recv_exact(self._in, size))
                out = self._tamper(FrameType(kind), header, payload)
                if out is None:
                    break
                self._out.sendall(out[0] + out[1])
        except (OSError, EOFError):
            pass
        finally:
            # The source's sends fail from now on and the receiver sees the stream end; what the
            # receiver still says reaches the source through the other thread.
            for s, how in ((self._in, socket.SHUT_RD), (self._out, socket.SHUT_WR)):
                try:
                    s.shutdown(how)
                except OSError:
                    pass

    def _forward_back(self) -> None:
        try:
            while data := self._out.recv(65536):
                self._in.sendall(data)
        except OSError:
            pass
        finally:
            try:
                self._in.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def close(self) -> None:
        for s in (self._in, self._out):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in self._threads:
            t.join(CHILD_TIMEOUT)
        self._in.close()
        self.source_end.close()


def flip_once(what: str) -> Proxy.Tamper:
    done = False
    noise_page = NOISE // PAGE_SIZE

    def tamper(kind: FrameType, header: bytearray, payload: bytearray) -> tuple[bytearray, bytearray]:
        nonlocal done
        if done:
            return header, payload
        _, _, _, first, count, _, _ = FRAME_HEADER.unpack(header)
        if what == "a frame header" and kind is FrameType.PAGES:
            header[12] ^= 0x01  # the run's first page
        elif what == "a page nobody writes again" and kind is FrameType.PAGES \
                and first <= noise_page < first + count:
            payload[(noise_page - first) * PAGE_SIZE + 123] ^= 0x01
        elif what == "the VM state" and kind is FrameType.STATE:
            payload[len(payload) // 2] ^= 0x01
        else:
            return header, payload
        done = True
        return header, payload
    return tamper


@pytest.mark.parametrize("what", ["a frame header", "a page nobody writes again", "the VM state"])
def test_a_flipped_byte_is_refused_and_the_source_runs_on(source: Source, child: Child,
                                                          what: str) -> None:
    proxy = Proxy(child.sock, flip_once(what))
    try:
        with pytest.raises(MigrationError, match=r"refused: .*corrupted"):
            migrate(source.vm, proxy.source_end, timeout=TIMEOUT)
        assert_still_running(source)
    finally:
        proxy.close()
    error = child.result()["error"]
    assert "corrupted" in error
    if what == "a page nobody writes again":
        assert f"the first is page {NOISE // PAGE_SIZE:#x}" in error


def test_without_page_checksums_a_flipped_header_byte_is_still_refused(source: Source,
                                                                     child: Child) -> None:
    proxy = Proxy(child.sock, flip_once("a frame header"), page_checksums=False)
    try:
        with pytest.raises(MigrationError, match=r"refused: .*corrupted"):
            migrate(source.vm, proxy.source_end, timeout=TIMEOUT, page_checksums=False)
        assert_still_running(source)
    finally:
        proxy.close()
    assert "frame header at byte" in child.result()["error"]


def test_a_truncated_stream_is_refused(source: Source, child: Child) -> None:
    def cut(kind: FrameType, header: bytearray, payload: bytearray) -> tuple[bytearray, bytearray] | None:
        return None if kind is FrameType.PAGES else (header, payload)

    proxy = Proxy(child.sock, cut)
    try:
        with pytest.raises(MigrationError):
            migrate(source.vm, proxy.source_end, timeout=TIMEOUT)
        assert_still_running(source)
    finally:
        proxy.close()
    assert "truncated" in child.result()["error"]


# ---- the receiver's checks, in this process -------------------------------------------------------


def test_page_checksums_are_one_zlib_crc32_per_page() -> None:
    data = bytearray(random.Random(5).randbytes(3 * PAGE_SIZE))
    view = memoryview(data)
    expected = [zlib.crc32(view[i:i + PAGE_SIZE]) for i in range(0, len(data), PAGE_SIZE)]
    assert list(struct.unpack("<3I", migration._page_crcs(view))) == expected



def _preamble(magic: bytes = MAGIC, version: int = VERSION) -> bytes:
    body = magic + version.to_bytes(4, "little")
    return body + zlib.crc32(body).to_bytes(4, "little")


def _frame(kind: FrameType, payload: bytes, *, first: int = 0, count: int | None = None,
           crc_of: bytes | None = None) -> bytes:
    """A frame as the wire format says: for PAGES, ``first``/``count`` and the CRC of ``crc_of``
    (the page checksum table); for the others, the payload's length and CRC."""
    size = len(payload) if count is None else count
    body = struct.pack("<HHIQQI", kind, 0, 0, first, size,
                       zlib.crc32(payload if crc_of is None else crc_of))
    return body + zlib.crc32(body).to_bytes(4, "little") + payload


@pytest.mark.parametrize(("stream", "message"), [
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "not a kvmlib migration stream"),
    (_preamble(version=VERSION + 1), f"stream version {VERSION + 1}; this kvmlib receives version "
                                     f"{VERSION}"),
    (_preamble()[:-1] + b"\x00", "preamble fails its checksum"),
    (_preamble()[:10], "stream ended after 0 bytes"),
])
def test_the_receiver_refuses_what_is_not_a_stream_it_reads(kvm: Kvm, stream: bytes,
                                                            message: str) -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.sendall(stream)
        ours.shutdown(socket.SHUT_WR)
        with pytest.raises(MigrationError, match=message):
            receive(kvm, theirs, EventExitHandler(), tape_bus(Tape()), timeout=TIMEOUT)
        # ... and tells the other side why, then hangs up.
        reply = ours.recv(65536)
        assert FRAME_HEADER.unpack(reply[:FRAME_HEADER.size])[0] == FrameType.REFUSE
        assert message.split(";", maxsplit=1)[0] in reply[FRAME_HEADER.size:].decode()


def test_the_receiver_refuses_devices_it_does_not_have(kvm: Kvm) -> None:
    hello = json.dumps({"page_size": PAGE_SIZE, "num_vcpus": 1,
                        "regions": [{"start": 0, "size": RAM_SIZE, "log_dirty_pages": True,
                                     "read_only": False}],
                        "devices": [{"space": "pio", "base": 0x3F8, "kind": "Serial"}],
                        "page_checksums": True}).encode()
    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.sendall(_preamble() + _frame(FrameType.HELLO, hello))
        with pytest.raises(MigrationError, match=r"devices \[Serial at pio 0x3f8\] but this bus has "
                                                 r"\[Tape at pio 0x20\]"):
            receive(kvm, theirs, EventExitHandler(), tape_bus(Tape()), timeout=TIMEOUT)


def test_bad_arguments_are_refused_before_anything_is_sent(source: Source) -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        with pytest.raises(MigrationError, match="max_downtime"):
            migrate(source.vm, ours, max_downtime=0)
        theirs.setblocking(False)
        with pytest.raises(BlockingIOError):
            theirs.recv(1)


# ---- the documentation's example -----------------------------------------------------------------


def test_the_two_process_example_in_the_docs_runs(kvm: Kvm) -> None:
    done = subprocess.run([sys.executable, str(ROOT / "docs" / "examples" / "migration_example.py")],
                          capture_output=True, text=True, timeout=CHILD_TIMEOUT, check=False)
    assert done.returncode == 0, done.stderr
    match = re.fullmatch(r"destination: the guest continues from (\d+), still counting: True\n"
                         r"source: stopped at (\d+) after \d+ rounds, \d+ KiB sent "
                         r"\(zero pages cost a header\)\n", done.stdout)
    assert match, done.stdout
    assert match[1] == match[2]


# ---- the receiver's helper thread, in this process ------------------------------------------------

PREFAULT_THREAD = "kvmlib-migration-prefault"


def _prefault_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == PREFAULT_THREAD]


class ReceiverThread:
    """:func:`receive` in a thread of this process; ``result()`` waits for it, bounded."""

    def __init__(self, kvm: Kvm, sock: socket.socket) -> None:
        self.outcome: list[object] = []

        def run() -> None:
            try:
                self.outcome.append(receive(kvm, sock, EventExitHandler(), tape_bus(Tape()),
                                            timeout=TIMEOUT))
            except BaseException as e:
                self.outcome.append(e)

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def result(self) -> object:
        self._thread.join(CHILD_TIMEOUT)
        assert not self._thread.is_alive()
        result = self.outcome[0]
        if isinstance(result, tuple):
            vm, memory = result
            self.digest = digest(memory)
            vm.close()
            memory.close()
        return result


@pytest.mark.parametrize("outcome", ["succeeds", "fails"])
def test_the_receivers_helper_thread_ends_with_the_receive(kvm: Kvm, source: Source,
                                                            outcome: str) -> None:
    def progress(r: RoundStats) -> None:
        if outcome == "fails":
            raise RuntimeError("stop here")

    ours, theirs = socket.socketpair()
    with ours, theirs:
        receiver = ReceiverThread(kvm, theirs)
        if outcome == "fails":
            with pytest.raises(MigrationError, match="stop here"):
                migrate(source.vm, ours, timeout=TIMEOUT, progress=progress)
            assert isinstance(receiver.result(), MigrationError)
        else:
            migrate(source.vm, ours, timeout=TIMEOUT)
            assert isinstance(receiver.result(), tuple)
            assert receiver.digest == digest(source.memory)
    assert _prefault_threads() == []


def test_a_kernel_that_cannot_populate_only_costs_the_receiver_its_faults(
        kvm: Kvm, source: Source, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []

    def refuse(self: GuestRegionMmap, offset: int = 0, size: int | None = None) -> None:
        calls.append(offset)
        raise GuestMemoryMapError("cannot populate (test)", errno.EINVAL)

    monkeypatch.setattr(GuestRegionMmap, "populate", refuse)
    ours, theirs = socket.socketpair()
    with ours, theirs:
        receiver = ReceiverThread(kvm, theirs)
        migrate(source.vm, ours, timeout=TIMEOUT)
        assert isinstance(receiver.result(), tuple)
        assert receiver.digest == digest(source.memory)
    assert calls == [0]  # tried once, then left the faults to the receiving thread


def test_a_failure_in_the_helper_thread_is_not_lost(kvm: Kvm, source: Source,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    called = threading.Event()

    def broken(self: GuestRegionMmap, offset: int = 0, size: int | None = None) -> None:
        called.set()
        raise RuntimeError("a bug in populate")

    def progress(r: RoundStats) -> None:
        assert called.wait(TIMEOUT)  # the helper has failed before the stream ends

    monkeypatch.setattr(GuestRegionMmap, "populate", broken)
    ours, theirs = socket.socketpair()
    with ours, theirs:
        receiver = ReceiverThread(kvm, theirs)
        with pytest.raises(MigrationError, match="refused: populating the received memory failed: "
                                                 "RuntimeError: a bug in populate"):
            migrate(source.vm, ours, timeout=TIMEOUT, progress=progress)
        error = receiver.result()
        assert isinstance(error, MigrationError)
        assert isinstance(error.__cause__, MigrationError)
        assert isinstance(error.__cause__.__cause__, RuntimeError)
    assert_still_running(source)


def test_the_helper_stays_a_window_ahead_of_the_stream_and_never_behind_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    ahead, chunk = migration._PREFAULT_AHEAD_PAGES, migration._PREFAULT_CHUNK_PAGES
    pages = 4 * ahead
    populated: list[tuple[int, int]] = []  # (first, end) pages, numbered across both regions
    grew = threading.Condition()

    def record(self: GuestRegionMmap, offset: int = 0, size: int | None = None) -> None:
        base = self.start_addr // PAGE_SIZE
        with grew:
            populated.append((base + offset // PAGE_SIZE, base + (offset + (size or 0)) // PAGE_SIZE))
            grew.notify_all()

    def wait_until_populated_to(end: int) -> None:
        with grew:
            assert grew.wait_for(lambda: bool(populated) and populated[-1][1] >= end, TIMEOUT)

    monkeypatch.setattr(GuestRegionMmap, "populate", record)
    regions = [GuestRegionMmap.anonymous(0, pages * PAGE_SIZE),
               GuestRegionMmap.anonymous(pages * PAGE_SIZE, pages * PAGE_SIZE)]
    try:
        helper = migration._Prefaulter(regions)
        try:
            wait_until_populated_to(ahead)
            helper.advance(0, 3 * ahead)  # the stream jumped (a long zero run)
            wait_until_populated_to(4 * ahead)
            helper.advance(1, ahead)  # the stream is a window into the second region
            wait_until_populated_to(pages + 2 * ahead)
        finally:
            assert helper.stop() is None
        assert _prefault_threads() == []
    finally:
        for r in regions:
            r.close()
    # A window ahead of the stream, in whole chunks, and never what the stream already wrote.
    expected = [*range(0, ahead, chunk), *range(3 * ahead, 4 * ahead, chunk),
                *range(pages + ahead, pages + 2 * ahead, chunk)]
    assert populated == [(first, first + chunk) for first in expected]


# ---- timeouts --------------------------------------------------------------------------------------


@pytest.mark.parametrize("when", ["the handshake", "pre-copy"])
def test_a_receiver_that_stops_answering_times_out_and_the_source_runs_on(
        source: Source, when: str) -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.settimeout(7.0)
        if when == "pre-copy":
            # Accepts, then never reads again: the source's sends fill the socket and wait.
            theirs.sendall(_frame(FrameType.ACCEPT, b'{"version": 1}'))
        pauses = source.vm.vcpu_run_state.pauses
        with pytest.raises(MigrationError, match=f"in {when}.*did not answer in time"):
            migrate(source.vm, ours, timeout=0.3)
        assert source.vm.vcpu_run_state.pauses == pauses
        assert_still_running(source)
        assert ours.gettimeout() == 7.0  # the owner's setting is back


def test_a_receiver_hearing_nothing_times_out(kvm: Kvm) -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        with pytest.raises(MigrationError, match="did not answer in time"):
            receive(kvm, theirs, EventExitHandler(), tape_bus(Tape()), timeout=0.3)
        assert theirs.gettimeout() is None  # blocking again, as it was


def test_the_channel_does_deferred_work_while_the_socket_would_block() -> None:
    payload = random.Random(9).randbytes(8 << 20)  # more than any socket buffer holds
    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.settimeout(5.0)
        peer_may_start = threading.Event()
        received = bytearray()
        calls: list[int] = []  # what the peer had received at each call

        def idle() -> bool:
            calls.append(len(received))
            if len(calls) < 3:
                return True  # did a piece of work: the channel tries the socket again
            peer_may_start.set()
            return False  # nothing left: the channel waits for the socket

        def peer() -> None:
            assert peer_may_start.wait(TIMEOUT)
            while len(received) < len(payload):
                received.extend(theirs.recv(1 << 20))
            theirs.sendall(b"ok")

        thread = threading.Thread(target=peer, daemon=True)
        thread.start()
        channel = migration._Channel(ours, TIMEOUT)
        channel.idle = idle
        channel.send([payload])
        assert calls[:3] == [0, 0, 0]  # the full socket first ran the deferred work
        answer = bytearray(2)
        channel.recv_exact(memoryview(answer))
        channel.restore()
        thread.join(TIMEOUT)
        assert received == payload and answer == b"ok"
        assert ours.gettimeout() == 5.0


@pytest.mark.parametrize("between", [0, 8])
@pytest.mark.parametrize("copies", ["torn, then intact", "intact, then corrupted",
                                    "intact, then intact and changed"])
def test_the_last_copy_of_a_page_decides_even_when_checks_are_deferred(
        kvm: Kvm, source: Source, copies: str, between: int) -> None:
    """A page sent twice in one stream, one copy failing its checksum: the receiver checks frames
    after receiving later ones (``between`` frames apart, the copies may both wait unchecked),
    but in stream order, so only a failing last copy is refused."""
    source.vm.pause()
    state = source.vm.save_state().to_bytes()
    ram = source.memory.read(GuestAddress(0), RAM_SIZE)
    page = NOISE // PAGE_SIZE
    hello = {"page_size": PAGE_SIZE, "num_vcpus": 1, "page_checksums": True,
             "regions": [{"start": 0, "size": RAM_SIZE, "log_dirty_pages": True,
                          "read_only": False}],
             "devices": [{"space": "pio", "base": 0x20, "kind": "Tape"}]}

    def pages(first: int, count: int, corrupt: bool = False, changed: bool = False) -> bytes:
        data = bytearray(ram[first * PAGE_SIZE:(first + count) * PAGE_SIZE])
        if changed:
            data[321] ^= 0xFF  # a later version of the page (the guest wrote it)
        table = migration._page_crcs(memoryview(data))
        if corrupt:
            data[123] ^= 0x01  # after its checksum was taken: as a tear or a bad link would
        return _frame(FrameType.PAGES, bytes(data) + table, first=first, count=count, crc_of=table)

    frames = [pages(f, min(64, RAM_SIZE // PAGE_SIZE - f))
              for f in range(0, RAM_SIZE // PAGE_SIZE, 64)]
    first_copy = pages(page, 1, corrupt=copies.startswith("torn"))
    last_copy = pages(page, 1, corrupt=copies.endswith("corrupted"),
                      changed=copies.endswith("changed"))
    if copies.endswith("changed"):
        # A stale check of the first copy after the second's would refuse this stream.
        source.memory.write(NOISE + 321, bytes([ram[NOISE + 321] ^ 0xFF]))
    stream = b"".join([*frames, first_copy, *frames[:between], last_copy,
                       _frame(FrameType.STATE, state),
                       _frame(FrameType.END, json.dumps({"frames": 2 + len(frames) + between,
                                                         "pages": 2 + RAM_SIZE // PAGE_SIZE
                                                         + between * 64}).encode())])
    ours, theirs = socket.socketpair()
    with ours, theirs:
        receiver = ReceiverThread(kvm, theirs)
        ours.sendall(_preamble() + _frame(FrameType.HELLO, json.dumps(hello).encode()))
        kind, _, _, _, size, _, _ = FRAME_HEADER.unpack(_recv_exact(ours, FRAME_HEADER.size))
        assert kind == FrameType.ACCEPT
        _recv_exact(ours, size)
        ours.sendall(stream)
        result = receiver.result()
    if not copies.endswith("corrupted"):
        assert isinstance(result, tuple), result
        assert receiver.digest == digest(source.memory)
    else:
        assert isinstance(result, MigrationError)
        assert f"1 page(s) of region 0 (the first is page {page:#x}) failed" in str(result)
