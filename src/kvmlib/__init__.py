"""kvmlib: drive Linux KVM from Python.

The layers, lowest first: :mod:`kvmlib.ioctl` (the kernel ABI and one wrapper per fd kind),
:mod:`kvmlib.memory` (guest memory), :mod:`kvmlib.vcpu`, :mod:`kvmlib.vm` and
:mod:`kvmlib.exit_handler` (the VM lifecycle). Everything a user needs is re-exported here.
"""

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
    KernelBufferError,
    KvmError,
    KvmIoctlError,
    KvmUnavailableError,
    SnapshotError,
    VcpuError,
    VmError,
)
from kvmlib.exit_handler import EventExitHandler, ExitHandler
from kvmlib.ioctl import (
    Cap,
    FailEntry,
    Hlt,
    InternalError,
    Intr,
    IoIn,
    IoOut,
    Kvm,
    MmioRead,
    MmioWrite,
    Shutdown,
    SystemEvent,
    Unknown,
    VcpuExit,
    VcpuFd,
    VmFd,
)
from kvmlib.memory import GuestAddress, GuestMemoryMmap, GuestRegionMmap
from kvmlib.memory_image import MemoryImage
from kvmlib.reset import VmSnapshot
from kvmlib.runstate import LifecycleState, VcpuRunState, VmRunState
from kvmlib.state import DeviceState, VcpuState, VmState
from kvmlib.vcpu import KvmVcpu, Vcpu, VcpuConfig, VcpuConfigList
from kvmlib.vm import KvmVm, Vm, VmConfig

__version__ = "0.1.0"

__all__ = [
    "BusError",
    "Cap",
    "ClosedError",
    "DeviceState",
    "DirtyBitmap",
    "EventExitHandler",
    "ExitHandler",
    "FailEntry",
    "GuestAddress",
    "GuestMemoryError",
    "GuestMemoryMmap",
    "GuestRegionMmap",
    "Hlt",
    "InternalError",
    "Intr",
    "IoIn",
    "IoManager",
    "IoOut",
    "KernelBufferError",
    "Kvm",
    "KvmError",
    "KvmIoctlError",
    "KvmUnavailableError",
    "KvmVcpu",
    "KvmVm",
    "LifecycleState",
    "MemoryImage",
    "MmioDevice",
    "MmioRange",
    "MmioRead",
    "MmioWrite",
    "PioDevice",
    "PioRange",
    "Shutdown",
    "SnapshotError",
    "StatefulDevice",
    "SystemEvent",
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
    "__version__",
]
