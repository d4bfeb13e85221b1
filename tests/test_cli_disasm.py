"""The instruction behind a KVM emulation failure: bytes, mnemonic (capstone or the fallback), hint."""

from __future__ import annotations

import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvmlib import Kvm, VcpuError, cli, disasm
from kvmlib.disasm import FailedInstruction, describe_failure, hint, instruction_bytes, recognize
from kvmlib.ioctl.exits import InternalError

from .test_cli import kvmlib
from .test_vmm import RESET, kernel_file

XRSTOR_RSP = bytes.fromhex("0f ae 2c 24")  # xrstor [rsp]
CMPXCHG16B_RSI = bytes.fromhex("48 0f c7 0e")  # cmpxchg16b [rsi]


def emulation_failure(fetched: bytes, *, flagged: bool = True) -> InternalError:
    """An InternalError as KVM reports an emulation failure: length, then up to 15 bytes."""
    raw = bytes([len(fetched)]) + fetched.ljust(15, b"\0")
    words = tuple(int.from_bytes(raw[i:i + 8], "little") for i in (0, 8))
    return InternalError(suberror=1, data=(1 if flagged else 0, *words, 4096, 0))


def vcpu_error(fetched: bytes) -> VcpuError:
    return VcpuError("vCPU 0 stopped", vcpu_id=0, exit=emulation_failure(fetched), rip=0x100200)


def test_the_fetched_bytes_are_read_from_the_exit() -> None:
    padded = XRSTOR_RSP + bytes(11)  # KVM fetches 15 bytes, more than the instruction
    assert instruction_bytes(emulation_failure(padded)) == padded
    assert instruction_bytes(emulation_failure(padded, flagged=False)) is None
    assert instruction_bytes(InternalError(suberror=2, data=(1, 2, 3))) is None
    assert instruction_bytes(None) is None
    assert describe_failure(VcpuError("not an exit")) is None
    assert describe_failure(None) is None


@pytest.mark.parametrize(("code", "mnemonic", "length"), [
    ("0f ae 2c 24", "xrstor", 4),               # xrstor [rsp]: ModRM, SIB
    ("48 0f ae 20", "xsave64", 4),              # xsave64 [rax]
    ("0f ae 25 78 56 34 12", "xsave", 7),       # xsave [rip + disp32]
    ("0f ae 74 24 08", "xsaveopt", 5),          # xsaveopt [rsp + 8]
    ("0f c7 5c 24 40", "xrstors", 5),
    ("0f c7 a0 00 01 00 00", "xsavec", 7),      # xsavec [rax + disp32]
    ("48 0f c7 0e", "cmpxchg16b", 4),
    ("f0 48 0f c7 0e", "cmpxchg16b", 5),        # lock prefix
    ("0f c7 0e", "cmpxchg8b", 3),
    ("0f c7 f0", "rdrand", 3),
    ("0f c7 f8", "rdseed", 3),
    ("f3 0f c7 f8", "rdpid", 4),
    ("0f 01 d0", "xgetbv", 3),
    ("0f 01 d1", "xsetbv", 3),
    ("0f 01 f9", "rdtscp", 3),
    ("0f 38 f0 06", "movbe", 4),
    ("f3 48 0f b8 c1", "popcnt", 5),
    ("0f ae f0", "mfence", 3),
    ("cc", "int3", 1),
])
def test_the_fallback_knows_the_instructions_hosts_fail_on(code: str, mnemonic: str,
                                                           length: int) -> None:
    raw = bytes.fromhex(code)
    assert recognize(raw + bytes(15 - len(raw))) == (mnemonic, length)


@pytest.mark.parametrize("code", ["90", "0f 0b", "", "0f", "f2 0f 38 f0 c1", "c4 e2 79 18 06"])
def test_the_fallback_says_nothing_about_the_rest(code: str) -> None:
    assert recognize(bytes.fromhex(code)) is None  # nop, ud2, nothing, crc32, a VEX instruction


def test_16_bit_addressing_has_no_length() -> None:
    assert recognize(bytes.fromhex("0f ae 2e 34 12"), bits=16) == ("xrstor", None)
    assert recognize(bytes.fromhex("0f ae e8"), bits=16) == ("lfence", 3)


@pytest.mark.parametrize(("mnemonic", "expected"), [
    ("xrstor", "xsave"),
    ("XRSTOR64", "xsave"),
    ("xgetbv", "xsave"),
    ("cmpxchg16b", "cx16"),
    ("lock cmpxchg16b", "cx16"),
    ("", None),
    ("rdrand", "rdrand"),
    ("aesenc", "aes"),
    ("vmovdqu", "avx"),
    ("vmcall", None),
    ("verw", None),
    ("mov", None),
    ("int3", None),
])
def test_hints(mnemonic: str, expected: str | None) -> None:
    assert hint(mnemonic) == expected


