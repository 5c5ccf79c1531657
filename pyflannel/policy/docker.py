"""This node's Docker containers, their addresses and labels, for network policy.

A container's labels cover its own addresses and win over its node's labels on the same key
(docs/policy.md, "Endpoints and labels"). The watcher follows dockerd's event stream over the
unix socket's HTTP API (``GET /events`` filtered to containers), then lists the running
containers and inspects each; an event makes it inspect that one container again. When
dockerd goes away it says so in one line and reconnects with back-off; the containers it
knew stay until dockerd answers again (a restart of dockerd does not open the policy).
"""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.parse
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Any

from pyflannel.backoff import Backoff
from pyflannel.logutil import WarnOnce

log = logging.getLogger("pyflannel")
MAX_BODY = 16 << 20  # a /containers/json of thousands of containers fits
MAX_EVENT = 1 << 20
EVENTS_PATH = "/events?filters=" + urllib.parse.quote(json.dumps({"type": ["container"]}))


class DockerError(Exception):
    """dockerd cannot be reached or answered something unusable (one line)."""


class DockerAbsent(DockerError):
    """No socket at the path: a node without Docker, or dockerd not started yet."""


@dataclass(frozen=True)
class Container:
    """A running container: its id, name, addresses and labels (as Docker gives them)."""

    id: str
    name: str
    addresses: tuple[IPv4Address | IPv6Address, ...]
    labels: dict[str, str]


def container_from_inspect(doc: Any) -> Container | None:
    """A running container from ``/containers/{id}/json``; None when it is not running or
    has no address (a bad field is left out, never the whole container)."""
    if not isinstance(doc, dict) or not isinstance(doc.get("State"), dict):
        return None
    if not doc["State"].get("Running"):
        return None
    settings = doc.get("NetworkSettings") if isinstance(doc.get("NetworkSettings"), dict) else {}
    networks = settings.get("Networks") if isinstance(settings.get("Networks"), dict) else {}
    found: list[IPv4Address | IPv6Address] = []
    for net in [settings, *networks.values()]:
        if not isinstance(net, dict):
            continue
        for key in ("IPAddress", "GlobalIPv6Address"):
            try:
                addr = ip_address(net.get(key) or "")
            except ValueError:
                continue
            if addr not in found:
                found.append(addr)
    if not found:
        return None
    config = doc.get("Config") if isinstance(doc.get("Config"), dict) else {}
    raw = config.get("Labels") if isinstance(config.get("Labels"), dict) else {}
    labels = {k: v for k, v in raw.items() if isinstance(k, str) and isinstance(v, str)}
    return Container(str(doc.get("Id", ""))[:64], str(doc.get("Name", "")).lstrip("/"),
                     tuple(found), labels)


class _Http:
    """One HTTP/1.1 exchange with dockerd over its unix socket."""

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path

    async def open(self, path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter,
                                             dict[str, str]]:
        try:
            reader, writer = await asyncio.open_unix_connection(self.socket_path,
                                                                limit=MAX_EVENT)
        except FileNotFoundError:
            raise DockerAbsent(f"no Docker socket at {self.socket_path}") from None
        except OSError as e:
            raise DockerError(f"cannot connect to {self.socket_path}: {e}") from None
        try:  # a reset or an over-long line is dockerd's trouble, retried; the socket closed
            writer.write(f"GET {path} HTTP/1.1\r\nHost: docker\r\n\r\n".encode())
            status = await reader.readline()
            parts = status.decode(errors="replace").split(" ", 2)
            if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
                raise DockerError(f"dockerd answered {status[:80]!r} to GET {path[:60]}")
            headers: dict[str, str] = {}
            while True:
                line = await reader.readline()
                if line in (b"\r\n", b"\n", b""):
                    break
                name, _, value = line.decode(errors="replace").partition(":")
                headers[name.strip().lower()] = value.strip()
        except (OSError, ValueError) as e:
            writer.close()
            raise DockerError(f"dockerd's answer to GET {path[:60]} broke off: {e}") from None
        except DockerError:
            writer.close()
            raise
        if parts[1] != "200":
            writer.close()
            raise DockerError(f"dockerd answered {parts[1]} to GET {path[:60]}")
        return reader, writer, headers

    async def get_json(self, path: str) -> Any:
        reader, writer, headers = await self.open(path)
        try:
            body = b"".join([c async for c in _body(reader, headers)])
        finally:
            writer.close()
        try:
            return json.loads(body)
        except ValueError:
            raise DockerError(f"dockerd sent no JSON for GET {path[:60]}") from None


