"""The extension backend: the operator's shell commands are the data path (flanneld's contract).

flanneld v0.20.2 runs four commands, each with ``sh -c`` in the daemon's environment plus a
few variables, stdin fed with a string and a newline, stdout and stderr combined and
trimmed:

* ``PreStartupCommand`` before the lease is taken; its output becomes the lease's
  ``BackendData`` as a JSON string (no command: no BackendData);
* ``PostStartupCommand`` once the subnet is ours, with ``NETWORK``, ``SUBNET`` and
  ``PUBLIC_IP``;
* ``SubnetAddCommand`` per peer lease that appears or changes, ``SubnetRemoveCommand`` per
  lease that goes, each with the peer's ``SUBNET`` and ``PUBLIC_IP`` and the peer's
  BackendData string on stdin. Leases of another ``BackendType`` are ignored.

Where flanneld ran them inline and gave up on a failure, here each command has a timeout
(``CommandTimeout``, 30 s), runs in an asyncio subprocess beside the event loop, and a
failure is one log line (exit code and output) and is tried again on the next reconcile:
the node is not ready until PostStartupCommand succeeded, and a peer whose SubnetAdd failed
is listed as ignored, with why, until it succeeds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from dataclasses import dataclass

from pyflannel.backend.base import Backend, BackendError
from pyflannel.host.childstdin import stdin_file
from pyflannel.lease.model import Lease, LeaseAttrs

log = logging.getLogger("pyflannel.extension")

OUTPUT_CAP = 1 << 20  # PreStartupCommand output kept (a lease value is small anyway)
LOG_CAP = 300  # characters of a failing command's output in its log line


@dataclass(frozen=True)
class CommandResult:
    """How one command ended: its exit code (None: killed at its timeout) and its combined
    stdout and stderr, trimmed as flanneld trims them."""

    code: int | None
    output: str

    @property
    def ok(self) -> bool:
        return self.code == 0

    def describe(self) -> str:
        """One line for the log: how it ended and what it said."""
        how = "timed out" if self.code is None else f"exited {self.code}"
        said = " | ".join(line for line in self.output.splitlines() if line.strip())
        if len(said) > LOG_CAP:
            said = said[:LOG_CAP - 3] + "..."
        return f"{how}: {said}" if said else how


async def run_command(command: str, env: dict[str, str], stdin: str,
                      timeout: float) -> CommandResult:
    """``sh -c command`` with ``env`` added to ours and ``stdin`` plus a newline on its
    stdin (flanneld's runCmd). At ``timeout`` its whole process group is killed, so a
    child it left behind cannot hold the pipe open."""
    with stdin_file((stdin + "\n").encode()) as fd:
        proc = await asyncio.create_subprocess_exec(
            "sh", "-c", command, stdin=fd, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, env={**os.environ, **env},
            start_new_session=True)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        _kill_group(proc.pid)
        await proc.wait()
        return CommandResult(None, f"no exit within {timeout:g}s")
    except BaseException:  # cancelled (shutdown): leave nothing running
        _kill_group(proc.pid)
        with contextlib.suppress(ProcessLookupError):
            await asyncio.shield(proc.wait())
        raise
    return CommandResult(proc.returncode, out[:OUTPUT_CAP].decode(errors="replace").strip())


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def peer_backend_data(lease: Lease) -> tuple[str | None, str | None]:
    """(the string SubnetAdd/RemoveCommand get on stdin, None) or (None, why this lease
    cannot be handed to them): another backend's lease, or BackendData not a JSON
    string."""
    if lease.attrs.backend_type != "extension":
        return None, f"its BackendType is {lease.attrs.backend_type or 'empty'!r}, not 'extension'"
    data = lease.attrs.backend_data
    if data is None:
        return "", None
    if not isinstance(data, str):
        return None, "its BackendData is not a JSON string"
    return data, None


def what_commands_see(lease: Lease | None) -> tuple | None:
    """A lease as the commands see it: a renewal (new revision, same content) runs none."""
    return None if lease is None else (lease.subnet, lease.attrs)


def peer_env(lease: Lease) -> dict[str, str]:
    return {"SUBNET": str(lease.subnet), "PUBLIC_IP": str(lease.attrs.public_ip)}


class ExtensionBackend(Backend):
    type = "extension"

    def __init__(self, cfg, ext) -> None:
        super().__init__(cfg, ext)
        opt = cfg.backend_option
        self.pre_startup = str(opt("PreStartupCommand", "") or "")
        self.post_startup = str(opt("PostStartupCommand", "") or "")
        self.subnet_add = str(opt("SubnetAddCommand", "") or "")
        self.subnet_remove = str(opt("SubnetRemoveCommand", "") or "")
        self.timeout = float(opt("CommandTimeout", 30) or 30)
        self.started_for: Lease | None = None  # the lease PostStartupCommand succeeded for
        self.applied: dict[str, Lease] = {}  # peers SubnetAddCommand succeeded for
        self.failed: dict[str, str] = {}  # peer key name -> why its last command failed
        self._worker: asyncio.Task | None = None
        self._again = False  # changes arrived while the worker ran

    @property
    def mtu(self) -> int:
        return self.ext.mtu

    async def prepare(self) -> LeaseAttrs:
        data = None
        if self.pre_startup:
            result = await run_command(self.pre_startup, {}, "", self.timeout)
            if not result.ok:
                raise BackendError(f"extension: PreStartupCommand {result.describe()}")
            log.info("PreStartupCommand ran: %d bytes of output for BackendData",
                     len(result.output))
            data = result.output
        return LeaseAttrs(public_ip=self.ext.public_ip, backend_type=self.type,
                          backend_data=data)

    # -- the worker: commands never run on the caller's time ----------------------------

    async def commit(self) -> None:
        self._kick()

    async def reconcile_all(self) -> None:
        self._kick()  # failed commands are tried again here

    async def reconcile(self) -> None:
        """No routes of ours: the commands own the kernel's tables."""

    def _kick(self) -> None:
        if self._worker is not None and not self._worker.done():
            self._again = True
            return
        self._again = False
        self._worker = asyncio.get_running_loop().create_task(self._sync())

    async def _sync(self) -> None:
        while True:
            try:
                await self.sync_once()
            except (OSError, RuntimeError, ValueError) as e:  # e.g. no sh, fork failed
                self._errors.error("commands", "extension commands cannot run (%s: %s); "
                                   "will retry", type(e).__name__, e)
            if not self._again:
                return
            self._again = False

    async def sync_once(self) -> None:
        """One pass: PostStartupCommand for our current lease, then SubnetRemoveCommand for
        peers gone and SubnetAddCommand for peers new or changed. A failure is logged and
        left for the next pass."""
        lease = self.lease
        if lease is None:
            return
        if (what_commands_see(self.started_for) != what_commands_see(lease)
                and not await self._post_startup(lease)):
            return
        wanted = {}
        for name, peer in list(self.peers.items()):
            data, why = peer_backend_data(peer)
            if why is not None:
                self.skip_peer(peer, why)
            else:
                wanted[name] = (peer, data)
        for name, peer in list(self.applied.items()):
            if name not in wanted:
                await self._peer_command("SubnetRemoveCommand", self.subnet_remove, name, peer,
                                         peer_backend_data(peer)[0] or "", gone=True)
        for name, (peer, data) in wanted.items():
            if what_commands_see(self.applied.get(name)) != what_commands_see(peer):
                await self._peer_command("SubnetAddCommand", self.subnet_add, name, peer,
                                         data or "", gone=False)

    async def _post_startup(self, lease: Lease) -> bool:
        if self.post_startup:
            env = {"NETWORK": str(self.cfg.network), "SUBNET": str(lease.subnet),
                   "PUBLIC_IP": str(lease.attrs.public_ip)}
            result = await run_command(self.post_startup, env, "", self.timeout)
            if not result.ok:
                self._errors.error("post-startup", "PostStartupCommand %s; will retry",
                                   result.describe())
                return False
            self._errors.clear("post-startup", "PostStartupCommand succeeded")
            log.info("PostStartupCommand ran for subnet %s", lease.subnet)
        self.started_for = lease
        return True

    async def _peer_command(self, what: str, command: str, name: str, peer: Lease,
                            data: str, *, gone: bool) -> None:
        if command:
            result = await run_command(command, peer_env(peer), data, self.timeout)
            if not result.ok:
                why = f"{what} {result.describe()}"
                self._errors.error(f"peer {name}", "peer %s (%s): %s; will retry",
                                   peer.subnet, peer.attrs.public_ip, why)
                self.failed[name] = why
                return
            log.info("%s ran for %s via %s", what, peer.subnet, peer.attrs.public_ip)
        self._errors.clear(f"peer {name}", f"{what} for {peer.subnet} succeeded")
        self.failed.pop(name, None)
        if gone:
            self.applied.pop(name, None)
        else:
            self.applied[name] = peer

    # -- what the daemon asks -------------------------------------------------------------

    def data_path_behind(self) -> bool:
        """Not ready before PostStartupCommand succeeded for the lease we hold."""
        return (self.lease is not None
                and what_commands_see(self.started_for) != what_commands_see(self.lease))

    def peer_problems(self) -> dict[str, str]:
        out = {name: why for name, p in self.peers.items()
               if (why := peer_backend_data(p)[1]) is not None}
        out.update((name, why) for name, why in self.failed.items() if name in self.peers)
        return out

    async def teardown(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None
        await super().teardown()
