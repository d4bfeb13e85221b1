"""Helpers for testing code that drives KVM.

Nothing here is part of kvmlib's runtime: ``import kvmlib`` never imports this package, and its
helpers may need tools a plain install lacks (:func:`assemble` runs GNU binutils). The pytest
plugin (:mod:`kvmlib.testing.plugin`, registered as a ``pytest11`` entry point) builds on
:func:`make_vm`, :class:`Census` and :func:`wait_until`; importing this package does not import
pytest.
"""

from kvmlib.testing.asm import AssemblerError, assemble
from kvmlib.testing.harness import Census, make_vm, open_kvm, wait_until

__all__ = ["AssemblerError", "Census", "assemble", "make_vm", "open_kvm", "wait_until"]
