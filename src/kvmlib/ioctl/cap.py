"""``KVM_CAP_*``: the capabilities kvmlib asks ``KVM_CHECK_EXTENSION`` about."""

from __future__ import annotations

from enum import IntEnum


class Cap(IntEnum):
    """KVM capabilities for :meth:`Kvm.check_extension` (``KVM_CAP_*``)."""

    KVM_CAP_IRQCHIP = 0
    KVM_CAP_HLT = 1
    KVM_CAP_USER_MEMORY = 3
    KVM_CAP_SET_TSS_ADDR = 4
    KVM_CAP_EXT_CPUID = 7
    KVM_CAP_NR_VCPUS = 9
    KVM_CAP_NR_MEMSLOTS = 10
    KVM_CAP_PIT = 11
    KVM_CAP_MP_STATE = 14
    KVM_CAP_SYNC_MMU = 16
    KVM_CAP_USER_NMI = 22
    KVM_CAP_SET_GUEST_DEBUG = 23
    KVM_CAP_IRQ_ROUTING = 25
    KVM_CAP_IRQFD = 32
    KVM_CAP_PIT2 = 33
    KVM_CAP_PIT_STATE2 = 35
    KVM_CAP_IOEVENTFD = 36
    KVM_CAP_SET_IDENTITY_MAP_ADDR = 37
    KVM_CAP_ADJUST_CLOCK = 39
    KVM_CAP_INTERNAL_ERROR_DATA = 40
    KVM_CAP_VCPU_EVENTS = 41
    KVM_CAP_DEBUGREGS = 50
    KVM_CAP_XSAVE = 55
    KVM_CAP_XCRS = 56
    KVM_CAP_MAX_VCPUS = 66
    KVM_CAP_READONLY_MEM = 81
    KVM_CAP_MAX_VCPU_ID = 128
    KVM_CAP_IMMEDIATE_EXIT = 136
    KVM_CAP_XSAVE2 = 208


