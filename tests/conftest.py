"""Shared fixtures: a KVM handle that skips (or, under KVMLIB_REQUIRE_KVM=1, fails) without /dev/kvm."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from kvmlib import Kvm, KvmUnavailableError

REQUIRE_KVM = os.environ.get("KVMLIB_REQUIRE_KVM") == "1"


@pytest.fixture
def kvm() -> Iterator[Kvm]:
    """An open /dev/kvm; skips with the reason when KVM is unusable, unless it is required."""
    try:
        handle = Kvm()
    except KvmUnavailableError as e:
        if REQUIRE_KVM:
            pytest.fail(f"KVMLIB_REQUIRE_KVM=1 but KVM is unusable: {e}")
        pytest.skip(f"KVM is unusable here: {e}")
    with handle:
        yield handle
