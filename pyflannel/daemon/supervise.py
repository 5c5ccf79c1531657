"""Keeping control-plane tasks alive without hiding a bug in a restart loop."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from pyflannel.backoff import Backoff

log = logging.getLogger("pyflannel")


class Fatal(Exception):
    """An error the operator must fix; the daemon exits non-zero with this one line."""


async def supervise(run: Callable[[], Awaitable[None]], name: str,
                    restarts: dict[str, int] | None = None) -> None:
    """Run a task that should never end; restart it after an unexpected error.

    Expected trouble (etcd down, a device gone) is handled inside each task. What reaches
    here is a bug: its traceback is logged the first time, later failures of the same kind
    get one line, restarts back off to 30 s and are counted for the metrics, so a task
    failing in a loop is visible and never floods the journal.
    """
    backoff = Backoff(1.0, 30.0)
    seen: set[str] = set()
    while True:
        try:
            await run()
            return
        except (asyncio.CancelledError, Fatal):
            raise
        except Exception as e:  # noqa: BLE001 - the point is to survive our own bugs
            kind = f"{type(e).__name__}: {e}"[:200]
            if restarts is not None:
                restarts[name] = restarts.get(name, 0) + 1
            delay = backoff.next()
            if kind in seen:
                log.error("task %s failed again (%s); restarting in %.0fs", name, kind, delay)
            else:
                seen.add(kind)
                log.exception("task %s failed; restarting it in %.0fs", name, delay)
            await asyncio.sleep(delay)
