"""The devices' exception."""

from __future__ import annotations

from kvmlib.errors import KvmError


class DeviceError(KvmError):
    """A device was given something it cannot take (e.g. a malformed saved state)."""


__all__ = ["DeviceError"]
