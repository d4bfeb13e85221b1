"""Helpers that turn a hang into a test failure: every call runs with a deadline."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import pytest

T = TypeVar("T")

#: Long enough for any lifecycle call on a loaded machine; a hang is what it catches.
DEADLINE = 10.0


class Outcome:
    """What a call did: returned ``value`` or raised ``error``."""

    def __init__(self) -> None:
        self.value: Any = None
        self.error: BaseException | None = None
        self.done = threading.Event()

    def get(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.value


def _call(fn: Callable[[], Any], outcome: Outcome, start: threading.Barrier | None) -> None:
    try:
        if start is not None:
            start.wait()
        outcome.value = fn()
    except BaseException as e:
        outcome.error = e
    finally:
        outcome.done.set()


def bounded(fn: Callable[[], T], timeout: float = DEADLINE, what: str = "") -> T:
    """``fn()`` on a helper thread; fails the test if it has not returned within ``timeout``."""
    outcome = Outcome()
    thread = threading.Thread(target=_call, args=(fn, outcome, None), daemon=True)
    thread.start()
    if not outcome.done.wait(timeout):
        pytest.fail(f"{what or getattr(fn, '__name__', 'call')} did not return within {timeout} s")
    thread.join()
    result: T = outcome.get()
    return result


def together(fns: Sequence[Callable[[], Any]], timeout: float = DEADLINE) -> list[Outcome]:
    """Start every call at the same moment (a barrier), each on its own thread; fail on a hang."""
    start = threading.Barrier(len(fns))
    outcomes = [Outcome() for _ in fns]
    threads = [threading.Thread(target=_call, args=(fn, o, start), daemon=True)
               for fn, o in zip(fns, outcomes, strict=True)]
    for t in threads:
        t.start()
    for i, o in enumerate(outcomes):
        if not o.done.wait(timeout):
            pytest.fail(f"call {i} of {len(fns)} run together did not return within {timeout} s")
    for t in threads:
        t.join()
    return outcomes
