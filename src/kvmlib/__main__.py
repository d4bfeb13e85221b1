"""``python -m kvmlib``: boot a tiny built-in guest on 2 vCPUs that prints through port I/O.

vCPU 0 prints a greeting, then wakes the other vCPUs with INIT/SIPI (as firmware does on real
hardware); each prints its number. When every vCPU has printed, the guest writes the exit port and
the VM is shut down.
"""

from __future__ import annotations

import argparse
import sys
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
AP_COUNT = GuestAddress(0x30000)  # how many APs have printed (guest-maintained)
GREETING = b"Hello from a kvmlib guest!\n"
_MSG = BSP_CODE + 0x100


def _bsp_program(num_vcpus: int) -> bytes:
    """64-bit code: print the greeting, start the APs, wait for them, then write the exit port."""
    msg = _MSG.to_bytes(4, "little")
    count = AP_COUNT.to_bytes(4, "little")
    code = bytes([
        0xBE, *msg,                    # mov esi, GREETING
        0x66, 0xBA, 0xF8, 0x03,        # mov dx, SERIAL_PORT
        0xAC,                          # next: lodsb
        0x84, 0xC0,                    # test al, al
        0x74, 0x03,                    # jz done
        0xEE,                          # out dx, al
        0xEB, 0xF8,                    # jmp next
        0xB9, 0x1B, 0x00, 0x00, 0x00,  # done: mov ecx, IA32_APIC_BASE
        0x0F, 0x32,                    # rdmsr
        0x0D, 0x00, 0x0C, 0x00, 0x00,  # or eax, EN | EXTD (x2APIC)
        0x0F, 0x30,                    # wrmsr
        0xB9, 0x30, 0x08, 0x00, 0x00,  # mov ecx, x2APIC ICR
        0x31, 0xD2,                    # xor edx, edx
        0xB8, 0x00, 0x45, 0x0C, 0x00,  # mov eax, INIT to all but self
        0x0F, 0x30,                    # wrmsr
        0xB8, 0x20, 0x46, 0x0C, 0x00,  # mov eax, SIPI vector 0x20 to all but self
        0x0F, 0x30,                    # wrmsr
        0x83, 0x3C, 0x25, *count, num_vcpus - 1,  # wait: cmp dword [AP_COUNT], num_vcpus-1
        0x72, 0xF6,                    # jb wait
        0x66, 0xBA, 0x01, 0x05,        # mov dx, EXIT_PORT
        0xEE,                          # out dx, al
        0xEB, 0xFE,                    # jmp $
    ])
    return code.ljust(_MSG - BSP_CODE, b"\x90") + GREETING + b"\0"


def _ap_program() -> bytes:
    """Real-mode code for every other vCPU: take a number, print a line, count itself, halt."""
    return bytes([
        0xB8, 0x00, 0x30,              # mov ax, 0x3000  (AP_COUNT >> 4)
        0x8E, 0xD8,                    # mov ds, ax
        0xB3, 0x01,                    # mov bl, 1
        0xBA, 0xF8, 0x03,              # mov dx, SERIAL_PORT
        0xB0, 0x01,                    # lock: mov al, 1
        0x86, 0x06, 0x08, 0x00,        # xchg [8], al      (one line at a time on the console)
        0x84, 0xC0,                    # test al, al
        0x75, 0xF6,                    # jnz lock
        0xB0, ord("v"), 0xEE,          # mov al, 'v' ; out dx, al
        0xB0, ord("C"), 0xEE,          # 'C'
        0xB0, ord("P"), 0xEE,          # 'P'
        0xB0, ord("U"), 0xEE,          # 'U'
        0xB0, ord(" "), 0xEE,          # ' '
        0xF0, 0x0F, 0xC0, 0x1E, 0x04, 0x00,  # lock xadd [4], bl   (bl = previous ticket)
        0x88, 0xD8,                    # mov al, bl
        0x04, ord("1"),                # add al, '1'
        0xEE,                          # out dx, al
        0xB0, ord(" "), 0xEE,
        0xB0, ord("u"), 0xEE,
        0xB0, ord("p"), 0xEE,
        0xB0, 0x0A, 0xEE,              # '\n'
        0xC6, 0x06, 0x08, 0x00, 0x00,  # mov byte [8], 0   (unlock)
        0xF0, 0x66, 0xFF, 0x06, 0x00, 0x00,  # lock inc dword [0]   (AP_COUNT)
        0xFA,                          # cli
        0xF4,                          # hlt
        0xEB, 0xFD,                    # jmp hlt
    ])


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
            memory.write(BSP_CODE, _bsp_program(num_vcpus))
            memory.write(AP_CODE, _ap_program())
            vm.run(BSP_CODE)
            finished = handler.wait(timeout)
            vm.shutdown()
            if not finished:
                raise KvmError(f"the built-in guest did not finish within {timeout} s")
    return bytes(console.output)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m kvmlib`` and of the ``kvmlib`` command.

    ``kvmlib run ...`` boots a Linux kernel (see :mod:`kvmlib.cli`); without a command it runs the
    built-in guest.
    """
    args_list = sys.argv[1:] if argv is None else argv
    if args_list[:1] == ["run"]:
        from kvmlib import cli
        return cli.main(args_list[1:])
    parser = argparse.ArgumentParser(
        prog="python -m kvmlib", description=__doc__,
        epilog="To boot a Linux kernel: python -m kvmlib run --kernel PATH ... "
               "(see python -m kvmlib run --help).",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vcpus", type=int, default=2, help="how many vCPUs (default 2)")
    args = parser.parse_args(args_list)
    try:
        output = run_hello(args.vcpus)
    except KvmError as e:
        print(f"kvmlib: {e}", file=sys.stderr)
        return 1
    sys.stdout.write(output.decode("ascii", "replace"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
