"""The i8042: CPU reset ends the VM, Linux's probe gets answers, state round-trips."""

from __future__ import annotations

import pytest

from kvmlib import GuestAddress, GuestMemoryMmap, Kvm
from kvmlib.bus import IoManager, PioRange
from kvmlib.devices import I8042_COMMAND_PORT, I8042_DATA_PORT, DeviceError, I8042Device
from kvmlib.exit_handler import EventExitHandler
from kvmlib.vcpu import VmRunState
from kvmlib.vm import KvmVm, VmConfig


class Controller:
    def __init__(self) -> None:
        self.resets = 0
        self.dev = I8042Device(self._reset)

    def _reset(self) -> None:
        self.resets += 1

    def status(self) -> int:
        buf = bytearray(1)
        self.dev.pio_read(I8042_COMMAND_PORT, 0, memoryview(buf))
        return buf[0]

    def read_data(self) -> int:
        buf = bytearray(1)
        self.dev.pio_read(I8042_DATA_PORT, 0, memoryview(buf))
        return buf[0]

    def command(self, cmd: int) -> None:
        self.dev.pio_write(I8042_COMMAND_PORT, 0, memoryview(bytes([cmd])))

    def write_data(self, value: int) -> None:
        self.dev.pio_write(I8042_DATA_PORT, 0, memoryview(bytes([value])))


@pytest.fixture
def ctl() -> Controller:
    return Controller()


def test_the_output_buffer_starts_empty(ctl: Controller) -> None:
    assert not ctl.status() & 0x01


def test_0xfe_resets_the_cpu(ctl: Controller) -> None:
    ctl.command(0xFE)
    assert ctl.resets == 1


def test_output_port_with_the_reset_line_low_resets_too(ctl: Controller) -> None:
    ctl.command(0xD1)
    ctl.write_data(0x03)  # reset line high: nothing
    assert ctl.resets == 0
    ctl.command(0xD1)
    ctl.write_data(0x02)
    assert ctl.resets == 1


def test_the_command_byte_reads_back_what_was_written(ctl: Controller) -> None:
    ctl.command(0x60)
    ctl.write_data(0x47)
    ctl.command(0x20)
    assert ctl.status() & 0x01
    assert ctl.read_data() == 0x47
    assert not ctl.status() & 0x01  # reading emptied the buffer


@pytest.mark.parametrize(("cmd", "answer"), [(0xAA, 0x55), (0xAB, 0x00), (0xA9, 0x00), (0xD0, 0x03)])
def test_probe_commands_are_answered(ctl: Controller, cmd: int, answer: int) -> None:
    ctl.command(cmd)
    assert ctl.read_data() == answer


def test_keyboard_bytes_without_a_keyboard_are_ignored(ctl: Controller) -> None:
    ctl.write_data(0xFF)
    assert not ctl.status() & 0x01 and ctl.resets == 0


def test_state_round_trips_and_bad_state_is_refused(ctl: Controller) -> None:
    ctl.command(0x60)
    ctl.write_data(0x11)
    ctl.command(0x20)
    state = ctl.dev.save_state()
    other = Controller()
    other.dev.restore_state(state)
    assert other.read_data() == 0x11
    with pytest.raises(DeviceError, match="bytes"):
        other.dev.restore_state(state[:-1])
    with pytest.raises(DeviceError, match="pending"):
        other.dev.restore_state(state[:5] + b"\x99" + state[6:])


RESET_GUEST = bytes([0xB0, 0xFE, 0xE6, 0x64, 0xEB, 0xFE])  # mov al, 0xfe; out 0x64, al; jmp $


def test_a_guest_reset_ends_the_vm_cleanly(kvm: Kvm) -> None:
    handler = EventExitHandler()
    bus = IoManager()
    with GuestMemoryMmap.from_ranges([(0, 2 << 20)]) as memory:
        memory.write(GuestAddress(0x10000), RESET_GUEST)
        with KvmVm.new(kvm, VmConfig.from_kvm(kvm, 1), memory, handler, bus) as vm:
            def reset() -> None:
                # What a VMM does: mark the VM exiting and wake its owner; the owner shuts it down.
                vm.vcpu_run_state.set_and_notify(VmRunState.EXITING)
                handler.kick()
            device = I8042Device(reset)
            bus.register_pio(PioRange(I8042_DATA_PORT, 1), device)
            bus.register_pio(PioRange(I8042_COMMAND_PORT, 1), device)
            vm.run(GuestAddress(0x10000))
            assert handler.wait(10)
            vm.shutdown()
            assert device.resets == 1
