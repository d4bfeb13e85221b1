"""The built-in demo guest of ``kvmlib hello``: 2 vCPUs (by default) that print through port I/O.

vCPU 0 prints a greeting, then wakes the other vCPUs with INIT/SIPI (as firmware does on real
hardware); each prints its number. When every vCPU has printed, the guest writes the exit port and
the VM is shut down. The whole guest is a few hundred bytes of machine code, shipped with the
assembly source it was built from.
"""

from __future__ import annotations

import threading

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

SERIAL_PORT = 0x3F8
EXIT_PORT = 0x501
RAM_SIZE = 2 << 20
BSP_CODE = GuestAddress(0x10000)
AP_CODE = GuestAddress(0x20000)  # reached through SIPI vector 0x20
DATA = GuestAddress(0x30000)  # what the vCPUs share, below
APS_UP = DATA + 0  # u32: how many APs have printed their line (guest-maintained)
APS_EXPECTED = DATA + 4  # u32: how many APs there are (written by the host before the run)
CONSOLE_LOCK = DATA + 8  # u8: 1 while an AP is printing, so lines do not interleave
GREETING = b"Hello from a kvmlib guest!\n"

#: vCPU 0's program, 64-bit code at ``BSP_CODE`` (GNU ``as``, Intel syntax). It is written once here
#: and shipped as :data:`BSP_MACHINE_CODE`, so the demo needs no assembler; a test assembles it with
#: :func:`kvmlib.testing.assemble` and checks the two agree.
BSP_SOURCE = rf"""
        .equ SERIAL_PORT, {SERIAL_PORT:#x}
        .equ EXIT_PORT, {EXIT_PORT:#x}
        .equ APS_UP, {APS_UP:#x}
        .equ APS_EXPECTED, {APS_EXPECTED:#x}
        .equ IA32_APIC_BASE, 0x1b
        .equ APIC_BASE_EN_EXTD, 0xc00   # enabled, in x2APIC mode: the ICR is one MSR
        .equ X2APIC_ICR, 0x830
        .equ ICR_INIT_OTHERS, 0xc4500   # INIT, level assert, to all excluding self
        .equ ICR_SIPI_OTHERS, 0xc4600 | ({AP_CODE:#x} >> 12)

        lea rsi, [rip + greeting]
        mov dx, SERIAL_PORT
print:
        lodsb
        test al, al
        jz wake_aps
        out dx, al
        jmp print

wake_aps:                               # as firmware does on real hardware: INIT, then SIPI
        mov ecx, IA32_APIC_BASE
        rdmsr
        or eax, APIC_BASE_EN_EXTD
        wrmsr
        mov ecx, X2APIC_ICR
        xor edx, edx
        mov eax, ICR_INIT_OTHERS
        wrmsr
        mov eax, ICR_SIPI_OTHERS
        wrmsr

        mov eax, dword ptr [APS_EXPECTED]
wait_for_aps:                           # unsigned 32-bit compare: any count of APs works
        pause
        cmp dword ptr [APS_UP], eax
        jb wait_for_aps
        mov dx, EXIT_PORT
        out dx, al
        jmp $

greeting:
        .asciz "Hello from a kvmlib guest!\n"
"""

#: The other vCPUs' program, real-mode code at ``AP_CODE`` (CS = 0x2000, IP = 0 after the SIPI, so
#: labels are offsets from 0): print ``vCPU <id> up`` with the id in decimal, count itself, halt.
AP_SOURCE = rf"""
        .equ SERIAL_PORT, {SERIAL_PORT:#x}
        .equ DATA_SEGMENT, {DATA >> 4:#x}
        .equ APS_UP, {APS_UP - DATA}            # offsets in DATA_SEGMENT
        .equ CONSOLE_LOCK, {CONSOLE_LOCK - DATA}

.macro print_string label               # the NUL-terminated string at cs:label
        mov si, offset \label
1:
        lods al, byte ptr cs:[si]
        test al, al
        jz 2f
        out dx, al
        jmp 1b
2:
.endm

        mov ax, DATA_SEGMENT
        mov ds, ax
        mov eax, 1
        cpuid                           # EBX bits 31..24: the initial APIC id, which is the vCPU id
        shr ebx, 24
        mov dx, SERIAL_PORT

take_console:
        mov al, 1
        xchg al, byte ptr [CONSOLE_LOCK]
        test al, al
        jz print_line
        pause
        jmp take_console

print_line:
        print_string prefix
        mov ax, bx                      # the id (at most 254) in decimal, no leading zeros
        mov cl, 10
        div cl                          # al = id / 10, ah = ones
        mov ch, ah
        xor ah, ah
        div cl                          # al = hundreds, ah = tens
        cmp bx, 100
        jb no_hundreds
        add al, '0'
        out dx, al
no_hundreds:
        cmp bx, 10
        jb no_tens
        mov al, ah
        add al, '0'
        out dx, al
no_tens:
        mov al, ch
        add al, '0'
        out dx, al
        print_string suffix

        mov byte ptr [CONSOLE_LOCK], 0
        lock inc dword ptr [APS_UP]     # after the line: the BSP ends the VM when all are in
        cli
halt:
        hlt
        jmp halt

prefix:
        .asciz "vCPU "
suffix:
        .asciz " up\n"
"""

