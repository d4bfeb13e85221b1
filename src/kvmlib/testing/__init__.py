"""Helpers for testing code that drives KVM.

Nothing here is part of kvmlib's runtime: ``import kvmlib`` never imports this package, and its
helpers may need tools a plain install lacks (:func:`assemble` runs GNU binutils).
"""

from kvmlib.testing.asm import AssemblerError, assemble

__all__ = ["AssemblerError", "assemble"]