async def _body(reader: asyncio.StreamReader, headers: dict[str, str]) -> AsyncIterator[bytes]:
    """The body's pieces: chunked, by Content-Length, or to the end of the stream."""
    total = 0
    try:
        if headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size = int((await reader.readline()).split(b";")[0].strip() or b"x", 16)
                if size == 0:
                    return
                total += size
                if total > MAX_BODY:
                    raise DockerError("dockerd sent more than 16 MiB")
                chunk = await reader.readexactly(size)
                await reader.readexactly(2)
                yield chunk
        elif "content-length" in headers:
            size = int(headers["content-length"])
            if size > MAX_BODY:
                raise DockerError("dockerd sent more than 16 MiB")
            yield await reader.readexactly(size)
        else:
            yield await reader.read(MAX_BODY)
    except (ValueError, asyncio.IncompleteReadError, ConnectionError) as e:
        raise DockerError(f"dockerd's answer broke off: {e}") from None


class DockerWatcher:
    """Keeps ``containers`` equal to this node's running containers; calls ``changed``
    after each change."""

    def __init__(self, socket_path: str, changed: Callable[[], Any] = lambda: None,
                 backoff: Backoff | None = None) -> None:
        self.http = _Http(socket_path)
        self.socket_path = socket_path
        self.changed = changed
        self.containers: dict[str, Container] = {}
        self.connected = asyncio.Event()  # set while the event stream is followed
        self.backoff = backoff or Backoff(0.5, 30.0)
        self._warn = WarnOnce(log)  # one line per problem per outage
        self._said_absent = False

    async def run(self) -> None:
        while True:
            try:
                await self._follow()
                problem = "dockerd closed the event stream"
            except DockerError as e:
                problem = str(e)
                absent = isinstance(e, DockerAbsent)
            else:
                absent = False
            self.connected.clear()
            delay = self.backoff.next()
            if absent and not self.containers:  # no Docker here (yet): normal, said once
                if not self._said_absent:
                    self._said_absent = True
                    log.info("policy: %s; containers are followed once it appears", problem)
            else:
                self._warn.warn(("docker", problem), "policy: Docker containers: %s; "
                                "retrying (the containers known stay)", problem)
            await asyncio.sleep(delay)

    async def _follow(self) -> None:
        """Open the event stream, list and inspect, then apply events until it ends."""
        reader, writer, headers = await self.http.open(EVENTS_PATH)
        try:
            ids = await self.http.get_json("/containers/json")
            if not isinstance(ids, list):
                raise DockerError("dockerd's container list is not a list")
            fresh = {}
            for item in ids:
                cid = item.get("Id") if isinstance(item, dict) else None
                if isinstance(cid, str) and (c := await self._inspect(cid)) is not None:
                    fresh[cid] = c
            self._replace(fresh)
            self.connected.set()
            self.backoff.reset()
            self._warn = WarnOnce(log)
            log.info("policy: following Docker at %s (%d containers)", self.socket_path,
                     len(fresh))
            buffer = b""
            async for chunk in _body(reader, headers):
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    await self._event(line)
                if len(buffer) > MAX_EVENT:
                    raise DockerError("an event of dockerd's is over 1 MiB")
        finally:
            writer.close()

    async def _event(self, line: bytes) -> None:
        try:
            event = json.loads(line)
        except ValueError:
            return  # a keep-alive or a torn line: the next event re-inspects anyway
        actor = event.get("Actor") if isinstance(event, dict) else None
        cid = (actor or {}).get("ID") if isinstance(actor, dict) else None
        cid = cid or (event.get("id") if isinstance(event, dict) else None)
        if not isinstance(cid, str) or not cid:
            return
        c = await self._inspect(cid)
        fresh = dict(self.containers)
        if c is None:
            fresh.pop(cid, None)
        else:
            fresh[cid] = c
        self._replace(fresh)

    async def _inspect(self, cid: str) -> Container | None:
        try:
            doc = await self.http.get_json(f"/containers/{urllib.parse.quote(cid)}/json")
        except DockerError as e:
            if "answered 404" in str(e):
                return None  # gone between the event and the question
            raise
        return container_from_inspect(doc)

    def _replace(self, fresh: dict[str, Container]) -> None:
        if fresh != self.containers:
            self.containers = fresh
            self.changed()
