"""Snapshot files on a file system that fails: refused targets, I/O errors, killed and concurrent saves.

The killed and concurrent saves run in a child process: ``python -m tests.test_snapshot_files TARGET
CONTROL_DIR`` saves a fresh VM to TARGET and, in its first write of memory, creates
``CONTROL_DIR/ready`` and then waits while ``CONTROL_DIR/hold`` exists.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kvmlib import Kvm, SnapshotError
from kvmlib.exit_handler import EventExitHandler
from kvmlib.snapshot import (
    DIFF_FILE,
    MANIFEST,
    MEMORY_FILE,
    STATE_FILE,
    load_snapshot,
    load_state,
    read_manifest,
    restore_snapshot,
    save_snapshot,
)
from kvmlib.vm import KvmVm, VmConfig

from .snapshot_guests import Counter, count_to, counting_bus, memory_with

ROOT = Path(__file__).resolve().parent.parent
#: The longest any test waits for another process or thread; only reached when something hangs.
WAIT = 60.0


def new_vm(kvm: Kvm) -> KvmVm:
    """A VM that has not run (which save_snapshot accepts) over fresh dirty-logging memory."""
    memory = memory_with(count_to(10), log_dirty_pages=True)
    try:
        return KvmVm.new(kvm, VmConfig.from_kvm(kvm, 1), memory, EventExitHandler(),
                         counting_bus(Counter()))
    except BaseException:
        memory.close()
        raise


@pytest.fixture
def vm(kvm: Kvm) -> Iterator[KvmVm]:
    v = new_vm(kvm)
    yield v
    v.close()
    v.guest_memory.close()


@pytest.fixture
def snaps(tmp_path: Path) -> Path:
    """The directory the snapshots of a test go into: nothing else is put there."""
    d = tmp_path / "snaps"
    d.mkdir()
    return d


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def temp_dirs(directory: Path, target: str = "snap") -> list[Path]:
    return sorted(directory.glob(f".{target}.tmp-*"))


def forbid_save_state(monkeypatch: pytest.MonkeyPatch, vm: KvmVm) -> None:
    def save_state() -> None:
        pytest.fail("save_state was called for a target that should have been refused first")
    monkeypatch.setattr(vm, "save_state", save_state)


def wait_until(ready: Callable[[], bool], what: str,
               child: subprocess.Popen[str] | None = None) -> None:
    deadline = time.monotonic() + WAIT
    while not ready():
        if child is not None and child.poll() is not None:
            _, err = child.communicate()
            pytest.fail(f"the child exited with {child.returncode} before {what}:\n{err}")
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what}")
        time.sleep(0.01)


# ---- the target is checked before anything else ------------------------------------------------


def test_a_dangling_symlink_is_refused_before_the_vm_is_read(
        vm: KvmVm, snaps: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = snaps / "snap"
    target.symlink_to(snaps / "nowhere")
    forbid_save_state(monkeypatch, vm)
    with pytest.raises(SnapshotError, match="already exists as a dangling symbolic link") as e:
        save_snapshot(vm, target)
    assert str(target) in str(e.value)
    assert names(snaps) == ["snap"]
    assert target.is_symlink() and not target.exists()


def test_a_missing_parent_directory_is_refused_before_the_vm_is_read(
        vm: KvmVm, snaps: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    forbid_save_state(monkeypatch, vm)
    with pytest.raises(SnapshotError, match=f"{snaps / 'missing'} does not exist"):
        save_snapshot(vm, snaps / "missing" / "snap")
    assert names(snaps) == []


def test_a_parent_that_is_a_regular_file_is_refused_before_the_vm_is_read(
        vm: KvmVm, snaps: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (snaps / "file").write_text("not a directory")
    forbid_save_state(monkeypatch, vm)
    with pytest.raises(SnapshotError, match=f"{snaps / 'file'} is not a directory"):
        save_snapshot(vm, snaps / "file" / "snap")
    with pytest.raises(SnapshotError, match="Not a directory"):
        save_snapshot(vm, snaps / "file" / "sub" / "snap")
    assert names(snaps) == ["file"]


def test_a_temporary_directory_that_cannot_be_created_is_a_snapshot_error(
        vm: KvmVm, snaps: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def mkdir(*args: Any, **kwargs: Any) -> None:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
    monkeypatch.setattr(os, "mkdir", mkdir)  # as root the real permission check never refuses
    with pytest.raises(SnapshotError, match="Permission denied") as e:
        save_snapshot(vm, snaps / "snap")
    assert str(snaps) in str(e.value)
    assert isinstance(e.value.__cause__, PermissionError)
    monkeypatch.undo()
    assert names(snaps) == []


def test_a_directory_made_at_the_target_during_the_save_is_not_replaced(
        vm: KvmVm, snaps: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = snaps / "snap"
    real_pwrite = os.pwrite

    def pwrite(fd: int, data: Any, offset: int) -> int:
        if not target.exists():
            target.mkdir()  # someone else's (empty) directory: a plain rename would replace it
        return real_pwrite(fd, data, offset)
    monkeypatch.setattr(os, "pwrite", pwrite)
    with pytest.raises(SnapshotError, match="already exists"):
        save_snapshot(vm, target)
    assert names(snaps) == ["snap"]
    assert names(target) == []


# ---- I/O errors while writing --------------------------------------------------------------------


def failing_after_some_bytes(real: Callable[..., int], err: int) -> Callable[..., int]:
    """``real`` (os.write or os.pwrite) that writes half of its first buffer, then fails with ``err``."""
    calls = 0

    def call(fd: int, data: Any, *offset: int) -> int:
        nonlocal calls
        calls += 1
        if calls == 1 and len(data) > 1:
            return real(fd, memoryview(data)[:len(data) // 2], *offset)
        raise OSError(err, os.strerror(err))
    return call


@pytest.mark.parametrize(("call", "err", "file"), [
    ("write", errno.ENOSPC, STATE_FILE),
    ("pwrite", errno.ENOSPC, MEMORY_FILE),
    ("pwrite", errno.EIO, MEMORY_FILE),
])
def test_a_write_error_is_a_snapshot_error_and_leaves_nothing(
        vm: KvmVm, snaps: Path, monkeypatch: pytest.MonkeyPatch, call: str, err: int,
        file: str) -> None:
    monkeypatch.setattr(os, call, failing_after_some_bytes(getattr(os, call), err))
    target = snaps / "snap"
    with pytest.raises(SnapshotError) as e:
        save_snapshot(vm, target)
    monkeypatch.undo()
    assert str(target) in str(e.value)
    assert file in str(e.value)
    assert os.strerror(err) in str(e.value)
    assert isinstance(e.value.__cause__, OSError) and e.value.__cause__.errno == err
    assert names(snaps) == []


def test_an_fsync_error_is_a_snapshot_error_and_leaves_nothing(
        vm: KvmVm, snaps: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fsync(fd: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))
    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(SnapshotError, match="Input/output error") as e:
        save_snapshot(vm, snaps / "snap")
    monkeypatch.undo()
    assert isinstance(e.value.__cause__, OSError)
    assert names(snaps) == []


def test_after_a_failed_diff_save_its_base_can_no_longer_be_used(
        vm: KvmVm, snaps: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    save_snapshot(vm, snaps / "base")
    vm.guest_memory.write_u64(0x200000, 0x1234)
    real_write, failing = os.write, failing_after_some_bytes(os.write, errno.ENOSPC)

    def write(fd: int, data: Any) -> int:
        is_diff = os.readlink(f"/proc/self/fd/{fd}").endswith(DIFF_FILE)
        return (failing if is_diff else real_write)(fd, data)
    monkeypatch.setattr(os, "write", write)
    with pytest.raises(SnapshotError, match=f"{DIFF_FILE}: No space left on device"):
        save_snapshot(vm, snaps / "diff", base=snaps / "base")
    monkeypatch.undo()
    # The failed save consumed the pages dirtied since the base: a diff now would lose the write.
    with pytest.raises(SnapshotError, match="not the last snapshot"):
        save_snapshot(vm, snaps / "diff", base=snaps / "base")
    save_snapshot(vm, snaps / "full")
    with load_snapshot(snaps / "full") as loaded:
        assert loaded.memory.read_u64(0x200000) == 0x1234
    assert names(snaps) == ["base", "full"]


# ---- killed and concurrent saves ----------------------------------------------------------------


class HeldSave:
    """A child process saving a fresh VM to ``target``, held in its first write of memory."""

    def __init__(self, target: Path, control: Path) -> None:
        self.target, self.control = target, control
        control.mkdir()
        (control / "hold").touch()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.test_snapshot_files", str(target), str(control)],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_until((control / "ready").exists, "the child's save started writing memory", self.proc)

    def release(self) -> None:
        (self.control / "hold").unlink()
        _, err = self.proc.communicate(timeout=WAIT)
        assert self.proc.returncode == 0, err

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.communicate(timeout=WAIT)
        assert self.proc.returncode == -signal.SIGKILL

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate(timeout=WAIT)


@pytest.fixture
def held(snaps: Path, tmp_path: Path) -> Iterator[HeldSave]:
    h = HeldSave(snaps / "snap", tmp_path / "control")
    yield h
    h.close()


def test_the_leftovers_of_a_killed_save_are_removed_by_the_next_save(
        vm: KvmVm, snaps: Path, held: HeldSave) -> None:
    held.kill()
    [stale] = temp_dirs(snaps)
    assert STATE_FILE in names(stale)  # it had got as far as the memory
    info = save_snapshot(vm, snaps / "snap")
    assert names(snaps) == ["snap"]
    assert read_manifest(snaps / "snap").id == info.id


def test_a_save_in_progress_in_another_process_is_left_alone(
        vm: KvmVm, snaps: Path, held: HeldSave) -> None:
    [running] = temp_dirs(snaps)
    before = names(running)
    with pytest.raises(SnapshotError, match="another save to it is in progress") as e:
        save_snapshot(vm, snaps / "snap")
    assert str(running) in str(e.value)
    assert temp_dirs(snaps) == [running] and names(running) == before
    held.release()
    assert names(snaps) == ["snap"]
    read_manifest(snaps / "snap")


def test_a_save_in_progress_in_another_thread_is_left_alone(
        kvm: Kvm, vm: KvmVm, snaps: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = snaps / "snap"
    writing, go = threading.Event(), threading.Event()
    real_pwrite = os.pwrite

    def pwrite(fd: int, data: Any, offset: int) -> int:
        if threading.current_thread() is worker:
            writing.set()
            go.wait(WAIT)
        return real_pwrite(fd, data, offset)
    monkeypatch.setattr(os, "pwrite", pwrite)
    other = new_vm(kvm)
    errors: list[BaseException] = []

    def save() -> None:
        try:
            save_snapshot(other, target)
        except BaseException as e:
            errors.append(e)
    worker = threading.Thread(target=save)
    worker.start()
    try:
        assert writing.wait(WAIT), "the other thread's save never started writing memory"
        [running] = temp_dirs(snaps)
        with pytest.raises(SnapshotError, match="in progress"):
            save_snapshot(vm, target)
        assert temp_dirs(snaps) == [running]
    finally:
        go.set()
        worker.join(WAIT)
        other.close()
        other.guest_memory.close()
    assert not worker.is_alive() and errors == []
    assert names(snaps) == ["snap"]


def test_a_leftover_of_another_target_is_not_taken_for_one_of_this_target(
        vm: KvmVm, snaps: Path) -> None:
    other = snaps / ".snap.tmp-x.tmp-0123abcd"  # what a save to "snap.tmp-x" would make
    other.mkdir()
    save_snapshot(vm, snaps / "snap")
    assert names(snaps) == [other.name, "snap"]


# ---- I/O errors while reading --------------------------------------------------------------------


@pytest.fixture
def saved(vm: KvmVm, snaps: Path) -> Path:
    save_snapshot(vm, snaps / "snap")
    return snaps / "snap"


def eio(*args: Any, **kwargs: Any) -> Any:
    raise OSError(errno.EIO, os.strerror(errno.EIO))


def test_an_io_error_reading_memory_is_a_snapshot_error(
        saved: Path, kvm: Kvm, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "preadv", eio)
    with pytest.raises(SnapshotError, match="Input/output error") as e:
        load_snapshot(saved)
    assert str(saved / MEMORY_FILE) in str(e.value)
    assert isinstance(e.value.__cause__, OSError) and e.value.__cause__.errno == errno.EIO
    with pytest.raises(SnapshotError, match="Input/output error"):
        restore_snapshot(kvm, saved, EventExitHandler(), counting_bus(Counter()))


def test_an_io_error_finding_the_data_is_not_taken_for_a_hole(
        saved: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "lseek", eio)
    with pytest.raises(SnapshotError, match=f"{MEMORY_FILE}: Input/output error"):
        load_snapshot(saved, verify=False)  # once, this loaded all-zero memory


def test_a_memory_file_that_cannot_be_opened_is_a_snapshot_error(
        saved: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_open = os.open

    def denying_open(path: Any, *args: Any, **kwargs: Any) -> int:
        if Path(path).name == MEMORY_FILE:  # as root, chmod cannot make a file unreadable
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, *args, **kwargs)
    monkeypatch.setattr(os, "open", denying_open)
    with pytest.raises(SnapshotError, match=f"{MEMORY_FILE}: Permission denied"):
        load_snapshot(saved)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_an_unreadable_memory_file_is_a_snapshot_error(saved: Path) -> None:
    (saved / MEMORY_FILE).chmod(0)
    with pytest.raises(SnapshotError, match="Permission denied"):
        load_snapshot(saved)


def test_a_memory_file_replaced_by_a_symlink_loop_is_a_snapshot_error(saved: Path) -> None:
    (saved / MEMORY_FILE).unlink()
    (saved / MEMORY_FILE).symlink_to(MEMORY_FILE)
    with pytest.raises(SnapshotError, match="Too many levels of symbolic links") as e:
        load_snapshot(saved)
    assert str(saved / MEMORY_FILE) in str(e.value)


def test_a_state_file_replaced_by_a_directory_is_a_snapshot_error(saved: Path) -> None:
    (saved / STATE_FILE).unlink()
    (saved / STATE_FILE).mkdir()
    with pytest.raises(SnapshotError, match=f"{STATE_FILE} is not a regular file"):
        load_state(saved)


def test_a_manifest_that_cannot_be_read_keeps_its_cause(saved: Path) -> None:
    (saved / MANIFEST).unlink()
    (saved / MANIFEST).mkdir()
    with pytest.raises(SnapshotError, match="Is a directory") as e:
        read_manifest(saved)
    assert isinstance(e.value.__cause__, IsADirectoryError)


# ---- the child process of HeldSave ------------------------------------------------------------


def _save_held(target: str, control: str) -> None:
    ready, hold = Path(control) / "ready", Path(control) / "hold"
    real_pwrite = os.pwrite

    def pwrite(fd: int, data: Any, offset: int) -> int:
        ready.touch()
        deadline = time.monotonic() + WAIT  # never outlive a test that forgot this process
        while hold.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        return real_pwrite(fd, data, offset)
    os.pwrite = pwrite
    with Kvm() as kvm:
        vm = new_vm(kvm)
        with vm.guest_memory, vm:
            save_snapshot(vm, target)


if __name__ == "__main__":
    _save_held(sys.argv[1], sys.argv[2])
