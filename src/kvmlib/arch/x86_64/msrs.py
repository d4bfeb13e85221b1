"""Model-specific registers a vCPU boots with."""

from __future__ import annotations

MSR_IA32_TSC = 0x10
MSR_IA32_SYSENTER_CS = 0x174
MSR_IA32_SYSENTER_ESP = 0x175
MSR_IA32_SYSENTER_EIP = 0x176
MSR_IA32_MISC_ENABLE = 0x1A0
MSR_MTRR_DEF_TYPE = 0x2FF
MSR_STAR = 0xC0000081
MSR_LSTAR = 0xC0000082
MSR_CSTAR = 0xC0000083
MSR_SYSCALL_MASK = 0xC0000084
MSR_KERNEL_GS_BASE = 0xC0000102

MSR_IA32_MISC_ENABLE_FAST_STRING = 1 << 0
MTRR_ENABLE = 1 << 11
MTRR_MEM_TYPE_WB = 6


def boot_msr_entries() -> dict[int, int]:
    """The MSR values a 64-bit boot expects: syscall MSRs cleared, fast strings, write-back MTRR."""
    return {
        MSR_IA32_SYSENTER_CS: 0,
        MSR_IA32_SYSENTER_ESP: 0,
        MSR_IA32_SYSENTER_EIP: 0,
        MSR_STAR: 0,
        MSR_CSTAR: 0,
        MSR_KERNEL_GS_BASE: 0,
        MSR_SYSCALL_MASK: 0,
        MSR_LSTAR: 0,
        MSR_IA32_TSC: 0,
        MSR_IA32_MISC_ENABLE: MSR_IA32_MISC_ENABLE_FAST_STRING,
        # Without an enabled default memory type every access would be uncached.
        MSR_MTRR_DEF_TYPE: MTRR_ENABLE | MTRR_MEM_TYPE_WB,
    }


__all__ = ["boot_msr_entries"]
