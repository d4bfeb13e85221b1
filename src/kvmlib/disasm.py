"""The instruction a vCPU failed on: its bytes, its mnemonic, and the CPUID flag behind it.

When KVM cannot emulate an instruction it stops the vCPU with a KVM internal error
(``KVM_INTERNAL_ERROR_EMULATION``) and, where the kernel offers it, the bytes it fetched at RIP.
:func:`describe_failure` turns a :class:`~kvmlib.VcpuError` carrying such an exit into a
:class:`FailedInstruction`: the instruction decoded by `capstone <https://www.capstone-engine.org>`_
when the optional ``disasm`` extra is installed (``pip install 'kvmlib[disasm]'``), otherwise
recognised from a small table of the instructions hosts are known to fail on; and, when the
instruction belongs to a CPUID feature, that feature's ``/proc/cpuinfo`` name, so the guest can be
told the feature is absent (``kvmlib run --hide-cpuid``).
"""

from __future__ import annotations

import functools
import importlib
from typing import Any

import attrs

from kvmlib.ioctl.exits import InternalError

#: ``KVM_INTERNAL_ERROR_EMULATION``: the suberror that carries the instruction.
EMULATION_SUBERROR = 1
#: ``KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES``, in the exit's first data word.
_FLAG_INSTRUCTION_BYTES = 1
#: The longest x86 instruction.
MAX_INSTRUCTION_LENGTH = 15

#: Mnemonic -> the CPUID flag (as ``/proc/cpuinfo`` names it) that tells a guest it exists.
HINTS: dict[str, str] = {
    **dict.fromkeys(("xsave", "xsaveopt", "xsavec", "xsaves", "xrstor", "xrstors", "xgetbv",
                     "xsetbv"), "xsave"),
    "cmpxchg16b": "cx16",
    "rdrand": "rdrand",
    "rdseed": "rdseed",
    "movbe": "movbe",
    "rdtscp": "rdtscp",
    "rdpid": "rdpid",
    "popcnt": "popcnt",
    "pclmulqdq": "pclmulqdq",
    "monitor": "monitor",
    "mwait": "monitor",
    **dict.fromkeys(("aesenc", "aesenclast", "aesdec", "aesdeclast", "aesimc", "aeskeygenassist"),
                    "aes"),
}
#: Mnemonic -> what to know about an instruction that no CPUID flag keeps a guest from using.
NOTES: dict[str, str] = {
    "int3": "a breakpoint, which Linux executes while it boots (the self-test of its code "
            "patching); no CPUID flag keeps a kernel from it",
}
# Mnemonics that start with "v" without being VEX/EVEX-encoded (AVX) instructions.
_NOT_AVX = frozenset({
    "verr", "verw", "vmcall", "vmclear", "vmfunc", "vmlaunch", "vmload", "vmmcall", "vmptrld",
    "vmptrst", "vmread", "vmresume", "vmrun", "vmsave", "vmwrite", "vmxoff", "vmxon",
})


@attrs.define(frozen=True, slots=True)
class FailedInstruction:
    """The instruction a vCPU stopped on, as far as it can be told.

    Attributes:
        code: the instruction's bytes (all of :attr:`fetched` when its length is unknown).
        fetched: the bytes KVM fetched at RIP (up to 15, usually more than the instruction).
        mnemonic: ``xrstor``, ``cmpxchg16b`` ... (without prefixes such as ``lock``); None when
            neither the disassembler nor the built-in table knows it.
        text: the instruction with its operands (``xrstor ptr [rsp]``) when a disassembler
            decoded it, else None.
        feature: the CPUID flag (named as in ``/proc/cpuinfo``) that tells a guest the
            instruction exists, when there is one.
        kernel_parameter: the Linux command-line parameter that keeps the kernel itself from
            using the feature even when CPUID shows it (``clearcpuid=xsave``, Linux 5.19 and
            later), when there is a feature.
        note: what else is known about the instruction (:data:`NOTES`), when something is.
    """

    code: bytes
    fetched: bytes
    mnemonic: str | None
    text: str | None
    feature: str | None
    kernel_parameter: str | None
    note: str | None = None

    def describe(self) -> str:
        """One line: ``xrstor ptr [rsp] (0f ae 2c 24)``, or the bytes and what is known."""
        raw = self.code.hex(" ")
        if self.text is not None:
            return f"{self.text} ({raw})"
        if self.mnemonic is not None:
            return f"{raw} ({self.mnemonic})"
        return f"{raw} (not decoded: pip install 'kvmlib[disasm]' to disassemble it)"


