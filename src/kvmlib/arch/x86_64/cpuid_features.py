"""CPUID feature flags by the names ``/proc/cpuinfo`` uses, and a template that hides them.

A CPUID template adapts what the host supports before vCPUs get it (Firecracker's CPU templates
do the same): to make VMs uniform across hosts, or to keep a guest away from an instruction the
host's KVM cannot run. The table covers the leaves that carry feature bits a guest tests: 1, 7.0,
7.1, 0xD.1 and 0x80000001.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

import attrs

from kvmlib.arch.x86_64.cpuid import CpuidEntry


class CpuidTemplate(Protocol):
    """Turns the CPUID a VM would get into the CPUID it gets (applied before per-vCPU filtering)."""

    def __call__(self, entries: tuple[CpuidEntry, ...]) -> tuple[CpuidEntry, ...]:
        """The adapted entries."""


@attrs.define(frozen=True, slots=True)
class FeatureBit:
    """Where a feature flag lives: CPUID leaf, subleaf, register and bit."""

    leaf: int
    subleaf: int
    register: str
    bit: int


def _leaf(leaf: int, subleaf: int, register: str, names: str) -> dict[str, FeatureBit]:
    # ``names`` lists the flags from bit 0 upwards; "-" marks a bit with no cpuinfo name.
    return {name: FeatureBit(leaf, subleaf, register, bit)
            for bit, name in enumerate(names.split()) if name != "-"}


#: Feature flag name -> location.
FEATURES: dict[str, FeatureBit] = {
    **_leaf(1, 0, "edx", "fpu vme de pse tsc msr pae mce cx8 apic - sep mtrr pge mca cmov pat pse36 "
                         "pn clflush - dts acpi mmx fxsr sse sse2 ss ht tm ia64 pbe"),
    **_leaf(1, 0, "ecx", "pni pclmulqdq dtes64 monitor ds_cpl vmx smx est tm2 ssse3 cid sdbg fma "
                         "cx16 xtpr pdcm - pcid dca sse4_1 sse4_2 x2apic movbe popcnt "
                         "tsc_deadline_timer aes xsave osxsave avx f16c rdrand hypervisor"),
    **_leaf(7, 0, "ebx", "fsgsbase tsc_adjust sgx bmi1 hle avx2 fdp_excptn_only smep bmi2 erms "
                         "invpcid rtm cqm - mpx rdt_a avx512f avx512dq rdseed adx smap avx512ifma "
                         "- clflushopt clwb intel_pt avx512pf avx512er avx512cd sha_ni avx512bw "
                         "avx512vl"),
    **_leaf(7, 0, "ecx", "- avx512vbmi umip pku ospke waitpkg avx512_vbmi2 - gfni vaes vpclmulqdq "
                         "avx512_vnni avx512_bitalg tme avx512_vpopcntdq - la57 - - - - - rdpid - "
                         "bus_lock_detect cldemote - movdiri movdir64b enqcmd sgx_lc"),
    **_leaf(7, 0, "edx", "- - avx512_4vnniw avx512_4fmaps fsrm - - - avx512_vp2intersect - "
                         "md_clear - - - serialize - tsxldtrk - pconfig arch_lbr - - amx_bf16 "
                         "avx512_fp16 amx_tile amx_int8 - - flush_l1d arch_capabilities"),
    **_leaf(7, 1, "eax", "- - - - avx_vnni avx512_bf16"),
    **_leaf(0xD, 1, "eax", "xsaveopt xsavec xgetbv1 xsaves"),
    **_leaf(0x80000001, 0, "ecx", "lahf_lm cmp_legacy svm extapic cr8_legacy abm sse4a misalignsse "
                                  "3dnowprefetch osvw ibs xop skinit wdt - lwp fma4 tce - nodeid_msr "
                                  "- tbm topoext perfctr_core perfctr_nb - bpext - perfctr_llc "
                                  "mwaitx"),
    **_leaf(0x80000001, 0, "edx", "- - - - - - - - - - - syscall - - - - - - - - nx - mmxext - - "
                                  "fxsr_opt pdpe1gb rdtscp - lm 3dnowext 3dnow"),
}


class UnknownCpuFeatureError(ValueError):
    """A feature name is not in :data:`FEATURES`."""


def feature_bit(name: str) -> FeatureBit:
    """The location of feature ``name`` (as in /proc/cpuinfo, case-insensitive)."""
    try:
        return FEATURES[name.strip().lower()]
    except KeyError:
        raise UnknownCpuFeatureError(
            f"unknown CPU feature {name!r}; names are those of /proc/cpuinfo, e.g. cx16, xsave, "
            "avx2") from None


def _normalized(names: Iterable[str]) -> tuple[str, ...]:
    return tuple(str(n).strip().lower() for n in names)


@attrs.define(frozen=True, slots=True)
class HideFeatures:
    """A :class:`CpuidTemplate` that clears the given feature flags.

    The guest is told only that the features are absent; the guest kernel drops what depends on
    them (Linux: AVX without XSAVE, and so on).
    """

    names: tuple[str, ...] = attrs.field(converter=_normalized)

    @names.validator
    def _known(self, _attribute: attrs.Attribute[tuple[str, ...]], value: tuple[str, ...]) -> None:
        for name in value:
            feature_bit(name)

    def __call__(self, entries: tuple[CpuidEntry, ...]) -> tuple[CpuidEntry, ...]:
        """The entries with the named bits cleared."""
        masks: dict[tuple[int, int, str], int] = {}
        for name in self.names:
            f = FEATURES[name]
            key = (f.leaf, f.subleaf, f.register)
            masks[key] = masks.get(key, 0) | 1 << f.bit
        out = []
        for entry in entries:
            adapted = entry
            for (leaf, subleaf, register), mask in masks.items():
                if entry.function == leaf and entry.index == subleaf:
                    adapted = attrs.evolve(adapted, **{register: getattr(adapted, register) & ~mask})
            out.append(adapted)
        return tuple(out)


def parse_feature_list(text: str | Iterable[str]) -> tuple[str, ...]:
    """``"cx16,xsave"`` (or an iterable of names) -> checked, normalized names."""
    items = text.split(",") if isinstance(text, str) else list(text)
    names = tuple(n.strip().lower() for n in items if n.strip())
    for name in names:
        feature_bit(name)
    return names


__all__ = [
    "FEATURES", "CpuidTemplate", "FeatureBit", "HideFeatures", "UnknownCpuFeatureError",
    "feature_bit", "parse_feature_list",
]
