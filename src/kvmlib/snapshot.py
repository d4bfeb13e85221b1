"""Snapshot files: a paused VM's state and memory in a directory, and a VM rebuilt from one.

A snapshot is a directory holding three files, all readable by the owner only::

    manifest.json   what the snapshot is: format, version, id, base, file sizes and checksums
    state.json      the VmState (see kvmlib.state), JSON
    memory.img      a full snapshot: every region's bytes back to back, in region order; sparse:
                    64 KiB chunks that are all zero are holes
    memory.diff     a diff snapshot instead: only the pages dirtied since its base, back to back,
                    in the order the manifest's "pages" runs list them

The manifest (format ``kvmlib-snapshot``, version :data:`FORMAT_VERSION`) carries a SHA-256 of its
own canonical form, of ``state.json``, and of the memory: for ``memory.diff`` the file's bytes; for
``memory.img`` the concatenation, over every chunk that is not all zero, of the chunk's 8-byte
little-endian offset and its bytes (so checking it never reads a hole). A snapshot is written into a
temporary directory beside the target, each file fsynced, then renamed into place in one step: a
snapshot directory either is complete or does not exist. The saving process holds ``flock`` on its
temporary directory throughout, so the next save to the same target can tell the leftovers of a
killed save (unlocked: removed) from a save still running (locked: left alone, and this save
refused). Every file system failure, saving or loading, is a :class:`SnapshotError` naming the path
and the reason, with the :class:`OSError` chained.

Loading reads and checks every manifest, the state and the memory of a whole diff chain before the
caller gets anything, so a truncated, corrupted or foreign snapshot raises :class:`SnapshotError`
naming the file and the fault, and nothing is half applied. Memory is either read into anonymous
memory (``mode="read"``, only the file's data extents are read) or mapped copy-on-write from
``memory.img`` (``mode="mmap"``: pages are read when the guest first touches them, and the guest's
writes never reach the file).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import logging
import os
import secrets
import stat
import time
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import attrs

from kvmlib._platform import LOCK_EX, LOCK_NB, flock, libc
from kvmlib.bus import IoManager
from kvmlib.errors import GuestMemoryError, SnapshotError
from kvmlib.exit_handler import ExitHandler
from kvmlib.ioctl import Kvm
from kvmlib.memory import PAGE_SIZE, GuestMemoryMmap, GuestRegionMmap
from kvmlib.resources import Closeable
from kvmlib.state import VmState
from kvmlib.vm import KvmVm

#: The ``format`` a manifest must name.
FORMAT = "kvmlib-snapshot"
#: The snapshot directory format this library writes and reads.
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
STATE_FILE = "state.json"
MEMORY_FILE = "memory.img"
DIFF_FILE = "memory.diff"
#: Granularity of holes in ``memory.img`` and of its checksum.
CHUNK = 64 << 10
_FILE_CURSOR = "snapshot-file"
_IO_BLOCK = 8 << 20

MemoryMode = Literal["read", "mmap"]

log = logging.getLogger(__name__)
_libc = libc()
_memcmp = _libc.memcmp
_memcmp.restype = ctypes.c_int
_memcmp.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
_ZERO = ctypes.create_string_buffer(CHUNK)
_ZERO_ADDR = ctypes.addressof(_ZERO)



@attrs.define(frozen=True, slots=True)
class SnapshotInfo:
    """What a snapshot's manifest says.

    Attributes:
        path: the snapshot directory.
        id: a unique id (diff snapshots name their base by it).
        kind: ``"full"`` or ``"diff"``.
        base_id: for a diff, its base's id.
        base_path: for a diff, its base directory (as recorded, resolved against ``path``).
        memory: the guest memory layout, ``(start, size)`` per region.
        created: when it was written (seconds since the epoch).
    """

    path: Path
    id: str
    kind: Literal["full", "diff"]
    base_id: str | None
    base_path: Path | None
    memory: tuple[tuple[int, int], ...]
    created: float


@attrs.define(slots=True)
class LoadedSnapshot(Closeable):
    """A snapshot read back: the state, the guest memory it fills, and the chain it came from.

    The memory belongs to the caller; :meth:`close` (or ``with``) unmaps it.
    """

    state: VmState
    memory: GuestMemoryMmap
    chain: tuple[SnapshotInfo, ...]

    def close(self) -> None:
        """Unmap the guest memory."""
        self.memory.close()



# ---- writing --------------------------------------------------------------------------------------


def save_snapshot(vm: KvmVm, path: str | os.PathLike[str], *,
                  base: str | os.PathLike[str] | None = None) -> SnapshotInfo:
    """Write the paused VM ``vm`` to the new directory ``path``.

    The target is checked before anything is read from the VM or written: it must not exist in
    any form (a dangling symbolic link counts), and its parent must be an existing directory.
    Temporary directories left beside the target by saves that were killed are removed; a save to
    the same target still running in another process or thread is left alone and makes this one
    fail. Every failure of the file system is a :class:`SnapshotError` naming the path and the
    reason, with the :class:`OSError` as its ``__cause__``, and leaves nothing behind.

    Args:
        vm: a paused VM (or one not yet run).
        path: the snapshot directory to create; it must not exist.
        base: write a diff snapshot holding only the pages dirtied since ``base`` was saved
            from this same VM (``base`` must be the last snapshot saved from it). Regions not
            created with ``log_dirty_pages`` are written whole into a diff.

    Raises:
        VmError: the VM is running, stopped or closed.
        SnapshotError: ``path`` exists, its parent is not a directory, another save to ``path`` is
            in progress, ``base`` is not where this VM's dirty tracking starts, or the files could
            not be written.
    """
    target = Path(path)
    _check_target(target)
    state = vm.save_state()
    memory = vm.guest_memory
    snapshot_id = uuid.uuid4().hex
    manifest: dict[str, Any] = {
        "format": FORMAT, "version": FORMAT_VERSION, "id": snapshot_id,
        "created": time.time(), "base": None,
    }
    if base is not None:
        base_info = read_manifest(base)
        if vm.dirty_tracker.label(_FILE_CURSOR) != base_info.id:
            raise SnapshotError(f"{base} is not the last snapshot saved from this VM, so the pages "
                                "dirtied since it are not known; save a full snapshot instead")
        if base_info.memory != state.memory:
            raise SnapshotError(f"{base} has another memory layout than the VM")
        manifest["base"] = {"id": base_info.id,
                            "path": os.path.relpath(base_info.path.resolve(), target.resolve().parent)}
    tmp, tmp_fd = _claim_temp_dir(target)
    tracking_moved = False
    try:
        state_bytes = state.to_bytes()
        with _os_errors(f"cannot save {target}: writing {STATE_FILE}"):
            _write_file(tmp / STATE_FILE, [memoryview(state_bytes)])
        manifest["state"] = {"file": STATE_FILE, "size": len(state_bytes),
                             "sha256": hashlib.sha256(state_bytes).hexdigest()}
        # Dirty tracking restarts before memory is read, so no write can fall between the two.
        tracking_moved = True
        if base is None:
            vm.dirty_tracker.start(_FILE_CURSOR)
            with _os_errors(f"cannot save {target}: writing {MEMORY_FILE}"):
                manifest["memory"] = _write_full_memory(tmp / MEMORY_FILE, memory)
        else:
            dirty = {d.slot: d.runs() for d in vm.dirty_tracker.take(_FILE_CURSOR)}
            with _os_errors(f"cannot save {target}: writing {DIFF_FILE}"):
                manifest["memory"] = _write_diff_memory(tmp / DIFF_FILE, memory, dirty)
        manifest["memory"]["regions"] = [list(r) for r in state.memory]
        manifest["checksum"] = _manifest_checksum(manifest)
        with _os_errors(f"cannot save {target}: writing {MANIFEST}"):
            _write_file(tmp / MANIFEST, [memoryview(json.dumps(manifest, indent=1).encode())])
        with _os_errors(f"cannot save {target}: syncing {tmp}"):
            _fsync_dir(tmp)
        _rename_into_place(tmp, target)
    except BaseException:
        _remove_temp_dir(tmp, tmp_fd)
        if tracking_moved:
            # The file cursor no longer starts at the last snapshot saved: a diff on it would
            # miss the pages dirtied before this attempt.
            vm.dirty_tracker.set_label(_FILE_CURSOR, None)
        raise
    finally:
        os.close(tmp_fd)
    # The file cursor now runs from this snapshot: a diff on it holds exactly what changed since.
    vm.dirty_tracker.set_label(_FILE_CURSOR, snapshot_id)
    with _os_errors(f"{target} was written, but making its rename durable failed (it may not "
                    f"survive a crash): syncing {target.parent}"):
        _fsync_dir(target.parent)
    saved = read_manifest(target)
    log.info("%s snapshot saved to %s", saved.kind, target)
    return saved


@contextlib.contextmanager
def _os_errors(what: str) -> Iterator[None]:
    """Raise an :class:`OSError` from the block as ``SnapshotError("<what>: <reason>")``, chained."""
    try:
        yield
    except OSError as e:
        raise SnapshotError(f"{what}: {e.strerror or e}") from e


def _check_target(target: Path) -> None:
    """Refuse a target that exists in any form or whose parent is not a directory."""
    if os.path.lexists(target):
        dangling = " as a dangling symbolic link" if not target.exists() else ""
        raise SnapshotError(f"{target} already exists{dangling}; a snapshot is written to a new "
                            "directory")
    parent = target.parent
    try:
        mode = os.stat(parent).st_mode
    except FileNotFoundError as e:
        raise SnapshotError(f"cannot save {target}: the directory {parent} does not exist") from e
    except OSError as e:
        raise SnapshotError(f"cannot save {target}: {parent}: {e.strerror or e}") from e
    if not stat.S_ISDIR(mode):
        raise SnapshotError(f"cannot save {target}: {parent} is not a directory")


_TEMP_TAG = ".tmp-"
_TEMP_TOKEN_BYTES = 4


def _temp_name(target_name: str) -> str:
    return f".{target_name}{_TEMP_TAG}{secrets.token_hex(_TEMP_TOKEN_BYTES)}"


def _is_temp_name(name: str, target_name: str) -> bool:
    """Whether ``name`` is exactly what :func:`_temp_name` makes for ``target_name``.

    Matching the token exactly keeps ``.a.tmp-x.tmp-0123abcd`` (a save to ``a.tmp-x``) from
    passing for a save to ``a``.
    """
    prefix = f".{target_name}{_TEMP_TAG}"
    token = name[len(prefix):]
    return (name.startswith(prefix) and len(token) == 2 * _TEMP_TOKEN_BYTES
            and all(c in "0123456789abcdef" for c in token))


def _try_lock(fd: int, *, wait: bool = False) -> bool | None:
    """``flock(LOCK_EX)`` on ``fd``: whether it was taken.

    False if another holds it, None if the file system cannot lock it (NFS cannot lock a directory).
    """
    try:
        flock(fd, LOCK_EX | (0 if wait else LOCK_NB))
    except BlockingIOError:
        return False
    except OSError:
        return None
    return True


def _open_dir(name: str | Path, dir_fd: int | None = None, *, follow: bool = True) -> int:
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    return os.open(name, flags, dir_fd=dir_fd)


def _claim_temp_dir(target: Path) -> tuple[Path, int]:
    """Create this save's temporary directory beside ``target``, locked; clear stale ones.

    A save holds ``flock(LOCK_EX)`` on its temporary directory from creating it until it is renamed
    into place or removed; the kernel drops the lock when the process dies, however it dies, so a
    temporary directory whose lock can be taken belongs to a save that is over. Returns the
    directory and the descriptor holding its lock (the caller closes it when done).

    Raises:
        SnapshotError: another save to ``target`` is in progress, ``target`` appeared meanwhile, or
            the directory cannot be created.
    """
    parent = target.parent
    stale: list[tuple[str, int]] = []
    # Read access is needed anyway, to fsync the directory after the rename.
    with _os_errors(f"cannot save {target}: {parent}"):
        parent_fd = _open_dir(parent)
    try:
        # Creating a temporary directory and locking it happen under the parent's lock, and so
        # does looking for stale ones: a new directory is never seen before it is locked.
        if _try_lock(parent_fd, wait=True):
            with _os_errors(f"cannot save {target}: listing {parent}"):
                siblings = os.listdir(parent_fd)
            for name in siblings:
                if not _is_temp_name(name, target.name):
                    continue
                try:
                    # Not following a link: its files are removed, and they must be this save's.
                    fd = _open_dir(name, parent_fd, follow=False)
                except OSError:
                    continue  # gone already, or not a directory kvmlib made
                locked = _try_lock(fd)
                if locked:
                    stale.append((name, fd))
                    continue
                os.close(fd)
                if locked is False:
                    raise SnapshotError(f"cannot save {target}: another save to it is in progress "
                                        f"(writing {parent / name})")
        if os.path.lexists(target):
            raise SnapshotError(f"{target} already exists; a snapshot is written to a new directory")
        with _os_errors(f"cannot save {target}: creating a temporary directory in {parent}"):
            while True:
                tmp = parent / _temp_name(target.name)
                try:
                    os.mkdir(tmp, 0o700)
                    break
                except FileExistsError:
                    continue
            try:
                tmp_fd = _open_dir(tmp, follow=False)
            except BaseException:
                os.rmdir(tmp)
                raise
        # If this cannot be locked, neither could the parent (one file system): no save will ever
        # look for stale directories beside it, so running unlocked is safe.
        _try_lock(tmp_fd)
    except BaseException:
        for _, fd in stale:
            os.close(fd)
        raise
    finally:
        os.close(parent_fd)
    for name, fd in stale:
        _remove_temp_dir(parent / name, fd)
        os.close(fd)
    return tmp, tmp_fd


def _remove_temp_dir(path: Path, fd: int) -> None:
    """Remove a temporary directory's files, through ``fd``, then the directory; best effort.

    Nothing here may hide the error that made a save give up, nor fail a save because of another's
    leftovers; what cannot be removed now is stale and removed by the next save.
    """
    try:
        names = os.listdir(fd)
    except OSError:
        return
    for name in names:
        try:
            os.unlink(name, dir_fd=fd)
        except OSError:
            pass
    try:
        os.rmdir(path)
    except OSError:
        pass


_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_renameat2 = getattr(_libc, "renameat2", None)
if _renameat2 is not None:
    _renameat2.restype = ctypes.c_int
    _renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]


def _rename_into_place(tmp: Path, target: Path) -> None:
    """Rename ``tmp`` to ``target``, never replacing what appeared there since it was checked.

    A plain rename(2) silently replaces an empty directory; ``RENAME_NOREPLACE`` refuses any.
    """
    exists = f"{target} already exists; a snapshot is written to a new directory"
    if _renameat2 is not None:
        if _renameat2(_AT_FDCWD, os.fsencode(tmp), _AT_FDCWD, os.fsencode(target),
                      _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            raise SnapshotError(exists) from FileExistsError(err, os.strerror(err), str(target))
        if err not in (errno.ENOSYS, errno.EINVAL):
            e = OSError(err, os.strerror(err), str(tmp), None, str(target))
            raise SnapshotError(f"cannot save {target}: renaming {tmp} to it: {e.strerror}") from e
    # No renameat2 (an old libc or kernel, or a file system without RENAME_NOREPLACE): check, then
    # rename, which leaves a short window.
    if os.path.lexists(target):
        raise SnapshotError(exists)
    with _os_errors(f"cannot save {target}: renaming {tmp} to it"):
        os.rename(tmp, target)


def _write_file(path: Path, pieces: Sequence[memoryview]) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        for piece in pieces:
            _write_all(fd, piece)
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: memoryview, offset: int | None = None) -> None:
    done = 0
    while done < len(data):
        chunk = data[done:done + _IO_BLOCK]
        n = os.write(fd, chunk) if offset is None else os.pwrite(fd, chunk, offset + done)
        done += n


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _nonzero_chunks(region: GuestRegionMmap, lo: int = 0, hi: int | None = None) -> Iterator[int]:
    """Offsets (within ``region``) of the CHUNK-sized chunks in ``[lo, hi)`` that are not all zero."""
    end = region.size if hi is None else hi
    base = region.host_address
    for off in range(lo - lo % CHUNK, end, CHUNK):
        n = min(CHUNK, region.size - off)
        if _memcmp(base + off, _ZERO_ADDR, n):
            yield off


def _write_full_memory(path: Path, memory: GuestMemoryMmap) -> dict[str, Any]:
    digest = hashlib.sha256()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    # Each run is checksummed in a second thread while this one writes it: hashlib and pwrite
    # both release the GIL, so the two overlap; runs are still hashed in order.
    pool = ThreadPoolExecutor(1, thread_name_prefix="kvmlib-snapshot-hash")
    try:
        file_off = 0
        for region in memory.regions:
            view = region.as_memoryview()
            for off, length in _coalesce(_nonzero_chunks(region), region.size):
                data = view[off:off + length]
                hashed = pool.submit(_hash_chunks, digest, file_off + off, data)
                _write_all(fd, data, file_off + off)
                hashed.result()
            file_off += region.size
        os.ftruncate(fd, file_off)  # the zero tail becomes a hole too
        os.fsync(fd)
    finally:
        pool.shutdown()
        os.close(fd)
    return {"file": MEMORY_FILE, "size": file_off, "sha256": digest.hexdigest()}


def _coalesce(chunks: Iterator[int], limit: int) -> Iterator[tuple[int, int]]:
    """Runs ``(offset, length)`` of consecutive chunk offsets, clipped to ``limit``."""
    start = prev = -1
    for off in chunks:
        if start >= 0 and off == prev + CHUNK:
            prev = off
            continue
        if start >= 0:
            yield start, min(prev + CHUNK, limit) - start
        start = prev = off
    if start >= 0:
        yield start, min(prev + CHUNK, limit) - start


def _hash_chunks(digest: Any, file_off: int, data: memoryview) -> None:
    """Add a run of non-zero chunks starting at ``file_off`` to the memory.img checksum."""
    for pos in range(0, len(data), CHUNK):
        digest.update((file_off + pos).to_bytes(8, "little"))
        digest.update(data[pos:pos + CHUNK])


def _write_diff_memory(path: Path, memory: GuestMemoryMmap,
                       dirty: dict[int, list[tuple[int, int]]]) -> dict[str, Any]:
    digest = hashlib.sha256()
    pages: list[list[int]] = []
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        size = 0
        for slot, region in enumerate(memory.regions):
            runs = dirty.get(slot, [(0, region.num_pages)])
            view = region.as_memoryview()
            for first, count in runs:
                data = view[first * PAGE_SIZE:(first + count) * PAGE_SIZE]
                digest.update(data)
                _write_all(fd, data)
                pages.append([slot, first, count])
                size += len(data)
        os.fsync(fd)
    finally:
        os.close(fd)
    return {"file": DIFF_FILE, "size": size, "sha256": digest.hexdigest(), "pages": pages}


def _manifest_checksum(manifest: dict[str, Any]) -> str:
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# ---- reading --------------------------------------------------------------------------------------


def read_manifest(path: str | os.PathLike[str]) -> SnapshotInfo:
    """Read and check a snapshot's manifest (not its other files).

    Raises:
        SnapshotError: no manifest, not a kvmlib snapshot, another version, or it was altered.
    """
    return _read_manifest(Path(path))[0]


def _read_manifest(path: Path) -> tuple[SnapshotInfo, dict[str, Any]]:
    file = path / MANIFEST
    try:
        raw = file.read_bytes()
    except FileNotFoundError as e:
        raise SnapshotError(f"{path} is not a snapshot: it has no {MANIFEST}") from e
    except OSError as e:
        raise SnapshotError(f"cannot read {file}: {e.strerror or e}") from e
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise SnapshotError(f"{file} is not JSON: the file is corrupted or not a snapshot") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise SnapshotError(f"{file} is not a kvmlib snapshot manifest")
    if doc.get("version") != FORMAT_VERSION:
        raise SnapshotError(f"{file} has format version {doc.get('version')!r}; this kvmlib reads "
                            f"version {FORMAT_VERSION}")
    if doc.get("checksum") != _manifest_checksum(doc):
        raise SnapshotError(f"{file} fails its checksum: it was altered or corrupted")
    try:
        base = doc["base"]
        info = SnapshotInfo(
            path=path, id=str(doc["id"]), kind="diff" if base else "full",
            base_id=str(base["id"]) if base else None,
            base_path=(path.parent / base["path"]).resolve() if base else None,
            memory=tuple((int(a), int(b)) for a, b in doc["memory"]["regions"]),
            created=float(doc["created"]))
        for key in ("file", "size", "sha256"):
            doc["state"][key], doc["memory"][key]
    except (KeyError, TypeError, ValueError) as e:
        raise SnapshotError(f"{file} is malformed: {type(e).__name__}: {e}") from None
    return info, doc


def _chain(path: Path) -> list[tuple[SnapshotInfo, dict[str, Any]]]:
    """The snapshot at ``path`` and its bases, oldest (the full one) first."""
    chain = [_read_manifest(path)]
    while chain[-1][0].kind == "diff":
        info = chain[-1][0]
        assert info.base_path is not None
        if len(chain) > 1000 or any(c[0].path.resolve() == info.base_path for c in chain):
            raise SnapshotError(f"{info.path}: its chain of bases loops")
        base, doc = _read_manifest(info.base_path)
        if base.id != info.base_id:
            raise SnapshotError(f"{info.path} was taken on base {info.base_id}, but {base.path} is "
                                f"snapshot {base.id}")
        if base.memory != info.memory:
            raise SnapshotError(f"{info.path} and its base {base.path} have different memory layouts")
        chain.append((base, doc))
    chain.reverse()
    return chain


def _checked_file(info: SnapshotInfo, entry: dict[str, Any]) -> tuple[Path, int]:
    name = entry["file"]
    if name not in (STATE_FILE, MEMORY_FILE, DIFF_FILE):
        raise SnapshotError(f"{info.path / MANIFEST} names an unexpected file {name!r}")
    file = info.path / name
    try:
        st = file.stat()
    except FileNotFoundError as e:
        raise SnapshotError(f"{file} is missing") from e
    except OSError as e:
        raise SnapshotError(f"cannot read {file}: {e.strerror or e}") from e
    if not stat.S_ISREG(st.st_mode):
        raise SnapshotError(f"{file} is not a regular file")
    actual = st.st_size
    if actual != entry["size"]:
        raise SnapshotError(f"{file} is {actual} bytes but the manifest says {entry['size']} "
                            f"({'truncated' if actual < entry['size'] else 'has extra bytes'})")
    return file, actual


def load_state(path: str | os.PathLike[str]) -> VmState:
    """The checked VM state of the snapshot at ``path`` (memory is not read)."""
    info, doc = _read_manifest(Path(path))
    return _load_state(info, doc)


def _load_state(info: SnapshotInfo, doc: dict[str, Any]) -> VmState:
    file, _ = _checked_file(info, doc["state"])
    with _os_errors(f"cannot read {file}"):
        data = file.read_bytes()
    if hashlib.sha256(data).hexdigest() != doc["state"]["sha256"]:
        raise SnapshotError(f"{file} fails its checksum: it is corrupted")
    state = VmState.from_bytes(data)
    if state.memory != info.memory:
        raise SnapshotError(f"{file} and {info.path / MANIFEST} disagree on the memory layout")
    return state


def load_snapshot(path: str | os.PathLike[str], *, mode: MemoryMode = "read",
                  log_dirty_pages: bool = False, verify: bool = True) -> LoadedSnapshot:
    """Read a snapshot (and, for a diff, its chain of bases) into new guest memory.

    Args:
        path: the snapshot directory.
        mode: ``"read"`` copies memory into anonymous memory; ``"mmap"`` maps ``memory.img``
            copy-on-write, so loading costs nothing up front and pages are read on first touch.
        log_dirty_pages: create the regions with dirty-page logging (for diffs and fast reset).
        verify: check the memory checksums (reads every data extent once). The manifest, state
            and sizes are always checked.

    Raises:
        SnapshotError: a file is missing, truncated, corrupted or foreign, or the chain is broken.
    """
    if mode not in ("read", "mmap"):
        raise SnapshotError(f"mode must be 'read' or 'mmap', not {mode!r}")
    chain = _chain(Path(path))
    state = _load_state(*chain[-1])
    files = [_checked_file(info, doc["memory"]) for info, doc in chain]
    full_info, full_doc = chain[0]
    if full_doc["memory"]["size"] != sum(size for _, size in full_info.memory):
        raise SnapshotError(f"{full_info.path / MANIFEST}: memory size does not match its regions")
    diffs = []
    for (info, doc), (file, _) in zip(chain[1:], files[1:], strict=True):
        diffs.append((file, _diff_runs(info, doc)))
        if verify:
            with _os_errors(f"cannot read {file}"):
                _verify_whole_file(file, doc["memory"]["sha256"])
    image = files[0][0]
    with _os_errors(f"cannot read {image}"):
        memory = _map_full(image, full_info.memory, mode, log_dirty_pages)
    try:
        if verify:
            with _os_errors(f"cannot read {image}"):
                digest = _full_digest(image, memory)
            if digest != full_doc["memory"]["sha256"]:
                raise SnapshotError(f"{image} fails its checksum: it is corrupted")
        for file, runs in diffs:
            with _os_errors(f"cannot read {file}"):
                _apply_diff(file, runs, memory)
    except BaseException:
        memory.close()
        raise
    return LoadedSnapshot(state, memory, tuple(info for info, _ in chain))


def _diff_runs(info: SnapshotInfo, doc: dict[str, Any]) -> list[tuple[int, int, int]]:
    runs: list[tuple[int, int, int]] = []
    total = 0
    try:
        for slot, first, count in doc["memory"]["pages"]:
            if not all(isinstance(v, int) for v in (slot, first, count)) \
                    or not 0 <= slot < len(info.memory):
                raise ValueError(f"page run {slot}:{first}+{count} names no region")
            pages = info.memory[slot][1] // PAGE_SIZE
            if first < 0 or not 0 < count <= pages - first:
                raise ValueError(f"page run {slot}:{first}+{count} is outside the region")
            runs.append((slot, first, count))
            total += count * PAGE_SIZE
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise SnapshotError(f"{info.path / MANIFEST} has a malformed page list: {e}") from None
    if total != doc["memory"]["size"]:
        raise SnapshotError(f"{info.path / MANIFEST}: its page runs do not add up to the diff's size")
    return runs


def _verify_whole_file(file: Path, expected: str) -> None:
    digest = hashlib.sha256()
    with open(file, "rb", buffering=0) as f:
        buf = bytearray(_IO_BLOCK)
        view = memoryview(buf)
        while n := f.readinto(buf):
            digest.update(view[:n])
    if digest.hexdigest() != expected:
        raise SnapshotError(f"{file} fails its checksum: it is corrupted")


def _data_extents(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """The ``(offset, length)`` extents of ``fd`` that hold data (holes are all zero)."""
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:
                return  # only a hole is left
            raise
        end = os.lseek(fd, start, os.SEEK_HOLE)
        yield start, min(end, size) - start
        pos = end


def _map_full(file: Path, layout: tuple[tuple[int, int], ...], mode: MemoryMode,
              log_dirty_pages: bool) -> GuestMemoryMmap:
    regions: list[GuestRegionMmap] = []
    fd = os.open(file, os.O_RDONLY | os.O_CLOEXEC)
    try:
        file_off = 0
        for start, size in layout:
            if mode == "mmap":
                regions.append(GuestRegionMmap.from_file(start, size, fd, file_off, private=True,
                                                         log_dirty_pages=log_dirty_pages))
            else:
                region = GuestRegionMmap.anonymous(start, size, log_dirty_pages=log_dirty_pages)
                regions.append(region)
                view = region.as_memoryview()
                for off, length in _data_extents(fd, file_off + size):
                    lo, hi = max(off, file_off), min(off + length, file_off + size)
                    if lo < hi:
                        _read_exact(fd, view[lo - file_off:hi - file_off], lo, file)
            file_off += size
        return GuestMemoryMmap.from_regions(regions)
    except GuestMemoryError as e:
        for r in regions:
            r.close()
        raise SnapshotError(f"cannot load {file}: {e}") from None
    except BaseException:
        for r in regions:
            r.close()
        raise
    finally:
        os.close(fd)


def _read_exact(fd: int, into: memoryview, offset: int, file: Path) -> None:
    done = 0
    while done < len(into):
        n = os.preadv(fd, [into[done:done + _IO_BLOCK]], offset + done)
        if n == 0:
            raise SnapshotError(f"{file} ended early at {offset + done:#x}: it is truncated")
        done += n


def _full_digest(file: Path, memory: GuestMemoryMmap) -> str:
    """The memory.img checksum, computed from the loaded memory over the file's data extents."""
    digest = hashlib.sha256()
    fd = os.open(file, os.O_RDONLY | os.O_CLOEXEC)
    try:
        total = sum(r.size for r in memory.regions)
        extents = list(_data_extents(fd, total))
    finally:
        os.close(fd)
    file_off = 0
    for region in memory.regions:
        view = region.as_memoryview()
        seen = -1
        for off, length in extents:
            lo, hi = max(off, file_off), min(off + length, file_off + region.size)
            if lo >= hi:
                continue
            # Hash whole chunks, once each, in ascending order, as the writer did.
            for chunk in _nonzero_chunks(region, lo - file_off, hi - file_off):
                if chunk <= seen:
                    continue
                seen = chunk
                piece = view[chunk:chunk + CHUNK]
                digest.update((file_off + chunk).to_bytes(8, "little"))
                digest.update(piece)
        file_off += region.size
    return digest.hexdigest()


