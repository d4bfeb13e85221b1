"""Decoded exits and the exit-handler hook: debug events, hypercalls, user-space MSRs, the rest."""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable, Iterator

import pytest

from kvmlib import (
    Debug,
    ExceptionExit,
    GuestAddress,
    GuestMemoryMmap,
    Hypercall,
    IrqWindowOpen,
    Kvm,
    KvmVm,
    SystemEvent,
    SystemEventKind,
    Undecoded,
    Unknown,
    VcpuError,
    VcpuExit,
    VmConfig,
    X86Rdmsr,
    X86Wrmsr,
)
from kvmlib.exit_handler import ExitHandler, ExitingVcpu
from kvmlib.ioctl import (
    EXIT_SIZE,
    KVM_EXIT_DEBUG,
    KVM_EXIT_EXCEPTION,
    KVM_EXIT_HYPERCALL,
    KVM_EXIT_IRQ_WINDOW_OPEN,
    KVM_EXIT_SYSTEM_EVENT,
    KVM_EXIT_UNKNOWN,
    KVM_EXIT_X86_RDMSR,
    KVM_EXIT_X86_WRMSR,
    KVM_MSR_EXIT_REASON_UNKNOWN,
    Cap,
    GuestDebug,
    decode_exit,
    make_kvm_guest_debug,
)

from .concurrency import DEADLINE, bounded
from .vm_guests import BSP_CODE, OUT_THEN_SPIN, Reporter, bus_with, memory_with


def union(*pieces: tuple[int, bytes]) -> memoryview:
    """The exit union of a ``kvm_run`` page with ``pieces`` (offset, bytes) written into it."""
    raw = bytearray(EXIT_SIZE)
    for offset, data in pieces:
        raw[offset:offset + len(data)] = data
    return memoryview(raw)


# ---- decoding -------------------------------------------------------------------------------------

def test_a_debug_exit_carries_kvm_debug_exit_arch() -> None:
    view = union((0, struct.pack("<I4xQQQ", 1, 0x10002, 0xFFFF4FF1, 0x401)))
    assert decode_exit(KVM_EXIT_DEBUG, view) == Debug(exception=1, pc=0x10002, dr6=0xFFFF4FF1,
                                                      dr7=0x401)


def test_a_hypercall_is_decoded_and_answered_in_place() -> None:
    view = union((0, struct.pack("<Q6QQI", 12, 1, 2, 3, 4, 5, 6, 0, 1)))
    exit_ = decode_exit(KVM_EXIT_HYPERCALL, view)
    assert isinstance(exit_, Hypercall)
    assert (exit_.nr, exit_.args, exit_.longmode) == (12, (1, 2, 3, 4, 5, 6), 1)
    exit_.answer(-1)
    assert struct.unpack_from("<Q", view, 56)[0] == 2**64 - 1  # ret, where the kernel reads it


def test_user_space_msr_exits_are_answered_or_failed_in_place() -> None:
    view = union((0, struct.pack("<B7xIIQ", 0, KVM_MSR_EXIT_REASON_UNKNOWN, 0x1234, 0)))
    rdmsr = decode_exit(KVM_EXIT_X86_RDMSR, view)
    assert rdmsr == X86Rdmsr(0x1234, KVM_MSR_EXIT_REASON_UNKNOWN, view)
    assert isinstance(rdmsr, X86Rdmsr)
    rdmsr.answer(0x1122334455667788)
    assert struct.unpack_from("<BQ", view, 0)[0] == 0
    assert struct.unpack_from("<Q", view, 16)[0] == 0x1122334455667788
    rdmsr.fail()
    assert view[0] == 1
    view = union((0, struct.pack("<B7xIIQ", 0, KVM_MSR_EXIT_REASON_UNKNOWN, 0x1235, 0x55)))
    wrmsr = decode_exit(KVM_EXIT_X86_WRMSR, view)
    assert isinstance(wrmsr, X86Wrmsr) and (wrmsr.index, wrmsr.data) == (0x1235, 0x55)


