"""CPUID for a vCPU: an immutable entry type and the per-vCPU filter applied at creation."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import attrs

from kvmlib.ioctl import kvm_cpuid_entry2, make_kvm_cpuid2

_U32 = attrs.validators.and_(attrs.validators.instance_of(int),
                             attrs.validators.ge(0), attrs.validators.lt(1 << 32))

# CPUID.1:ECX[31] is reserved for hypervisors to announce themselves; guests check it.
HYPERVISOR_BIT = 1 << 31
# CPUID.1:EDX[28]: more than one logical processor per package.
HTT_BIT = 1 << 28


@attrs.define(frozen=True, slots=True)
class CpuidEntry:
    """One CPUID leaf/subleaf, as ``struct kvm_cpuid_entry2`` holds it."""

    function: int = attrs.field(validator=_U32)
    index: int = attrs.field(default=0, validator=_U32)
    flags: int = attrs.field(default=0, validator=_U32)
    eax: int = attrs.field(default=0, validator=_U32)
    ebx: int = attrs.field(default=0, validator=_U32)
    ecx: int = attrs.field(default=0, validator=_U32)
    edx: int = attrs.field(default=0, validator=_U32)

    @classmethod
    def from_kvm(cls, e: kvm_cpuid_entry2) -> CpuidEntry:
        """Copy a kernel entry."""
        return cls(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)


def entries_from_kvm_cpuid2(cpuid: Any) -> tuple[CpuidEntry, ...]:
    """The entries of a ``kvm_cpuid2`` as immutable values."""
    return tuple(CpuidEntry.from_kvm(cpuid.entries[i]) for i in range(cpuid.nent))


def to_kvm_cpuid2(entries: Iterable[CpuidEntry]) -> Any:
    """A ``kvm_cpuid2`` for KVM_SET_CPUID2."""
    items = list(entries)
    obj = make_kvm_cpuid2(len(items))
    for slot, e in zip(obj.entries, items, strict=True):
        slot.function, slot.index, slot.flags = e.function, e.index, e.flags
        slot.eax, slot.ebx, slot.ecx, slot.edx = e.eax, e.ebx, e.ecx, e.edx
    return obj


def _bits_for(count: int) -> int:
    """How many low APIC-id bits a topology level of ``count`` members needs."""
    return max(count - 1, 0).bit_length()


def filter_cpuid(entries: Iterable[CpuidEntry], vcpu_id: int, num_vcpus: int) -> tuple[CpuidEntry, ...]:
    """Adapt the host-supported CPUID to one vCPU of a ``num_vcpus`` VM.

    Leaf 1 announces the hypervisor, this vCPU's initial APIC id and the logical processor count;
    leaf 0xB (x2APIC topology) reports one thread per core and ``num_vcpus`` cores, with this
    vCPU's x2APIC id in EDX of every subleaf.
    """
    out = []
    for entry in entries:
        e = entry
        if e.function == 1:
            ebx = (e.ebx & 0x0000FFFF) | ((num_vcpus & 0xFF) << 16) | ((vcpu_id & 0xFF) << 24)
            edx = e.edx | HTT_BIT if num_vcpus > 1 else e.edx & ~HTT_BIT
            e = attrs.evolve(e, ebx=ebx, ecx=e.ecx | HYPERVISOR_BIT, edx=edx)
        elif e.function == 0xB:
            if e.index == 0:  # SMT level: one thread per core
                e = attrs.evolve(e, eax=0, ebx=1, ecx=(1 << 8) | e.index, edx=vcpu_id)
            elif e.index == 1:  # core level: every vCPU a core of one package
                e = attrs.evolve(e, eax=_bits_for(num_vcpus), ebx=num_vcpus,
                                 ecx=(2 << 8) | e.index, edx=vcpu_id)
            else:  # no further levels
                e = attrs.evolve(e, eax=0, ebx=0, ecx=e.index, edx=vcpu_id)
        out.append(e)
    return tuple(out)


__all__ = ["CpuidEntry", "entries_from_kvm_cpuid2", "filter_cpuid", "to_kvm_cpuid2"]
