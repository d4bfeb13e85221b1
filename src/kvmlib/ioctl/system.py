"""``/dev/kvm``: the system fd wrapper, :class:`Kvm`."""

from __future__ import annotations

import os

from kvmlib._platform import unsupported_platform
from kvmlib.errors import KvmUnavailableError
from kvmlib.ioctl.fd import _FdOwner
from kvmlib.ioctl.numbers import (
    KVM_API_VERSION,
    KVM_CHECK_EXTENSION,
    KVM_CREATE_VM,
    KVM_GET_API_VERSION,
    KVM_GET_MSR_INDEX_LIST,
    KVM_GET_SUPPORTED_CPUID,
    KVM_GET_VCPU_MMAP_SIZE,
)
from kvmlib.ioctl.structs import (
    kvm_cpuid2,
    make_kvm_cpuid2,
    make_kvm_msr_list,
)
from kvmlib.ioctl.vm import VmFd


class Kvm(_FdOwner):
    """``/dev/kvm``: the system fd. Checks the API version on open.

    Args:
        path: the KVM device node.

    Raises:
        KvmUnavailableError: the device is missing, not permitted, or speaks another API version.
    """

    def __init__(self, path: str = "/dev/kvm") -> None:
        unsupported = unsupported_platform()
        if unsupported is not None:
            raise KvmUnavailableError(unsupported)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError as e:
            raise KvmUnavailableError(
                f"{path} does not exist: load the KVM module (modprobe kvm_intel or kvm_amd) and "
                "check that virtualization is enabled in the firmware", e.errno) from e
        except PermissionError as e:
            raise KvmUnavailableError(
                f"no permission to open {path}: add your user to the 'kvm' group "
                "(then log in again) or adjust the device's permissions", e.errno) from e
        except OSError as e:
            raise KvmUnavailableError(f"cannot open {path}: {e.strerror}", e.errno) from e
        super().__init__(fd)
        self._path = path
        version = self.get_api_version()
        if version != KVM_API_VERSION:
            self.close()
            raise KvmUnavailableError(
                f"{path} speaks KVM API version {version}; kvmlib needs {KVM_API_VERSION}"
            )

    def get_api_version(self) -> int:
        """KVM_GET_API_VERSION (always 12 on any kernel kvmlib supports)."""
        return self._ioctl_int("KVM_GET_API_VERSION", KVM_GET_API_VERSION)

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION: 0 when ``cap`` is unsupported, else a positive, cap-specific value."""
        return self._ioctl_int("KVM_CHECK_EXTENSION", KVM_CHECK_EXTENSION, int(cap))

    def get_vcpu_mmap_size(self) -> int:
        """KVM_GET_VCPU_MMAP_SIZE: the size of a vCPU's ``kvm_run`` mapping."""
        return self._ioctl_int("KVM_GET_VCPU_MMAP_SIZE", KVM_GET_VCPU_MMAP_SIZE)

    @property
    def vcpu_mmap_size(self) -> int:
        """The size of a vCPU's ``kvm_run`` mapping (KVM_GET_VCPU_MMAP_SIZE)."""
        return self.get_vcpu_mmap_size()

    def _describe(self) -> str:
        return f"the Kvm handle on {self._path}"

    def get_supported_cpuid(self, max_entries: int = 256) -> kvm_cpuid2:
        """KVM_GET_SUPPORTED_CPUID: a ``kvm_cpuid2`` trimmed to the entries the kernel filled.

        ``max_entries`` is only the first guess: a larger list is fetched whole.
        """
        obj = self._get_growing("KVM_GET_SUPPORTED_CPUID", KVM_GET_SUPPORTED_CPUID,
                                make_kvm_cpuid2, "nent", max_entries)
        return make_kvm_cpuid2(obj.entries[i] for i in range(obj.nent))

    def get_msr_index_list(self, max_entries: int = 256) -> list[int]:
        """KVM_GET_MSR_INDEX_LIST: the MSRs KVM saves and restores.

        ``max_entries`` is only the first guess: a longer list is fetched whole.
        """
        obj = self._get_growing("KVM_GET_MSR_INDEX_LIST", KVM_GET_MSR_INDEX_LIST,
                                make_kvm_msr_list, "nmsrs", max_entries)
        return [obj.indices[i] for i in range(obj.nmsrs)]

    def create_vm(self) -> VmFd:
        """KVM_CREATE_VM: a new, empty VM."""
        fd = self._ioctl_int("KVM_CREATE_VM", KVM_CREATE_VM, 0)
        try:
            mmap_size = self.get_vcpu_mmap_size()
        except BaseException:
            os.close(fd)
            raise
        return VmFd(fd, mmap_size)




