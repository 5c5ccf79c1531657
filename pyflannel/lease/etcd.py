"""Thin etcd v3 I/O for leases (aetcd), with fail-over across endpoints.

All decisions live in :mod:`pyflannel.lease.policy`; this module only reads and writes keys,
turning etcd's many failure shapes into two exceptions the daemon can reason about.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, replace
from ipaddress import IPv4Network, IPv6Network
from urllib.parse import urlsplit

import aetcd
import aetcd.exceptions as aexc
import grpc
from aetcd import rpc
from aetcd import watcher as aetcd_watcher
from aetcd.utils import prefix_range_end

from pyflannel.lease.model import (
    Lease,
    LeaseAttrs,
    config_key,
    subnet_key,
    subnets_prefix,
)
from pyflannel.lease.registry import (
    EtcdAuthError,
    EtcdUnavailable,
    Listing,
    RawKV,
    Rejected,
    WatchCompacted,
    WatchEvent,
    build_listing,
    decode,
    event_for,
)

__all__ = ["EtcdAuthError", "EtcdRegistry", "EtcdTlsError", "EtcdUnavailable", "Listing",
           "WatchCompacted", "WatchEvent", "registry_for"]

log = logging.getLogger("pyflannel.etcd")

RPC_TIMEOUT_S = 5
CLOSE_GRACE_S = 10.0
LIST_PAGE = 512  # keys per range request; fewer when a page exceeds gRPC's message limit
MAX_MESSAGE = 16 * 1024 * 1024  # gRPC receive limit (its default, 4 MiB, is one big page)


class _PageTooLarge(Exception):
    """A range reply exceeded the gRPC receive limit: ask for fewer keys."""


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


def kv_to_lease(key: str, value: bytes, lease_id: int, mod_revision: int) -> Lease:
    """A stored key as a lease; raises LeaseFormatError when it is not one."""
    from pyflannel.lease.model import LeaseFormatError

    got = decode(RawKV(key.encode(), bytes(value), lease_id, mod_revision))
    if isinstance(got, Rejected):
        raise LeaseFormatError(got.reason)
    return got


def _token_expired(text: str) -> bool:
    """etcd's answers to a token it no longer knows (expired, or etcd restarted)."""
    text = text.lower()
    return "invalid auth token" in text or "auth store is old" in text


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
        max_message: int = MAX_MESSAGE,
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
        self._max_message = max_message
        self._index = 0
        self._client: aetcd.Client | None = None
        self._retired: list[aetcd.Client] = []
        # etcd leases granted for a create whose outcome we never learned: revoked once
        # etcd answers again, unless they turn out to hold our key.
        self._orphans: set[int] = set()
        self.errors = 0  # failed requests, for the metrics
        self.reauthentications = 0

    @property
    def endpoint(self) -> Endpoint:
        return self.endpoints[self._index]

    def _make_client(self) -> aetcd.Client:
        ep = self.endpoint
        kw = dict(host=ep.host, port=ep.port, username=self._username,
                  password=self._password, timeout=self._timeout,
                  options={"grpc.enable_retries": 0,
                           "grpc.max_receive_message_length": self._max_message,
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
        """Run ``op(client)``, moving to the next endpoint when one does not answer, and
        authenticating again (once per call) when etcd has forgotten our token."""
        errors: list[str] = []
        tried = 0
        reauthenticated = False
        while tried < len(self.endpoints):
            if self._client is None:
                self._client = self._make_client()
            client = self._client
            try:
                return await op(client)
            except asyncio.CancelledError:
                _reraise_if_cancelling()
                # gRPC cancels calls on a channel that closes: a connection failure.
                errors.append(f"{self.endpoint}: call cancelled (channel closed)")
            except (TimeoutError, aexc.ConnectionFailedError, aexc.ConnectionTimeoutError,
                    OSError) as e:
                errors.append(f"{self.endpoint}: {_one_line(e)}")
            except aexc.RevisionCompactedError as e:
                raise WatchCompacted(str(e)) from None
            except aexc.ClientError as e:
                text = _one_line(e)
                if _token_expired(text) and not reauthenticated:
                    reauthenticated = True
                    self.errors += 1
                    self.reauthentications += 1
                    log.info("etcd %s no longer knows our auth token; authenticating again",
                             self.endpoint)
                    await self._drop_client(client)  # a new client authenticates anew
                    continue
                if "larger than max" in text:
                    raise _PageTooLarge(text) from None
                if isinstance(e, aexc.UnauthenticatedError) or _is_auth_refusal(text):
                    self.errors += 1
                    raise EtcdAuthError(f"etcd {self.endpoint} refused the credentials: "
                                        f"{text}") from None
                errors.append(f"{self.endpoint}: {text}")
            except rpc.AioRpcError as e:  # raised outside aetcd's wrappers (e.g. on connect)
                errors.append(f"{self.endpoint}: {_one_line(e.details() or e)}")
            self.errors += 1
            tried += 1
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
        """Every key under ``subnets/``, read in pages at one revision, so a prefix holding
        more than a gRPC message (large or hostile values) still lists."""
        prefix = subnets_prefix(self.prefix).encode()
        end = prefix_range_end(prefix)
        kvs: list[RawKV] = []
        start, revision, limit = prefix, 0, LIST_PAGE
        while True:
            try:
                reply = await self._call(
                    lambda c, s=start, r=revision, n=limit: _range(c, s, end, n, r))
            except _PageTooLarge as e:
                if limit == 1:
                    raise EtcdUnavailable(f"etcd {self.endpoint}: one key is larger than "
                                          f"a gRPC message: {e}") from None
                limit = max(1, limit // 8)
                continue
            revision = revision or reply.header.revision
            kvs.extend(RawKV(bytes(kv.key), bytes(kv.value), kv.lease, kv.mod_revision)
                       for kv in reply.kvs)
            if not reply.more or not reply.kvs:
                return build_listing(kvs, revision)
            start = bytes(reply.kvs[-1].key) + b"\0"

    async def get_lease(self, subnet: IPv4Network,
                        ipv6_subnet: IPv6Network | None = None) -> Lease | None:
        """The lease under the key naming ``subnet`` (and ``ipv6_subnet``), if usable."""
        key = subnet_key(self.prefix, subnet, ipv6_subnet)
        got = await self._call(lambda c: c.get(key.encode()))
        if got is None:
            return None
        lease = decode(RawKV(key.encode(), bytes(got.value), got.lease, got.mod_revision))
        return lease if isinstance(lease, Lease) else None

    async def lease_ttl(self, lease_id: int) -> int:
        """Seconds left on an etcd lease; -1 when it no longer exists."""
        info = await self._call(lambda c: c.get_lease_info(lease_id, keys=False))
        return int(info.TTL)

    # -- writes ------------------------------------------------------------------------

    async def create(self, subnet: IPv4Network, attrs: LeaseAttrs, ttl: int,
                     ipv6_subnet: IPv6Network | None = None) -> Lease | None:
        """Claim a free key atomically; None when another node got there first. The etcd
        lease granted for a create that fails is revoked, never left for a day.

        The key names both subnets (``subnet`` is NO_IPV4_SUBNET for an IPv6-only lease).
        """
        key = subnet_key(self.prefix, subnet, ipv6_subnet).encode()

        async def op(c: aetcd.Client):
            await self._revoke_orphans(c)
            grant = await c.lease(ttl)
            self._orphans.add(grant.id)  # until we know what became of the transaction
            ok, _ = await c.transaction(
                compare=[c.transactions.create(key) == 0],
                success=[c.transactions.put(key, attrs.to_json().encode(), lease=grant.id)],
                failure=[],
            )
            if ok:
                self._orphans.discard(grant.id)
                return grant.id
            await c.revoke_lease(grant.id)
            self._orphans.discard(grant.id)
            return None

        lease_id = await self._call(op)
        if lease_id is None:
            return None
        return Lease(subnet, attrs, lease_id=lease_id, ipv6_subnet=ipv6_subnet)

    async def _revoke_orphans(self, c: aetcd.Client) -> None:
        """Revoke leases from creates whose outcome was lost, unless one holds a key (its
        transaction did commit: the next acquisition adopts that key and its lease)."""
        for lease_id in list(self._orphans):
            info = await c.get_lease_info(lease_id, keys=True)
            if int(info.TTL) > 0 and not info.keys:
                await c.revoke_lease(lease_id)
                log.info("revoked etcd lease %x left by an interrupted create", lease_id)
            self._orphans.discard(lease_id)

    async def revoke(self, lease_id: int) -> None:
        """Give an etcd lease back (and with it any key it still holds)."""
        async def op(c: aetcd.Client):
            try:
                await c.revoke_lease(lease_id)
            except aexc.ClientError as e:
                if "not found" not in str(e).lower():
                    raise

        await self._call(op)

    async def reclaim(self, existing: Lease, attrs: LeaseAttrs, ttl: int) -> Lease | None:
        """Re-put a key that already names us on a fresh lease (or keep a reservation's
        missing TTL); None when the key changed under us since we read it."""
        key = existing.key(self.prefix).encode()

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
        return replace(existing, attrs=attrs, lease_id=lease_id, mod_revision=0)

    async def refresh(self, lease_id: int) -> int:
        """Keep a lease alive; returns the new TTL, or 0 if etcd no longer has it."""
        async def op(c: aetcd.Client):
            if self._orphans:
                await self._revoke_orphans(c)
            return await c.refresh_lease(lease_id)

        reply = await self._call(op)
        if reply is None:  # the keep-alive stream ended unanswered: etcd went away
            raise EtcdUnavailable(f"lease keep-alive on {self.endpoint} got no answer")
        return int(reply.TTL)

    async def put_lease(self, subnet: IPv4Network, attrs: LeaseAttrs, lease_id: int = 0,
                        ipv6_subnet: IPv6Network | None = None) -> None:
        key = subnet_key(self.prefix, subnet, ipv6_subnet).encode()
        await self._call(lambda c: c.put(key, attrs.to_json().encode(), lease=lease_id or None))

    async def delete_lease(self, subnet: IPv4Network,
                           ipv6_subnet: IPv6Network | None = None) -> bool:
        key = subnet_key(self.prefix, subnet, ipv6_subnet).encode()
        return bool(await self._call(lambda c: c.delete(key)))

    async def delete_if_unchanged(self, lease: Lease) -> bool:
        """Delete ``lease``'s key only if nobody wrote it since we read it (a stale lease of
        ours, say after the config changed); False when it changed or is gone."""
        key = lease.key(self.prefix).encode()

        async def op(c: aetcd.Client):
            ok, _ = await c.transaction(
                compare=[c.transactions.mod(key) == lease.mod_revision],
                success=[c.transactions.delete(key)], failure=[])
            return ok

        return bool(await self._call(op))

    # -- watch -------------------------------------------------------------------------

    async def _open_watch(self, key: bytes, **kw) -> tuple[aetcd.Client, object]:
        """A watch created on the current client, and that client (so a failure retires the
        client the watch ran on, not whichever is current by then)."""
        async def op(c: aetcd.Client):
            return c, await c.watch(key, **kw)

        return await self._call(op)

    async def _watch_failed(self, client: aetcd.Client, what: str, e: BaseException) -> None:
        await self._drop_client(client)
        raise EtcdUnavailable(f"{what} on {self.endpoint} ended: {_one_line(e)}") from None

    async def watch_config(self) -> AsyncIterator[bytes | None]:
        """Each new value of ``<prefix>/config`` (None when deleted); raises EtcdUnavailable
        when the stream breaks."""
        client, watch = await self._open_watch(config_key(self.prefix).encode())
        try:
            async for ev in watch:
                yield None if ev.kind == "DELETE" else bytes(ev.kv.value)
        except aexc.ClientError as e:
            await self._watch_failed(client, "config watch", e)
        except asyncio.CancelledError:
            _reraise_if_cancelling()
            raise EtcdUnavailable(f"config watch on {self.endpoint} ended") from None
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(watch.cancel(), 1)
        raise EtcdUnavailable(f"config watch on {self.endpoint} ended")

    async def watch(self, start_revision: int) -> AsyncIterator[WatchEvent]:
        """Changes under the subnets directory from ``start_revision`` on; returns once the
        watch is established.

        The iterator ends by raising: EtcdUnavailable when the stream breaks, WatchCompacted
        when the revision is gone. Keys or values we cannot use arrive as events with
        ``rejected`` set, so the caller can say so once.
        """
        prefix = subnets_prefix(self.prefix).encode()
        client, watch = await self._open_watch(prefix, range_end=prefix_range_end(prefix),
                                               start_revision=start_revision)
        return self._events(client, watch)

    async def _events(self, client: aetcd.Client, watch) -> AsyncIterator[WatchEvent]:
        try:
            async for ev in watch:
                kv = RawKV(bytes(ev.kv.key), bytes(ev.kv.value), ev.kv.lease,
                           ev.kv.mod_revision)
                yield event_for(kv, deleted=ev.kind == "DELETE")
        except aexc.RevisionCompactedError as e:
            raise WatchCompacted(str(e)) from None
        except aexc.ClientError as e:
            await self._watch_failed(client, "watch", e)
        except asyncio.CancelledError:
            _reraise_if_cancelling()
            raise EtcdUnavailable(f"watch on {self.endpoint} ended (channel closed)") from None
        finally:
            with contextlib.suppress(Exception):  # the stream may already be gone
                await asyncio.wait_for(watch.cancel(), 1)
        raise EtcdUnavailable(f"watch on {self.endpoint} ended")


async def _range(c: aetcd.Client, start: bytes, end: bytes, limit: int, revision: int):
    """One page of a range read (aetcd's get_range has no limit or revision)."""
    await c.connect()
    request = rpc.RangeRequest(key=start, range_end=end, limit=limit, revision=revision)
    try:
        return await c.kvstub.Range(request, timeout=c._timeout, metadata=c.metadata)
    except rpc.AioRpcError as e:
        aexc._handle_exception(e)


def _is_auth_refusal(text: str) -> bool:
    text = text.lower()
    return "authentication failed" in text or "permission denied" in text or \
        "user name" in text or "password" in text


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
