"""kvmlib.initramfs: newc archives read back by a parser written from the format, and by GNU cpio."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import struct
import subprocess
from pathlib import Path

import attrs
import pytest

from kvmlib import KvmError
from kvmlib import initramfs as ir
from kvmlib.initramfs import (
    BlockDevice,
    CharDevice,
    Directory,
    Fifo,
    File,
    HostFile,
    InitramfsError,
    Symlink,
)

HEADER = 110


@attrs.define
class Member:
    offset: int
    name: str
    ino: int
    mode: int
    uid: int
    gid: int
    nlink: int
    mtime: int
    rdev: tuple[int, int]
    data: bytes


def _align(n: int) -> int:
    return (n + 3) & ~3


def parse(archive: bytes) -> list[Member]:
    """Every member before the trailer, checking magic, alignment and zero padding on the way."""
    members: list[Member] = []
    offset = 0
    while True:
        assert offset % 4 == 0
        assert archive[offset:offset + 6] == b"070701", archive[offset:offset + 16]
        fields = [int(archive[offset + 6 + 8 * i:offset + 14 + 8 * i], 16) for i in range(13)]
        ino, mode, uid, gid, nlink, mtime, size, _maj, _min, rmaj, rmin, namesize, check = fields
        assert check == 0
        name_end = offset + HEADER + namesize
        assert archive[name_end - 1] == 0
        name = archive[offset + HEADER:name_end - 1].decode()
        data_start = _align(name_end)
        assert archive[name_end:data_start] == bytes(data_start - name_end)
        data = archive[data_start:data_start + size]
        assert len(data) == size
        next_offset = _align(data_start + size)
        assert archive[data_start + size:next_offset] == bytes(next_offset - data_start - size)
        if name == "TRAILER!!!":
            assert (ino, mode, size) == (0, 0, 0)
            assert next_offset == len(archive)
            return members
        members.append(Member(offset, name, ino, mode, uid, gid, nlink, mtime, (rmaj, rmin), data))
        offset = next_offset


def by_name(archive: bytes) -> dict[str, Member]:
    return {m.name: m for m in parse(archive)}


def test_every_kind_of_entry(tmp_path: Path) -> None:
    host = tmp_path / "tool"
    host.write_bytes(b"host bytes")
    host.chmod(0o750)
    archive = ir.build({
        "etc/motd": b"hello\n",
        "init": File(b"#!/bin/sh\n", mode=0o755),
        "bin/tool": host,
        "bin/other": HostFile(host, mode=0o700),
        "bin/sh": Symlink("busybox"),
        "var/empty": Directory(0o700),
        "dev/console": CharDevice(5, 1),
        "dev/vda": BlockDevice(254, 0, mode=0o660),
        "run/pipe": Fifo(),
    })
    m = by_name(archive)
    assert m["etc/motd"].mode == stat.S_IFREG | 0o644 and m["etc/motd"].data == b"hello\n"
    assert m["init"].mode == stat.S_IFREG | 0o755
    assert m["bin/tool"].mode == stat.S_IFREG | 0o750 and m["bin/tool"].data == b"host bytes"
    assert m["bin/other"].mode == stat.S_IFREG | 0o700 and m["bin/other"].data == b"host bytes"
    assert m["bin/sh"].mode == stat.S_IFLNK | 0o777 and m["bin/sh"].data == b"busybox"
    assert m["var/empty"].mode == stat.S_IFDIR | 0o700 and m["var/empty"].data == b""
    assert m["dev/console"].mode == stat.S_IFCHR | 0o600 and m["dev/console"].rdev == (5, 1)
    assert m["dev/vda"].mode == stat.S_IFBLK | 0o660 and m["dev/vda"].rdev == (254, 0)
    assert m["run/pipe"].mode == stat.S_IFIFO | 0o644
    for member in m.values():
        assert (member.uid, member.gid, member.mtime) == (0, 0, 0)
        assert member.nlink == (2 if stat.S_ISDIR(member.mode) else 1)


def test_parents_are_implicit_and_come_first() -> None:
    archive = ir.build({"a/b/c/file": b"x", "a/b/link": Symlink("c/file")})
    members = parse(archive)
    assert [m.name for m in members] == ["a", "a/b", "a/b/c", "a/b/c/file", "a/b/link"]
    for m in members[:3]:
        assert m.mode == stat.S_IFDIR | 0o755


def test_a_listed_parent_keeps_its_mode() -> None:
    assert by_name(ir.build({"secret": Directory(0o700), "secret/key": b"k"}))["secret"].mode == (
        stat.S_IFDIR | 0o700)


def test_output_is_deterministic_whatever_the_order() -> None:
    entries: dict[str, ir.Entry] = {"z": b"1", "a/y": b"2", "a/b": Symlink("y"), "m": Directory()}
    first = ir.build(entries)
    assert ir.build(dict(reversed(list(entries.items())))) == first
    members = parse(first)
    assert [m.ino for m in members] == list(range(1, len(members) + 1))
    # Directories come before their contents even where plain string order would differ.
    assert [m.name for m in parse(ir.build({"a-b": b"", "a/b": b""}))] == ["a", "a/b", "a-b"]


def test_the_modification_time_is_fixed_and_settable() -> None:
    assert {m.mtime for m in parse(ir.build({"f": b"", "d/e": b""}, mtime=1_700_000_000))} == {
        1_700_000_000}


@pytest.mark.parametrize("length", range(1, 9))
def test_names_and_data_of_every_length_stay_aligned(length: int) -> None:
    name = "n" * length
    member, = parse(ir.build({name: b"d" * length}))
    assert member.name == name and member.data == b"d" * length


def test_an_empty_archive_is_just_the_trailer() -> None:
    assert parse(ir.build({})) == []


@pytest.mark.parametrize("name", [
    "/init", "", ".", "..", "../etc/passwd", "a/../b", "a/./b", "a//b", "a/", "x\0y",
    "n" * 256, "/".join(["d" * 200] * 21), "TRAILER!!!",
])
def test_bad_names_are_refused(name: str) -> None:
    with pytest.raises(InitramfsError):
        ir.build({name: b""})


def test_an_absolute_path_error_suggests_the_relative_one() -> None:
    with pytest.raises(InitramfsError, match=r"absolute.*'init'"):
        ir.build({"/init": b""})


def test_long_but_acceptable_names() -> None:
    longest_component = "c" * 255
    assert parse(ir.build({longest_component: b""}))[0].name == longest_component


@pytest.mark.parametrize(("entries", "match"), [
    ({"a": b"x", "a/b": b"y"}, "inside 'a', which is not a directory"),
    ({"a": Symlink("/etc"), "a/b": b"y"}, "not a directory"),
    ({"f": "text"}, "str"),
    ({"f": 42}, "not an initramfs entry"),
    ({"l": Symlink("")}, "target"),
])
def test_bad_entries_are_refused(entries: dict[str, ir.Entry], match: str) -> None:
    with pytest.raises(InitramfsError, match=match):
        ir.build(entries)


def test_bad_entry_fields_are_refused_when_made() -> None:
    with pytest.raises(InitramfsError, match="mode"):
        File(b"", mode=0o10000)
    with pytest.raises(InitramfsError, match="mode"):
        Directory(-1)
    with pytest.raises(InitramfsError, match="32 bits"):
        CharDevice(1 << 32, 0)
    with pytest.raises(InitramfsError, match="bytes"):
        File("text")  # type: ignore[arg-type]
    with pytest.raises(InitramfsError, match="bytes"):
        File(3)  # type: ignore[arg-type]


def test_a_missing_host_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(InitramfsError, match=r"cannot read host file.*missing"):
        ir.build({"f": tmp_path / "missing"})


def test_errors_are_kvm_errors() -> None:
    assert issubclass(InitramfsError, KvmError)


def test_write_puts_the_archive_in_a_file(tmp_path: Path) -> None:
    entries: dict[str, ir.Entry] = {"init": File(b"x", 0o755)}
    ir.write(tmp_path / "initrd.cpio", entries)
    assert (tmp_path / "initrd.cpio").read_bytes() == ir.build(entries)
    with pytest.raises(InitramfsError, match="cannot write"):
        ir.write(tmp_path / "no" / "such" / "dir.cpio", entries)


def _tree(root: Path) -> None:
    (root / "bin").mkdir()
    (root / "bin" / "prog").write_bytes(b"\x7fELF...")
    (root / "bin" / "prog").chmod(0o755)
    (root / "etc").mkdir()
    (root / "etc" / "secret").write_bytes(b"s3cret")
    (root / "etc" / "secret").chmod(0o600)
    (root / "empty").mkdir(mode=0o700)
    (root / "empty").chmod(0o700)
    (root / "bin" / "sh").symlink_to("prog")
    (root / "dangling").symlink_to("/nowhere/at/all")
    os.mkfifo(root / "fifo", 0o640)


def test_from_directory_keeps_modes_symlinks_and_contents(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    _tree(root)
    entries = ir.from_directory(root)
    assert sorted(entries) == ["bin", "bin/prog", "bin/sh", "dangling", "empty", "etc", "etc/secret",
                               "fifo"]
    m = by_name(ir.build(entries))
    assert m["bin/prog"].mode == stat.S_IFREG | 0o755 and m["bin/prog"].data == b"\x7fELF..."
    assert m["etc/secret"].mode == stat.S_IFREG | 0o600 and m["etc/secret"].data == b"s3cret"
    assert m["empty"].mode == stat.S_IFDIR | 0o700
    assert m["bin/sh"].mode == stat.S_IFLNK | 0o777 and m["bin/sh"].data == b"prog"
    assert m["dangling"].data == b"/nowhere/at/all"
    assert m["fifo"].mode == stat.S_IFIFO | 0o640


def test_from_directory_combines_with_other_entries(tmp_path: Path) -> None:
    (tmp_path / "data.txt").write_bytes(b"data")
    archive = ir.build({**ir.from_directory(tmp_path), "init": File(b"#!/bin/sh\n", 0o755)})
    assert sorted(by_name(archive)) == ["data.txt", "init"]


def test_from_directory_refuses_a_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # a short relative name: socket paths are limited to ~107 bytes
    with socket.socket(socket.AF_UNIX) as server:
        server.bind("sock")
        with pytest.raises(InitramfsError, match="socket"):
            ir.from_directory(tmp_path)


def test_from_directory_needs_a_directory(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(InitramfsError, match="not a directory"):
        ir.from_directory(tmp_path / "file")
    with pytest.raises(InitramfsError, match="not a directory"):
        ir.from_directory(tmp_path / "missing")


@pytest.mark.skipif(shutil.which("cpio") is None, reason="GNU cpio is not installed")
def test_gnu_cpio_reads_the_archive_back(tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    _tree(source)
    (source / "fifo").unlink()  # extracting a fifo is fine, but comparing one is not worth it
    archive = ir.build({**ir.from_directory(source), "dev/console": CharDevice(5, 1),
                        "deep/er/file": b"x" * 1001})
    listing = subprocess.run(["cpio", "-t", "--quiet"], input=archive, capture_output=True,
                             timeout=60, check=True).stdout.decode().split()
    assert listing == [m.name for m in parse(archive)]
    out = tmp_path / "out"
    out.mkdir()
    no_devices = ir.build({**ir.from_directory(source), "deep/er/file": b"x" * 1001})
    subprocess.run(["cpio", "-i", "-d", "-m", "--quiet", "--no-absolute-filenames"], input=no_devices,
                   cwd=out, capture_output=True, timeout=60, check=True)
    for name in ("bin/prog", "etc/secret", "deep/er/file"):
        assert (out / name).read_bytes() == (
            (source / name).read_bytes() if name != "deep/er/file" else b"x" * 1001)
    assert stat.S_IMODE((out / "etc" / "secret").stat().st_mode) == 0o600
    assert stat.S_IMODE((out / "bin" / "prog").stat().st_mode) == 0o755
    assert os.readlink(out / "bin" / "sh") == "prog"
    assert stat.S_IMODE((out / "empty").stat().st_mode) == 0o700


# -- the busybox initramfs -------------------------------------------------------------------------

def _elf(*program_header_types: int) -> bytes:
    """A 64-bit little-endian ELF header and program headers of the given types, nothing else."""
    ident = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    header = ident + struct.pack("<HHIQQQIHHHHHH", 2, 0x3E, 1, 0x401000, 64, 0, 0, 64, 56,
                                 len(program_header_types), 64, 0, 0)
    return header + b"".join(struct.pack("<IIQQQQQQ", t, 5, 0, 0, 0, 0, 0, 0x1000)
                             for t in program_header_types)


@pytest.fixture
def fake_busybox(tmp_path: Path) -> Path:
    path = tmp_path / "busybox"
    path.write_bytes(_elf(1, 1, 4))  # PT_LOAD, PT_LOAD, PT_NOTE: static
    path.chmod(0o755)
    return path


def test_the_busybox_initramfs_runs_the_command(fake_busybox: Path) -> None:
    command = "echo hi; exit 3"
    m = by_name(ir.busybox_initramfs(command, busybox=fake_busybox))
    assert m["command"].data == b"echo hi; exit 3\n"
    init = m["init"]
    assert init.mode == stat.S_IFREG | 0o755
    script = init.data.decode()
    assert script.startswith("#!/bin/busybox sh\n")
    assert "/bin/busybox sh /command\nstatus=$?\n" in script
    assert r"printf '\nkvmlib-exit-status: %d\n' " in script
    assert "reboot -f" in script
    assert script == ir.busybox_init_script(command)
    assert m["bin/busybox"].data == fake_busybox.read_bytes()
    assert m["bin/busybox"].mode == stat.S_IFREG | 0o755
    assert m["bin/sh"].mode == stat.S_IFLNK | 0o777 and m["bin/sh"].data == b"busybox"
    assert m["dev/console"].mode == stat.S_IFCHR | 0o600 and m["dev/console"].rdev == (5, 1)
    for directory in ("proc", "sys", "tmp"):
        assert stat.S_ISDIR(m[directory].mode)


def test_a_multi_line_command_is_kept_as_written(fake_busybox: Path) -> None:
    command = "set -e\ncat <<'END'\n$not 'expanded'\nEND\n"
    assert by_name(ir.busybox_initramfs(command, busybox=fake_busybox))["command"].data == (
        command.encode())


def test_extra_entries_are_added_and_win(fake_busybox: Path) -> None:
    m = by_name(ir.busybox_initramfs("true", busybox=fake_busybox, extra={
        "opt/test/data": b"payload", "tmp": Directory(0o700)}))
    assert m["opt/test/data"].data == b"payload"
    assert m["tmp"].mode == stat.S_IFDIR | 0o700


def test_the_busybox_initramfs_is_deterministic(fake_busybox: Path) -> None:
    assert (ir.busybox_initramfs("true", busybox=fake_busybox)
            == ir.busybox_initramfs("true", busybox=fake_busybox))


def test_an_empty_command_is_refused(fake_busybox: Path) -> None:
    with pytest.raises(InitramfsError, match="empty"):
        ir.busybox_initramfs("  \n", busybox=fake_busybox)


def test_a_missing_busybox_names_the_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(ir, "BUSYBOX_PATHS", (str(tmp_path / "bin" / "busybox"),))
    with pytest.raises(InitramfsError, match="busybox-static"):
        ir.busybox_initramfs("true")
    with pytest.raises(InitramfsError, match="busybox-static"):
        ir.busybox_initramfs("true", busybox=tmp_path / "nope")


def test_busybox_is_found_on_path(fake_busybox: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(fake_busybox.parent))
    assert ir.find_busybox() == fake_busybox
    assert by_name(ir.busybox_initramfs("true"))["bin/busybox"].data == fake_busybox.read_bytes()


def test_a_dynamically_linked_busybox_is_refused(tmp_path: Path) -> None:
    dynamic = tmp_path / "busybox"
    dynamic.write_bytes(_elf(6, 3, 1))  # PT_PHDR, PT_INTERP, PT_LOAD
    with pytest.raises(InitramfsError, match=r"dynamically linked.*busybox-static"):
        ir.busybox_initramfs("true", busybox=dynamic)


def test_a_busybox_that_is_not_elf_is_refused(tmp_path: Path) -> None:
    script = tmp_path / "busybox"
    script.write_bytes(b"#!/bin/sh\necho not really busybox\n" + bytes(64))
    with pytest.raises(InitramfsError, match=r"not an ELF executable.*busybox-static"):
        ir.busybox_initramfs("true", busybox=script)


def test_the_hosts_busybox_if_any() -> None:
    try:
        busybox = ir.find_busybox()
    except InitramfsError:
        pytest.skip("no busybox here")
    try:
        archive = ir.busybox_initramfs("true", busybox=busybox)
    except InitramfsError as e:
        assert "dynamically linked" in str(e)  # Debian's plain busybox package
        return
    assert by_name(archive)["bin/busybox"].data == busybox.read_bytes()


@pytest.mark.parametrize(("console", "status"), [
    (b"boot noise\nkvmlib-exit-status: 0\r\nreboot: Restarting system\r\n", 0),
    ("kvmlib-exit-status: 3\n", 3),
    (bytearray(b"kvmlib-exit-status: 4\n"), 4),
    (b"first\nkvmlib-exit-status: 1\nkvmlib-exit-status: 127\n", 127),
    (b"output without a newline\nkvmlib-exit-status: 2", 2),
    (b"echo kvmlib-exit-status: 5\n", None),  # not at the start of a line: someone's echo
    (b"kvmlib-exit-status: \n", None),
    (b"", None),
])
def test_parse_exit_status(console: bytes | bytearray | str, status: int | None) -> None:
    assert ir.parse_exit_status(console) == status
