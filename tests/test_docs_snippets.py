"""Every Python snippet in README.md and docs/*.rst runs, as a reader would run it.

A snippet is a ```` ```python ```` fence in the README, or a ``.. code-block:: python`` in the
docs. Each runs on its own, in a fresh directory, in a new interpreter, and must exit 0. Plain
``::`` literal blocks are for shell commands and output: one that holds Python statements fails
the suite, so that no Python example can hide from it. The rare snippet that cannot run says why
in an rst comment right above it (``.. not-run: reason``); there is none today.

The booting snippets of docs/boot.rst name ``bzImage`` and ``initramfs.cpio`` in the current
directory. Their directory gets a stand-in kernel built here: it prints a Linux-like banner, then,
with ``/bin/sh`` on its command line, serves a prompt that answers ``uname -r`` and
``reboot -f``, and otherwise reboots at once, as an initramfs whose ``/init`` reboots would.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

from kvmlib import Kvm
from kvmlib.testing import assemble

from .loader_images import bzimage

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.rst"))]
PYTHON_LANGUAGES = {"python", "python3", "py"}
TIMEOUT = 120


@dataclass(frozen=True)
class Block:
    """A code block of a document: where it starts, its language (None for ``::``), its text."""

    path: Path
    line: int
    language: str | None
    code: str
    not_run: str | None = None

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT) if self.path.is_relative_to(ROOT) else self.path}:{self.line}"


def markdown_blocks(path: Path, text: str) -> list[Block]:
    """The fenced code blocks of a Markdown document."""
    blocks = []
    for match in re.finditer(r"^```(\w*)[^\n]*\n(.*?)^```", text, re.MULTILINE | re.DOTALL):
        line = text.count("\n", 0, match.start()) + 1
        blocks.append(Block(path, line, match.group(1) or None, match.group(2)))
    return blocks


def _indented_block(lines: list[str], start: int) -> tuple[str, int]:
    """The block indented under the line before ``start`` (options skipped), and where it ends."""
    i = start
    while i < len(lines) and re.match(r"^\s+:[\w-]+:", lines[i]):  # directive options
        i += 1
    body: list[str] = []
    while i < len(lines) and (not lines[i].strip() or lines[i][:1].isspace()):
        body.append(lines[i])
        i += 1
    while body and not body[-1].strip():
        body.pop()
    return textwrap.dedent("\n".join(body)).strip("\n") + "\n", i


def rst_blocks(path: Path, text: str) -> list[Block]:
    """The code blocks of an rst document: ``code-block`` directives and ``::`` literal blocks."""
    lines = text.splitlines()
    blocks: list[Block] = []
    not_run: str | None = None
    i = 0
    while i < len(lines):
        line = lines[i]
        marker = re.match(r"^\.\. not-run:(.*)$", line)
        directive = re.match(r"^\s*\.\. (?:code-block|code|sourcecode)::\s*(\S*)\s*$", line)
        if marker:
            not_run = marker.group(1).strip()
            if not not_run:
                raise AssertionError(f"{path}:{i + 1}: '.. not-run:' needs a reason")
            i += 1
            continue
        if directive:
            code, end = _indented_block(lines, i + 1)
            blocks.append(Block(path, i + 1, directive.group(1) or None, code, not_run))
            not_run, i = None, end
            continue
        if line.rstrip().endswith("::") and not line.lstrip().startswith(".."):
            code, end = _indented_block(lines, i + 1)
            if code.strip():
                blocks.append(Block(path, i + 1, None, code, not_run))
            not_run, i = None, end
            continue
        if line.strip():
            not_run = None  # a marker applies to the block right below it only
        i += 1
    return blocks


def document_blocks(path: Path) -> list[Block]:
    text = path.read_text()
    return markdown_blocks(path, text) if path.suffix == ".md" else rst_blocks(path, text)


def looks_like_python(code: str) -> bool:
    """Whether a block is Python statements (imports, assignments, calls), not output or shell."""
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return False
    return any(isinstance(node, (ast.Import, ast.ImportFrom, ast.Assign, ast.Call, ast.With,
                                 ast.For, ast.FunctionDef, ast.ClassDef))
               for node in ast.walk(tree))


SNIPPETS = [b for path in DOCUMENTS for b in document_blocks(path) if b.language in PYTHON_LANGUAGES]


# ---- the extraction itself ----------------------------------------------------------------------

def test_blocks_are_found_with_their_language_line_and_marker(tmp_path: Path) -> None:
    rst = tmp_path / "page.rst"
    text = ("Title\n=====\n\nRun this:\n\n.. code-block:: python\n   :caption: x\n\n"
            "   import os\n   print(os.sep)\n\nOutput::\n\n    /\n\n"
            ".. not-run: needs a GPU\n\n.. code-block:: python\n\n   import torch\n\nText.\n")
    blocks = rst_blocks(rst, text)
    assert [(b.line, b.language, b.code, b.not_run) for b in blocks] == [
        (6, "python", "import os\nprint(os.sep)\n", None),
        (12, None, "/\n", None),
        (18, "python", "import torch\n", "needs a GPU"),
    ]
    md = "Intro\n\n```python\nx = 1\n```\n\n```sh\nls\n```\n"
    assert [(b.line, b.language, b.code) for b in markdown_blocks(tmp_path / "R.md", md)] == [
        (3, "python", "x = 1\n"), (7, "sh", "ls\n")]
    with pytest.raises(AssertionError, match="needs a reason"):
        rst_blocks(rst, ".. not-run:\n\n.. code-block:: python\n\n   pass\n")


def test_python_is_told_from_output_and_shell() -> None:
    assert looks_like_python("from kvmlib import Kvm\n")
    assert looks_like_python("vm.pause()\n")
    assert not looks_like_python("python -m benchmarks --quick   # briefly\n")
    assert not looks_like_python("input   3: reset copied back 4 pages\n")
    assert not looks_like_python("b'A'\n")


def test_every_python_example_is_a_code_block_that_runs() -> None:
    assert len(SNIPPETS) >= 8, [s.where for s in SNIPPETS]
    hidden = [b.where for path in DOCUMENTS for b in document_blocks(path)
              if b.language is None and looks_like_python(b.code)]
    assert not hidden, f"Python in plain literal blocks (write '.. code-block:: python'): {hidden}"
    skipped = [(s.where, s.not_run) for s in SNIPPETS if s.not_run]
    assert not skipped, f"snippets marked not-run (keep these rare, each with its reason): {skipped}"


# ---- running them --------------------------------------------------------------------------------

STAND_IN_KERNEL = r"""
    .equ COM1, 0x3f8
    .equ LSR, 0x3fd
    cld
    mov esi, [rsi + 0x228]          # boot_params.hdr.cmd_line_ptr