def _apply_diff(file: Path, runs: list[tuple[int, int, int]], memory: GuestMemoryMmap) -> None:
    fd = os.open(file, os.O_RDONLY | os.O_CLOEXEC)
    try:
        pos = 0
        for slot, first, count in runs:
            view = memory.regions[slot].as_memoryview()
            _read_exact(fd, view[first * PAGE_SIZE:(first + count) * PAGE_SIZE], pos, file)
            pos += count * PAGE_SIZE
    finally:
        os.close(fd)


def restore_snapshot(kvm: Kvm, path: str | os.PathLike[str], exit_handler: ExitHandler,
                     bus: IoManager, *, mode: MemoryMode = "read", log_dirty_pages: bool = False,
                     verify: bool = True) -> tuple[KvmVm, GuestMemoryMmap]:
    """Load a snapshot and build the VM: call ``run()`` on it to continue where it was saved.

    The caller owns both results: close the VM, then the memory.
    """
    loaded = load_snapshot(path, mode=mode, log_dirty_pages=log_dirty_pages, verify=verify)
    try:
        vm = KvmVm.from_state(kvm, loaded.state, loaded.memory, exit_handler, bus)
    except BaseException:
        loaded.close()
        raise
    log.info("VM restored from the snapshot %s (memory by %s%s)", path, mode,
             ", verified" if verify else "")
    return vm, loaded.memory


__all__ = [
    "CHUNK", "DIFF_FILE", "FORMAT", "FORMAT_VERSION", "MANIFEST", "MEMORY_FILE", "STATE_FILE",
    "LoadedSnapshot", "MemoryMode", "SnapshotInfo", "load_snapshot", "load_state", "read_manifest",
    "restore_snapshot", "save_snapshot",
]
