"""Run by test_migration in a fresh process: receive a VM over an inherited socket, run it, report.

Usage: ``python -m tests.migration_child FD MODE``; prints one JSON object. MODE is ``run``
(receive, inspect, resume, count on, report), ``layout`` (offer memory of another layout than
the source's, so the receiver refuses) or ``require-checksums`` (``run``, refusing a stream
without page checksums). A refusal is reported as ``{"error": message}``.
"""

from __future__ import annotations

import json
import socket
import sys
from typing import Any

from kvmlib import GuestMemoryMmap, Kvm
from kvmlib.exit_handler import EventExitHandler
from kvmlib.migration import MigrationError, receive

from .migration_guests import (
    HOST_NOTE,
    NOISE,
    NOISE_SIZE,
    RAM_SIZE,
    digest,
    noise,
    tape_bus,
    wait_counter_above,
    window_consistent,
)
from .snapshot_guests import Tape

TIMEOUT = 20.0


def main(fd: int, mode: str) -> None:
    tape = Tape()
    report: dict[str, Any] = {}
    with socket.socket(fileno=fd) as sock, Kvm() as kvm:
        offered = GuestMemoryMmap.from_ranges([(0, 2 * RAM_SIZE)]) if mode == "layout" else None
        try:
            vm, memory = receive(kvm, sock, EventExitHandler(), tape_bus(tape), memory=offered,
                                 require_page_checksums=mode == "require-checksums",
                                 timeout=TIMEOUT)
        except MigrationError as e:
            print(json.dumps({"error": str(e)}))
            return
        finally:
            if offered is not None:
                offered.close()
        with memory, vm:
            rax = vm.vcpu_regs(0).rax
            report.update(lifecycle=vm.lifecycle.value, rax=rax, tape=tape.last, digest=digest(memory),
                          noise=memory.read(NOISE, NOISE_SIZE) == noise(),
                          host_note=memory.read(HOST_NOTE, 35) == b"written by the host during pre-copy",
                          consistent=window_consistent(memory, rax))
            vm.resume()
            report["counting"] = wait_counter_above(memory, rax + 1000)
            vm.pause()
            after = vm.vcpu_regs(0).rax
            report.update(rax_after=after, consistent_after=window_consistent(memory, after))
    print(json.dumps(report))


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
