"""Thin etcd v3 I/O for leases (aetcd), with fail-over across endpoints.

All decisions live in :mod:`pyflannel.lease.policy`; this module only reads and writes keys,
turning etcd's many failure shapes into two exceptions the daemon can reason about.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Network
from urllib.parse import urlsplit

import aetcd
import aetcd.exceptions as aexc
import grpc
from aetcd import rpc
from aetcd import watcher as aetcd_watcher

from pyflannel.lease.model import (
    Lease,
    LeaseAttrs,
    LeaseFormatError,
    config_key,
    parse_subnet_key,
    subnet_key,
    subnets_prefix,
)

log = logging.getLogger("pyflannel.etcd")

RPC_TIMEOUT_S = 5
CLOSE_GRACE_S = 10.0


class EtcdUnavailable(ConnectionError):
    """No endpoint answered; the caller retries with back-off."""


class EtcdAuthError(PermissionError):
    """etcd refused our credentials: retrying will not help."""


class WatchCompacted(RuntimeError):
    """The watch start revision was compacted away: list again, then watch anew."""


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int
    tls: bool

    def __str__(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"


def parse_endpoint(url: str) -> Endpoint:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"etcd endpoint {url!r} is not http(s)://host:port")
    return Endpoint(parts.hostname, parts.port or 2379, parts.scheme == "https")


@dataclass(frozen=True)
class WatchEvent:
    """A change under ``<prefix>/subnets/``: a lease put (``lease`` set) or a key gone."""

    subnet: IPv4Network
    lease: Lease | None
    revision: int


@dataclass(frozen=True)
class Listing:
    leases: list[Lease]
    revision: int
    malformed: list[tuple[str, str]]  # (key, reason)


def kv_to_lease(key: str, value: bytes, lease_id: int, mod_revision: int) -> Lease:
    return Lease(
        subnet=parse_subnet_key(key),
        attrs=LeaseAttrs.from_json(value),
        lease_id=lease_id,
        mod_revision=mod_revision,
    )


class EtcdTlsError(ValueError):
    """A TLS file could not be read or used (one line naming the flag)."""


def tls_credentials(cafile: str = "", certfile: str = "", keyfile: str = ""):
    """gRPC channel credentials from flanneld's -etcd-cafile/-certfile/-keyfile."""
    def read(path: str, flag: str) -> bytes | None:
        if not path:
            return None
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError as e:
            raise EtcdTlsError(f"flag -{flag}: cannot read {path}: {e.strerror}") from None

    cert, key = read(certfile, "etcd-certfile"), read(keyfile, "etcd-keyfile")
    if bool(cert) != bool(key):
        raise EtcdTlsError("flags -etcd-certfile and -etcd-keyfile go together")
    return grpc.ssl_channel_credentials(root_certificates=read(cafile, "etcd-cafile"),
                                        private_key=key, certificate_chain=cert)


