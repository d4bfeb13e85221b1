"""Build a tiny initramfs (``newc`` cpio) around a static busybox, for the boot tests."""

from __future__ import annotations

import stat
from pathlib import Path

SHELL_MARKER = "kvmlib initramfs shell is up"

#: /init: mount what a shell needs, prove the shell runs, then reboot (the i8042 reset ends the VM).
INIT_SCRIPT = f"""#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev
/bin/busybox mount -t proc proc /proc
/bin/busybox echo "{SHELL_MARKER}: $(/bin/busybox uname -r)"
/bin/busybox reboot -f
"""


def _entry(name: str, mode: int, data: bytes = b"", ino: int = 0,
           rdev: tuple[int, int] = (0, 0)) -> bytes:
    # ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor namesize check
    fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, *rdev, len(name) + 1, 0]
    header = b"070701" + b"".join(b"%08X" % f for f in fields)
    out = header + name.encode() + b"\0"
    out += b"\0" * (-len(out) % 4)
    out += data + b"\0" * (-len(data) % 4)
    return out


def build_initramfs(busybox: Path, init: str = INIT_SCRIPT) -> bytes:
    """An uncompressed newc archive: /bin/busybox, /bin/sh -> busybox, /init, /dev/console, /proc."""
    parts = [
        _entry("bin", stat.S_IFDIR | 0o755, ino=1),
        _entry("dev", stat.S_IFDIR | 0o755, ino=2),
        _entry("dev/console", stat.S_IFCHR | 0o600, ino=8, rdev=(5, 1)),
        _entry("proc", stat.S_IFDIR | 0o755, ino=3),
        _entry("sys", stat.S_IFDIR | 0o755, ino=4),
        _entry("bin/busybox", stat.S_IFREG | 0o755, busybox.read_bytes(), ino=5),
        _entry("bin/sh", stat.S_IFLNK | 0o777, b"busybox", ino=6),
        _entry("init", stat.S_IFREG | 0o755, init.encode(), ino=7),
        _entry("TRAILER!!!", 0),
    ]
    return b"".join(parts)
