"""The saved state of a VM: vCPUs, in-kernel devices, bus devices, and its encoding.

Kernel structures are kept as their raw bytes (exactly what the GET ioctls returned), so a state is
hashable, comparable and cheap to encode; their sizes are checked when a state is built, so a
state that decodes always fits the structures it will be given back to. The encoding is JSON with
base64 for the binary parts: small (a few KiB per vCPU), versioned, and readable with any tool.
"""

from __future__ import annotations

import base64
import binascii
import ctypes
import json
from collections.abc import Iterable
from typing import Any

import attrs

from kvmlib.errors import SnapshotError
from kvmlib.ioctl import (
    KernelStruct,
    kvm_clock_data,
    kvm_cpuid_entry2,
    kvm_debugregs,
    kvm_irqchip,
    kvm_lapic_state,
    kvm_pit_state2,
    kvm_regs,
    kvm_sregs,
    kvm_vcpu_events,
    kvm_xcrs,
    kvm_xsave,
)

#: The version of :class:`VmState` this library writes; states of other versions are refused.
STATE_VERSION = 1


def _exact(ctype: type[KernelStruct]) -> Any:
    size = ctypes.sizeof(ctype)

    def check(_inst: object, attribute: attrs.Attribute[bytes], value: bytes) -> None:
        if not isinstance(value, bytes) or len(value) != size:
            got = len(value) if isinstance(value, bytes) else type(value).__name__
            raise SnapshotError(f"{attribute.name} must be the {size} bytes of {ctype.__name__}, "
                                f"not {got}")
    return check


def _xsave_size(_inst: object, attribute: attrs.Attribute[bytes], value: bytes) -> None:
    if not isinstance(value, bytes) or len(value) < ctypes.sizeof(kvm_xsave):
        raise SnapshotError(f"{attribute.name} must be an XSAVE area of at least "
                            f"{ctypes.sizeof(kvm_xsave)} bytes")


def _cpuid_size(_inst: object, attribute: attrs.Attribute[bytes], value: bytes) -> None:
    entry = ctypes.sizeof(kvm_cpuid_entry2)
    if not isinstance(value, bytes) or not value or len(value) % entry:
        raise SnapshotError(f"{attribute.name} must be whole kvm_cpuid_entry2 records ({entry} bytes)")