def instruction_bytes(exit: object) -> bytes | None:
    """The bytes KVM fetched at the failing RIP, from an emulation-failure internal error exit.

    With ``KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES`` set in ``data[0]``, the next 16
    bytes of the data hold a length, then that many bytes (``struct kvm_run``'s
    ``emulation_failure``). None for any other exit, or when KVM did not report them.
    """
    if not isinstance(exit, InternalError) or exit.suberror != EMULATION_SUBERROR:
        return None
    data = exit.data
    if len(data) < 3 or not data[0] & _FLAG_INSTRUCTION_BYTES:
        return None
    raw = b"".join((word & (1 << 64) - 1).to_bytes(8, "little") for word in data[1:3])
    length = min(raw[0], MAX_INSTRUCTION_LENGTH)
    return raw[1:1 + length] or None


@functools.cache
def _capstone(bits: int) -> Any:
    """A capstone decoder for ``bits``-bit code, or None when capstone is not installed."""
    try:
        capstone = importlib.import_module("capstone")
    except ImportError:
        return None
    modes = {16: capstone.CS_MODE_16, 32: capstone.CS_MODE_32, 64: capstone.CS_MODE_64}
    return capstone.Cs(capstone.CS_ARCH_X86, modes[bits])


def disassembler_available() -> bool:
    """Whether the optional disassembler (capstone, the ``disasm`` extra) is installed."""
    return _capstone(64) is not None


def disassemble(code: bytes, *, bits: int = 64, address: int = 0) -> tuple[str, str, int] | None:
    """The first instruction of ``code`` as ``(mnemonic, operands, length)``.

    None when no disassembler is installed or ``code`` does not start with a valid instruction.

    Raises:
        ValueError: ``bits`` is not 16, 32 or 64.
    """
    if bits not in (16, 32, 64):
        raise ValueError(f"bits must be 16, 32 or 64, not {bits!r}")
    decoder = _capstone(bits)
    if decoder is None:
        return None
    for insn in decoder.disasm(code, address, 1):
        return str(insn.mnemonic), str(insn.op_str), int(insn.size)
    return None


_LEGACY_PREFIXES = frozenset({0xF0, 0xF2, 0xF3, 0x2E, 0x36, 0x3E, 0x26, 0x64, 0x65, 0x66, 0x67})


def _modrm_length(code: bytes, at: int, bits: int, address_size_prefix: bool) -> int | None:
    """Bytes taken by the ModRM byte at ``at``, its SIB and its displacement."""
    if at >= len(code):
        return None
    modrm = code[at]
    mod, rm = modrm >> 6, modrm & 7
    if mod == 3:
        return 1
    if (bits == 16) != address_size_prefix:
        return None  # 16-bit addressing: not needed for the instructions below
    length = 1
    if rm == 4:
        if at + 1 >= len(code):
            return None
        length += 1
        if mod == 0 and code[at + 1] & 7 == 5:
            length += 4
    elif mod == 0 and rm == 5:
        length += 4
    return length + (1 if mod == 1 else 4 if mod == 2 else 0)


