"""The docs' Sphinx extension (docs/_ext/kvmlib_docs.py): where references go, what values show.

The docs build itself (``sphinx-build -n -W`` in .ci/run) checks that every reference resolves;
these tests pin down the rules it resolves them by. Sphinx comes with the ``dev`` extra.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

import pytest

pytest.importorskip("sphinx", reason="the docs extension needs Sphinx (the dev extra)")

EXT = Path(__file__).resolve().parent.parent / "docs" / "_ext"


@pytest.fixture(scope="module")
def ext() -> ModuleType:
    sys.path.insert(0, str(EXT))
    try:
        return importlib.import_module("kvmlib_docs")
    finally:
        sys.path.remove(str(EXT))


def test_a_re_exported_name_goes_where_the_object_is_defined(ext: ModuleType) -> None:
    from kvmlib.vm import KvmVm

    assert ext._documented_name("kvmlib.KvmVm", None, None) == ("kvmlib.vm.KvmVm", KvmVm)
    assert ext._documented_name("kvmlib.KvmVm.run", None, None)[0] == "kvmlib.vm.KvmVm.run"
    # A property has no module of its own: it is found through its class.
    assert ext._documented_name("kvmlib.KvmVm.lifecycle", None, None)[0] == "kvmlib.vm.KvmVm.lifecycle"
    # A constant is found where its name is assigned, through the package's re-export.
    assert ext._documented_name("kvmlib.loader.MMIO_GAP_START", None, None)[0] == (
        "kvmlib.loader.layout.MMIO_GAP_START")


def test_a_short_name_is_found_as_the_docstring_s_module_sees_it(ext: ModuleType) -> None:
    # Imported for type checking only, in the module whose docstring names it.
    assert ext._documented_name("Kvm.create_vm", "kvmlib.ioctl.vm", "VmFd")[0] == (
        "kvmlib.ioctl.system.Kvm.create_vm")
    # Not imported there, but exported by an enclosing package.
    assert ext._documented_name("Intr", "kvmlib.ioctl.vcpu", "VcpuFd")[0] == "kvmlib.ioctl.exits.Intr"
    # A module-level name from inside a class's docstring.
    assert ext._documented_name("TRANSITIONS", "kvmlib.runstate", "VcpuRunState")[0] == (
        "kvmlib.runstate.TRANSITIONS")
    assert ext._documented_name("NoSuchThing", "kvmlib.vm", None) is None


def test_hex_is_kept_for_the_values_the_source_writes_in_hex(ext: ModuleType) -> None:
    layout = ext._hex_assignments("kvmlib.loader.layout")
    assert {"MMIO_GAP_START", "HIMEM_START", "CMDLINE_START"} <= layout
    assert "KVM_TSS_ADDRESS" in ext._hex_assignments("kvmlib.vm")
    assert "MAX_VCPUS" not in ext._hex_assignments("kvmlib.vcpu")  # written in decimal
    assert "CHUNK" not in ext._hex_assignments("kvmlib.snapshot")  # 64 << 10


def test_an_attribute_comment_with_a_colon_keeps_its_words(ext: ModuleType) -> None:
    lines = ["COM1: the ports and the ISA IRQ Linux's ``ttyS0`` expects."]
    ext.keep_attribute_docstring(None, "data", "kvmlib.devices.serial.COM1_PORT", 0x3F8, None, lines)
    lines[:] = ["the ports and the ISA IRQ Linux's ``ttyS0`` expects.", "", ":type: COM1"]  # napoleon
    ext.restore_attribute_docstring(None, "data", "kvmlib.devices.serial.COM1_PORT", 0x3F8, None, lines)
    assert lines == ["COM1: the ports and the ISA IRQ Linux's ``ttyS0`` expects."]
    # A function's docstring is napoleon's to rewrite.
    args = ["Args:", "    x: a value."]
    ext.keep_attribute_docstring(None, "function", "f", None, None, args)
    rewritten = [":param x: a value."]
    ext.restore_attribute_docstring(None, "function", "f", None, None, rewritten)
    assert rewritten == [":param x: a value."]


def test_private_bases_give_way_to_their_public_ones(ext: ModuleType) -> None:
    from kvmlib.errors import KvmError, KvmUnavailableError
    from kvmlib.ioctl.system import Kvm
    from kvmlib.resources import Closeable

    bases = list(Kvm.__bases__)
    ext.public_bases(None, "kvmlib.ioctl.system.Kvm", Kvm, None, bases)
    assert bases == [Closeable]
    bases = list(KvmUnavailableError.__bases__)
    ext.public_bases(None, "x", KvmUnavailableError, None, bases)
    assert bases == [KvmError, OSError]
