"""``python -m kvmlib``: the ``kvmlib`` command (:mod:`kvmlib.cli`).

The built-in demo guest lives in :mod:`kvmlib.demo` (``kvmlib hello``); its names are kept here
too, where they were first published.
"""

from __future__ import annotations

import sys

from kvmlib.cli import main
from kvmlib.demo import (
    AP_CODE,
    AP_MACHINE_CODE,
    AP_SOURCE,
    APS_EXPECTED,
    APS_UP,
    BSP_CODE,
    BSP_MACHINE_CODE,
    BSP_SOURCE,
    CONSOLE_LOCK,
    DATA,
    EXIT_PORT,
    GREETING,
    RAM_SIZE,
    SERIAL_PORT,
    Console,
    ExitPort,
    run_hello,
)

__all__ = [
    "APS_EXPECTED",
    "APS_UP",
    "AP_CODE",
    "AP_MACHINE_CODE",
    "AP_SOURCE",
    "BSP_CODE",
    "BSP_MACHINE_CODE",
    "BSP_SOURCE",
    "CONSOLE_LOCK",
    "DATA",
    "EXIT_PORT",
    "GREETING",
    "RAM_SIZE",
    "SERIAL_PORT",
    "Console",
    "ExitPort",
    "main",
    "run_hello",
]

if __name__ == "__main__":
    sys.exit(main())
