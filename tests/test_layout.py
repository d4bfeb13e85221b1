"""Every structure and ioctl number in kvmlib.ioctl, proved against the installed <linux/kvm.h>.

And kvmlib._sigaction's mirror of glibc's ``struct sigaction``, against <signal.h>.

A C program is generated from kvmlib's own tables, compiled with gcc against the system headers and run;
each ``sizeof``, ``offsetof`` and macro value it prints is compared with what ctypes / kvmlib says.
"""

from __future__ import annotations

import ctypes
import shutil
import signal
import subprocess
from ctypes import Structure, Union
from pathlib import Path
from typing import Any

import pytest

from kvmlib import _sigaction, ioctl

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is not installed")


def _is_aggregate(t: Any) -> bool:
    return isinstance(t, type) and issubclass(t, (Structure, Union))


def layout_checks(struct_type: type[Any], c_name: str) -> dict[str, tuple[str, int]]:
    """Map a check's key to (C expression, the value ctypes gives) for a struct and its members."""
    checks: dict[str, tuple[str, int]] = {
        f"sizeof {c_name}": (f"sizeof(struct {c_name})", ctypes.sizeof(struct_type))
    }

    def walk(t: Any, c_prefix: str, base: int) -> None:
        anonymous = set(getattr(t, "_anonymous_", ()))
        for spec in t._fields_:
            name, ftype = spec[0], spec[1]
            if len(spec) == 3:  # bit-fields have no offsetof in C
                continue
            descr = getattr(t, name)
            off = base + descr.offset
            if name in anonymous:
                walk(ftype, c_prefix, off)
                continue
            path = f"{c_prefix}{name}"
            checks[f"offsetof {c_name}.{path}"] = (f"offsetof(struct {c_name}, {path})", off)
            if getattr(ftype, "_length_", None) == 0:
                # A flexible array member: C has no size for it, but its element has one.
                checks[f"sizeof {c_name}.{path}[0]"] = (
                    f"sizeof(((struct {c_name} *)0)->{path}[0])", ctypes.sizeof(ftype._type_))
            else:
                checks[f"sizeof {c_name}.{path}"] = (
                    f"sizeof(((struct {c_name} *)0)->{path})", ctypes.sizeof(ftype))
            if _is_aggregate(ftype):
                walk(ftype, f"{path}.", off)

    walk(struct_type, "", 0)
    return checks


def constant_checks() -> dict[str, tuple[str, int]]:
    """Every KVM_* integer (ioctl numbers, exit reasons, flags) and every capability."""
    checks = {}
    for name in dir(ioctl):
        value = getattr(ioctl, name)
        if name.startswith("KVM_") and isinstance(value, int):
            checks[f"macro {name}"] = (f"(unsigned long)({name})", int(value))
    for cap in ioctl.Cap:
        checks[f"macro {cap.name}"] = (f"(unsigned long)({cap.name})", int(cap))
    return checks


def run_c(checks: dict[str, tuple[str, int]], workdir: Path,
          headers: tuple[str, ...] = ("linux/kvm.h",)) -> dict[str, int]:
    """Compile and run a program printing every check's C value."""
    lines = ["#include <stddef.h>", "#include <stdio.h>",
             *(f"#include <{h}>" for h in headers), "int main(void) {"]
    for key, (expr, _) in checks.items():
        lines.append(f'    printf("%s=%lu\\n", "{key}", (unsigned long)({expr}));')
    lines += ["    return 0;", "}"]
    src = workdir / "layout.c"
    src.write_text("\n".join(lines) + "\n")
    exe = workdir / "layout"
    subprocess.run(["gcc", "-std=gnu11", "-o", str(exe), str(src)], check=True,
                   capture_output=True, text=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    return {k: int(v) for k, v in (line.rsplit("=", 1) for line in out.splitlines())}


def mismatches(checks: dict[str, tuple[str, int]], workdir: Path,
               headers: tuple[str, ...] = ("linux/kvm.h",)) -> list[str]:
    """The checks whose C value differs from kvmlib's."""
    c_values = run_c(checks, workdir, headers)
    return [f"{key}: kvmlib {want} != C {c_values[key]}"
            for key, (_, want) in checks.items() if c_values[key] != want]


def test_every_structure_matches_the_kernel_headers(tmp_path: Path) -> None:
    checks: dict[str, tuple[str, int]] = {}
    for st in ioctl.KERNEL_STRUCTS:
        checks.update(layout_checks(st, st.__name__))
    assert len(checks) > 400  # every struct and member is really being compared
    assert mismatches(checks, tmp_path) == []


def test_every_ioctl_number_and_constant_matches_the_kernel_headers(tmp_path: Path) -> None:
    checks = constant_checks()
    assert "macro KVM_RUN" in checks and "macro KVM_GET_XSAVE" in checks
    assert mismatches(checks, tmp_path) == []


def test_the_layout_check_detects_a_wrong_structure(tmp_path: Path) -> None:
    # kvm_regs with rbx and rcx swapped and one register missing: the same comparison must object.
    names = [f[0] for f in ioctl.kvm_regs._fields_]
    names[1], names[2] = names[2], names[1]
    wrong = type("kvm_regs", (Structure,), {"_fields_": [(n, ctypes.c_uint64) for n in names[:-1]]})
    found = mismatches(layout_checks(wrong, "kvm_regs"), tmp_path)
    assert "sizeof kvm_regs: kvmlib 136 != C 144" in found
    assert any(m.startswith("offsetof kvm_regs.rbx") for m in found)


def test_the_constant_check_detects_a_wrong_number(tmp_path: Path) -> None:
    wrong = {"macro KVM_RUN": ("(unsigned long)(KVM_RUN)", ioctl.KVM_RUN + 1)}
    assert mismatches(wrong, tmp_path) == [
        f"macro KVM_RUN: kvmlib {ioctl.KVM_RUN + 1} != C {ioctl.KVM_RUN}"]


def test_struct_sigaction_matches_glibc(tmp_path: Path) -> None:
    checks: dict[str, tuple[str, int]] = {}
    for st in _sigaction.GLIBC_STRUCTS:
        checks.update(layout_checks(st, st.__name__))
    # sa_handler and sa_sigaction (through glibc's macros), the 1024-bit mask, flags and restorer.
    for key in ("sizeof sigaction", "offsetof sigaction.sa_handler",
                "offsetof sigaction.sa_sigaction", "sizeof sigaction.sa_mask",
                "offsetof sigaction.sa_mask.__val", "offsetof sigaction.sa_flags",
                "offsetof sigaction.sa_restorer"):
        assert key in checks
    assert checks["sizeof sigaction.sa_mask"][1] == 1024 // 8
    checks["macro SIG_DFL"] = ("(unsigned long)SIG_DFL", _sigaction.SIG_DFL)
    checks["macro SIG_IGN"] = ("(unsigned long)SIG_IGN", _sigaction.SIG_IGN)
    # The signal kvmlib kicks vCPUs with: glibc decides SIGRTMIN at run time.
    checks["macro SIGRTMIN"] = ("(unsigned long)SIGRTMIN", int(signal.SIGRTMIN))
    assert mismatches(checks, tmp_path, ("signal.h",)) == []
