"""The typed surface: struct annotations match their ctypes fields, and a type checker catches misuse."""

from __future__ import annotations

import ctypes
import inspect
import os
import textwrap
from pathlib import Path
from typing import Any

import pytest

from kvmlib.ioctl import RegsFields, SregsFields, kvm_regs, kvm_sregs, structs
from kvmlib.ioctl.structs import KernelStruct, KernelUnion

_INT_TYPES = (ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64, ctypes.c_int8,
              ctypes.c_int16, ctypes.c_int32, ctypes.c_int64)
_NAMES = {ctypes.c_uint8: "c_uint8", ctypes.c_uint16: "c_uint16", ctypes.c_uint32: "c_uint32",
          ctypes.c_uint64: "c_uint64", ctypes.c_int32: "c_int32", ctypes.c_int64: "c_int64"}


def _element(t: Any) -> str:
    if t in _NAMES:
        return _NAMES[t]
    if isinstance(t, type) and issubclass(t, ctypes.Array):
        return f"Array[{_element(t._type_)}]"
    return str(t.__name__)


def expected_annotation(t: Any) -> str:
    """What a field of ctypes type ``t`` reads as in Python, written as structs.py annotates it."""
    if t in _INT_TYPES:
        return "int"
    if t is ctypes.c_void_p:
        return "int | None"
    char_array = getattr(t, "_type_", None) is ctypes.c_char and issubclass(t, ctypes.Array)
    if char_array or t is ctypes.c_char:
        return "bytes"  # ctypes turns a char array into bytes
    return _element(t)


def kernel_types() -> list[type[Any]]:
    return [t for t in vars(structs).values()
            if isinstance(t, type) and issubclass(t, (KernelStruct, KernelUnion))
            and "_fields_" in t.__dict__ and t.__module__ == structs.__name__]


@pytest.mark.parametrize("struct_type", kernel_types(), ids=lambda t: t.__name__)
def test_every_field_is_annotated_with_the_type_ctypes_gives(struct_type: type[Any]) -> None:
    expected: dict[str, str] = {}
    anonymous = set(getattr(struct_type, "_anonymous_", ()))
    for name, ftype, *_ in struct_type._fields_:
        expected[name] = expected_annotation(ftype)
        if name in anonymous:
            expected.update({sub: expected_annotation(st) for sub, st, *_ in ftype._fields_})
    annotations = {k: v.split("  #")[0] for k, v in inspect.get_annotations(struct_type).items()}
    assert annotations == expected


def test_setting_a_field_that_does_not_exist_is_refused() -> None:
    regs = kvm_regs()
    regs.rip = 0x1000
    with pytest.raises(AttributeError, match="kvm_regs has no field 'ripp'"):
        regs.ripp = 0x1000  # type: ignore[attr-defined]
    with pytest.raises(AttributeError, match="ripp"):
        kvm_regs(ripp=1)


def test_the_register_keywords_are_the_register_fields() -> None:
    assert set(RegsFields.__annotations__) == {name for name, *_ in kvm_regs._fields_}
    assert set(SregsFields.__annotations__) == {
        name for name, *_ in kvm_sregs._fields_} - {"interrupt_bitmap"}


CONSUMER = '''
from kvmlib import GuestAddress, GuestMemoryMmap, KvmVm
from kvmlib.ioctl import kvm_regs

def use(memory: GuestMemoryMmap, vm: KvmVm) -> None:
    regs = kvm_regs()
    regs.rip = 0x1000
    regs.ripp = 0x1000                      # line 8: a register typo
    memory.write(GuestAddress(0x1000), b"\\x90")
    memory.write(b"\\x90", 0x1000)          # line 10: the old, data-first order
    data: bytes = memory.read(0x1000, 4)
    vm.set_vcpu_regs(0, rip=0x1000, rax=1)
    vm.set_vcpu_regs(0, rpi=0x1000)         # line 13: a keyword typo
    vm.vcpus[0].set_sregs(cr3="0x9000")     # line 14: a wrong type
    print(data, vm.vcpu_regs(0).rip + 1)
'''


def test_a_strict_type_checker_catches_register_typos_and_argument_order(tmp_path: Path) -> None:
    api = pytest.importorskip("mypy.api", reason="mypy is not installed (pip install -e '.[dev]')")
    consumer = tmp_path / "consumer.py"
    consumer.write_text(textwrap.dedent(CONSUMER))
    out, err, status = api.run([str(consumer), "--strict", "--no-incremental",
                                "--cache-dir", os.devnull, "--show-error-codes"])
    errors = sorted({int(line.split(":")[1]) for line in out.splitlines()
                     if line.startswith(str(consumer)) and ": error:" in line})
    assert errors == [8, 10, 13, 14], out + err
    assert status == 1