def _msr_pairs(values: Iterable[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    pairs = tuple((int(i), int(v)) for i, v in values)
    if any(not (0 <= i < 1 << 32 and 0 <= v < 1 << 64) for i, v in pairs):
        raise SnapshotError("MSR indices must fit 32 bits and values 64 bits")
    return pairs


@attrs.define(frozen=True, slots=True)
class VcpuState:
    """One vCPU's state, in the order KVM needs it back (see :meth:`kvmlib.KvmVcpu.restore_state`)."""

    id: int
    cpuid: bytes = attrs.field(validator=_cpuid_size)
    mp_state: int
    regs: bytes = attrs.field(validator=_exact(kvm_regs))
    sregs: bytes = attrs.field(validator=_exact(kvm_sregs))
    xsave: bytes = attrs.field(validator=_xsave_size)
    xcrs: bytes = attrs.field(validator=_exact(kvm_xcrs))
    debugregs: bytes = attrs.field(validator=_exact(kvm_debugregs))
    lapic: bytes = attrs.field(validator=_exact(kvm_lapic_state))
    msrs: tuple[tuple[int, int], ...] = attrs.field(converter=_msr_pairs)
    vcpu_events: bytes = attrs.field(validator=_exact(kvm_vcpu_events))

    @property
    def rip(self) -> int:
        """The saved instruction pointer (handy in tests and logs)."""
        return int(kvm_regs.from_buffer_copy(self.regs).rip)


@attrs.define(frozen=True, slots=True)
class DeviceState:
    """The state of one :class:`~kvmlib.bus.StatefulDevice` on the bus.

    Attributes:
        space: ``"pio"`` or ``"mmio"``.
        base: the first port or address of the device's first range (its identity on the bus).
        kind: the device's class name, to say what did not match when restoring.
        data: what the device's ``save_state`` returned.
    """

    space: str = attrs.field(validator=attrs.validators.in_(("pio", "mmio")))
    base: int
    kind: str
    data: bytes

    @property
    def key(self) -> tuple[str, int]:
        """Where the device sits: ``(space, base)``."""
        return self.space, self.base


def _tuple(values: Iterable[Any]) -> tuple[Any, ...]:
    return tuple(values)


def _layout(values: Iterable[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    return tuple((int(start), int(size)) for start, size in values)


@attrs.define(frozen=True, slots=True)
class VmState:
    """Everything needed to rebuild a paused VM, apart from guest memory's contents.

    Attributes:
        memory: the guest memory layout, ``(start, size)`` per region.
        vcpus: one state per vCPU, in id order.
        pit2, clock, pic_master, pic_slave, ioapic: the in-kernel devices' and clock's structures.
        devices: the bus devices that have state.
        version: :data:`STATE_VERSION` when written by this library.
    """

    memory: tuple[tuple[int, int], ...] = attrs.field(converter=_layout)
    vcpus: tuple[VcpuState, ...] = attrs.field(converter=_tuple)
    pit2: bytes = attrs.field(validator=_exact(kvm_pit_state2))
    clock: bytes = attrs.field(validator=_exact(kvm_clock_data))
    pic_master: bytes = attrs.field(validator=_exact(kvm_irqchip))
    pic_slave: bytes = attrs.field(validator=_exact(kvm_irqchip))
    ioapic: bytes = attrs.field(validator=_exact(kvm_irqchip))
    devices: tuple[DeviceState, ...] = attrs.field(converter=_tuple, default=())
    version: int = STATE_VERSION

    def __attrs_post_init__(self) -> None:
        if self.version != STATE_VERSION:
            raise SnapshotError(f"VM state version {self.version} is not supported (this kvmlib "
                                f"reads version {STATE_VERSION})")
        if not self.vcpus:
            raise SnapshotError("a VM state needs at least one vCPU")
        if [v.id for v in self.vcpus] != list(range(len(self.vcpus))):
            raise SnapshotError("vCPU states must have ids 0..n-1 in order")
        if not self.memory:
            raise SnapshotError("a VM state needs a memory layout")
        keys = [d.key for d in self.devices]
        if len(set(keys)) != len(keys):
            raise SnapshotError("two device states claim the same bus position")

    @property
    def num_vcpus(self) -> int:
        """How many vCPUs the state describes."""
        return len(self.vcpus)

    def to_bytes(self) -> bytes:
        """The JSON encoding (UTF-8), deterministic for equal states."""
        return json.dumps(_encode(self), sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> VmState:
        """Decode :meth:`to_bytes`; raises SnapshotError naming what is malformed."""
        try:
            doc = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SnapshotError(f"VM state is not valid JSON: {e}") from None
        if not isinstance(doc, dict):
            raise SnapshotError("VM state must be a JSON object")
        version = doc.get("version")
        if version != STATE_VERSION:
            raise SnapshotError(f"VM state version {version!r} is not supported (this kvmlib reads "
                                f"version {STATE_VERSION})")
        try:
            return _decode(doc)
        except SnapshotError:
            raise
        except (KeyError, TypeError, ValueError, binascii.Error) as e:
            raise SnapshotError(f"VM state is malformed: {type(e).__name__}: {e}") from None


_BLOBS_VCPU = ("cpuid", "regs", "sregs", "xsave", "xcrs", "debugregs", "lapic", "vcpu_events")
_BLOBS_VM = ("pit2", "clock", "pic_master", "pic_slave", "ioapic")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: Any) -> bytes:
    if not isinstance(text, str):
        raise TypeError(f"expected base64 text, not {type(text).__name__}")
    return base64.b64decode(text, validate=True)


def _encode(state: VmState) -> dict[str, Any]:
    doc: dict[str, Any] = {name: _b64(getattr(state, name)) for name in _BLOBS_VM}
    doc["version"] = state.version
    doc["memory"] = [list(r) for r in state.memory]
    doc["vcpus"] = [
        {"id": v.id, "mp_state": v.mp_state, "msrs": [list(p) for p in v.msrs],
         **{name: _b64(getattr(v, name)) for name in _BLOBS_VCPU}}
        for v in state.vcpus
    ]
    doc["devices"] = [{"space": d.space, "base": d.base, "kind": d.kind, "data": _b64(d.data)}
                      for d in state.devices]
    return doc


def _int(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"expected an integer, not {value!r}")
    return value


def _decode(doc: dict[str, Any]) -> VmState:
    vcpus = [
        VcpuState(id=_int(v["id"]), mp_state=_int(v["mp_state"]),
                  msrs=[(_int(i), _int(x)) for i, x in v["msrs"]],
                  **{name: _unb64(v[name]) for name in _BLOBS_VCPU})
        for v in doc["vcpus"]
    ]
    devices = [DeviceState(str(d["space"]), _int(d["base"]), str(d["kind"]), _unb64(d["data"]))
               for d in doc["devices"]]
    return VmState(memory=[(_int(a), _int(b)) for a, b in doc["memory"]], vcpus=vcpus,
                   devices=devices, version=_int(doc["version"]),
                   **{name: _unb64(doc[name]) for name in _BLOBS_VM})


__all__ = ["STATE_VERSION", "DeviceState", "VcpuState", "VmState"]
