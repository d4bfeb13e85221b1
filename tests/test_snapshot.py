"""Snapshot files against the real /dev/kvm: save, restore in another process, diffs, corruption."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvmlib import Kvm, SnapshotError, VmError
from kvmlib.exit_handler import EventExitHandler
from kvmlib.memory import PAGE_SIZE
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

from .snapshot_guests import (
    CODE,
    COUNTER,
    FLAG,
    RAM_SIZE,
    Counter,
    Tape,
    count_to,
    counting,
    counting_bus,
    memory_with,
    scribble,
    wait_for_flag,
)

ROOT = Path(__file__).resolve().parent.parent
LIMIT = 600


class Running:
    """A counting VM with a Tape device, paused after it has counted a little."""

    def __init__(self, kvm: Kvm, code: bytes, *, wait_for: int = 100,
                 log_dirty_pages: bool = False) -> None:
        self.memory = memory_with(code, log_dirty_pages=log_dirty_pages)
        self.counter, self.tape = Counter(), Tape()
        self.vm = KvmVm.new(kvm, VmConfig.from_kvm(kvm, 1), self.memory, EventExitHandler(),
                            counting_bus(self.counter, self.tape))
        self.vm.run(CODE)
        assert self.counter.wait_count(wait_for)
        self.vm.pause()
        self.tape.last = 0x42

    def close(self) -> None:
        self.vm.close()
        self.memory.close()


@pytest.fixture
def running(kvm: Kvm) -> Iterator[Running]:
    r = Running(kvm, count_to(LIMIT))
    yield r
    r.close()


def run_child(path: Path, mode: str = "read") -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", "tests.snapshot_child", str(path), mode],
                         cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def test_a_snapshot_restored_in_another_process_continues_from_the_saved_count(
        running: Running, tmp_path: Path) -> None:
    last = running.counter.values[-1]
    save_snapshot(running.vm, tmp_path / "snap")
    first = run_child(tmp_path / "snap")
    assert first["values"] == list(range(last + 1, LIMIT + 1))
    assert first["rax_at_start"] in (last, last + 1)  # paused before or after the next inc
    assert (first["rax"], first["counter"], first["tape_at_start"]) == (LIMIT, LIMIT, 0x42)


def test_restoring_twice_from_one_snapshot_gives_the_same_result(
        running: Running, tmp_path: Path) -> None:
    save_snapshot(running.vm, tmp_path / "snap")
    assert run_child(tmp_path / "snap") == run_child(tmp_path / "snap")


def test_memory_mapped_copy_on_write_restores_the_same_and_leaves_the_file_alone(
        running: Running, tmp_path: Path) -> None:
    save_snapshot(running.vm, tmp_path / "snap")
    image = (tmp_path / "snap" / MEMORY_FILE).read_bytes()
    assert run_child(tmp_path / "snap", "mmap") == run_child(tmp_path / "snap", "read")
    assert (tmp_path / "snap" / MEMORY_FILE).read_bytes() == image


def test_files_are_private_and_memory_is_sparse(running: Running, tmp_path: Path) -> None:
    save_snapshot(running.vm, tmp_path / "snap")
    snap = tmp_path / "snap"
    assert stat.S_IMODE(snap.stat().st_mode) == 0o700
    for name in (MANIFEST, STATE_FILE, MEMORY_FILE):
        assert stat.S_IMODE((snap / name).stat().st_mode) == 0o600
    image = snap / MEMORY_FILE
    assert image.stat().st_size == RAM_SIZE
    # The guest wrote a few pages; the VM's boot tables a few more: far less than 4 MiB is stored.
    assert image.stat().st_blocks * 512 < RAM_SIZE // 4
    assert list(tmp_path.iterdir()) == [snap]  # no temporary directory left behind


def test_loaded_memory_equals_the_saved_memory(running: Running, tmp_path: Path) -> None:
    saved = running.memory.read(0, RAM_SIZE)
    state = running.vm.save_state()
    save_snapshot(running.vm, tmp_path / "snap")
    for mode in ("read", "mmap"):
        with load_snapshot(tmp_path / "snap", mode=mode) as loaded:
            assert loaded.memory.read(0, RAM_SIZE) == saved
            assert loaded.state.vcpus[0].regs == state.vcpus[0].regs


def test_saving_a_running_vm_is_refused(running: Running, tmp_path: Path) -> None:
    running.vm.resume()
    with pytest.raises(VmError, match="pause"):
        save_snapshot(running.vm, tmp_path / "snap")
    assert not (tmp_path / "snap").exists()


def test_an_existing_directory_is_not_overwritten(running: Running, tmp_path: Path) -> None:
    (tmp_path / "snap").mkdir()
    with pytest.raises(SnapshotError, match="already exists"):
        save_snapshot(running.vm, tmp_path / "snap")


# ---- corruption ---------------------------------------------------------------------------------


@pytest.fixture
def saved(running: Running, tmp_path: Path) -> Path:
    save_snapshot(running.vm, tmp_path / "snap")
    return tmp_path / "snap"


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def first_data_offset(path: Path) -> int:
    data = path.read_bytes()
    return next(i for i, b in enumerate(data) if b)


@pytest.mark.parametrize("mode", ["read", "mmap"])
def test_a_corrupted_memory_image_is_refused(saved: Path, mode: str) -> None:
    flip_byte(saved / MEMORY_FILE, first_data_offset(saved / MEMORY_FILE))
    with pytest.raises(SnapshotError, match=f"{MEMORY_FILE} fails its checksum"):
        load_snapshot(saved, mode=mode)  # type: ignore[arg-type]


def test_a_byte_written_into_a_hole_is_refused(saved: Path) -> None:
    flip_byte(saved / MEMORY_FILE, RAM_SIZE - 1)  # the last page is never written
    with pytest.raises(SnapshotError, match="fails its checksum"):
        load_snapshot(saved)


def test_a_truncated_memory_image_is_refused(saved: Path) -> None:
    os.truncate(saved / MEMORY_FILE, RAM_SIZE - PAGE_SIZE)
    with pytest.raises(SnapshotError, match="truncated"):
        load_snapshot(saved)


def test_a_corrupted_state_is_refused(saved: Path) -> None:
    flip_byte(saved / STATE_FILE, 10)
    with pytest.raises(SnapshotError, match=f"{STATE_FILE} fails its checksum"):
        load_state(saved)


def test_an_altered_manifest_is_refused(saved: Path) -> None:
    doc = json.loads((saved / MANIFEST).read_text())
    doc["memory"]["size"] += PAGE_SIZE
    (saved / MANIFEST).write_text(json.dumps(doc))
    with pytest.raises(SnapshotError, match="altered or corrupted"):
        read_manifest(saved)


def test_a_foreign_or_missing_manifest_is_refused(saved: Path, tmp_path: Path) -> None:
    (saved / MANIFEST).write_text('{"format": "qemu-savevm"}')
    with pytest.raises(SnapshotError, match="not a kvmlib snapshot"):
        load_snapshot(saved)
    (saved / MANIFEST).write_bytes(b"\x7fELF\x02\x01")
    with pytest.raises(SnapshotError, match="not JSON"):
        load_snapshot(saved)
    with pytest.raises(SnapshotError, match=r"no manifest\.json"):
        load_snapshot(tmp_path)


def test_a_missing_memory_file_is_refused(saved: Path) -> None:
    (saved / MEMORY_FILE).unlink()
    with pytest.raises(SnapshotError, match="missing"):
        load_snapshot(saved)


def test_restore_into_a_bus_without_the_devices_is_refused_before_creating_a_vm(
        kvm: Kvm, saved: Path) -> None:
    with pytest.raises(SnapshotError, match="devices"):
        restore_snapshot(kvm, saved, EventExitHandler(), counting_bus(Counter()))


# ---- diff snapshots -----------------------------------------------------------------------------


def test_diff_snapshots_store_only_dirtied_pages_and_restore_base_plus_diffs(
        kvm: Kvm, tmp_path: Path) -> None:
    pages = [0x100, 0x101, 0x3F0]
    r = Running(kvm, counting(20) + wait_for_flag() + scribble(pages, 0x99), wait_for=20,
                log_dirty_pages=True)
    try:
        base = save_snapshot(r.vm, tmp_path / "base")
        r.memory.write_u8(FLAG, 1)
        r.vm.resume()
        assert r.counter.wait_done()
        r.vm.pause()
        diff = save_snapshot(r.vm, tmp_path / "diff1", base=tmp_path / "base")
        assert (diff.kind, diff.base_id) == ("diff", base.id)
        # FLAG's page (a host write), the scribbled pages, nothing else.
        assert (tmp_path / "diff1" / DIFF_FILE).stat().st_size == (len(pages) + 1) * PAGE_SIZE
        r.tape.last = 0x77
        save_snapshot(r.vm, tmp_path / "diff2", base=tmp_path / "diff1")
        expected = r.memory.read(0, RAM_SIZE)
        with load_snapshot(tmp_path / "diff2") as loaded:
            assert loaded.memory.read(0, RAM_SIZE) == expected
            assert [i.kind for i in loaded.chain] == ["full", "diff", "diff"]
            assert loaded.state.devices[0].data == b"\x77"
            assert loaded.memory.read_u64(COUNTER) == 20
    finally:
        r.close()


def test_a_diff_needs_the_last_snapshot_of_the_same_vm_as_base(kvm: Kvm, tmp_path: Path) -> None:
    r = Running(kvm, count_to(LIMIT), log_dirty_pages=True)
    try:
        save_snapshot(r.vm, tmp_path / "a")
        save_snapshot(r.vm, tmp_path / "b")
        with pytest.raises(SnapshotError, match="not the last snapshot"):
            save_snapshot(r.vm, tmp_path / "c", base=tmp_path / "a")
    finally:
        r.close()


def test_a_diff_whose_base_was_replaced_is_refused(kvm: Kvm, tmp_path: Path) -> None:
    r = Running(kvm, count_to(LIMIT), log_dirty_pages=True)
    try:
        save_snapshot(r.vm, tmp_path / "base")
        save_snapshot(r.vm, tmp_path / "diff", base=tmp_path / "base")
        (tmp_path / "base").rename(tmp_path / "old")
        save_snapshot(r.vm, tmp_path / "base")
        with pytest.raises(SnapshotError, match="was taken on base"):
            load_snapshot(tmp_path / "diff")
    finally:
        r.close()
