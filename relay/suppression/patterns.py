"""Suppression, patterns: `*@example.com`, `user+*@example.org` (a `*` is any run of
characters, none included), matched in memory against lowercase addresses; patterns whose
domain has no `*` are kept by domain, so an address is tried only against its own domain's
and the few wild-domain ones."""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")
WILD = "*"


def is_pattern(address: str) -> bool:
    return WILD in address


def compile_pattern(pattern: str) -> re.Pattern[str]:
    """The regular expression of a pattern: every `*` any run of characters, the rest literal."""
    return re.compile(".*".join(re.escape(part) for part in pattern.lower().split(WILD)), re.S)


def matches(pattern: str, address: str) -> bool:
    """Whether address (any case) is one of pattern's."""
    return compile_pattern(pattern).fullmatch(address.lower()) is not None


@dataclass
class Patterns(Generic[T]):
    """Patterns, each with a value (its entry), by domain where the domain is literal."""

    by_domain: dict[str, list[tuple[re.Pattern[str], T]]] = field(
        default_factory=lambda: defaultdict(list)
    )
    wild: list[tuple[re.Pattern[str], T]] = field(default_factory=list)

    @classmethod
    def of(cls, items: Iterable[tuple[str, T]]) -> Patterns[T]:
        table: Patterns[T] = cls()
        for pattern, value in items:
            _, at, domain = pattern.lower().rpartition("@")
            compiled = (compile_pattern(pattern), value)
            if at and WILD not in domain:
                table.by_domain[domain].append(compiled)
            else:
                table.wild.append(compiled)
        return table

    def find(self, address: str) -> list[T]:
        """The values of every pattern address matches."""
        address = address.lower()
        domain = address.rpartition("@")[2]
        tried = [*self.by_domain.get(domain, ()), *self.wild]
        return [value for regex, value in tried if regex.fullmatch(address)]

    def __len__(self) -> int:
        return len(self.wild) + sum(len(v) for v in self.by_domain.values())
