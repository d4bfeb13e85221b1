"""The part of an i8042 keyboard controller a VMM needs: the CPU-reset line, and a quiet probe.

Linux resets an x86 machine through the i8042 (``reboot=k``, and the fallback of the default
method) by writing 0xFE to the command port. Here that ends the VM through the ``reset`` callback
(vmm-reference raises an interrupt instead). Writing the output port with bit 0 clear (command
0xD1, then the byte) pulls the same reset line on real hardware, so it resets too.

No keyboard or mouse is attached: the controller answers the commands Linux's i8042 driver probes
with (controller self test, command byte, interface tests) so that the driver finds an empty
controller and moves on instead of waiting on timeouts, and ignores the rest.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable

from kvmlib.bus import answer_byte
from kvmlib.devices.errors import DeviceError

I8042_DATA_PORT = 0x60
I8042_COMMAND_PORT = 0x64

# Commands (written to the command port).
CMD_READ_CTR = 0x20
CMD_WRITE_CTR = 0x60
CMD_AUX_DISABLE = 0xA7
CMD_AUX_ENABLE = 0xA8
CMD_AUX_TEST = 0xA9
CMD_SELF_TEST = 0xAA
CMD_KBD_TEST = 0xAB
CMD_KBD_DISABLE = 0xAD
CMD_KBD_ENABLE = 0xAE
CMD_READ_OUTPUT_PORT = 0xD0
CMD_WRITE_OUTPUT_PORT = 0xD1
CMD_RESET_CPU = 0xFE

# Status register bits.
STATUS_OBF = 0x01   # output buffer full: a byte waits at the data port
STATUS_SYS = 0x04   # the system flag: self test passed
STATUS_CMD = 0x08   # the last write went to the command port

SELF_TEST_OK = 0x55
INTERFACE_OK = 0x00
#: Output port: bit 0 is the CPU reset line (active low), bit 1 the A20 gate.
OUTPUT_PORT_DEFAULT = 0x03
#: Controller configuration byte at power-on: keyboard interrupt on, system flag, translation.
CTR_DEFAULT = 0x45

_STATE = struct.Struct("<BBBBBBB")
_STATE_VERSION = 1


class I8042Device:
    """An i8042 on ports 0x60 and 0x64; a :class:`~kvmlib.bus.PioDevice` and a ``StatefulDevice``.

    Register it on two one-port ranges (0x61, between them, belongs to the PIT's speaker)::

        bus.register_pio(PioRange(I8042_DATA_PORT, 1), i8042)
        bus.register_pio(PioRange(I8042_COMMAND_PORT, 1), i8042)

    Args:
        reset: called (on the vCPU's thread, once per reset command) when the guest resets the CPU.
    """

    def __init__(self, reset: Callable[[], None]) -> None:
        self._reset = reset
        self._lock = threading.Lock()
        self._ctr = CTR_DEFAULT
        self._output_port = OUTPUT_PORT_DEFAULT
        self._out: int | None = None
        self._pending: int | None = None   # a command waiting for its data byte
        self._last_was_command = False
        self.resets = 0

    def pio_read(self, base: int, offset: int, data: memoryview) -> None:
        """The status register (0x64) or the output buffer (0x60, which empties it)."""
        with self._lock:
            if base == I8042_COMMAND_PORT:
                value = STATUS_SYS | (STATUS_OBF if self._out is not None else 0) | (
                    STATUS_CMD if self._last_was_command else 0)
            else:
                value, self._out = (self._out or 0), None
        answer_byte(data, value)

    def pio_write(self, base: int, offset: int, data: memoryview) -> None:
        """A command (0x64) or a command's data byte (0x60)."""
        if not len(data):
            return
        value = data[0]
        with self._lock:
            reset = self._command(value) if base == I8042_COMMAND_PORT else self._data(value)
        if reset:
            self.resets += 1
            self._reset()

    def _command(self, cmd: int) -> bool:
        self._last_was_command = True
        self._pending = None
        if cmd == CMD_RESET_CPU:
            return True
        if cmd == CMD_READ_CTR:
            self._out = self._ctr
        elif cmd in (CMD_WRITE_CTR, CMD_WRITE_OUTPUT_PORT):
            self._pending = cmd
        elif cmd == CMD_SELF_TEST:
            self._out = SELF_TEST_OK
        elif cmd in (CMD_KBD_TEST, CMD_AUX_TEST):
            self._out = INTERFACE_OK
        elif cmd == CMD_READ_OUTPUT_PORT:
            self._out = self._output_port
        # 0xA7/0xA8/0xAD/0xAE (enable/disable) and anything else: accepted, nothing to answer.
        return False

    def _data(self, value: int) -> bool:
        self._last_was_command = False
        pending, self._pending = self._pending, None
        if pending == CMD_WRITE_CTR:
            self._ctr = value
        elif pending == CMD_WRITE_OUTPUT_PORT:
            self._output_port = value
            return not value & 0x01  # the reset line is active low
        # Without a pending command the byte is for the keyboard, and there is none.
        return False

    def save_state(self) -> bytes:
        """The command byte, output port, output buffer and a pending command."""
        with self._lock:
            return _STATE.pack(_STATE_VERSION, self._ctr, self._output_port,
                               int(self._out is not None), self._out or 0,
                               self._pending or 0, int(self._last_was_command))

    def restore_state(self, state: bytes) -> None:
        """Put back :meth:`save_state`'s bytes; DeviceError (and no change) if they are not valid."""
        if len(state) != _STATE.size:
            raise DeviceError(f"i8042 state must be {_STATE.size} bytes, not {len(state)}")
        version, ctr, output_port, has_out, out, pending, last_cmd = _STATE.unpack(state)
        if version != _STATE_VERSION:
            raise DeviceError(f"i8042 state version {version} is not {_STATE_VERSION}")
        if pending not in (0, CMD_WRITE_CTR, CMD_WRITE_OUTPUT_PORT):
            raise DeviceError(f"i8042 state has an impossible pending command {pending:#x}")
        with self._lock:
            self._ctr, self._output_port = ctr, output_port
            self._out = out if has_out else None
            self._pending = pending or None
            self._last_was_command = bool(last_cmd)


__all__ = ["I8042_COMMAND_PORT", "I8042_DATA_PORT", "I8042Device"]
