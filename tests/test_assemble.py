"""kvmlib.testing.assemble: GNU as behind a function, its errors, and a guest it builds running on KVM."""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from kvmlib import (
    EventExitHandler,
    GuestAddress,
    GuestMemoryMmap,
    IoManager,
    Kvm,
    KvmError,
    KvmVm,
    PioRange,
    VmConfig,
)
from kvmlib.testing import AssemblerError, assemble

needs_binutils = pytest.mark.skipif(
    shutil.which("as") is None or shutil.which("ld") is None,
    reason="GNU binutils (as, ld) are not installed")


@needs_binutils
def test_the_documented_example() -> None:
    assert assemble("mov al, 0x41\nout 0x10, al\nhlt") == b"\xb0\x41\xe6\x10\xf4"


@needs_binutils
@pytest.mark.parametrize(("source", "expected"), [
    ("jmp $", "eb fe"),
    ("jmp .", "eb fe"),
    ("top: dec ecx\njnz top", "ff c9 75 fc"),
    ("1: dec ecx\njnz 1b\njmp 2f\nnop\n2: ret", "ff c9 75 fc eb 01 90 c3"),
    (".byte 1, 2\n.word 0x0304\n.long 5\n.quad 0x0807060504030201",
     "01 02 04 03 05 00 00 00 01 02 03 04 05 06 07 08"),
    ('.ascii "hi"\n.asciz "!"', "68 69 21 00"),
    ("mov eax, 1\nmov ax, 1", "b8 01 00 00 00 66 b8 01 00"),
    ("mov rax, 1", "48 c7 c0 01 00 00 00"),
    ("nop # a comment\n/* another */ nop; nop", "90 90 90"),
])
def test_known_64_bit_encodings(source: str, expected: str) -> None:
    assert assemble(source) == bytes.fromhex(expected)


@needs_binutils
@pytest.mark.parametrize(("bits", "source", "expected"), [
    (16, "mov ax, 0x1234\nmov eax, 1\nint 0x10", "b8 34 12 66 b8 01 00 00 00 cd 10"),
    (16, "lods al, byte ptr cs:[si]", "2e ac"),
    (32, "mov eax, 1\nmov ax, 1\npush ebp", "b8 01 00 00 00 66 b8 01 00 55"),
    (32, "jmp $", "eb fe"),
])
def test_16_and_32_bit_code(bits: int, source: str, expected: str) -> None:
    assert assemble(source, origin=0, bits=bits) == bytes.fromhex(expected)


@needs_binutils
@pytest.mark.parametrize(("origin", "expected"), [
    # nop; here: mov eax, offset here   ->   here = origin + 1
    (0x10000, "90 b8 01 00 01 00"),
    (0x200000, "90 b8 01 00 20 00"),
    (0, "90 b8 01 00 00 00"),
])
def test_absolute_label_addresses_follow_the_origin(origin: int, expected: str) -> None:
    assert assemble("nop\nhere: mov eax, offset here", origin=origin) == bytes.fromhex(expected)


@needs_binutils
def test_64_bit_absolute_and_rip_relative_references() -> None:
    source = "lea rax, [rip + target]\nmov rbx, offset target\nnop\ntarget: .quad target"
    # lea: disp32 = target - end of lea (7 + 1 bytes later), the same wherever the code is.
    # mov rbx, imm32 (sign-extended) and the .quad: target = origin + 7 + 7 + 1.
    at_64k = bytes.fromhex("48 8d 05 08 00 00 00" "48 c7 c3 0f 00 01 00" "90"
                           "0f 00 01 00 00 00 00 00")
    assert assemble(source, origin=0x10000) == at_64k
    high = assemble(".quad target\ntarget:", origin=0x123456789000)
    assert high == (0x123456789000 + 8).to_bytes(8, "little")


@needs_binutils
def test_16_and_32_bit_absolute_addresses() -> None:
    assert assemble("x: mov ax, offset x", origin=0x7C00, bits=16) == bytes.fromhex("b8 00 7c")
    assert assemble("nop\nx: mov eax, offset x", origin=0x7000, bits=32) == bytes.fromhex(
        "90 b8 01 70 00 00")


@needs_binutils
def test_data_and_bss_follow_the_code_without_a_gap() -> None:
    source = ".data\nd: .byte 0xaa\n.text\nmov eax, offset d\n.bss\n.zero 2\n"
    assert assemble(source, origin=0x1000) == bytes.fromhex("b8 05 10 00 00 aa 00 00")


