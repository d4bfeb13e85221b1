"""kvmlib: drive Linux KVM from Python.

The layers, lowest first: :mod:`kvmlib.ioctl` (the kernel ABI and one wrapper per fd kind),
:mod:`kvmlib.memory` (guest memory), :mod:`kvmlib.vcpu`, :mod:`kvmlib.vm` and
:mod:`kvmlib.exit_handler` (the VM lifecycle). Everything a user needs is re-exported here.
"""

from kvmlib.errors import (
    GuestMemoryError,
    KvmError,
    KvmIoctlError,
    KvmUnavailableError,
    VcpuError,
    VmError,
)
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

__version__ = "0.1.0"

__all__ = [
    "Cap",
    "FailEntry",
    "GuestAddress",
    "GuestMemoryError",
    "GuestMemoryMmap",
    "GuestRegionMmap",
    "Hlt",
    "InternalError",
    "Intr",
    "IoIn",
    "IoOut",
    "Kvm",
    "KvmError",
    "KvmIoctlError",
    "KvmUnavailableError",
    "MmioRead",
    "MmioWrite",
    "Shutdown",
    "SystemEvent",
    "Unknown",
    "VcpuError",
    "VcpuExit",
    "VcpuFd",
    "VmError",
    "VmFd",
    "__version__",
]