def recognize(code: bytes, *, bits: int = 64) -> tuple[str, int | None] | None:
    """The mnemonic and length of ``code``'s first instruction, for the instructions hosts fail on.

    A fallback for when no disassembler is installed: it knows the XSAVE family, the ``0f ae``
    and ``0f c7`` groups (``cmpxchg16b``, ``rdrand``, ``rdseed``, ``rdpid``), ``xgetbv``,
    ``xsetbv``, ``rdtscp``, ``monitor``, ``mwait``, ``movbe``, ``popcnt`` and ``int3``, and returns
    None for anything else. The length is None where it cannot be told (16-bit addressing).
    """
    at, rep, repne, addr16, rex_w = 0, False, False, False, False
    while at < len(code) and code[at] in _LEGACY_PREFIXES:
        rep |= code[at] == 0xF3
        repne |= code[at] == 0xF2
        addr16 |= code[at] == 0x67
        at += 1
    if bits == 64 and at < len(code) and 0x40 <= code[at] <= 0x4F:
        rex_w = bool(code[at] & 8)
        at += 1
    op = code[at:]
    if op[:1] == b"\xcc":
        return "int3", at + 1
    if len(op) < 3 or op[0] != 0x0F:
        return None
    second, modrm = op[1], op[2]
    reg, mod = modrm >> 3 & 7, modrm >> 6
    name: str | None = None
    modrm_at = at + 2
    if second == 0x01:
        fixed = {0xD0: "xgetbv", 0xD1: "xsetbv", 0xF9: "rdtscp", 0xC8: "monitor", 0xC9: "mwait"}
        return (fixed[modrm], at + 3) if modrm in fixed else None
    if second == 0xAE and mod != 3:
        name = ("fxsave", "fxrstor", "ldmxcsr", "stmxcsr", "xsave", "xrstor", "xsaveopt",
                "clflush")[reg]
        if rex_w and reg in (0, 1, 4, 5, 6):
            name += "64"
    elif second == 0xAE and reg in (5, 6, 7) and not (rep or repne):
        name = ("lfence", "mfence", "sfence")[reg - 5]
    elif second == 0xC7 and mod != 3:
        name = {1: "cmpxchg16b" if rex_w else "cmpxchg8b", 3: "xrstors", 4: "xsavec",
                5: "xsaves"}.get(reg)
    elif second == 0xC7:
        name = {6: "rdrand", 7: "rdpid" if rep else "rdseed"}.get(reg)
    elif second == 0x38 and len(op) >= 4 and op[2] in (0xF0, 0xF1) and not repne:
        name, modrm_at = "movbe", at + 3
    elif second == 0xB8 and rep:
        name = "popcnt"
    if name is None:
        return None
    rest = _modrm_length(code, modrm_at, bits, addr16)
    return name, None if rest is None else modrm_at + rest


def hint(mnemonic: str) -> str | None:
    """The CPUID flag behind ``mnemonic``, named as in ``/proc/cpuinfo``, when known.

    ``xrstor`` -> ``"xsave"``, ``lock cmpxchg16b`` -> ``"cx16"``; a VEX or EVEX encoded
    instruction (``vmovdqu``, ``vpxor`` ...) -> ``"avx"``.
    """
    words = mnemonic.lower().split()
    name = words[-1] if words else ""  # capstone names prefixes first: "lock cmpxchg16b"
    if name.endswith("64") and name[:-2] in HINTS:
        name = name[:-2]  # xsave64, xrstor64: the REX.W forms
    if name in HINTS:
        return HINTS[name]
    if name.startswith("v") and name not in _NOT_AVX:
        return "avx"
    return None


def describe_failure(error: BaseException | None, *, bits: int = 64) -> FailedInstruction | None:
    """The instruction behind ``error`` (a :class:`~kvmlib.VcpuError`), when KVM reported it.

    None unless ``error.exit`` is a KVM internal error for an emulation failure with the
    instruction's bytes. ``bits`` is the mode to decode in; kvmlib boots kernels in 64-bit mode.
    """
    fetched = instruction_bytes(getattr(error, "exit", None))
    if fetched is None:
        return None
    rip = getattr(error, "rip", None)
    decoded = disassemble(fetched, bits=bits, address=rip if isinstance(rip, int) else 0)
    text: str | None = None
    mnemonic: str | None
    length: int | None
    if decoded is not None:
        full, operands, length = decoded
        text = f"{full} {operands}".strip()
        mnemonic = full.split()[-1] if full.split() else None
    else:
        known = recognize(fetched, bits=bits)
        mnemonic, length = known if known is not None else (None, None)
    feature = hint(mnemonic) if mnemonic else None
    # Linux 5.19 and later take /proc/cpuinfo's names in clearcpuid= (older ones had noxsave
    # and the like, since removed).
    parameter = f"clearcpuid={feature}" if feature else None
    return FailedInstruction(code=fetched[:length] if length else fetched, fetched=fetched,
                             mnemonic=mnemonic, text=text, feature=feature,
                             kernel_parameter=parameter, note=NOTES.get(mnemonic or ""))


__all__ = [
    "EMULATION_SUBERROR", "HINTS", "MAX_INSTRUCTION_LENGTH", "NOTES", "FailedInstruction",
    "describe_failure", "disassemble", "disassembler_available", "hint", "instruction_bytes",
    "recognize",
]
