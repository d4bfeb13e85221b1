"""How a VM tells its owner that a vCPU has stopped.

Every vCPU thread calls :meth:`ExitHandler.kick` once when its loop ends, whatever the reason, so a
main loop can wake up and decide (usually: :meth:`kvmlib.KvmVm.shutdown`). Subclass
:class:`ExitHandler` to plug kvmlib into your own event loop, or use :class:`EventExitHandler`.
"""

from __future__ import annotations

import abc
import threading

from typing_extensions import override


class ExitHandler(abc.ABC):
    """The contract between a VM and its owner: one method, called from vCPU threads."""

    @abc.abstractmethod
    def kick(self) -> None:
        """A vCPU's loop has ended. Called from that vCPU's thread; must not block for long."""


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


__all__ = ["EventExitHandler", "ExitHandler"]
