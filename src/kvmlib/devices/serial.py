"""A 16550A UART on the port bus, with its interrupt raised through an irqfd.

The register behaviour is what Linux's 8250 driver relies on: the autoconfig probe (scratch
register, IER read-back, loopback with MSR reflecting MCR), FIFO detection through FCR and IIR,
divisor latches behind LCR.DLAB, transmit with or without THR-empty interrupts, and receive with
received-data interrupts. Output is immediate (THR is always empty again), so LSR always reports
THRE | TEMT.

Interrupts are edges: :class:`EventFdTrigger` signals an eventfd that KVM turns into a pulse on the
in-kernel irqchip (``KVM_IRQFD``), as Firecracker wires its serial port. An edge is sent whenever a
new interrupt condition arises that the guest enabled; the 8250 driver's handler then reads IIR
until no interrupt is pending, so an extra edge costs one handler run, while a missing one would
stall the console.
"""

from __future__ import annotations

import os
import struct
import threading
from collections import deque
from collections.abc import Callable
from typing import BinaryIO, Protocol, Union

from kvmlib.bus import answer_byte
from kvmlib.devices.errors import DeviceError
from kvmlib.resources import Closeable

#: COM1: the ports and the ISA IRQ Linux's ``ttyS0`` expects.
COM1_PORT = 0x3F8
COM1_IRQ = 4
#: The UART occupies 8 ports.
SERIAL_PORT_COUNT = 8
#: How many received bytes the UART buffers for the guest (a real 16550A holds 16; more here keeps
#: pasted input flowing with fewer wake-ups, and the guest cannot tell).
RX_FIFO_SIZE = 64

# Register offsets.
DATA, IER, IIR_FCR, LCR, MCR, LSR, MSR, SCR = range(8)
# IER bits.
IER_RDA, IER_THRE, IER_RLS, IER_MS = 0x01, 0x02, 0x04, 0x08
IER_MASK = 0x0F
# IIR values (bit 0 clear = an interrupt is pending), in priority order.
IIR_NONE, IIR_RLS, IIR_RDA, IIR_THRE, IIR_MS = 0x01, 0x06, 0x04, 0x02, 0x00
IIR_FIFO_ENABLED = 0xC0
# FCR bits.
FCR_ENABLE, FCR_CLEAR_RX = 0x01, 0x02
# LCR / MCR / LSR / MSR bits.
LCR_DLAB = 0x80
MCR_LOOP = 0x10
MCR_MASK = 0x1F
LSR_DR, LSR_OE, LSR_THRE, LSR_TEMT = 0x01, 0x02, 0x20, 0x40
MSR_DELTA_MASK = 0x0F
MSR_CTS, MSR_DSR, MSR_RI, MSR_DCD = 0x10, 0x20, 0x40, 0x80

_STATE = struct.Struct("<BBBBBBBBBBBB")
_STATE_VERSION = 1


class InterruptTrigger(Protocol):
    """What the UART raises its interrupt through."""

    def trigger(self) -> None:
        """Send one interrupt edge."""


class EventFdTrigger(Closeable):
    """An eventfd to register with ``VmFd.register_irqfd``: each :meth:`trigger` is an edge."""

    def __init__(self) -> None:
        self.fd: int = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._closed = False

    def trigger(self) -> None:
        """Signal the eventfd (KVM injects the interrupt)."""
        os.eventfd_write(self.fd, 1)

    def close(self) -> None:
        """Close the eventfd; idempotent."""
        if not self._closed:
            self._closed = True
            os.close(self.fd)



#: Where transmitted bytes go: a binary stream (written and flushed), a callable, or nowhere.
SerialSink = Union[BinaryIO, Callable[[bytes], None], None]


