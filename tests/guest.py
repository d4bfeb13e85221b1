"""Small guest programs for the tests, as commented machine code, and a helper to run them."""

from __future__ import annotations

from kvmlib import GuestAddress, GuestMemoryMmap, Kvm, VcpuFd, VmFd

#: Guest-physical layout the real-mode tests use: 64 KiB of RAM at 0, code at CODE_ADDR.
RAM_SIZE = 0x10000
CODE_ADDR = 0x1000
#: Unbacked guest-physical address: accesses there become MMIO exits.
MMIO_ADDR = 0x20000


def real_mode_vcpu(vm: VmFd, memory: GuestMemoryMmap, code: bytes, vcpu_id: int = 0) -> VcpuFd:
    """Map ``memory``, load ``code`` at CODE_ADDR, and make a vCPU that starts there in real mode."""
    for slot, region in enumerate(memory.regions):
        vm.set_user_memory_region(slot, int(region.start_addr), region.size, region.host_address,
                                  region.flags)
    memory.write(GuestAddress(CODE_ADDR), code)
    vcpu = vm.create_vcpu(vcpu_id)
    sregs = vcpu.get_sregs()
    # Flat real mode: every segment's base 0, so guest addresses are physical addresses.
    for seg in (sregs.cs, sregs.ds, sregs.es, sregs.ss):
        seg.base, seg.selector = 0, 0
    vcpu.set_sregs(sregs)
    regs = vcpu.get_regs()
    regs.rip, regs.rflags, regs.rsp = CODE_ADDR, 0x2, 0x8000
    vcpu.set_regs(regs)
    return vcpu


def new_vm(kvm: Kvm) -> tuple[VmFd, GuestMemoryMmap]:
    """A VM with RAM_SIZE bytes of anonymous memory at guest-physical 0."""
    vm = kvm.create_vm()
    return vm, GuestMemoryMmap.from_ranges([(GuestAddress(0), RAM_SIZE)])