def test_the_other_exits_decode_to_their_kinds() -> None:
    assert decode_exit(KVM_EXIT_EXCEPTION, union((0, struct.pack("<II", 13, 0x18)))) \
        == ExceptionExit(13, 0x18)
    assert decode_exit(KVM_EXIT_IRQ_WINDOW_OPEN, union()) == IrqWindowOpen()
    event = decode_exit(KVM_EXIT_SYSTEM_EVENT, union((0, struct.pack("<II2Q", 2, 1, 7, 8))))
    assert event == SystemEvent(2, (7,))
    assert isinstance(event, SystemEvent) and event.kind is SystemEventKind.RESET
    assert SystemEvent(99, ()).kind is None


def test_unknown_is_what_kvm_calls_unknown_and_undecoded_is_what_kvmlib_does_not_decode() -> None:
    assert decode_exit(KVM_EXIT_UNKNOWN, union((0, struct.pack("<Q", 0x30)))) == Unknown(0x30)
    other = decode_exit(1000, union((0, b"\x01\x02")))
    assert isinstance(other, Undecoded) and other.reason == 1000 and other.data[:2] == b"\x01\x02"
    assert len(other.data) == EXIT_SIZE


# ---- the exit handler hook ------------------------------------------------------------------------

class Recorder(ExitHandler):
    """Handles the exits it is told to, answering MSR reads and hypercalls."""

    def __init__(self, handles: tuple[type, ...], rdmsr_value: int = 0x41) -> None:
        self.handles = handles
        self.rdmsr_value = rdmsr_value
        self.seen: list[tuple[int, VcpuExit, int]] = []
        self.ended = threading.Event()

    def kick(self) -> None:
        self.ended.set()

    def handle_exit(self, vcpu: ExitingVcpu, exit: VcpuExit) -> bool:
        if not isinstance(exit, self.handles):
            return False
        self.seen.append((vcpu.id, exit, vcpu.get_regs().rip))
        if isinstance(exit, X86Rdmsr):
            exit.answer(self.rdmsr_value)
        if isinstance(exit, Hypercall):
            exit.answer(7)
        return True


Factory = Callable[..., tuple[KvmVm, Reporter]]


@pytest.fixture
def make_vm(kvm: Kvm) -> Iterator[Factory]:
    owned: list[tuple[KvmVm, GuestMemoryMmap]] = []

    def make(code: bytes, handler: ExitHandler) -> tuple[KvmVm, Reporter]:
        reporter = Reporter()
        memory = memory_with({BSP_CODE: code})
        vm = KvmVm.new(kvm, VmConfig.from_kvm(kvm, 1), memory, handler, bus_with(reporter))
        owned.append((vm, memory))
        return vm, reporter

    yield make
    for vm, memory in owned:
        try:
            bounded(vm.close, what="close")
        except VcpuError:
            pass
        finally:
            memory.close()


def test_a_handled_debug_exit_lets_the_guest_run_on(make_vm: Factory) -> None:
    handler = Recorder((Debug,))
    vm, reporter = make_vm(OUT_THEN_SPIN, handler)
    event = Debug(exception=1, pc=int(BSP_CODE), dr6=0x4000, dr7=0)
    vm.vcpus[0].feed_exit(event)  # this host's KVM cannot produce it: feed it
    vm.run(BSP_CODE)
    assert reporter.wait_for_writers(1)  # the out after the "breakpoint" happened
    bounded(vm.shutdown)
    assert handler.seen == [(0, event, BSP_CODE)]


def test_a_handled_hypercall_is_answered_and_the_guest_runs_on(
        make_vm: Factory) -> None:
    handler = Recorder((Hypercall,))
    vm, reporter = make_vm(OUT_THEN_SPIN, handler)
    raw = union((0, struct.pack("<Q6Q", 5, 1, 2, 3, 4, 5, 6)))
    vm.vcpus[0].feed_exit(Hypercall(5, (1, 2, 3, 4, 5, 6), 1, raw))  # not from this host: fed
    vm.run(BSP_CODE)
    assert reporter.wait_for_writers(1)
    bounded(vm.shutdown)
    assert [type(e) for _, e, _ in handler.seen] == [Hypercall]
    assert struct.unpack_from("<Q", raw, 56)[0] == 7


@pytest.mark.parametrize("exit_", [Debug(3, 0x10000, 0, 0), ExceptionExit(6, 0),
                                   Undecoded(1000, bytes(EXIT_SIZE))])
