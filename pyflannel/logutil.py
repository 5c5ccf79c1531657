"""Logging set-up and a guard against log floods from repeated errors."""

from __future__ import annotations

import logging
import sys
import time

LOG_FORMAT = "%(asctime)s %(levelname).1s %(name)s: %(message)s"


def setup_logging(verbosity: int = 0) -> None:
    """One line per event on stderr (journald adds its own timestamp, we keep ours)."""
    level = logging.DEBUG if verbosity > 0 else logging.INFO
    logging.basicConfig(stream=sys.stderr, level=level, format=LOG_FORMAT,
                        datefmt="%Y-%m-%dT%H:%M:%S", force=True)
    for noisy in ("grpc", "aetcd", "pyroute2", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING if verbosity < 2 else logging.DEBUG)


class RateLimitedLog:
    """Log an error when it starts or changes, then at most once per ``every`` seconds,
    and say once when it clears. A down etcd must not write a line per retry."""

    def __init__(self, logger: logging.Logger, every: float = 60.0) -> None:
        self.logger, self.every = logger, every
        self._state: dict[str, tuple[str, float, int]] = {}

    def error(self, topic: str, fmt: str, *args: object) -> None:
        text = fmt % args
        now = time.monotonic()
        last = self._state.get(topic)
        if last is None or last[0] != text or now - last[1] >= self.every:
            suppressed = last[2] if last else 0
            suffix = f" ({suppressed} similar suppressed)" if suppressed else ""
            self.logger.error("%s%s", text, suffix)
            self._state[topic] = (text, now, 0)
        else:
            self._state[topic] = (last[0], last[1], last[2] + 1)

    def clear(self, topic: str, message: str) -> None:
        if self._state.pop(topic, None) is not None:
            self.logger.info("%s", message)


class WarnOnce:
    """Warn once per key (a lease key, a peer), remembering a bounded number of keys so a
    hostile stream of distinct keys cannot grow memory; ``forget`` re-arms a key."""

    def __init__(self, logger: logging.Logger, limit: int = 4096) -> None:
        self.logger, self.limit = logger, limit
        self._seen: dict[object, None] = {}

    def warn(self, key: object, fmt: str, *args: object) -> bool:
        """Log at WARNING the first time ``key`` is seen; True if it was logged."""
        if key in self._seen:
            return False
        if len(self._seen) >= self.limit:
            self._seen.pop(next(iter(self._seen)))
        self._seen[key] = None
        self.logger.warning(fmt, *args)
        return True

    def forget(self, key: object) -> None:
        self._seen.pop(key, None)

    def __len__(self) -> int:
        return len(self._seen)