#: :data:`BSP_SOURCE` assembled (``assemble(BSP_SOURCE, origin=BSP_CODE)``).
BSP_MACHINE_CODE = bytes.fromhex(
    "48 8d 35 48 00 00 00 66 ba f8 03 ac 84 c0 74 03 "
    "ee eb f8 b9 1b 00 00 00 0f 32 0d 00 0c 00 00 0f "
    "30 b9 30 08 00 00 31 d2 b8 00 45 0c 00 0f 30 b8 "
    "20 46 0c 00 0f 30 8b 04 25 04 00 03 00 f3 90 39 "
    "04 25 00 00 03 00 72 f5 66 ba 01 05 ee eb fe 48 "
    "65 6c 6c 6f 20 66 72 6f 6d 20 61 20 6b 76 6d 6c "
    "69 62 20 67 75 65 73 74 21 0a 00"
)

#: :data:`AP_SOURCE` assembled (``assemble(AP_SOURCE, origin=0, bits=16)``).
AP_MACHINE_CODE = bytes.fromhex(
    "b8 00 30 8e d8 66 b8 01 00 00 00 0f a2 66 c1 eb "
    "18 ba f8 03 b0 01 86 06 08 00 84 c0 74 04 f3 90 "
    "eb f2 be 6c 00 2e ac 84 c0 74 03 ee eb f7 89 d8 "
    "b1 0a f6 f1 88 e5 30 e4 f6 f1 83 fb 64 72 03 04 "
    "30 ee 83 fb 0a 72 05 88 e0 04 30 ee 88 e8 04 30 "
    "ee be 72 00 2e ac 84 c0 74 03 ee eb f7 c6 06 08 "
    "00 00 66 f0 ff 06 00 00 fa f4 eb fd 76 43 50 55 "
    "20 00 20 75 70 0a 00"
)


class Console:
    """The serial port's data register, write-only, collecting what the guest prints."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.output = bytearray()

    def pio_read(self, base: int, offset: int, data: memoryview) -> None:
        data[:] = bytes(len(data))

    def pio_write(self, base: int, offset: int, data: memoryview) -> None:
        with self.lock:
            self.output += data


class ExitPort:
    """A port the guest writes to say it is done: it kicks the exit handler."""

    def __init__(self, handler: EventExitHandler) -> None:
        self.handler = handler

    def pio_read(self, base: int, offset: int, data: memoryview) -> None:
        data[:] = bytes(len(data))

    def pio_write(self, base: int, offset: int, data: memoryview) -> None:
        self.handler.kick()


def run_hello(num_vcpus: int = 2, timeout: float = 30.0) -> bytes:
    """Boot the built-in guest on ``num_vcpus`` vCPUs through :class:`KvmVm`; return its output."""
    handler = EventExitHandler()
    console = Console()
    bus = IoManager()
    bus.register_pio(PioRange(SERIAL_PORT, 1), console)
    bus.register_pio(PioRange(EXIT_PORT, 1), ExitPort(handler))
    with Kvm() as kvm, GuestMemoryMmap.from_ranges([(GuestAddress(0), RAM_SIZE)]) as memory:
        vm = KvmVm.new(kvm, VmConfig.from_kvm(kvm, num_vcpus), memory, handler, bus)
        with vm:
            memory.write(BSP_CODE, BSP_MACHINE_CODE)
            memory.write(AP_CODE, AP_MACHINE_CODE)
            memory.write_u32(APS_EXPECTED, num_vcpus - 1)
            vm.run(BSP_CODE)
            finished = handler.wait(timeout)
            vm.shutdown()
            if not finished:
                raise KvmError(f"the built-in guest did not finish within {timeout} s")
    return bytes(console.output)


__all__ = [
    "APS_EXPECTED",
    "APS_UP",
    "AP_CODE",
    "AP_MACHINE_CODE",
    "AP_SOURCE",
    "BSP_CODE",
    "BSP_MACHINE_CODE",
    "BSP_SOURCE",
    "CONSOLE_LOCK",
    "DATA",
    "EXIT_PORT",
    "GREETING",
    "RAM_SIZE",
    "SERIAL_PORT",
    "Console",
    "ExitPort",
    "run_hello",
]
