"""The diagrams in docs/ are drawn from the code's tables: they must say what the code does."""

from __future__ import annotations

import re
from pathlib import Path

from kvmlib.runstate import TRANSITIONS, LifecycleState

DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_the_lifecycle_diagram_has_exactly_the_transitions_of_the_state_machine() -> None:
    source = (DOCS / "diagrams" / "lifecycle.dot").read_text()
    edges = {(LifecycleState(a), LifecycleState(b))
             for a, b in re.findall(r"^\s*(\w+)\s*->\s*(\w+)", source, re.MULTILINE)}
    assert edges == {(a, b) for a, targets in TRANSITIONS.items() for b in targets}
