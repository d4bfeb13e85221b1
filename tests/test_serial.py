"""The 16550A UART against the register sequences Linux's 8250 driver performs."""

from __future__ import annotations

import io
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvmlib import GuestAddress, GuestMemoryMmap, Kvm
from kvmlib.bus import IoManager, PioRange
from kvmlib.devices import COM1_IRQ, COM1_PORT, RX_FIFO_SIZE, DeviceError, EventFdTrigger, Serial
from kvmlib.exit_handler import EventExitHandler
from kvmlib.vm import KvmVm, VmConfig

DATA, IER, IIR, FCR, LCR, MCR, LSR, MSR, SCR = 0, 1, 2, 2, 3, 4, 5, 6, 7


class Edges:
    """Counts interrupt edges."""

    def __init__(self) -> None:
        self.count = 0

    def trigger(self) -> None:
        self.count += 1


class Uart:
    """Drives a Serial the way a driver does: inb/outb on offsets."""

    def __init__(self) -> None:
        self.edges = Edges()
        self.out = bytearray()
        self.serial = Serial(self.edges, self.out.extend)

    def inb(self, offset: int) -> int:
        buf = bytearray(1)
        self.serial.pio_read(COM1_PORT, offset, memoryview(buf))
        return buf[0]

    def outb(self, offset: int, value: int) -> None:
        self.serial.pio_write(COM1_PORT, offset, memoryview(bytes([value])))


@pytest.fixture
def uart() -> Uart:
    return Uart()


def test_the_scratch_register_holds_what_was_written(uart: Uart) -> None:
    for value in (0xA5, 0x5A):
        uart.outb(SCR, value)
        assert uart.inb(SCR) == value


def test_ier_reads_back_its_four_low_bits(uart: Uart) -> None:
    # autoconfig(): write 0x0F, expect 0x0F; write 0, expect 0.
    uart.outb(IER, 0xFF)
    assert uart.inb(IER) == 0x0F
    uart.outb(IER, 0)
    assert uart.inb(IER) == 0


def test_loopback_reflects_mcr_in_msr_as_the_probe_expects(uart: Uart) -> None:
    uart.outb(MCR, 0x10 | 0x0A)  # LOOP | OUT2 | RTS
    assert uart.inb(MSR) & 0xF0 == 0x90  # DCD | CTS
    uart.outb(MCR, 0x10 | 0x05)  # LOOP | OUT1 | DTR
    assert uart.inb(MSR) & 0xF0 == 0x60  # RI | DSR


def test_loopback_sends_transmitted_bytes_back_and_nothing_out(uart: Uart) -> None:
    uart.outb(MCR, 0x10)
    uart.outb(DATA, 0x42)
    assert uart.inb(LSR) & 0x01 and uart.inb(DATA) == 0x42
    assert not uart.out


def test_fifo_enable_shows_in_iir_as_a_16550a(uart: Uart) -> None:
    uart.outb(FCR, 0x01)
    assert uart.inb(IIR) & 0xC0 == 0xC0
    uart.outb(FCR, 0x00)
    assert uart.inb(IIR) & 0xC0 == 0


def test_dlab_switches_offsets_0_and_1_to_the_divisor(uart: Uart) -> None:
    uart.outb(IER, 0x01)
    uart.outb(LCR, 0x80 | 0x03)
    uart.outb(DATA, 0x01)  # DLL: 115200 baud
    uart.outb(IER, 0x00)   # DLM
    assert (uart.inb(DATA), uart.inb(IER)) == (0x01, 0x00)
    uart.outb(LCR, 0x03)
    assert uart.inb(IER) == 0x01  # IER untouched by the divisor writes
    assert uart.inb(LCR) == 0x03


def test_polled_transmit_outputs_exactly_the_bytes(uart: Uart) -> None:
    for byte in b"Linux version":
        assert uart.inb(LSR) & 0x60 == 0x60  # THRE | TEMT: ready
        uart.outb(DATA, byte)
    assert bytes(uart.out) == b"Linux version"
    assert uart.edges.count == 0  # no interrupts asked for, none sent


def test_enabling_thre_interrupts_raises_one_at_once(uart: Uart) -> None:
    uart.outb(IER, 0x02)
    assert uart.edges.count == 1
    assert uart.inb(IIR) & 0x0F == 0x02
    assert uart.inb(IIR) & 0x0F == 0x01  # reading IIR acknowledged it


def test_each_transmitted_byte_raises_thre_again(uart: Uart) -> None:
    uart.outb(IER, 0x02)
    uart.inb(IIR)
    uart.outb(DATA, ord("a"))
    uart.outb(DATA, ord("b"))
    assert uart.edges.count == 3
    assert uart.inb(IIR) & 0x0F == 0x02
    assert bytes(uart.out) == b"ab"


