"""The one shape of every kvmlib resource owner: ``close()``, and ``with`` to call it."""

from __future__ import annotations

import abc
from types import TracebackType

from typing_extensions import Self


class Closeable(abc.ABC):
    """A mixin: subclasses implement :meth:`close` (idempotent) and get the context manager."""

    __slots__ = ()

    @abc.abstractmethod
    def close(self) -> None:
        """Release what the object owns; calling it again does nothing."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


__all__ = ["Closeable"]