@needs_binutils
def test_a_syntax_error_names_its_line() -> None:
    with pytest.raises(AssemblerError) as info:
        assemble("nop\nnop\nfrobnicate eax\nnop")
    error = info.value
    assert isinstance(error, KvmError)
    assert error.lines == (3,)
    assert any(m.startswith("line 3: Error:") and "frobnicate" in m for m in error.messages)
    assert "line 3" in str(error) and "frobnicate eax" in str(error)
    assert "guest.s" not in str(error)


@needs_binutils
def test_several_errors_are_all_reported() -> None:
    with pytest.raises(AssemblerError) as info:
        assemble("bogus1\nnop\nbogus2")
    assert info.value.lines == (1, 3)


@needs_binutils
def test_warnings_are_errors_because_they_mean_wrong_bytes() -> None:
    with pytest.raises(AssemblerError) as info:
        assemble("nop\nmov al, 0x141")
    assert info.value.lines == (2,)
    assert "Warning" in str(info.value)


@needs_binutils
def test_an_address_that_does_not_fit_names_its_line() -> None:
    # Real-mode code cannot hold a 16-bit offset of 0x10000.
    with pytest.raises(AssemblerError) as info:
        assemble("nop\nx: mov ax, offset x", origin=0x10000, bits=16)
    assert info.value.lines == (2,)
    assert "truncated" in str(info.value)


@needs_binutils
def test_an_undefined_label_is_an_error() -> None:
    with pytest.raises(AssemblerError, match="nowhere"):
        assemble("jmp nowhere")


def test_missing_binutils_name_what_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no as, no ld
    with pytest.raises(AssemblerError, match=r"GNU 'as'.*binutils.*apt install binutils"):
        # A source no other test assembles: a cached result would not need the assembler.
        assemble(f"nop # {tmp_path}")


@pytest.mark.parametrize("bits", [8, 0, 128])
def test_only_16_32_and_64_bits(bits: int) -> None:
    with pytest.raises(ValueError, match="bits"):
        assemble("nop", bits=bits)


def test_the_origin_is_a_64_bit_address() -> None:
    with pytest.raises(ValueError, match="origin"):
        assemble("nop", origin=-1)
    with pytest.raises(ValueError, match="origin"):
        assemble("nop", origin=1 << 64)


def test_source_must_be_text() -> None:
    with pytest.raises(TypeError):
        assemble(b"nop")  # type: ignore[arg-type]


@needs_binutils
def test_results_are_cached() -> None:
    first = assemble("nop\nnop\nhlt", origin=0x4000)
    assert assemble("nop\nnop\nhlt", origin=0x4000) is first


def test_importing_kvmlib_does_not_import_the_testing_helpers() -> None:
    code = ("import sys, kvmlib, kvmlib.__main__; "
            "assert 'kvmlib.testing' not in sys.modules, 'kvmlib.testing'; "
            "import kvmlib.testing; assert 'pytest' not in sys.modules, 'pytest'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr


GUEST = """
        mov rsi, qword ptr [rip + pointer]   # an absolute address the linker filled in
        mov dx, 0x10
1:      lodsb
        test al, al
        jz 2f
        out dx, al
        jmp 1b
2:      out 0x11, al
        jmp $

        .data
pointer: .quad message
message: .asciz "assembled for 0x10000\\n"
"""


class _Collector:
    """Port 0x10 collects bytes; port 0x11 ends the run."""

    def __init__(self, handler: EventExitHandler) -> None:
        self.handler = handler
        self.lock = threading.Lock()
        self.output = bytearray()

    def pio_read(self, base: int, offset: int, data: memoryview) -> None:
        data[:] = bytes(len(data))

    def pio_write(self, base: int, offset: int, data: memoryview) -> None:
        if base == 0x11:
            self.handler.kick()
            return
        with self.lock:
            self.output += data


@needs_binutils
def test_an_assembled_guest_runs_on_kvm(kvm: Kvm) -> None:
    start = GuestAddress(0x10000)
    handler = EventExitHandler()
    device = _Collector(handler)
    bus = IoManager()
    bus.register_pio(PioRange(0x10, 1), device)
    bus.register_pio(PioRange(0x11, 1), device)
    with GuestMemoryMmap.from_ranges([(GuestAddress(0), 2 << 20)]) as memory:
        memory.write(start, assemble(GUEST, origin=start))
        with KvmVm.new(kvm, VmConfig.from_kvm(kvm, 1), memory, handler, bus) as vm:
            vm.run(start)
            finished = handler.wait(30.0)
            vm.shutdown()
    assert finished
    assert bytes(device.output) == b"assembled for 0x10000\n"
