"""Shared test settings. The ``kvm`` fixture and friends come from kvmlib's own pytest plugin
(``kvmlib.testing.plugin``, registered through the ``pytest11`` entry point)."""

from __future__ import annotations

import os

pytest_plugins = ["pytester"]

#: Tests that need something the machine may lack fail instead of skipping when this is set (CI).
REQUIRE_KVM = os.environ.get("KVMLIB_REQUIRE_KVM") == "1"
