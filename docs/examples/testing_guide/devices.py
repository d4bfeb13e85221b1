"""A port device for the examples: it records what the guest writes and answers reads."""

from __future__ import annotations

import threading


class Recorder:
    """Records ``out`` per port; an ``in`` gets the next byte of :attr:`inputs` (0 when empty)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.writes: dict[int, list[int]] = {}
        self.inputs: list[int] = []

    def pio_read(self, base: int, offset: int, data: memoryview) -> None:
        with self.lock:
            data[0] = self.inputs.pop(0) if self.inputs else 0

    def pio_write(self, base: int, offset: int, data: memoryview) -> None:
        with self.lock:
            self.writes.setdefault(base + offset, []).append(data[0])

    def clear(self) -> None:
        """Forget what was written (after a reset)."""
        with self.lock:
            self.writes.clear()
            self.inputs.clear()
