"""Mail, an operator's target: one queue id or ALL of them."""

from __future__ import annotations

from collections.abc import Callable, Iterable

ALL = "ALL"


def expand(target: str, every: Callable[[], Iterable[str]]) -> list[str]:
    """The ids an action on target touches: every id when target is ALL, else target alone."""
    return list(every()) if target == ALL else [target]
