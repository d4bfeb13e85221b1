"""Every test starts from the same prepared guest, reset to a snapshot (see conftest.py)."""

from __future__ import annotations

import pytest

from kvmlib import KvmVm
from kvmlib.testing.harness import wait_until

from .devices import Recorder


@pytest.mark.parametrize("given", [1, 5, 200])
def test_the_guest_adds_the_input_to_its_prepared_state(fresh: tuple[KvmVm, Recorder],
                                                        given: int) -> None:
    vm, device = fresh
    device.inputs.append(given)
    vm.resume()
    wait_until(lambda: 0x12 in device.writes, what="the guest's sum")
    vm.pause()
    # Whatever the previous test did, the guest began at 1000 again.
    assert vm.vcpu_regs(0).rbx == 1000 + given
