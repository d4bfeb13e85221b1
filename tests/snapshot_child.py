"""Run by test_snapshot in a fresh Python process: restore a snapshot, run it to DONE, report.

Usage: ``python -m tests.snapshot_child SNAPSHOT_DIR MODE``; prints one JSON object.
"""

from __future__ import annotations

import hashlib
import json
import sys

from kvmlib import Kvm
from kvmlib.exit_handler import EventExitHandler
from kvmlib.snapshot import restore_snapshot

from .snapshot_guests import COUNTER, Counter, Tape, counting_bus


def main(path: str, mode: str) -> None:
    counter, tape = Counter(), Tape()
    with Kvm() as kvm:
        vm, memory = restore_snapshot(kvm, path, EventExitHandler(), counting_bus(counter, tape),
                                      mode="mmap" if mode == "mmap" else "read")
        with memory, vm:
            rax_at_start = vm.vcpu_regs(0).rax
            tape_at_start = tape.last
            vm.run()
            if not counter.wait_done(30):
                raise SystemExit("the restored guest never said DONE")
            vm.pause()
            digest = hashlib.sha256()
            for region in memory.regions:
                digest.update(region.as_memoryview())
            print(json.dumps({
                "rax_at_start": rax_at_start, "tape_at_start": tape_at_start,
                "values": counter.values, "rax": vm.vcpu_regs(0).rax,
                "counter": memory.read_u64(COUNTER), "memory_sha256": digest.hexdigest(),
            }))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
