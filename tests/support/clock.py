"""A clock the test moves by hand, for components that take an injectable ``clock``."""

from __future__ import annotations


class Clock:
    """Returns ``now`` when called; tests set or advance ``now``."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now
