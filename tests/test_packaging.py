"""Packaging: one version, and the lowest-dependency pins in step with the declared minimums.

These read the installed distribution's metadata, which hatch builds from pyproject.toml: after
changing pyproject.toml, reinstall (``pip install -e '.[test]'``) before running them.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
from pathlib import Path

import pytest

import kvmlib

ROOT = Path(__file__).resolve().parent.parent
CONSTRAINTS = ROOT / "constraints-lowest.txt"

_NAME = r"(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)"
_VERSION = r"(?P<version>[0-9]+(?:\.[0-9]+)*)"
# "name>=1.2" (or "name >= 1.2, <3"): a declared minimum. "name==1.2.0": a pin.
_MINIMUM = re.compile(rf"^{_NAME}\s*>=\s*{_VERSION}\s*(?:,|$)")
_PIN = re.compile(rf"^{_NAME}\s*==\s*{_VERSION}$")


def _normalize_name(name: str) -> str:
    """A project name as the registry compares it (PEP 503): case and runs of ``-_.`` do not matter."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _release(version: str) -> tuple[int, ...]:
    """A plain release number as a tuple without trailing zeros, so that 22.2 == 22.2.0."""
    parts = [int(p) for p in version.split(".")]
    while len(parts) > 1 and parts[-1] == 0:
        parts.pop()
    return tuple(parts)


def _declared_minimums() -> dict[str, str]:
    """The runtime dependencies (those without an extra) and their declared lowest versions."""
    minimums: dict[str, str] = {}
    for requirement in importlib.metadata.requires("kvmlib") or []:
        if ";" in requirement:  # an extra's dependency (or one for some platforms only)
            continue
        match = _MINIMUM.match(requirement)
        assert match is not None, f"runtime dependency {requirement!r} declares no minimum version (>=)"
        minimums[_normalize_name(match["name"])] = match["version"]
    return minimums


def _pins() -> dict[str, str]:
    """The versions pinned in constraints-lowest.txt."""
    pins: dict[str, str] = {}
    for raw in CONSTRAINTS.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = _PIN.match(line)
        assert match is not None, f"{CONSTRAINTS.name}: {line!r} is not an exact pin (name==version)"
        pins[_normalize_name(match["name"])] = match["version"]
    return pins


def test_version_is_the_installed_distributions() -> None:
    assert importlib.metadata.version("kvmlib") == kvmlib.__version__


def test_lowest_constraints_pin_the_declared_minimums() -> None:
    minimums = _declared_minimums()
    pins = _pins()
    assert set(pins) == set(minimums), (
        f"{CONSTRAINTS.name} pins {sorted(pins)}, pyproject.toml declares {sorted(minimums)}"
    )
    for name, minimum in minimums.items():
        assert _release(pins[name]) == _release(minimum), f"{name}: pinned {pins[name]}, declared >={minimum}"


def test_release_ignores_trailing_zeros() -> None:
    assert _release("22.2") == _release("22.2.0") == (22, 2)
    assert _release("4.6.0") != _release("4.6.1")
    assert _release("0") == (0,)


@pytest.mark.skipif(
    os.environ.get("KVMLIB_LOWEST_DEPS") != "1",
    reason="checked in the lowest-dependency run only (KVMLIB_LOWEST_DEPS=1: tox -e lowest, .ci/run)",
)
def test_lowest_dependencies_are_installed() -> None:
    installed = {name: importlib.metadata.version(name) for name in _pins()}
    assert {name: _release(v) for name, v in installed.items()} == {
        name: _release(v) for name, v in _pins().items()
    }, f"installed {installed}, expected the pins of {CONSTRAINTS.name}"
