"""Retry delays: exponential with a ceiling, so no failure becomes a hot loop or an endless wait."""

from __future__ import annotations


class Backoff:
    """``next()`` gives first, 2*first, ... up to ``ceiling``; ``reset()`` starts over."""

    def __init__(self, first: float = 0.2, ceiling: float = 5.0) -> None:
        self.first, self.ceiling, self.current = first, ceiling, first

    def next(self) -> float:
        delay, self.current = self.current, min(self.current * 2, self.ceiling)
        return delay

    def reset(self) -> None:
        self.current = self.first
