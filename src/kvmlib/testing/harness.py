"""Building blocks of the pytest plugin, usable without pytest: VMs from code, leak census, waits.

:func:`open_kvm` opens ``/dev/kvm`` or says why it cannot; :func:`make_vm` builds a VM whose vCPU 0
starts at a piece of guest code; :class:`Census` records the descriptors and threads a process has,
so that what a test leaked can be named; :func:`wait_until` polls a condition with a deadline.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import attrs
from typing_extensions import Buffer

from kvmlib.arch.x86_64.cpuid_features import CpuidTemplate
from kvmlib.arch.x86_64.regs import BOOT_DATA_END, BootState
from kvmlib.bus import IoManager
from kvmlib.errors import VmError
from kvmlib.exit_handler import EventExitHandler, ExitHandler
from kvmlib.ioctl import Kvm
from kvmlib.memory import GuestAddress, GuestMemoryMmap
from kvmlib.vm import KvmVm, VmConfig

#: The guest memory :func:`make_vm` gives by default: room for the boot tables, the MP table below
#: 640 KiB, and code at the usual 0x10000.
DEFAULT_MEMORY_SIZE = 2 << 20
#: Where :func:`make_vm` loads code by default.
DEFAULT_ENTRY = 0x10000

_MORE = frozenset({"log_dirty_pages", "cpuid_template", "hugepages"})


def make_vm(kvm: Kvm, code: Buffer, *, num_vcpus: int = 1,
            memory_size: int = DEFAULT_MEMORY_SIZE, bus: IoManager | None = None,
            entry: int = DEFAULT_ENTRY, exit_handler: ExitHandler | None = None,
            **more: Any) -> KvmVm:
    """A VM whose vCPU 0 starts at ``entry`` in 64-bit long mode, with ``code`` loaded there.

    Guest memory is ``memory_size`` bytes of RAM at guest address 0 (``vm.guest_memory``), made here
    and owned by the VM: :meth:`KvmVm.close` closes it too. ``vm.run()`` (no address) starts the guest.

    Args:
        kvm: the open ``/dev/kvm``.
        code: the guest's machine code (see :func:`kvmlib.testing.assemble`).
        num_vcpus: vCPUs; those but 0 wait for INIT/SIPI, as on hardware.
        memory_size: bytes of RAM (a page multiple, at least 1 MiB).
        bus: the devices (an empty bus by default; ``vm.bus`` is it).
        entry: where the code goes and vCPU 0 starts (at or above 0xc000, clear of the boot tables).
        exit_handler: the VM's exit handler (an :class:`~kvmlib.EventExitHandler` by default).
        more: ``log_dirty_pages`` (bool), ``hugepages`` (bool) for the memory; ``cpuid_template``
            for the vCPUs.

    Raises:
        TypeError: an unknown keyword in ``more``.
        VmError: ``entry`` would overlap the boot tables, or the code does not fit in memory.
    """
    unknown = set(more) - _MORE
    if unknown:
        raise TypeError(f"make_vm() got unexpected keyword(s) {sorted(unknown)}; it takes "
                        f"{sorted(_MORE)}")
    data = bytes(memoryview(code).cast("B"))
    if not (entry >= BOOT_DATA_END and entry + len(data) <= memory_size):
        raise VmError(f"code of {len(data)} bytes at {entry:#x} must lie in [{BOOT_DATA_END:#x}, "
                      f"{memory_size:#x}) (below {BOOT_DATA_END:#x} are the boot tables)")
    memory = GuestMemoryMmap.from_ranges(
        [(GuestAddress(0), memory_size)], log_dirty_pages=bool(more.get("log_dirty_pages")),
        hugepages=bool(more.get("hugepages")))
    try:
        memory.write(GuestAddress(entry), data)
        template: CpuidTemplate | None = more.get("cpuid_template")
        config = VmConfig.from_kvm(kvm, num_vcpus, template)
    except BaseException:
        memory.close()
        raise
    # The VM owns the memory from here on: closing the VM is all the caller owes.
    vm = KvmVm.new(kvm, config, memory, exit_handler or EventExitHandler(), bus or IoManager(),
                   own_memory=True)
    try:
        vm.load_boot_state(BootState.long_mode(entry))
    except BaseException:
        vm.close()
        raise
    return vm


def open_kvm() -> Kvm:
    """``Kvm()``; raises :class:`~kvmlib.KvmUnavailableError` saying why it is unusable."""
    return Kvm()


@attrs.define(frozen=True, slots=True)
class Census:
    """The open file descriptors and live threads of this process at one moment."""

    fds: Mapping[int, str]
    threads: Mapping[int, str]

    @classmethod
    def take(cls) -> Census:
        """Read ``/proc/self/fd`` and :func:`threading.enumerate`."""
        fds: dict[int, str] = {}
        for name in os.listdir("/proc/self/fd"):
            try:
                fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
            except OSError:
                continue  # the directory's own fd, gone by now
        return cls(fds, {t.ident or 0: t.name for t in threading.enumerate()})

    def leaked_since(self, before: Census) -> list[str]:
        """What is here now and was not in ``before``, one line each (empty: nothing leaked)."""
        leaks = [f"fd {fd} -> {target}" for fd, target in sorted(self.fds.items())
                 if before.fds.get(fd) != target]
        leaks += [f"thread {name!r}" for ident, name in self.threads.items()
                  if ident not in before.threads]
        return leaks


def wait_until(condition: Callable[[], object], timeout: float = 10.0, what: str = "",
               interval: float = 0.005) -> None:
    """Poll ``condition`` until it is true; raise :class:`TimeoutError` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what or 'the condition'} was not met within {timeout} s")
        time.sleep(interval)


__all__ = ["DEFAULT_ENTRY", "DEFAULT_MEMORY_SIZE", "Census", "make_vm", "open_kvm", "wait_until"]
