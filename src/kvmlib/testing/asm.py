"""Assemble small x86 guest programs with GNU ``as``, for tests.

:func:`assemble` turns Intel-syntax source (GNU ``as`` dialect: ``.intel_syntax noprefix``) into the
flat machine code to place at a guest address. It runs the GNU binutils ``as`` and ``ld`` as
subprocesses, so it is a test-time convenience, never something kvmlib itself needs: guests that
must run everywhere (such as the one ``python -m kvmlib`` boots) keep their machine code as bytes and
their source beside it.

Comments start with ``#`` (or are ``/* ... */``); ``;`` separates statements, as in GNU ``as``.
"""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from kvmlib.errors import KvmError

#: Seconds each of ``as`` and ``ld`` may take: guest programs are tiny, so this only bounds a hang.
TOOL_TIMEOUT = 30.0

_MODE_DIRECTIVES = {16: ".code16", 32: ".code32", 64: ".code64"}
_INSTALL_HINT = "install GNU binutils (Debian/Ubuntu: apt install binutils; Fedora: dnf install binutils)"
_SOURCE_NAME = "guest.s"

# Everything the program allocates goes into one output section, in source order of kinds, so the
# flat binary has no gaps between code and data and every address is origin plus offset.
_LINKER_SCRIPT = """\
SECTIONS
{{
  . = {origin:#x};
  .text : {{
    *(.text .text.*)
    *(.rodata .rodata.*)
    *(.data .data.*)
    *(.bss .bss.* COMMON)
  }}
}}
"""

# A position in the source as ``as`` ("guest.s:12:") or ``ld`` ("/tmp/.../guest.s:12:(.text+0x3):",
# from the line table ``-g`` records) print it.
_POSITION = re.compile(r"(?:\S*/)?" + re.escape(_SOURCE_NAME) + r":(\d+):(?:\([^)]*\):)?")
# Lines that only introduce the messages after them.
_NOISE = re.compile(r"Assembler messages:$|: in function `[^']*':$")


class AssemblerError(KvmError):
    """Guest source could not be assembled, or the GNU binutils needed to do it are missing.

    Attributes:
        messages: the assembler's and linker's messages, each position rewritten as
            ``line N:`` of the source given to :func:`assemble`.
        lines: the source line numbers (1-based) the messages point at, in order, without repeats.
    """

    def __init__(self, message: str, *, messages: Sequence[str] = (),
                 lines: Sequence[int] = ()) -> None:
        super().__init__(message)
        self.messages = tuple(messages)
        self.lines = tuple(lines)


def assemble(source: str, *, origin: int = 0x10000, bits: int = 64) -> bytes:
    """Assemble Intel-syntax ``source`` into the flat machine code to load at guest address ``origin``.

    Args:
        source: GNU ``as`` source in Intel syntax without register prefixes (``mov al, 0x41``),
            with labels, local labels (``1:`` / ``jmp 1b``), ``.byte`` / ``.word`` / ``.quad`` /
            ``.ascii``, ``.equ`` and macros. ``.data`` and ``.bss`` follow the code directly.
        origin: the address the first byte is placed at, which absolute references to labels
            (``mov eax, offset label``) resolve against. For real-mode code it is the offset within
            the code segment (0 for code a SIPI starts at ``vector << 12``).
        bits: 16, 32 or 64: the processor mode the code runs in.

    Returns:
        The bytes from ``origin`` to the end of the program.

    Raises:
        AssemblerError: the source has errors (or draws warnings, which are treated as errors
            because in guest code they mean silently wrong bytes, e.g. a truncated value), or GNU
            ``as`` / ``ld`` are not installed.
        ValueError: ``bits`` is not 16, 32 or 64, or ``origin`` is not a 64-bit address.

    Results are cached by ``(source, origin, bits)``: tests assemble the same guests repeatedly.
    """
    if not isinstance(source, str):
        raise TypeError(f"source must be str, not {type(source).__name__}")
    if bits not in _MODE_DIRECTIVES:
        raise ValueError(f"bits must be 16, 32 or 64, not {bits!r}")
    if not 0 <= origin < 1 << 64:
        raise ValueError(f"origin must be a 64-bit guest address, not {origin:#x}")
    return _assemble(source, int(origin), bits)


@functools.lru_cache(maxsize=256)
def _assemble(source: str, origin: int, bits: int) -> bytes:
    assembler = _find("as")
    linker = _find("ld")
    if not source.endswith("\n"):
        source += "\n"  # otherwise ``as`` warns, and warnings are fatal here
    with tempfile.TemporaryDirectory(prefix="kvmlib-asm-") as tmp:
        work = Path(tmp)
        # The mode directives go in a file of their own, read first: ``as`` keeps its state across
        # input files and numbers each file's lines separately, so messages name the user's lines.
        (work / "prologue.s").write_text(f".intel_syntax noprefix\n{_MODE_DIRECTIVES[bits]}\n")
        (work / _SOURCE_NAME).write_text(source)
        (work / "link.ld").write_text(_LINKER_SCRIPT.format(origin=origin))
        # -g: a line table, so ``ld`` can name the source line of a relocation that does not fit.
        _run([assembler, "--64", "--fatal-warnings", "-g", "-o", "guest.o", "prologue.s", _SOURCE_NAME],
             work, source, origin, bits)
        # -e: an explicit entry point keeps ``ld`` from warning that ``_start`` is missing.
        _run([linker, "-m", "elf_x86_64", "-T", "link.ld", "-e", f"{origin:#x}", "--oformat", "binary",
              "-o", "guest.bin", "guest.o"], work, source, origin, bits)
        return (work / "guest.bin").read_bytes()


def _find(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise AssemblerError(f"assembling guest code needs GNU {tool!r}, which is not on PATH: "
                             f"{_INSTALL_HINT}")
    return path


def _run(argv: list[str], cwd: Path, source: str, origin: int, bits: int) -> None:
    tool = Path(argv[0]).name
    try:
        done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, errors="replace",
                              timeout=TOOL_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        raise AssemblerError(f"{tool} did not finish within {TOOL_TIMEOUT:g} s") from None
    except OSError as e:
        raise AssemblerError(f"cannot run {argv[0]}: {e}; {_INSTALL_HINT}") from e
    if done.returncode != 0:
        # ``ld`` starts its messages with the path it was run as: the tool's name is enough.
        output = (done.stdout + done.stderr).replace(f"{argv[0]}: ", f"{tool}: ")
        raise _failure(tool, output, done.returncode, source, origin, bits)


def _failure(tool: str, output: str, returncode: int, source: str, origin: int,
             bits: int) -> AssemblerError:
    messages: list[str] = []
    lines: list[int] = []
    for raw in output.splitlines():
        if not raw.strip() or _NOISE.search(raw):
            continue
        match = _POSITION.search(raw)
        if match is None:
            messages.append(raw)
            continue
        number = int(match.group(1))
        if number not in lines:
            lines.append(number)
        messages.append(raw[:match.start()] + f"line {number}:" + raw[match.end():])
    if not messages:
        messages.append(f"{tool} exited with status {returncode} and no message")
    source_lines = source.splitlines()
    report = [f"cannot assemble the guest code ({bits}-bit, origin {origin:#x}):", *messages]
    for number in lines:
        if 1 <= number <= len(source_lines):
            report.append(f"{number:5} | {source_lines[number - 1]}")
    return AssemblerError("\n".join(report), messages=messages, lines=lines)


__all__ = ["TOOL_TIMEOUT", "AssemblerError", "assemble"]
