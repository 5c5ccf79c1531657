"""One long-lived netlink socket, used from one thread, for everything the daemon programs.

pyroute2 keeps a little native memory for every ``IPRoute`` it creates and for every dump
on a fresh socket (about 2 kB per call measured here, never given back), so a socket per
call grows a daemon by megabytes a day under peer churn. Here one socket lives as long as
the process, in one worker thread: calls are serialised, so two reconciles can never race
each other into a false "route exists" either.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from pyroute2 import IPRoute

T = TypeVar("T")

_local = threading.local()
_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="netlink")
_opened: list[IPRoute] = []  # closed at exit, so no socket is left for the GC to warn about


@atexit.register
def _close_all() -> None:
    while _opened:
        with contextlib.suppress(Exception):
            _opened.pop().close()


@contextlib.contextmanager
def iproute() -> Iterator[IPRoute]:
    """This thread's IPRoute, opened once. A call that fails with an OSError (the socket is
    broken) drops it, so the next call opens a fresh one."""
    ipr = getattr(_local, "ipr", None)
    if ipr is None:
        ipr = _local.ipr = IPRoute()
        _opened.append(ipr)
    try:
        yield ipr
    except OSError:
        with contextlib.suppress(Exception):
            ipr.close()
        with contextlib.suppress(ValueError):
            _opened.remove(ipr)
        _local.ipr = None
        raise


async def run_netlink(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a synchronous netlink function in the netlink thread (never on the loop)."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_executor, lambda: fn(*args, **kwargs))
