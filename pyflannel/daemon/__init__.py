"""pyflanneld, the per-node daemon, in parts with one job each.

- :mod:`.core`: the start-up sequence and the wiring of leases, backend and host;
- :mod:`.startup`: the start-up steps that wait or fail (config, interface, first lease);
- :mod:`.supervise`: keeping control-plane tasks alive, and ``Fatal``;
- :mod:`.iptables_keeper`: flanneld's masquerade and forward rules;
- :mod:`.config_watcher`: noticing a changed network config;
- :mod:`.snapshot`: one state snapshot for the metrics and the state file.
"""

from __future__ import annotations

import asyncio
import logging
import signal

from pyflannel import __version__
from pyflannel.daemon.core import Daemon
from pyflannel.daemon.supervise import Fatal, supervise
from pyflannel.flags import Options
from pyflannel.lease.etcd import EtcdTlsError

log = logging.getLogger("pyflannel")

__all__ = ["Daemon", "Fatal", "run", "supervise"]


async def _amain(opts: Options) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        daemon = Daemon(opts)
    except EtcdTlsError as e:
        log.error("%s", e)
        return 1
    try:
        await daemon.run(stop)
    except Fatal as e:
        log.error("%s", e)
        return 1
    log.info("stopped; lease kept for restart")
    return 0


def run(opts: Options) -> int:
    """Run the daemon until SIGTERM/SIGINT; returns the process exit status."""
    import uvloop

    log.info("pyflanneld %s starting", __version__)
    return uvloop.run(_amain(opts))
