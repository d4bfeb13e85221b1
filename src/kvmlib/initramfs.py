r"""Build initramfs images: ``newc`` (``070701``) cpio archives, as the Linux kernel unpacks them.

An archive is described by a mapping from archive paths (relative, ``/``-separated: ``"bin/sh"``) to
entries::

    from kvmlib import initramfs

    image = initramfs.build({
        "init": initramfs.File(b"#!/bin/busybox sh\n...", mode=0o755),
        "bin/busybox": Path("/bin/busybox"),           # a host file, read when building
        "bin/sh": initramfs.Symlink("busybox"),
        "dev/console": initramfs.CharDevice(5, 1),
        "proc": initramfs.Directory(),
    })

``bytes`` are a regular file (mode 0644) and a :class:`pathlib.Path` is a host file keeping its
permission bits; :class:`File`, :class:`HostFile`, :class:`Symlink`, :class:`Directory`,
:class:`CharDevice`, :class:`BlockDevice` and :class:`Fifo` say more. Parent directories are created
(mode 0755) when not listed. The output is deterministic: entries sorted by path, parents first,
inode numbers counted from 1 in that order, owner root, one fixed modification time.

:func:`from_directory` turns a host directory tree into such a mapping, and
:func:`busybox_initramfs` builds the image a kernel test needs: a static busybox and an ``/init``
that runs one shell command, prints ``kvmlib-exit-status: N`` (read it back with
:func:`parse_exit_status`) and reboots, which ends a kvmlib VM.

Every bad entry or unreadable file is an :class:`InitramfsError`.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TypeAlias, Union

import attrs

from kvmlib.errors import KvmError

#: The kernel's PATH_MAX: longer names (with their NUL) or symlink targets are not unpacked.
PATH_MAX = 4096
#: The longest path component Linux file systems take.
NAME_MAX = 255
#: What the ``/init`` of :func:`busybox_initramfs` prints before the command's exit status.
EXIT_STATUS_PREFIX = "kvmlib-exit-status: "
#: Where :func:`busybox_initramfs` looks for busybox when not told, after ``PATH``.
BUSYBOX_PATHS = ("/bin/busybox", "/usr/bin/busybox")

_MAGIC = b"070701"
_TRAILER = "TRAILER!!!"
_U32 = 1 << 32
_MODE_BITS = 0o7777

_INSTALL_BUSYBOX = "install a statically linked busybox (Debian/Ubuntu: apt install busybox-static)"


class InitramfsError(KvmError):
    """An archive entry is invalid, a host file cannot be read, or busybox is missing or unusable."""


def _mode(value: int) -> int:
    if not isinstance(value, int) or not 0 <= value <= _MODE_BITS:
        raise InitramfsError(f"mode must be permission bits (0 to 0o7777), not {value!r}")
    return value


def _optional_mode(value: int | None) -> int | None:
    return None if value is None else _mode(value)


def _contents(value: bytes) -> bytes:
    # bytes() would also take an int (that many zeros) or refuse a str without saying why.
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise InitramfsError(f"file contents must be bytes, not {type(value).__name__}")
    return bytes(value)


def _device_number(value: int) -> int:
    if not isinstance(value, int) or not 0 <= value < _U32:
        raise InitramfsError(f"a device number must fit 32 bits, not {value!r}")
    return value


@attrs.define(frozen=True, slots=True)
class File:
    """A regular file with the given contents.

    Attributes:
        data: the file's contents.
        mode: permission bits (``0o755`` for an executable).
    """

    data: bytes = attrs.field(converter=_contents)
    mode: int = attrs.field(default=0o644, converter=_mode)


@attrs.define(frozen=True, slots=True)
class HostFile:
    """A regular file whose contents are read from a host file when the archive is built.

    Attributes:
        path: the host file.
        mode: permission bits; ``None`` keeps the host file's.
    """

    path: Path = attrs.field(converter=Path)
    mode: int | None = attrs.field(default=None, converter=_optional_mode)


@attrs.define(frozen=True, slots=True)
class Symlink:
    """A symbolic link.

    Attributes:
        target: what the link points at, as the guest resolves it (``"busybox"``, ``"/bin/sh"``).
    """

    target: str


@attrs.define(frozen=True, slots=True)
class Directory:
    """A directory (needed only for an empty one or a mode other than 0755).

    Attributes:
        mode: permission bits.
    """

    mode: int = attrs.field(default=0o755, converter=_mode)


@attrs.define(frozen=True, slots=True)
class _DeviceNode:
    major: int = attrs.field(converter=_device_number)
    minor: int = attrs.field(converter=_device_number)
    mode: int = attrs.field(default=0o600, converter=_mode)


@attrs.define(frozen=True, slots=True)
class CharDevice(_DeviceNode):
    """A character device node, such as ``CharDevice(5, 1)`` for ``/dev/console``.

    Attributes:
        major: the device's major number.
        minor: the device's minor number.
        mode: permission bits.
    """


@attrs.define(frozen=True, slots=True)
class BlockDevice(_DeviceNode):
    """A block device node (attributes as :class:`CharDevice`'s)."""


@attrs.define(frozen=True, slots=True)
class Fifo:
    """A named pipe.

    Attributes:
        mode: permission bits.
    """

    mode: int = attrs.field(default=0o644, converter=_mode)


#: What an archive path can map to: ``bytes`` (a regular file, mode 0644), a host path (a regular
#: file read at build time, keeping the host file's permission bits) or one of the entry classes.
Entry: TypeAlias = Union[
    bytes, "os.PathLike[str]", File, HostFile, Symlink, Directory, CharDevice, BlockDevice, Fifo]


@attrs.define(frozen=True, slots=True)
class _Node:
    mode: int  # file type and permission bits, as st_mode
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def _split(name: str) -> tuple[bytes, ...]:
    """The components of an archive path, refusing what would escape or confuse the unpacker."""
    if not isinstance(name, str):
        raise InitramfsError(f"archive paths are str, not {type(name).__name__}: {name!r}")
    if name.startswith("/"):
        raise InitramfsError(f"archive path {name!r} is absolute: give it relative to the root, "
                             f"as {name.lstrip('/')!r}")
    raw = os.fsencode(name)
    if b"\0" in raw:
        raise InitramfsError(f"archive path {name!r} contains a NUL byte")
    parts = tuple(raw.split(b"/"))
    for part in parts:
        if part in (b"", b".", b".."):
            raise InitramfsError(f"archive path {name!r} has an empty, '.' or '..' component")
        if len(part) > NAME_MAX:
            raise InitramfsError(f"archive path {name!r} has a component longer than {NAME_MAX} bytes")
    if len(raw) + 1 > PATH_MAX:
        raise InitramfsError(f"archive path {name[:40]!r}... is longer than {PATH_MAX - 1} bytes")
    if parts == (_TRAILER.encode(),):
        # The unpacker would take it for the end of the archive and ignore everything after it.
        raise InitramfsError(f"{_TRAILER!r} cannot be an archive path: it marks the archive's end")
    return parts


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise InitramfsError(f"cannot read host file {str(path)!r}: {e.strerror or e}") from e


def _node(name: str, entry: Entry) -> _Node:
    if isinstance(entry, (bytes, bytearray, memoryview)):
        entry = File(bytes(entry))
    elif isinstance(entry, os.PathLike):
        entry = HostFile(Path(entry))
    if isinstance(entry, File):
        node = _Node(stat.S_IFREG | entry.mode, entry.data)
    elif isinstance(entry, HostFile):
        data = _read(entry.path)
        mode = entry.mode
        if mode is None:
            try:
                mode = stat.S_IMODE(entry.path.stat().st_mode)
            except OSError as e:
                raise InitramfsError(f"cannot stat host file {str(entry.path)!r}: {e.strerror or e}") from e
        node = _Node(stat.S_IFREG | mode, data)
    elif isinstance(entry, Symlink):
        if not isinstance(entry.target, str):
            raise InitramfsError(f"symlink {name!r}: the target must be str, not {entry.target!r}")
        target = os.fsencode(entry.target)
        if not target or b"\0" in target or len(target) >= PATH_MAX:
            raise InitramfsError(f"symlink {name!r}: the target must be 1 to {PATH_MAX - 1} bytes "
                                 f"without NUL, not {entry.target[:40]!r}")
        node = _Node(stat.S_IFLNK | 0o777, target)
    elif isinstance(entry, Directory):
        node = _Node(stat.S_IFDIR | entry.mode)
    elif isinstance(entry, CharDevice):
        node = _Node(stat.S_IFCHR | entry.mode, rdev=(entry.major, entry.minor))
    elif isinstance(entry, BlockDevice):
        node = _Node(stat.S_IFBLK | entry.mode, rdev=(entry.major, entry.minor))
    elif isinstance(entry, Fifo):
        node = _Node(stat.S_IFIFO | entry.mode)
    elif isinstance(entry, str):
        raise InitramfsError(f"entry {name!r} is a str, which could be contents or a host path: give "
                             f"contents as bytes or File, a host path as pathlib.Path or HostFile")
    else:
        raise InitramfsError(f"entry {name!r} is not an initramfs entry: {entry!r}")
    if len(node.data) >= _U32:
        raise InitramfsError(f"{name!r} is {len(node.data)} bytes: newc holds files under 4 GiB")
    return node


def _header(name: bytes, node: _Node, ino: int, nlink: int, mtime: int) -> bytes:
    fields = (ino, node.mode, 0, 0, nlink, mtime, len(node.data), 0, 0, *node.rdev, len(name) + 1, 0)
    out = _MAGIC + b"".join(b"%08X" % f for f in fields) + name + b"\0"
    # The kernel's unpacker expects the data, and the next header, on 4-byte boundaries.
    return out + b"\0" * (-len(out) % 4)


def build(entries: Mapping[str, Entry], *, mtime: int = 0) -> bytes:
    """An uncompressed ``newc`` cpio archive of ``entries``, ending with the trailer.

    Args:
        entries: archive path (relative, ``/``-separated) to :data:`Entry`. Parent directories
            that are not listed are added with mode 0755.
        mtime: the modification time of every entry, seconds since the epoch.

    Raises:
        InitramfsError: an absolute path or one with ``.``, ``..`` or empty components, a name
            longer than the kernel unpacks, an entry inside a non-directory, a bad entry, a host
            file that cannot be read, or a file of 4 GiB or more.
    """
    if not isinstance(mtime, int) or not 0 <= mtime < _U32:
        raise InitramfsError(f"mtime must fit 32 bits, not {mtime!r}")
    nodes: dict[tuple[bytes, ...], _Node] = {}
    names: dict[tuple[bytes, ...], str] = {}
    for name, entry in entries.items():
        parts = _split(name)
        if parts in nodes:
            raise InitramfsError(f"archive path {name!r} is given twice (as {names[parts]!r})")
        nodes[parts] = _node(name, entry)
        names[parts] = name
    for parts, name in list(names.items()):
        for depth in range(1, len(parts)):
            parent = parts[:depth]
            existing = nodes.get(parent)
            if existing is None:
                nodes[parent] = _Node(stat.S_IFDIR | 0o755)
            elif not stat.S_ISDIR(existing.mode):
                raise InitramfsError(f"{name!r} is inside {names[parent]!r}, which is not a directory")
    out = bytearray()
    # Sorting by components puts every directory before what it contains.
    for ino, parts in enumerate(sorted(nodes), start=1):
        node = nodes[parts]
        nlink = 2 if stat.S_ISDIR(node.mode) else 1
        out += _header(b"/".join(parts), node, ino, nlink, mtime)
        out += node.data + b"\0" * (-len(node.data) % 4)
    out += _header(_TRAILER.encode(), _Node(0), 0, 1, 0)
    return bytes(out)


def write(path: str | os.PathLike[str], entries: Mapping[str, Entry], *, mtime: int = 0) -> None:
    """Build the archive of ``entries`` (see :func:`build`) into the file ``path``.

    Raises:
        InitramfsError: as :func:`build`, or the file cannot be written.
    """
    image = build(entries, mtime=mtime)
    try:
        Path(path).write_bytes(image)
    except OSError as e:
        raise InitramfsError(f"cannot write {os.fspath(path)!r}: {e.strerror or e}") from e


def from_directory(path: str | os.PathLike[str]) -> dict[str, Entry]:
    """The entries for a host directory tree, its contents at the archive's root.

    Directories, regular files (as :class:`HostFile`, read when the archive is built), symlinks
    (their targets as they are, not followed), device nodes and named pipes keep their permission
    bits; ownership is not kept (everything belongs to root in the archive) and hard links become
    separate files. Combine the result with other entries: ``build({**from_directory(d), ...})``.

    Raises:
        InitramfsError: ``path`` is not a directory, or the tree holds what newc cannot carry
            usefully: a socket, or a file of 4 GiB or more.
    """
    root = Path(path)
    if not root.is_dir():
        raise InitramfsError(f"{os.fspath(path)!r} is not a directory")
    entries: dict[str, Entry] = {}
    for host, name in _walk(root, ""):
        try:
            st = host.lstat()
        except OSError as e:
            raise InitramfsError(f"cannot stat {str(host)!r}: {e.strerror or e}") from e
        mode = stat.S_IMODE(st.st_mode)
        if stat.S_ISDIR(st.st_mode):
            entries[name] = Directory(mode)
        elif stat.S_ISREG(st.st_mode):
            if st.st_size >= _U32:
                raise InitramfsError(f"{str(host)!r} is {st.st_size} bytes: newc holds files under 4 GiB")
            entries[name] = HostFile(host, mode)
        elif stat.S_ISLNK(st.st_mode):
            entries[name] = Symlink(os.readlink(host))
        elif stat.S_ISCHR(st.st_mode):
            entries[name] = CharDevice(os.major(st.st_rdev), os.minor(st.st_rdev), mode)
        elif stat.S_ISBLK(st.st_mode):
            entries[name] = BlockDevice(os.major(st.st_rdev), os.minor(st.st_rdev), mode)
        elif stat.S_ISFIFO(st.st_mode):
            entries[name] = Fifo(mode)
        else:
            raise InitramfsError(f"{str(host)!r} is a socket (or another kind of file) that an "
                                 f"initramfs cannot carry: remove it or build the entries yourself")
    return entries


def _walk(directory: Path, prefix: str) -> Iterable[tuple[Path, str]]:
    try:
        children = sorted(os.scandir(directory), key=lambda e: e.name)
    except OSError as e:
        raise InitramfsError(f"cannot list {str(directory)!r}: {e.strerror or e}") from e
    for child in children:
        name = prefix + child.name
        yield Path(child.path), name
        if child.is_dir(follow_symlinks=False):
            yield from _walk(Path(child.path), name + "/")


def find_busybox() -> Path:
    """A busybox on this host: ``busybox`` on ``PATH``, else one of :data:`BUSYBOX_PATHS`.

    Raises:
        InitramfsError: there is none; the message names the package to install.
    """
    found = shutil.which("busybox")
    candidates = ([found] if found else []) + list(BUSYBOX_PATHS)
    for candidate in candidates:
        if os.path.isfile(candidate):
            return Path(candidate)
    raise InitramfsError(f"no busybox found on PATH or at {', '.join(BUSYBOX_PATHS)}: {_INSTALL_BUSYBOX}")


def _check_static(path: Path, data: bytes) -> None:
    """Refuse a busybox the guest could not start: not ELF, or dynamically linked."""
    if data[:4] != b"\x7fELF" or len(data) < 64:
        raise InitramfsError(f"{str(path)!r} is not an ELF executable: {_INSTALL_BUSYBOX}")
    elf_class, byte_order = data[4], data[5]
    if byte_order != 1 or elf_class not in (1, 2):
        return  # not a little-endian ELF: not for an x86 guest anyway, so nothing more to say
    if elf_class == 2:
        phoff, = struct.unpack_from("<Q", data, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    else:
        phoff, = struct.unpack_from("<I", data, 0x1C)
        phentsize, phnum = struct.unpack_from("<HH", data, 0x2A)
    for index in range(phnum):
        offset = phoff + index * phentsize
        if offset + 4 > len(data):
            break
        p_type, = struct.unpack_from("<I", data, offset)
        if p_type == 3:  # PT_INTERP: it needs a dynamic loader and libraries the archive lacks
            raise InitramfsError(f"{str(path)!r} is dynamically linked, so it cannot run alone in an "
                                 f"initramfs: {_INSTALL_BUSYBOX}")


def busybox_init_script(command: str) -> str:
    """The ``/init`` of :func:`busybox_initramfs`: set up, run ``/command`` with ``sh``, report, reboot.

    ``command`` is not part of the script (it is the file ``/command``); it is taken here only to
    refuse an empty one.
    """
    if not command.strip():
        raise InitramfsError("the command to run is empty")
    # The status line starts on a line of its own even when the command's output did not end one.
    # ``reboot -f`` ends a kvmlib VM through the i8042 reset (kernel command line ``reboot=k``);
    # should it fail, init exits, the kernel panics, and ``panic=-1`` reboots.
    return f"""#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp /sbin /usr/bin /usr/sbin
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev 2>/dev/null
/bin/busybox --install -s
export PATH=/sbin:/bin:/usr/sbin:/usr/bin HOME=/
cd /
/bin/busybox sh /command
status=$?
/bin/busybox printf '\\n{EXIT_STATUS_PREFIX}%d\\n' "$status"
/bin/busybox reboot -f
/bin/busybox poweroff -f
"""


def busybox_initramfs(command: str, *, busybox: str | os.PathLike[str] | None = None,
                      extra: Mapping[str, Entry] | None = None, mtime: int = 0) -> bytes:
    """An initramfs that runs one shell command, prints its exit status, and ends the VM.

    The archive holds a static busybox at ``/bin/busybox`` (``/bin/sh`` links to it), the command
    as the file ``/command``, ``/dev/console``, and ``/init`` (:func:`busybox_init_script`): it
    mounts ``/proc``, ``/sys`` and ``devtmpfs`` on ``/dev``, installs the busybox applets as
    symlinks, runs ``sh /command`` on the console, prints ``kvmlib-exit-status: N`` on a line of
    its own (:func:`parse_exit_status` reads it back), and reboots. Boot it with
    ``rdinit=/init reboot=k panic=-1`` on the kernel command line so the reboot ends the VM.

    Args:
        command: shell commands (busybox ``sh``), one or more lines.
        busybox: the busybox binary; by default :func:`find_busybox`. It must be statically
            linked: there are no libraries in the archive.
        extra: more entries (test programs, data), added last: an entry here replaces the default
            one at the same path.
        mtime: the modification time of every entry (see :func:`build`).

    Raises:
        InitramfsError: no busybox, or one that is not a static ELF executable (the message
            names the package ``busybox-static``), an empty command, or a bad entry in ``extra``.
    """
    path = find_busybox() if busybox is None else Path(busybox)
    if not path.is_file():
        raise InitramfsError(f"no busybox at {str(path)!r}: {_INSTALL_BUSYBOX}")
    data = _read(path)
    _check_static(path, data)
    entries: dict[str, Entry] = {
        "init": File(busybox_init_script(command).encode(), 0o755),
        "command": File(command.encode() + (b"" if command.endswith("\n") else b"\n"), 0o755),
        "bin/busybox": File(data, 0o755),
        "bin/sh": Symlink("busybox"),
        "dev/console": CharDevice(5, 1),
        "proc": Directory(),
        "sys": Directory(),
        "tmp": Directory(0o1777),
    }
    entries.update(extra or {})
    return build(entries, mtime=mtime)


_EXIT_LINE = re.compile(r"^" + re.escape(EXIT_STATUS_PREFIX) + r"(\d+)\r?$", re.MULTILINE)


def parse_exit_status(console: str | bytes | bytearray | memoryview) -> int | None:
    r"""The exit status a :func:`busybox_initramfs` guest reported on its console, or ``None``.

    The last ``kvmlib-exit-status: N`` line counts (serial consoles may end it with ``\r\n``).
    """
    text = console if isinstance(console, str) else bytes(console).decode("latin-1")
    found = _EXIT_LINE.findall(text)
    return int(found[-1]) if found else None


__all__ = [
    "BUSYBOX_PATHS",
    "EXIT_STATUS_PREFIX",
    "NAME_MAX",
    "PATH_MAX",
    "BlockDevice",
    "CharDevice",
    "Directory",
    "Entry",
    "Fifo",
    "File",
    "HostFile",
    "InitramfsError",
    "Symlink",
    "build",
    "busybox_init_script",
    "busybox_initramfs",
    "find_busybox",
    "from_directory",
    "parse_exit_status",
    "write",
]
