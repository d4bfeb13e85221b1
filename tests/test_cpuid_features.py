"""CPUID templates: hiding feature flags by their /proc/cpuinfo names."""

from __future__ import annotations

import pytest

from kvmlib import Kvm
from kvmlib.arch.x86_64.cpuid import CpuidEntry
from kvmlib.arch.x86_64.cpuid_features import (
    FEATURES,
    HideFeatures,
    UnknownCpuFeatureError,
    feature_bit,
    parse_feature_list,
)
from kvmlib.exit_handler import EventExitHandler
from kvmlib.vm import KvmVm, VmConfig

from .snapshot_guests import CODE, COUNT_PORT, DONE_PORT, Counter, counting_bus, memory_with


def test_well_known_flags_sit_where_the_sdm_puts_them() -> None:
    assert feature_bit("cx16") == FEATURES["cx16"] and (FEATURES["cx16"].register, FEATURES["cx16"].bit) \
        == ("ecx", 13)
    assert (FEATURES["xsave"].leaf, FEATURES["xsave"].register, FEATURES["xsave"].bit) == (1, "ecx", 26)
    assert (FEATURES["sse2"].register, FEATURES["sse2"].bit) == ("edx", 26)
    assert (FEATURES["avx2"].leaf, FEATURES["avx2"].register, FEATURES["avx2"].bit) == (7, "ebx", 5)
    assert (FEATURES["lm"].leaf, FEATURES["lm"].register, FEATURES["lm"].bit) == (0x80000001, "edx", 29)
    assert (FEATURES["xsaveopt"].leaf, FEATURES["xsaveopt"].subleaf) == (0xD, 1)


def test_hide_clears_only_the_named_bits() -> None:
    leaf1 = CpuidEntry(1, ecx=0xFFFFFFFF, edx=0xFFFFFFFF)
    other = CpuidEntry(7, ebx=0xFFFFFFFF)
    out = HideFeatures(["CX16", " xsave"])((leaf1, other))
    assert out[0].ecx == 0xFFFFFFFF & ~(1 << 13) & ~(1 << 26)
    assert out[0].edx == 0xFFFFFFFF and out[1] == other


def test_unknown_names_are_refused_with_a_hint() -> None:
    with pytest.raises(UnknownCpuFeatureError, match="/proc/cpuinfo"):
        HideFeatures(["cx17"])
    assert parse_feature_list("cx16, xsave,,") == ("cx16", "xsave")


CPUID_LEAF1_ECX_TO_PORT = bytes([
    0xB8, 0x01, 0x00, 0x00, 0x00,  # mov eax, 1
    0x31, 0xC9,                    # xor ecx, ecx
    0x0F, 0xA2,                    # cpuid
    0x89, 0xC8,                    # mov eax, ecx
    0xE7, COUNT_PORT,              # out COUNT_PORT, eax
    0xE6, DONE_PORT,               # out DONE_PORT, al
    0xFA, 0xF4,                    # cli; hlt
])


@pytest.mark.parametrize("hidden", [(), ("cx16",)])
def test_the_guest_sees_the_template_s_cpuid(kvm: Kvm, hidden: tuple[str, ...]) -> None:
    counter = Counter()
    config = VmConfig.from_kvm(kvm, 1, HideFeatures(hidden))
    with memory_with(CPUID_LEAF1_ECX_TO_PORT) as memory, \
            KvmVm.new(kvm, config, memory, EventExitHandler(), counting_bus(counter)) as vm:
        vm.run(CODE)
        assert counter.wait_done()
        (ecx,) = counter.values
    assert bool(ecx & 1 << 13) == (_host_has(kvm, 13) and not hidden)
    assert ecx & 1 << 31  # the hypervisor bit is still announced


def _host_has(kvm: Kvm, bit: int) -> bool:
    cpuid = kvm.get_supported_cpuid()
    leaf1 = next(cpuid.entries[i] for i in range(cpuid.nent) if cpuid.entries[i].function == 1)
    return bool(leaf1.ecx & 1 << bit)