find:                               # does the command line name /bin/sh?
    cmp byte ptr [rsi], 0
    je init
    lea rdi, [rip + shell_path]
    mov ecx, 7
    push rsi
    repe cmpsb
    pop rsi
    je shell
    inc rsi
    jmp find
init:                               # like an initramfs whose /init reboots
    lea rsi, [rip + banner]
    call puts
    lea rsi, [rip + init_text]
    call puts
    jmp reboot
shell:
    lea rsi, [rip + banner]
    call puts
prompt:
    lea rsi, [rip + prompt_text]
    call puts
    lea rdi, [rip + line]
read:
    call getc
    cmp al, 10
    je enter
    cmp al, 13
    je enter
    out dx, al                      # echo (dx is still COM1)
    lea rsi, [rip + line_end]
    cmp rdi, rsi
    jae read
    mov [rdi], al
    inc rdi
    jmp read
enter:
    lea rsi, [rip + crlf]
    call puts
    lea rsi, [rip + uname_cmd]
    mov ecx, 8
    call is_line
    je uname
    lea rsi, [rip + reboot_cmd]
    mov ecx, 9
    call is_line
    je reboot
    jmp prompt
uname:
    lea rsi, [rip + release]
    call puts
    jmp prompt
reboot:
    mov al, 0xfe                    # the i8042's CPU reset
    out 0x64, al
    jmp reboot

