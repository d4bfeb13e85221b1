"""What `import kvmlib` does: it works on any platform, binds little, and `Kvm()` says what it needs."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from kvmlib._platform import unsupported_platform

# Run before `import kvmlib` in a fresh interpreter: what the platform lacks is taken away.
PRELUDES = {
    "windows": """
        sys.modules["fcntl"] = None  # ImportError, as on Windows
        sys.modules["termios"] = None
        def no_cdll(*args, **kwargs):
            raise TypeError("LoadLibrary() argument 1 must be str, not None")
        ctypes.CDLL = no_cdll
        sys.platform = "win32"
        platform.machine = lambda: "AMD64"
    """,
    "macos": """
        sys.platform = "darwin"
        platform.machine = lambda: "arm64"
    """,
    "linux-arm64": """
        platform.machine = lambda: "aarch64"
    """,
}


@pytest.mark.parametrize("host", sorted(PRELUDES))
def test_import_works_anywhere_and_kvm_names_the_requirement(host: str) -> None:
    script = "import ctypes, platform, signal, sys\n"
    if host != "linux-arm64":
        script += "del signal.SIGRTMIN, signal.SIGRTMAX  # no real-time signals\n"
    script += textwrap.dedent(PRELUDES[host]) + textwrap.dedent("""
        import kvmlib
        from kvmlib import ioctl, vcpu, vm  # the modules `import kvmlib` binds system calls in
        try:
            kvmlib.Kvm()
        except kvmlib.KvmUnavailableError as e:
            print(e)
        else:
            print("no error")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    machine = {"windows": "amd64", "macos": "arm64", "linux-arm64": "aarch64"}[host]
    platform_name = {"windows": "win32", "macos": "darwin", "linux-arm64": "linux"}[host]
    assert done.stdout.strip() == ("kvmlib needs Linux on x86-64 (it drives KVM through "
                                   f"/dev/kvm); this is {platform_name} on {machine}")


def test_this_host_is_supported() -> None:
    assert unsupported_platform() is None


def test_the_heavier_parts_are_imported_on_first_use_only() -> None:
    script = textwrap.dedent("""
        import sys
        import kvmlib
        heavy = ("kvmlib.vmm", "kvmlib.snapshot", "kvmlib.migration")
        print([m for m in heavy if m in sys.modules])
        from kvmlib import MigrationError, Vmm, migrate, receive, save_snapshot
        print([m for m in heavy if m in sys.modules], migrate.__module__, issubclass(
            MigrationError, kvmlib.KvmError), sorted({"migrate", "receive", "Vmm"} - set(dir(kvmlib))))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "[]", "['kvmlib.vmm', 'kvmlib.snapshot', 'kvmlib.migration'] kvmlib.migration True []"]