@pytest.fixture
def no_disassembler(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(disasm, "_capstone", lambda bits: None)


class FakeCapstone:
    """What kvmlib uses of capstone's ``Cs``: ``disasm(code, address, count)``."""

    def __init__(self) -> None:
        self.calls: list[tuple[bytes, int, int]] = []

    def disasm(self, code: bytes, address: int, count: int) -> Iterator[Any]:
        self.calls.append((code, address, count))
        yield types.SimpleNamespace(mnemonic="xrstor", op_str="ptr [rsp]", size=4)


def test_without_a_disassembler_the_raw_bytes_and_the_table_answer(no_disassembler: None) -> None:
    assert not disasm.disassembler_available()
    assert disasm.disassemble(XRSTOR_RSP) is None
    failed = describe_failure(vcpu_error(XRSTOR_RSP + bytes(11)))
    assert failed == FailedInstruction(code=XRSTOR_RSP, fetched=XRSTOR_RSP + bytes(11),
                                       mnemonic="xrstor", text=None, feature="xsave",
                                       kernel_parameter="clearcpuid=xsave")
    assert failed.describe() == "0f ae 2c 24 (xrstor)"
    unknown = describe_failure(vcpu_error(bytes.fromhex("0f 0b 90")))
    assert unknown is not None and unknown.mnemonic is None and unknown.feature is None
    assert unknown.describe() == "0f 0b 90 (not decoded: pip install 'kvmlib[disasm]' to " \
                                 "disassemble it)"


def test_a_disassembler_names_the_instruction_and_its_operands(
        monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeCapstone()
    monkeypatch.setattr(disasm, "_capstone", lambda bits: fake)
    failed = describe_failure(vcpu_error(XRSTOR_RSP + bytes(11)))
    assert failed is not None
    assert (failed.text, failed.mnemonic, failed.code) == ("xrstor ptr [rsp]", "xrstor", XRSTOR_RSP)
    assert failed.describe() == "xrstor ptr [rsp] (0f ae 2c 24)"
    assert fake.calls == [(XRSTOR_RSP + bytes(11), 0x100200, 1)]


def test_capstone_itself() -> None:
    pytest.importorskip("capstone")
    assert disasm.disassembler_available()
    assert disasm.disassemble(CMPXCHG16B_RSI + bytes(4)) == ("cmpxchg16b", "xmmword ptr [rsi]", 4)
    # What the Debian kernel stops on where KVM emulates ring 0: capstone puts the prefix first.
    locked = describe_failure(vcpu_error(bytes.fromhex("f0 48 0f c7 4d 20 74 66 4c 8b 44 24 08")))
    assert locked is not None
    assert (locked.text, locked.mnemonic, locked.feature) == (
        "lock cmpxchg16b xmmword ptr [rbp + 0x20]", "cmpxchg16b", "cx16")
    assert locked.describe() == "lock cmpxchg16b xmmword ptr [rbp + 0x20] (f0 48 0f c7 4d 20)"
    assert disasm.disassemble(bytes.fromhex("0f ae 2e 34 12"), bits=16)[0] == "xrstor"  # type: ignore[index]
    assert disasm.disassemble(b"\x0f") is None  # not a whole instruction
    with pytest.raises(ValueError, match="bits"):
        disasm.disassemble(b"\x90", bits=8)


def test_the_cli_hint_follows_what_kvm_did_with_the_flag(no_disassembler: None) -> None:
    failed = describe_failure(vcpu_error(XRSTOR_RSP))
    assert failed is not None
    assert cli._hint(failed, (), ()) == ("this host's KVM cannot emulate xrstor: try --hide-cpuid "
                                         "xsave, or add clearcpuid=xsave to --cmdline (Linux "
                                         "5.19 and later)")
    assert cli._hint(failed, ("xsave",), ("xsave",)) == (
        "this host's KVM cannot emulate xrstor, and hiding CPUID flag xsave has no effect here "
        "(this host's KVM forces it on): add clearcpuid=xsave to --cmdline (Linux 5.19 and later)")
    assert cli._hint(failed, ("xsave",), ()) == (
        "this host's KVM cannot emulate xrstor, although CPUID flag xsave is hidden: add "
        "clearcpuid=xsave to --cmdline (Linux 5.19 and later)")
    breakpoint_ = describe_failure(vcpu_error(bytes.fromhex("cc 90 90 90 90")))
    assert breakpoint_ is not None and breakpoint_.feature is None
    assert cli._hint(breakpoint_, (), ()) == ("this host's KVM cannot emulate int3, a breakpoint, "
                                              "which Linux executes while it boots (the self-test "
                                              "of its code patching); no CPUID flag keeps a "
                                              "kernel from it")
    assert cli._hint(describe_failure(vcpu_error(bytes.fromhex("0f 0b"))), (), ()) is None  # type: ignore[arg-type]
    cx16 = describe_failure(vcpu_error(CMPXCHG16B_RSI))
    assert cx16 is not None
    assert cli._hint(cx16, (), ()) == ("this host's KVM cannot emulate cmpxchg16b: try --hide-cpuid "
                                       "cx16, or add clearcpuid=cx16 to --cmdline (Linux 5.19 and "
                                       "later)")


def test_a_guest_that_kvm_cannot_emulate_is_explained(tmp_path: Path, kvm: Kvm) -> None:
    # xor eax, eax; xor edx, edx; xrstor [rsp]; then reset. Where KVM emulates ring-0 code (this
    # project's development host and CI) it cannot emulate xrstor; with hardware
    # virtualization the misaligned area faults and, with no IDT, the guest triple-faults.
    code = bytes.fromhex("31 c0 31 d2") + XRSTOR_RSP + RESET
    done = kvmlib("run", "--kernel", str(kernel_file(tmp_path, code)), "--memory", "64")
    if done.returncode != cli.EXIT_GUEST_ERROR:
        pytest.skip(f"this host's KVM runs xrstor (status {done.returncode})")
    err = done.stderr.decode()
    assert "KVM internal error 1 (EMULATION" in err
    assert "kvmlib: the instruction KVM could not emulate: " in err
    instruction = err.split("could not emulate: ", 1)[1].splitlines()[0]
    assert instruction in ("xrstor ptr [rsp] (0f ae 2c 24)", "0f ae 2c 24 (xrstor)")
    assert "kvmlib: hint: this host's KVM cannot emulate xrstor" in err
    assert "--hide-cpuid xsave" in err and "clearcpuid=xsave" in err