def test_an_exit_nobody_handles_stops_the_vcpu_with_an_error_naming_it(
        make_vm: Factory, exit_: VcpuExit) -> None:
    vm, _ = make_vm(OUT_THEN_SPIN, Recorder(()))
    vm.vcpus[0].feed_exit(exit_)  # this host's KVM cannot produce it: feed it
    vm.run(BSP_CODE)
    with pytest.raises(VcpuError, match=type(exit_).__name__) as raised:
        bounded(lambda: vm.wait(DEADLINE))
    assert raised.value.exit == exit_


# Reads MSR 0x1234 and reports the low byte on port 0x10; writes 0x55 to MSR 0x1235 and reports 7.
MSR_GUEST = bytes([
    0xB9, 0x34, 0x12, 0x00, 0x00,  # mov ecx, 0x1234
    0x0F, 0x32,                    # rdmsr
    0xE6, 0x10,                    # out 0x10, al
    0xB9, 0x35, 0x12, 0x00, 0x00,  # mov ecx, 0x1235
    0xB8, 0x55, 0x00, 0x00, 0x00,  # mov eax, 0x55
    0x31, 0xD2,                    # xor edx, edx
    0x0F, 0x30,                    # wrmsr
    0xB0, 0x07,                    # mov al, 7
    0xE6, 0x10,                    # out 0x10, al
    0xEB, 0xFE,                    # jmp $
])


def test_an_exit_handler_emulates_msrs_kvm_does_not_know(kvm: Kvm, make_vm: Factory) -> None:
    if not kvm.check_extension(Cap.KVM_CAP_X86_USER_SPACE_MSR):
        pytest.skip("this KVM has no KVM_CAP_X86_USER_SPACE_MSR")
    handler = Recorder((X86Rdmsr, X86Wrmsr), rdmsr_value=0x41)
    vm, reporter = make_vm(MSR_GUEST, handler)
    vm.fd.enable_cap(Cap.KVM_CAP_X86_USER_SPACE_MSR, KVM_MSR_EXIT_REASON_UNKNOWN)
    vm.run(BSP_CODE)
    with reporter.cond:
        assert reporter.cond.wait_for(lambda: len(reporter.writes) >= 2, DEADLINE)
    bounded(vm.shutdown)
    assert [value for _, value in reporter.writes] == [0x41, 7]
    kinds = [(type(e).__name__, e.index) for _, e, _ in handler.seen]  # type: ignore[union-attr]
    assert kinds == [("X86Rdmsr", 0x1234), ("X86Wrmsr", 0x1235)]
    wrmsr = handler.seen[1][1]
    assert isinstance(wrmsr, X86Wrmsr) and wrmsr.data == 0x55


# ---- guest debug ----------------------------------------------------------------------------------

def test_guest_debug_flags_and_hardware_breakpoints_encode_as_kvm_wants() -> None:
    debug = make_kvm_guest_debug(GuestDebug.SINGLESTEP)
    assert debug.control == GuestDebug.ENABLE | GuestDebug.SINGLESTEP
    debug = make_kvm_guest_debug(GuestDebug(0), [0x10000, 0x20000])
    assert debug.control == GuestDebug.ENABLE | GuestDebug.USE_HW_BP
    assert list(debug.arch.debugreg)[:4] == [0x10000, 0x20000, 0, 0]
    assert debug.arch.debugreg[7] == 0b0101  # L0 and L1, breaking on execution
    with pytest.raises(ValueError, match="4 hardware breakpoints"):
        make_kvm_guest_debug(GuestDebug(0), [1, 2, 3, 4, 5])


def test_kvm_accepts_every_guest_debug_setting(kvm: Kvm) -> None:
    with GuestMemoryMmap.from_ranges([(GuestAddress(0), 2 << 20)]) as memory, KvmVm.new(
            kvm, VmConfig.from_kvm(kvm, 1), memory, Recorder(()), bus_with(Reporter())) as vm:
        vcpu = vm.vcpus[0]
        vcpu.set_guest_debug(GuestDebug.SINGLESTEP)
        vcpu.set_guest_debug(GuestDebug.USE_SW_BP)
        vcpu.set_guest_debug(GuestDebug(0), [0x10000, 0x10010, 0x10020, 0x10030])
        vcpu.clear_guest_debug()