is_line:                            # ZF: the line (line..rdi) is the rcx bytes at rsi
    lea rax, [rip + line]
    mov rdx, rdi
    sub rdx, rax
    cmp rdx, rcx
    jne 1f
    push rdi
    mov rdi, rax
    repe cmpsb
    pop rdi
1:  ret

getc:                               # al: the next byte from the UART
    mov dx, LSR
1:  in al, dx
    test al, 1
    jz 1b
    mov dx, COM1
    in al, dx
    ret

puts:                               # print the NUL-terminated string at rsi
    mov dx, COM1
1:  lodsb
    test al, al
    jz 2f
    out dx, al
    jmp 1b
2:  ret

banner: .asciz "Linux version 6.1.0-standin (kvmlib docs test kernel)\r\n"
init_text: .asciz "Run /init as init process\r\nreboot: Restarting system\r\n"
prompt_text: .asciz "# "
crlf: .asciz "\r\n"
release: .asciz "6.1.0-standin\r\n"
shell_path: .ascii "/bin/sh"
uname_cmd: .ascii "uname -r"
reboot_cmd: .ascii "reboot -f"
line: .space 120
line_end:
"""


@pytest.fixture(scope="session")
def stand_in_kernel() -> bytes:
    """The stand-in bzImage: its 64-bit entry is 0x200 bytes into the protected-mode kernel."""
    return bzimage(b"\0" * 0x200 + assemble(STAND_IN_KERNEL, origin=0x100200))


def run_snippet(snippet: Block, directory: Path) -> subprocess.CompletedProcess[str]:
    script = directory / "snippet.py"
    script.write_text(snippet.code)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])]))
    return subprocess.run([sys.executable, str(script)], cwd=directory, env=env, text=True,
                          capture_output=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL, check=False)


@pytest.mark.parametrize("snippet", [s for s in SNIPPETS if not s.not_run], ids=lambda s: s.where)
def test_the_snippet_runs(snippet: Block, kvm: Kvm, stand_in_kernel: bytes, tmp_path: Path) -> None:
    (tmp_path / "bzImage").write_bytes(stand_in_kernel)
    (tmp_path / "initramfs.cpio").write_bytes(b"070701" + bytes(104))  # never read by the stand-in
    done = run_snippet(snippet, tmp_path)
    assert done.returncode == 0, f"{snippet.where} failed:\n{done.stdout}\n{done.stderr}"


def test_the_stand_in_kernel_boots_to_a_prompt_and_reboots(kvm: Kvm, stand_in_kernel: bytes,
                                                          tmp_path: Path) -> None:
    # What the booting snippets rely on, checked here so that a broken stand-in fails by name.
    from kvmlib.vmm import Vmm, VmmConfig, VmmExitReason

    kernel = tmp_path / "bzImage"
    kernel.write_bytes(stand_in_kernel)
    with Vmm(VmmConfig(kernel=kernel, cmdline="console=ttyS0 rdinit=/bin/sh", memory_mib=64)) as vmm:
        vmm.start()
        vmm.console.expect("Linux version 6.1.0-standin", timeout=20)
        vmm.console.expect("# ", timeout=20)
        vmm.console.send("echo\nuname -r\n")
        assert vmm.console.expect(re.compile(r"uname -r\r\n(\S+)\r\n# "), timeout=20).group(1) == (
            "6.1.0-standin")
        vmm.console.send("reboot -f\n")
        result = vmm.wait(timeout=20)
        assert result is not None and result.reason is VmmExitReason.RESET
    result = Vmm(VmmConfig(kernel=kernel, cmdline="console=ttyS0 rdinit=/init",
                           memory_mib=64)).run(timeout=20)
    assert result.reason is VmmExitReason.RESET
    assert result is not None
