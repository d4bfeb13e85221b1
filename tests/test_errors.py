"""Python's error conventions: OS errors are OSErrors, closed objects raise ValueError, leaks warn."""

from __future__ import annotations

import errno
import gc
import pickle
import threading
from pathlib import Path

import pytest

from kvmlib import (
    ClosedError,
    EventExitHandler,
    GuestMemoryMapError,
    GuestMemoryMmap,
    GuestRegionMmap,
    IoManager,
    Kvm,
    KvmError,
    KvmIoctlError,
    KvmUnavailableError,
    KvmVm,
    VmConfig,
)

from .concurrency import DEADLINE
from .vm_guests import BSP_CODE, SPIN, memory_with


def test_a_failed_ioctl_is_an_os_error_with_its_errno_and_cause(kvm: Kvm) -> None:
    with kvm.create_vm() as vm, pytest.raises(KvmIoctlError) as info:
        vm.set_user_memory_region(0, 0, 0x1001, 0, 0)  # a size that is not page aligned
    error = info.value
    assert isinstance(error, OSError) and isinstance(error, KvmError)
    assert error.errno == errno.EINVAL and error.strerror == "Invalid argument"
    assert str(error).startswith("KVM_SET_USER_MEMORY_REGION failed: [EINVAL]")
    assert isinstance(error.__cause__, OSError)
    copy = pickle.loads(pickle.dumps(error))
    assert (type(copy), str(copy), copy.errno, copy.ioctl) == (
        KvmIoctlError, str(error), error.errno, error.ioctl)


def test_an_unusable_device_is_an_os_error_with_the_open_errno(tmp_path: Path) -> None:
    with pytest.raises(KvmUnavailableError, match="does not exist") as info:
        Kvm(str(tmp_path / "kvm"))
    assert isinstance(info.value, OSError) and info.value.errno == errno.ENOENT
    assert isinstance(info.value.__cause__, FileNotFoundError)


def test_a_mapping_the_os_refuses_is_an_os_error(tmp_path: Path) -> None:
    with pytest.raises(GuestMemoryMapError, match="cannot open") as info:
        GuestRegionMmap.from_file(0, 0x1000, tmp_path / "missing")
    assert isinstance(info.value, OSError) and info.value.errno == errno.ENOENT
    assert isinstance(info.value.__cause__, FileNotFoundError)


def test_closed_objects_raise_value_error_as_files_do(kvm: Kvm) -> None:
    memory = memory_with({BSP_CODE: SPIN})
    vm = KvmVm.new(kvm, VmConfig.from_kvm(kvm, 1), memory, EventExitHandler(), IoManager())
    vcpu_fd, vm_fd = vm.vcpus[0].vcpu_fd, vm.fd
    vm.close()
    memory.close()
    for call in (vcpu_fd.get_regs, vcpu_fd.run, vm_fd.get_clock, lambda: vm.vcpu_regs(0),
                 vm.save_state, lambda: memory.read(0, 1)):
        with pytest.raises(ValueError, match="closed") as info:
            call()
        assert isinstance(info.value, ClosedError)
    other = Kvm()
    other.close()
    with pytest.raises(ClosedError):
        other.check_extension(0)


def _collect() -> None:
    for _ in range(3):
        gc.collect()


def test_owners_collected_unclosed_say_so(kvm: Kvm) -> None:
    with pytest.warns(ResourceWarning, match="unclosed the Kvm handle"):
        Kvm()
        _collect()
    with pytest.warns(ResourceWarning, match="unclosed this VmFd"):
        kvm.create_vm()
        _collect()
    with pytest.warns(ResourceWarning, match="unclosed <GuestMemoryMmap 1 regions>"):
        GuestMemoryMmap.from_ranges([(0, 0x10000)])
        _collect()


def test_a_vm_collected_unclosed_says_so_and_stops_its_vcpus(kvm: Kvm) -> None:
    memory = memory_with({BSP_CODE: SPIN})
    vm = KvmVm.new(kvm, VmConfig.from_kvm(kvm, 2), memory, EventExitHandler(), IoManager())
    vm.run(BSP_CODE)
    with pytest.warns(ResourceWarning, match=r"unclosed <KvmVm 2 vCPUs, running>"):
        del vm
        _collect()
    # The finalizer cannot join, but it told the vCPUs to stop: their threads end.
    for thread in [t for t in threading.enumerate() if t.name.startswith("vcpu_")]:
        thread.join(DEADLINE)
        assert not thread.is_alive()
    _collect()
    memory.close()
