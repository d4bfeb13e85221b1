"""``python -m kvmlib``: run a tiny built-in guest that prints through port I/O."""

from __future__ import annotations

import argparse
import sys

from kvmlib import GuestAddress, GuestMemoryMmap, Hlt, IoOut, Kvm, KvmError

SERIAL_PORT = 0x3F8
CODE_ADDR = 0x1000
MESSAGE = b"Hello from a kvmlib guest!\n"

# Real-mode code at CODE_ADDR: write the NUL-terminated message at CODE_ADDR + 15 to the serial port.
HELLO_GUEST = bytes([
    0xBE, (CODE_ADDR + 15) & 0xFF, (CODE_ADDR + 15) >> 8,  # mov si, message
    0xBA, SERIAL_PORT & 0xFF, SERIAL_PORT >> 8,            # mov dx, 0x3f8
    0xAC,                                                  # next: lodsb
    0x84, 0xC0,                                            # test al, al
    0x74, 0x03,                                            # jz done
    0xEE,                                                  # out dx, al
    0xEB, 0xF8,                                            # jmp next
    0xF4,                                                  # done: hlt
]) + MESSAGE + b"\0"


def run_hello(out: list[bytes]) -> None:
    """Run the built-in guest on one vCPU through the low-level API, collecting what it prints."""
    with Kvm() as kvm, kvm.create_vm() as vm, GuestMemoryMmap.from_ranges(
        [(GuestAddress(0), 0x10000)]
    ) as memory:
        region = memory.regions[0]
        vm.set_user_memory_region(0, 0, region.size, region.host_address)
        memory.write(HELLO_GUEST, GuestAddress(CODE_ADDR))
        with vm.create_vcpu(0) as vcpu:
            sregs = vcpu.get_sregs()
            sregs.cs.base = sregs.cs.selector = 0
            vcpu.set_sregs(sregs)
            regs = vcpu.get_regs()
            regs.rip, regs.rflags = CODE_ADDR, 2
            vcpu.set_regs(regs)
            while True:
                exit_ = vcpu.run()
                if isinstance(exit_, IoOut) and exit_.port == SERIAL_PORT:
                    out.append(bytes(exit_.data))
                elif isinstance(exit_, Hlt):
                    return
                else:
                    raise KvmError(f"unexpected exit from the built-in guest: {exit_!r}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m kvmlib``."""
    parser = argparse.ArgumentParser(prog="python -m kvmlib", description=__doc__)
    parser.parse_args(argv)
    printed: list[bytes] = []
    try:
        run_hello(printed)
    except KvmError as e:
        print(f"kvmlib: {e}", file=sys.stderr)
        return 1
    sys.stdout.write(b"".join(printed).decode("ascii", "replace"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