class Serial:
    """A 16550A UART: a :class:`~kvmlib.bus.PioDevice` and a :class:`~kvmlib.bus.StatefulDevice`.

    Register it with ``bus.register_pio(PioRange(COM1_PORT, SERIAL_PORT_COUNT), serial)``.

    Args:
        interrupt: raised on each new interrupt condition the guest enabled.
        output: where the guest's transmitted bytes go.
    """

    def __init__(self, interrupt: InterruptTrigger, output: SerialSink = None) -> None:
        self._interrupt = interrupt
        self._write_out = _sink(output)
        self._lock = threading.Lock()
        self._rx: deque[int] = deque()
        self._reset_registers()

    def _reset_registers(self) -> None:
        self._ier = 0
        self._lcr = 0x03  # 8 data bits, as firmware leaves it
        self._mcr = 0x08  # OUT2: the PC wiring that lets the IRQ through
        self._lsr_errors = 0
        self._msr_delta = 0
        self._scr = 0
        self._dll, self._dlm = 0x0C, 0x00  # 9600 baud
        self._fifo = False
        self._thre_pending = False

    # ---- guest side -------------------------------------------------------------------------

    def pio_read(self, base: int, offset: int, data: memoryview) -> None:
        """A guest ``in``: the register at ``offset`` (wider accesses read it in the first byte)."""
        with self._lock:
            value = self._read(offset)
        answer_byte(data, value)

    def pio_write(self, base: int, offset: int, data: memoryview) -> None:
        """A guest ``out`` of ``data[0]`` to the register at ``offset``."""
        if not len(data):
            return
        with self._lock:
            out, edge = self._write(offset, data[0])
        if out is not None and self._write_out is not None:
            self._write_out(out)
        if edge:
            self._interrupt.trigger()

    def _read(self, offset: int) -> int:
        dlab = self._lcr & LCR_DLAB
        if offset == DATA:
            if dlab:
                return self._dll
            value = self._rx.popleft() if self._rx else 0
            return value
        if offset == IER:
            return self._dlm if dlab else self._ier
        if offset == IIR_FCR:
            iir = self._iir()
            if iir == IIR_THRE:
                self._thre_pending = False  # reading IIR acknowledges THR empty
            return iir | (IIR_FIFO_ENABLED if self._fifo else 0)
        if offset == LCR:
            return self._lcr
        if offset == MCR:
            return self._mcr
        if offset == LSR:
            value = LSR_THRE | LSR_TEMT | self._lsr_errors | (LSR_DR if self._rx else 0)
            self._lsr_errors = 0
            return value
        if offset == MSR:
            value = self._modem_lines() | self._msr_delta
            self._msr_delta = 0
            return value
        if offset == SCR:
            return self._scr
        return 0

    def _write(self, offset: int, value: int) -> tuple[bytes | None, bool]:
        """Apply a register write; returns (bytes to transmit, whether to send an edge)."""
        dlab = self._lcr & LCR_DLAB
        if offset == DATA:
            if dlab:
                self._dll = value
                return None, False
            self._thre_pending = True  # transmitted at once: THR is empty again
            if self._mcr & MCR_LOOP:
                edge = self._receive_one(value)
                return None, edge or bool(self._ier & IER_THRE)
            return bytes([value]), bool(self._ier & IER_THRE)
        if offset == IER:
            if dlab:
                self._dlm = value
                return None, False
            before = self._ier
            self._ier = value & IER_MASK
            enabled = self._ier & ~before
            if enabled & IER_THRE:
                self._thre_pending = True  # THR is empty: the driver expects an interrupt now
            return None, bool((enabled & IER_THRE) or (enabled & IER_RDA and self._rx))
        if offset == IIR_FCR:
            self._fifo = bool(value & FCR_ENABLE)
            if value & FCR_CLEAR_RX:
                self._rx.clear()
            return None, False
        if offset == LCR:
            self._lcr = value
            return None, False
        if offset == MCR:
            before = self._modem_lines()
            self._mcr = value & MCR_MASK
            changed = (before ^ self._modem_lines()) >> 4
            self._msr_delta |= changed & MSR_DELTA_MASK
            return None, bool(changed and self._ier & IER_MS)
        if offset == SCR:
            self._scr = value
        return None, False  # LSR and MSR are read-only; anything else is ignored

    def _iir(self) -> int:
        if self._ier & IER_RLS and self._lsr_errors:
            return IIR_RLS
        if self._ier & IER_RDA and self._rx:
            return IIR_RDA
        if self._ier & IER_THRE and self._thre_pending:
            return IIR_THRE
        if self._ier & IER_MS and self._msr_delta:
            return IIR_MS
        return IIR_NONE

    def _modem_lines(self) -> int:
        if self._mcr & MCR_LOOP:
            # Loopback wires RTS->CTS, DTR->DSR, OUT1->RI, OUT2->DCD: the 8250 probe checks this.
            m = self._mcr
            return ((m & 0x02) << 3) | ((m & 0x01) << 5) | ((m & 0x04) << 4) | ((m & 0x08) << 4)
        return MSR_DCD | MSR_DSR | MSR_CTS  # a connected terminal

    def _receive_one(self, value: int) -> bool:
        if len(self._rx) >= RX_FIFO_SIZE:
            self._lsr_errors |= LSR_OE
            return bool(self._ier & IER_RLS)
        self._rx.append(value)
        return bool(self._ier & IER_RDA)

    # ---- host side --------------------------------------------------------------------------

    def enqueue_input(self, data: bytes) -> int:
        """Offer bytes to the guest; returns how many fit (retry the rest once it reads).

        Thread-safe: vCPU threads read the FIFO while another thread feeds it.
        """
        with self._lock:
            if self._mcr & MCR_LOOP:
                return len(data)  # in loopback the line is disconnected: input is dropped
            taken = min(len(data), RX_FIFO_SIZE - len(self._rx))
            self._rx.extend(data[:taken])
            edge = taken > 0 and bool(self._ier & IER_RDA)
        if edge:
            self._interrupt.trigger()
        return taken

    def rx_space(self) -> int:
        """How many more bytes :meth:`enqueue_input` would take now."""
        with self._lock:
            return RX_FIFO_SIZE - len(self._rx)

    # ---- state ------------------------------------------------------------------------------

    def save_state(self) -> bytes:
        """Registers, divisor, pending-interrupt bookkeeping and the receive FIFO."""
        with self._lock:
            head = _STATE.pack(_STATE_VERSION, self._ier, self._lcr, self._mcr, self._lsr_errors,
                               self._msr_delta, self._scr, self._dll, self._dlm, int(self._fifo),
                               int(self._thre_pending), len(self._rx))
            return head + bytes(self._rx)

    def restore_state(self, state: bytes) -> None:
        """Put back :meth:`save_state`'s bytes; DeviceError (and no change) if they are not valid."""
        if len(state) < _STATE.size:
            raise DeviceError(f"serial state is {len(state)} bytes, shorter than its header")
        (version, ier, lcr, mcr, lsr_errors, msr_delta, scr, dll, dlm, fifo, thre,
         count) = _STATE.unpack_from(state)
        if version != _STATE_VERSION:
            raise DeviceError(f"serial state version {version} is not {_STATE_VERSION}")
        if len(state) != _STATE.size + count or count > RX_FIFO_SIZE:
            raise DeviceError("serial state has a malformed receive FIFO")
        with self._lock:
            self._ier, self._lcr, self._mcr = ier & IER_MASK, lcr, mcr & MCR_MASK
            self._lsr_errors, self._msr_delta, self._scr = lsr_errors, msr_delta, scr
            self._dll, self._dlm, self._fifo, self._thre_pending = dll, dlm, bool(fifo), bool(thre)
            self._rx = deque(state[_STATE.size:])


def _sink(output: SerialSink) -> Callable[[bytes], None] | None:
    if output is None or callable(output):
        return output
    stream = output

    def write(data: bytes) -> None:
        stream.write(data)
        stream.flush()
    return write


__all__ = [
    "COM1_IRQ", "COM1_PORT", "RX_FIFO_SIZE", "SERIAL_PORT_COUNT", "EventFdTrigger",
    "InterruptTrigger", "Serial", "SerialSink",
]
