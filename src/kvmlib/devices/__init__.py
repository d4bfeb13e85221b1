"""Emulated devices for booting Linux: the 16550A UART and the i8042's reset line."""

from kvmlib.devices.errors import DeviceError
from kvmlib.devices.i8042 import I8042_COMMAND_PORT, I8042_DATA_PORT, I8042Device
from kvmlib.devices.serial import (
    COM1_IRQ,
    COM1_PORT,
    RX_FIFO_SIZE,
    SERIAL_PORT_COUNT,
    EventFdTrigger,
    InterruptTrigger,
    Serial,
    SerialSink,
)

__all__ = [
    "COM1_IRQ",
    "COM1_PORT",
    "I8042_COMMAND_PORT",
    "I8042_DATA_PORT",
    "RX_FIFO_SIZE",
    "SERIAL_PORT_COUNT",
    "DeviceError",
    "EventFdTrigger",
    "I8042Device",
    "InterruptTrigger",
    "Serial",
    "SerialSink",
]