def test_received_bytes_raise_rda_and_read_in_order(uart: Uart) -> None:
    uart.outb(IER, 0x01)
    assert uart.serial.enqueue_input(b"ls\n") == 3
    assert uart.edges.count == 1
    assert uart.inb(IIR) & 0x0F == 0x04
    got = bytearray()
    while uart.inb(LSR) & 0x01:
        got.append(uart.inb(DATA))
    assert bytes(got) == b"ls\n"
    assert uart.inb(IIR) & 0x0F == 0x01


def test_rda_has_priority_over_thre(uart: Uart) -> None:
    uart.outb(IER, 0x03)
    uart.serial.enqueue_input(b"x")
    assert uart.inb(IIR) & 0x0F == 0x04
    uart.inb(DATA)
    assert uart.inb(IIR) & 0x0F == 0x02


def test_a_full_fifo_takes_no_more_and_the_host_keeps_the_rest(uart: Uart) -> None:
    assert uart.serial.enqueue_input(bytes(RX_FIFO_SIZE + 10)) == RX_FIFO_SIZE
    assert uart.serial.rx_space() == 0
    uart.inb(DATA)
    assert uart.serial.enqueue_input(b"abc") == 1


def test_loopback_overrun_sets_oe_until_lsr_is_read(uart: Uart) -> None:
    uart.outb(MCR, 0x10)
    for _ in range(RX_FIFO_SIZE + 1):
        uart.outb(DATA, 0x11)
    assert uart.inb(LSR) & 0x02
    assert not uart.inb(LSR) & 0x02


def test_fcr_clears_the_receive_fifo(uart: Uart) -> None:
    uart.serial.enqueue_input(b"junk")
    uart.outb(FCR, 0x01 | 0x02)
    assert not uart.inb(LSR) & 0x01


def test_state_round_trips_and_bad_state_is_refused(uart: Uart) -> None:
    uart.outb(IER, 0x01)
    uart.outb(LCR, 0x83)
    uart.outb(DATA, 0x01)
    uart.outb(LCR, 0x03)
    uart.serial.enqueue_input(b"hi")
    state = uart.serial.save_state()
    other = Uart()
    other.serial.restore_state(state)
    assert other.serial.save_state() == state
    assert (other.inb(IER), other.inb(DATA), other.inb(DATA)) == (0x01, ord("h"), ord("i"))
    with pytest.raises(DeviceError, match="version"):
        other.serial.restore_state(b"\x09" + state[1:])
    with pytest.raises(DeviceError, match="FIFO"):
        other.serial.restore_state(state + b"x")
    assert other.serial.save_state() != state  # the FIFO was read, and the bad states changed nothing


def test_output_to_a_binary_stream_is_flushed_per_byte() -> None:
    stream = io.BytesIO()
    serial = Serial(Edges(), stream)
    serial.pio_write(COM1_PORT, DATA, memoryview(b"A"))
    assert stream.getvalue() == b"A"


@given(st.lists(st.tuples(st.integers(0, 7), st.integers(0, 255), st.booleans()), max_size=60))
def test_no_guest_access_sequence_raises(ops: list[tuple[int, int, bool]]) -> None:
    uart = Uart()
    for offset, value, is_write in ops:
        if is_write:
            uart.outb(offset, value)
        else:
            uart.inb(offset)
    wide = bytearray(4)
    uart.serial.pio_read(COM1_PORT, LSR, memoryview(wide))
    assert wide[1:] == b"\0\0\0"


def test_event_fd_trigger_counts_edges() -> None:
    with EventFdTrigger() as trigger:
        trigger.trigger()
        trigger.trigger()
        assert os.eventfd_read(trigger.fd) == 2


HELLO = bytes([
    0x66, 0xBA, 0xF8, 0x03,        # mov dx, 0x3f8
    *b"".join(bytes([0xB0, c, 0xEE]) for c in b"hello\n"),  # mov al, c; out dx, al
    0xB0, 0x00, 0xE6, 0x80,        # mov al, 0; out 0x80, al   (done)
    0xFA, 0xF4,                    # cli; hlt
])


class Done:
    def __init__(self, handler: EventExitHandler) -> None:
        self.handler = handler

    def pio_read(self, base: int, offset: int, data: memoryview) -> None:
        data[:] = bytes(len(data))

    def pio_write(self, base: int, offset: int, data: memoryview) -> None:
        self.handler.kick()


def test_a_guest_prints_through_the_uart_with_its_irq_wired(kvm: Kvm) -> None:
    out = bytearray()
    handler = EventExitHandler()
    with EventFdTrigger() as trigger, GuestMemoryMmap.from_ranges([(0, 2 << 20)]) as memory:
        bus = IoManager()
        bus.register_pio(PioRange(COM1_PORT, 8), Serial(trigger, out.extend))
        bus.register_pio(PioRange(0x80, 1), Done(handler))
        memory.write(GuestAddress(0x10000), HELLO)
        with KvmVm.new(kvm, VmConfig.from_kvm(kvm, 1), memory, handler, bus) as vm:
            vm.fd.register_irqfd(trigger.fd, COM1_IRQ)
            vm.run(GuestAddress(0x10000))
            assert handler.wait(10)
            vm.shutdown()
    assert bytes(out) == b"hello\n"
