"""How a VM tells its owner that a vCPU has stopped, and offers it the exits kvmlib does not handle.

Every vCPU thread calls :meth:`ExitHandler.kick` once when its loop ends, whatever the reason, so a
main loop can wake up and decide (usually: :meth:`kvmlib.KvmVm.shutdown`). Subclass
:class:`ExitHandler` to plug kvmlib into your own event loop, or use :class:`EventExitHandler`.

The vCPU loop hands port and MMIO exits to the bus; every other exit (a debug event, a hypercall, a
user-space MSR access, ``hlt``, a shutdown, an error) is first offered to
:meth:`ExitHandler.handle_exit`, on the vCPU's own thread. Return True and the guest runs on; the
default returns False, and kvmlib stops the vCPU (normally for ``hlt``, a shutdown or a system
event, with a :class:`~kvmlib.VcpuError` for anything else).
"""

from __future__ import annotations

import abc
import threading
from collections.abc import Sequence
from typing import Protocol

from typing_extensions import Unpack, override

from kvmlib.ioctl import (
    GuestDebug,
    RegsFields,
    SregsFields,
    VcpuExit,
    VcpuFd,
    kvm_regs,
    kvm_sregs,
)


class ExitingVcpu(Protocol):
    """What :meth:`ExitHandler.handle_exit` can do with the vCPU that exited (a ``KvmVcpu``)."""

    @property
    def id(self) -> int:
        """The vCPU id."""

    @property
    def vcpu_fd(self) -> VcpuFd:
        """The vCPU's fd wrapper, for any other ioctl."""

    def get_regs(self) -> kvm_regs:
        """The general-purpose registers."""

    def set_regs(self, regs: kvm_regs | None = None, /, **fields: Unpack[RegsFields]) -> kvm_regs:
        """Set registers (``set_regs(rip=...)`` changes only those named)."""

    def get_sregs(self) -> kvm_sregs:
        """The special registers."""

    def set_sregs(self, sregs: kvm_sregs | None = None, /,
                  **fields: Unpack[SregsFields]) -> kvm_sregs:
        """Set special registers (``set_sregs(cr3=...)`` changes only those named)."""

    def set_guest_debug(self, flags: GuestDebug, breakpoints: Sequence[int] = ()) -> None:
        """Single-step, software or hardware breakpoints (see ``KvmVcpu.set_guest_debug``)."""


class ExitHandler(abc.ABC):
    """The contract between a VM and its owner, called from vCPU threads.

    Implement :meth:`kick`; override :meth:`handle_exit` to handle exits kvmlib does not.
    """

    @abc.abstractmethod
    def kick(self) -> None:
        """A vCPU's loop has ended. Called from that vCPU's thread; must not block for long."""

    def handle_exit(self, vcpu: ExitingVcpu, exit: VcpuExit) -> bool:
        """Handle an exit the bus did not; return True to keep the guest running.

        Called on the vCPU's thread with the vCPU paused in user space: the registers may be read
        and written, and an exit the VMM answers (:class:`~kvmlib.X86Rdmsr`,
        :class:`~kvmlib.Hypercall`) answered, before the guest goes on. An exception ends the vCPU
        and is raised by the VM's owner (``shutdown()`` / ``wait()`` / ``close()``).

        The default handles nothing (False): kvmlib then ends the vCPU, normally for
        :class:`~kvmlib.Hlt`, :class:`~kvmlib.Shutdown` and :class:`~kvmlib.SystemEvent`, with a
        :class:`~kvmlib.VcpuError` for anything else.
        """
        return False


class EventExitHandler(ExitHandler):
    """An :class:`ExitHandler` backed by a :class:`threading.Event`.

    ``keep_running`` is True until the first kick; :meth:`wait` blocks until then.
    """

    def __init__(self) -> None:
        self._stopped = threading.Event()
        self._kicks = 0

    @override
    def kick(self) -> None:
        """Record the kick and wake every waiter."""
        self._kicks += 1
        self._stopped.set()

    @property
    def keep_running(self) -> bool:
        """False once any vCPU has ended."""
        return not self._stopped.is_set()

    @property
    def kicks(self) -> int:
        """How many times :meth:`kick` has been called."""
        return self._kicks

    def wait(self, timeout: float | None = None) -> bool:
        """Block until a kick (True) or until ``timeout`` seconds pass (False)."""
        return self._stopped.wait(timeout)


__all__ = ["EventExitHandler", "ExitHandler", "ExitingVcpu"]