class TlsClient(aetcd.Client):
    """aetcd's client over a TLS channel (aetcd itself only dials plain gRPC)."""

    def __init__(self, *args, credentials, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._credentials = credentials

    async def connect(self) -> None:
        if self._connected.is_set():
            return
        self.channel = rpc.secure_channel(f"{self._host}:{self._port}", self._credentials,
                                          options=list(self._options.items()))
        try:
            if self._username and self._password:
                self.auth_stub = rpc.AuthStub(self.channel)
                reply = await self.auth_stub.Authenticate(
                    rpc.AuthenticateRequest(name=self._username, password=self._password),
                    timeout=self._timeout)
                self.metadata = (("token", reply.token),)
        except rpc.AioRpcError as e:
            aexc._handle_exception(e)
        self.kvstub = rpc.KVStub(self.channel)
        self.clusterstub = rpc.ClusterStub(self.channel)
        self.leasestub = rpc.LeaseStub(self.channel)
        self.maintenancestub = rpc.MaintenanceStub(self.channel)
        self._watcher = aetcd_watcher.Watcher(rpc.WatchStub(self.channel),
                                              timeout=self._timeout, metadata=self.metadata)
        self._connected.set()


class EtcdRegistry:
    """Lease keys in etcd for one network prefix, over one or more endpoints."""

    def __init__(
        self,
        endpoints: Sequence[str],
        prefix: str,
        *,
        username: str = "",
        password: str = "",
        timeout: float = RPC_TIMEOUT_S,
        cafile: str = "",
        certfile: str = "",
        keyfile: str = "",
    ) -> None:
        self.endpoints = [parse_endpoint(e) for e in endpoints]
        if not self.endpoints:
            raise ValueError("no etcd endpoints given")
        self._credentials = None
        if any(ep.tls for ep in self.endpoints):
            self._credentials = tls_credentials(cafile, certfile, keyfile)
        self.prefix = prefix.rstrip("/")
        self._username = username or None
        self._password = password or None
        self._timeout = timeout
        self._index = 0
        self._client: aetcd.Client | None = None
        self._retired: list[aetcd.Client] = []
        self.errors = 0  # failed requests, for the metrics

    @property
    def endpoint(self) -> Endpoint:
        return self.endpoints[self._index]

    def _make_client(self) -> aetcd.Client:
        ep = self.endpoint
        kw = dict(host=ep.host, port=ep.port, username=self._username,
                  password=self._password, timeout=self._timeout,
                  options={"grpc.enable_retries": 0,
                           # notice a dead member or a cut path within ~15 s, not minutes
                           "grpc.keepalive_time_ms": 10_000,
                           "grpc.keepalive_timeout_ms": 5_000,
                           "grpc.keepalive_permit_without_calls": 1,
                           # gRPC backs off reconnects for up to two minutes after an
                           # outage, and shares that state between channels: cap it, so
                           # a returning etcd is used within a second or two
                           "grpc.initial_reconnect_backoff_ms": 200,
                           "grpc.min_reconnect_backoff_ms": 200,
                           "grpc.max_reconnect_backoff_ms": 2000})
        if ep.tls:
            return TlsClient(credentials=self._credentials, **kw)
        return aetcd.Client(**kw)

    async def _drop_client(self, client: aetcd.Client | None = None) -> None:
        """Stop using a client. Other tasks may still have calls in flight on it (closing
        the channel would cancel them under their feet), so it is closed a little later."""
        client = client or self._client
        if client is not None and client is self._client:
            self._client = None
        if client is not None and client not in self._retired:
            self._retired.append(client)
            asyncio.get_running_loop().call_later(
                CLOSE_GRACE_S, lambda: asyncio.ensure_future(self._close_quietly(client)))

    async def _close_quietly(self, client: aetcd.Client) -> None:
        with contextlib.suppress(Exception):  # a broken channel may fail to close
            await asyncio.wait_for(client.close(), 2)
        with contextlib.suppress(ValueError):
            self._retired.remove(client)

    async def close(self) -> None:
        clients = [c for c in [self._client, *self._retired] if c is not None]
        self._client, self._retired = None, []
        for client in clients:
            await self._close_quietly(client)

    async def _call(self, op):
        """Run ``op(client)``, moving to the next endpoint when one does not answer."""
        errors: list[str] = []
        for _ in range(len(self.endpoints)):
            if self._client is None:
                self._client = self._make_client()
            client = self._client
            try:
                return await op(client)
            except asyncio.CancelledError:
                _reraise_if_cancelling()
                # gRPC cancels calls on a channel that closes: a connection failure.
                errors.append(f"{self.endpoint}: call cancelled (channel closed)")
            except aexc.UnauthenticatedError as e:
                raise EtcdAuthError(f"etcd {self.endpoint} refused the credentials: {e}") from None
            except (TimeoutError, aexc.ConnectionFailedError, aexc.ConnectionTimeoutError,
                    OSError) as e:
                errors.append(f"{self.endpoint}: {_one_line(e)}")
            except aexc.ClientError as e:
                text = str(e).lower()
                if "auth" in text or "permission" in text or "password" in text:
                    raise EtcdAuthError(f"etcd {self.endpoint} refused the credentials: "
                                        f"{_one_line(e)}") from None
                errors.append(f"{self.endpoint}: {_one_line(e)}")
            except rpc.AioRpcError as e:  # raised outside aetcd's wrappers (e.g. on connect)
                errors.append(f"{self.endpoint}: {_one_line(e.details() or e)}")
            self.errors += 1
            if client is self._client:  # another task may have moved on already
                await self._drop_client(client)
                self._index = (self._index + 1) % len(self.endpoints)
        raise EtcdUnavailable("etcd unreachable (" + "; ".join(errors) + ")")

    # -- reads -------------------------------------------------------------------------

    async def get_config(self) -> bytes | None:
        key = config_key(self.prefix).encode()
        got = await self._call(lambda c: c.get(key))
        return None if got is None else bytes(got.value)

    async def put_config(self, value: bytes) -> None:
        key = config_key(self.prefix).encode()
        await self._call(lambda c: c.put(key, value))

    async def list_leases(self) -> Listing:
        prefix = subnets_prefix(self.prefix).encode()
        rng = await self._call(lambda c: c.get_prefix(prefix))
        leases, malformed = [], []
        for kv in rng.kvs:
            key = kv.key.decode(errors="replace")
            try:
                leases.append(kv_to_lease(key, kv.value, kv.lease, kv.mod_revision))
            except LeaseFormatError as e:
                malformed.append((key, str(e)))
        return Listing(leases, rng.header.revision, malformed)

    async def get_lease(self, subnet: IPv4Network) -> Lease | None:
        key = subnet_key(self.prefix, subnet)
        got = await self._call(lambda c: c.get(key.encode()))
        if got is None:
            return None
        return kv_to_lease(key, got.value, got.lease, got.mod_revision)

    async def lease_ttl(self, lease_id: int) -> int:
        """Seconds left on an etcd lease; -1 when it no longer exists."""
        info = await self._call(lambda c: c.get_lease_info(lease_id, keys=False))
        return int(info.TTL)

    # -- writes ------------------------------------------------------------------------

    async def create(self, subnet: IPv4Network, attrs: LeaseAttrs, ttl: int) -> Lease | None:
        """Claim a free subnet atomically; None when another node got there first."""
        key = subnet_key(self.prefix, subnet).encode()

        async def op(c: aetcd.Client):
            grant = await c.lease(ttl)
            ok, _ = await c.transaction(
                compare=[c.transactions.create(key) == 0],
                success=[c.transactions.put(key, attrs.to_json().encode(), lease=grant.id)],
                failure=[],
            )
            if not ok:
                await c.revoke_lease(grant.id)
                return None
            return grant.id

        lease_id = await self._call(op)
        if lease_id is None:
            return None
        return Lease(subnet, attrs, lease_id=lease_id)

    async def reclaim(self, existing: Lease, attrs: LeaseAttrs, ttl: int) -> Lease | None:
        """Re-put a key that already names us on a fresh lease (or keep a reservation's
        missing TTL); None when the key changed under us since we read it."""
        key = subnet_key(self.prefix, existing.subnet).encode()

        async def op(c: aetcd.Client):
            lease_id = 0
            if not existing.reserved:
                lease_id = (await c.lease(ttl)).id
            ok, _ = await c.transaction(
                compare=[c.transactions.mod(key) == existing.mod_revision],
                success=[c.transactions.put(key, attrs.to_json().encode(), lease=lease_id)],
                failure=[],
            )
            if not ok:
                if lease_id:
                    await c.revoke_lease(lease_id)
                return None
            if existing.lease_id:
                # The old lease now holds no key: let it go rather than wait a day.
                with contextlib.suppress(aexc.ClientError):
                    await c.revoke_lease(existing.lease_id)
            return lease_id

        lease_id = await self._call(op)
        if lease_id is None:
            return None
        return Lease(existing.subnet, attrs, lease_id=lease_id)

    async def refresh(self, lease_id: int) -> int:
        """Keep a lease alive; returns the new TTL, or 0 if etcd no longer has it."""
        reply = await self._call(lambda c: c.refresh_lease(lease_id))
        if reply is None:  # the keep-alive stream ended unanswered: etcd went away
            raise EtcdUnavailable(f"lease keep-alive on {self.endpoint} got no answer")
        return int(reply.TTL)

    async def put_lease(self, subnet: IPv4Network, attrs: LeaseAttrs, lease_id: int = 0) -> None:
        key = subnet_key(self.prefix, subnet).encode()
        await self._call(lambda c: c.put(key, attrs.to_json().encode(), lease=lease_id or None))

    async def delete_lease(self, subnet: IPv4Network) -> bool:
        key = subnet_key(self.prefix, subnet).encode()
        return bool(await self._call(lambda c: c.delete(key)))

    # -- watch -------------------------------------------------------------------------

    async def watch_config(self) -> AsyncIterator[bytes | None]:
        """Each new value of ``<prefix>/config`` (None when deleted); raises EtcdUnavailable
        when the stream breaks."""
        key = config_key(self.prefix).encode()
        watch = await self._call(lambda c: c.watch(key))
        try:
            async for ev in watch:
                yield None if ev.kind == "DELETE" else bytes(ev.kv.value)
        except aexc.ClientError as e:
            await self._drop_client()
            raise EtcdUnavailable(f"config watch on {self.endpoint} ended: {_one_line(e)}") \
                from None
        except asyncio.CancelledError:
            _reraise_if_cancelling()
            raise EtcdUnavailable(f"config watch on {self.endpoint} ended") from None
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(watch.cancel(), 1)
        raise EtcdUnavailable(f"config watch on {self.endpoint} ended")

    async def watch(self, start_revision: int) -> AsyncIterator[WatchEvent]:
        """Changes under the subnets directory from ``start_revision`` on.

        Ends by raising: EtcdUnavailable when the stream breaks, WatchCompacted when the
        revision is gone. Malformed values are reported as events with ``lease=None`` only
        for deletes; malformed puts are logged by the caller via :func:`decode_event`.
        """
        prefix = subnets_prefix(self.prefix).encode()
        watch = await self._call(lambda c: c.watch_prefix(prefix, start_revision=start_revision))
        try:
            async for ev in watch:
                key = ev.kv.key.decode(errors="replace")
                try:
                    subnet = parse_subnet_key(key)
                except LeaseFormatError:
                    continue
                if ev.kind == "DELETE":
                    yield WatchEvent(subnet, None, ev.kv.mod_revision)
                    continue
                try:
                    lease = kv_to_lease(key, ev.kv.value, ev.kv.lease, ev.kv.mod_revision)
                except LeaseFormatError as e:
                    log.warning("ignoring malformed lease %s: %s", key, e)
                    continue
                yield WatchEvent(subnet, lease, ev.kv.mod_revision)
        except aexc.RevisionCompactedError as e:
            raise WatchCompacted(str(e)) from None
        except aexc.ClientError as e:
            await self._drop_client()
            raise EtcdUnavailable(f"watch on {self.endpoint} ended: {_one_line(e)}") from None
        except asyncio.CancelledError:
            _reraise_if_cancelling()
            raise EtcdUnavailable(f"watch on {self.endpoint} ended (channel closed)") from None
        finally:
            with contextlib.suppress(Exception):  # the stream may already be gone
                await asyncio.wait_for(watch.cancel(), 1)
        raise EtcdUnavailable(f"watch on {self.endpoint} ended")


def _reraise_if_cancelling() -> None:
    """Inside ``except CancelledError``: re-raise if *our task* is being cancelled (as
    opposed to gRPC cancelling a call because its channel closed)."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def registry_for(opts) -> EtcdRegistry:
    """The registry the daemon's etcd flags (an Options) describe."""
    return EtcdRegistry(opts.etcd_endpoints, opts.etcd_prefix, username=opts.etcd_username,
                        password=opts.etcd_password, cafile=opts.etcd_cafile,
                        certfile=opts.etcd_certfile, keyfile=opts.etcd_keyfile)


def _one_line(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    return " ".join(text.split())[:300]
