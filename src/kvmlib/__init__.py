"""kvmlib: drive Linux KVM from Python.

The layers, lowest first: :mod:`kvmlib.ioctl` (the kernel ABI and one wrapper per fd kind),
:mod:`kvmlib.memory` (guest memory), :mod:`kvmlib.vcpu`, :mod:`kvmlib.vm` and
:mod:`kvmlib.exit_handler` (the VM lifecycle). Everything a user needs is re-exported here.
"""

import importlib
from typing import TYPE_CHECKING

from kvmlib.arch.x86_64.cpuid_features import HideFeatures
from kvmlib.bus import (
    BusError,
    IoManager,
    MmioDevice,
    MmioRange,
    PioDevice,
    PioRange,
    StatefulDevice,
)
from kvmlib.dirty import DirtyBitmap
from kvmlib.errors import (
    ClosedError,
    GuestMemoryError,
    GuestMemoryMapError,
    KernelBufferError,
    KvmError,
    KvmIoctlError,
    KvmUnavailableError,
    SnapshotError,
    VcpuError,
    VmError,
)
from kvmlib.exit_handler import EventExitHandler, ExitHandler, ExitingVcpu
from kvmlib.ioctl import (
    Cap,
    Debug,
    ExceptionExit,
    FailEntry,
    GuestDebug,
    Hlt,
    Hypercall,
    InternalError,
    Intr,
    IoIn,
    IoOut,
    IrqWindowOpen,
    Kvm,
    MmioRead,
    MmioWrite,
    Shutdown,
    SystemEvent,
    SystemEventKind,
    Undecoded,
    Unknown,
    VcpuExit,
    VcpuFd,
    VmFd,
    X86Rdmsr,
    X86Wrmsr,
)
from kvmlib.memory import GuestAddress, GuestMemoryMmap, GuestRegionMmap
from kvmlib.memory_image import MemoryImage
from kvmlib.reset import ResetTimings, VmSnapshot
from kvmlib.runstate import LifecycleState, VcpuRunState, VmRunState
from kvmlib.state import DeviceState, VcpuState, VmState
from kvmlib.vcpu import (
    InlineResult,
    KvmVcpu,
    StopReason,
    Vcpu,
    VcpuConfig,
    VcpuConfigList,
    setup_signal_handler,
)
from kvmlib.vm import KvmVm, Vm, VmConfig

__version__ = "0.1.0"

if TYPE_CHECKING:
    from kvmlib.migration import MigrationError, MigrationStats, migrate, receive
    from kvmlib.snapshot import load_snapshot, restore_snapshot, save_snapshot
    from kvmlib.vmm import Vmm, VmmConfig

# Imported on first use: the VMM, snapshot files and migration bring in what most users of the VM layer never
# need (terminal handling, hashing, JSON, a thread pool).
_LAZY = {
    "Vmm": "kvmlib.vmm", "VmmConfig": "kvmlib.vmm", "load_snapshot": "kvmlib.snapshot",
    "restore_snapshot": "kvmlib.snapshot", "save_snapshot": "kvmlib.snapshot",
    "migrate": "kvmlib.migration", "receive": "kvmlib.migration",
    "MigrationError": "kvmlib.migration", "MigrationStats": "kvmlib.migration",
}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'kvmlib' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "BusError",
    "Cap",
    "ClosedError",
    "Debug",
    "DeviceState",
    "DirtyBitmap",
    "EventExitHandler",
    "ExceptionExit",
    "ExitHandler",
    "ExitingVcpu",
    "FailEntry",
    "GuestAddress",
    "GuestDebug",
    "GuestMemoryError",
    "GuestMemoryMapError",
    "GuestMemoryMmap",
    "GuestRegionMmap",
    "HideFeatures",
    "Hlt",
    "Hypercall",
    "InlineResult",
    "InternalError",
    "Intr",
    "IoIn",
    "IoManager",
    "IoOut",
    "IrqWindowOpen",
    "KernelBufferError",
    "Kvm",
    "KvmError",
    "KvmIoctlError",
    "KvmUnavailableError",
    "KvmVcpu",
    "KvmVm",
    "LifecycleState",
    "MemoryImage",
    "MigrationError",
    "MigrationStats",
    "MmioDevice",
    "MmioRange",
    "MmioRead",
    "MmioWrite",
    "PioDevice",
    "PioRange",
    "ResetTimings",
    "Shutdown",
    "SnapshotError",
    "StatefulDevice",
    "StopReason",
    "SystemEvent",
    "SystemEventKind",
    "Undecoded",
    "Unknown",
    "Vcpu",
    "VcpuConfig",
    "VcpuConfigList",
    "VcpuError",
    "VcpuExit",
    "VcpuFd",
    "VcpuRunState",
    "VcpuState",
    "Vm",
    "VmConfig",
    "VmError",
    "VmFd",
    "VmRunState",
    "VmSnapshot",
    "VmState",
    "Vmm",
    "VmmConfig",
    "X86Rdmsr",
    "X86Wrmsr",
    "__version__",
    "load_snapshot",
    "migrate",
    "receive",
    "restore_snapshot",
    "save_snapshot",
    "setup_signal_handler",
]
