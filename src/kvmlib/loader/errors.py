"""The loader's exception."""

from __future__ import annotations

from kvmlib.errors import KvmError


class LoaderError(KvmError):
    """A kernel image, command line or initrd cannot be loaded or booted as asked.

    Raised for malformed or unsupported images (images are untrusted input: a bad one gives this
    error and nothing else, before any byte is written to guest memory) and for layouts that do
    not fit the guest's memory. The message names the field or range at fault and, where there is
    one, what to change.
    """


__all__ = ["LoaderError"]
