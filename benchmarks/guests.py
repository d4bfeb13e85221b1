"""The guest programs both sides run (64-bit code loaded at CODE; the C side reads the same bytes)."""

from __future__ import annotations

import struct

CODE = 0x10000
WORK_PORT = 0x10
DONE_PORT = 0x11


def exit_loop(exits: int) -> bytes:
    """``exits`` port writes to WORK_PORT, then one to DONE_PORT, then halt (ring 0)."""
    return bytes([
        0xB9, *struct.pack("<I", exits),  # mov ecx, exits
        0xE6, WORK_PORT,                  # next: out WORK_PORT, al
        0xFF, 0xC9,                       # dec ecx
        0x75, 0xFA,                       # jnz next
        0xE6, DONE_PORT,                  # out DONE_PORT, al
        0xFA, 0xF4,                       # cli; hlt
    ])


#: Report once on WORK_PORT, then halt: "run to the first exit".
FIRST_EXIT = bytes([0xE6, WORK_PORT, 0xFA, 0xF4])


def ring3_work(iterations: int) -> bytes:
    """A ring-3 compute loop of ``iterations`` (runs natively even where ring 0 is emulated), then
    DONE_PORT, then spin."""
    if not 0 < iterations < 1 << 31:
        raise ValueError("iterations must fit a signed 32-bit immediate")
    return bytes([
        0x48, 0xC7, 0xC1, *struct.pack("<I", iterations),  # mov rcx, iterations
        0x48, 0xFF, 0xC9,                                  # next: dec rcx
        0x75, 0xFB,                                        # jnz next
        0xE6, DONE_PORT,                                   # out DONE_PORT, al
        0xEB, 0xFE,                                        # jmp $
    ])


#: Ring 3: report once on WORK_PORT, then spin without exits (what pause and shutdown interrupt).
RING3_REPORT_AND_SPIN = bytes([0xE6, WORK_PORT, 0xEB, 0xFE])


INPUT_PORT = 0x12
#: Where the fuzz target writes its pages: above the boot tables and the code.
FUZZ_PAGES_AT = 0x200000


def fuzz_target(pages: int) -> bytes:
    """Ring 3: read an input byte from INPUT_PORT, write it into ``pages`` pages, report DONE."""
    if not 0 < pages < 1 << 20:
        raise ValueError("pages must be positive and fit the guest")
    return bytes([
        0xE4, INPUT_PORT,                                # in al, INPUT_PORT
        0x0F, 0xB6, 0xC0,                                # movzx eax, al
        0xBF, *struct.pack("<I", FUZZ_PAGES_AT),         # mov edi, FUZZ_PAGES_AT
        0xB9, *struct.pack("<I", pages),                 # mov ecx, pages
        0x89, 0x07,                                      # next: mov [rdi], eax
        0x48, 0x81, 0xC7, 0x00, 0x10, 0x00, 0x00,        # add rdi, 4096
        0xFF, 0xC9,                                      # dec ecx
        0x75, 0xF3,                                      # jnz next
        0xE6, DONE_PORT,                                 # out DONE_PORT, al
        0xEB, 0xFE,                                      # jmp $
    ])
