"""The boot tests' initramfs: a static busybox whose /init says the shell is up, built by kvmlib.initramfs."""

from __future__ import annotations

from pathlib import Path

from kvmlib import initramfs

SHELL_MARKER = "kvmlib initramfs shell is up"

#: /init: mount what a shell needs, prove the shell runs, then reboot (the i8042 reset ends the VM).
INIT_SCRIPT = f"""#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev
/bin/busybox mount -t proc proc /proc
/bin/busybox echo "{SHELL_MARKER}: $(/bin/busybox uname -r)"
/bin/busybox reboot -f
"""


def build_initramfs(busybox: Path, init: str = INIT_SCRIPT) -> bytes:
    """An uncompressed newc archive: /bin/busybox, /bin/sh -> busybox, /init, /dev/console, /proc."""
    return initramfs.build({
        "bin/busybox": initramfs.HostFile(busybox, 0o755),
        "bin/sh": initramfs.Symlink("busybox"),
        "init": initramfs.File(init.encode(), 0o755),
        "dev/console": initramfs.CharDevice(5, 1),
        "proc": initramfs.Directory(),
        "sys": initramfs.Directory(),
    })
