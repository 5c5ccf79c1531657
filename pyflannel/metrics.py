"""Prometheus metrics and the health endpoint (``-healthz-ip``/``-healthz-port``).

Fast-path counters live in shared memory and are read at scrape time by a collector, so
counting costs the data path nothing beyond its own integer additions.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

from pyflannel import __version__

log = logging.getLogger("pyflannel.http")

DROP_PREFIX = "drop_"
# Drop reasons renamed, by their old names: each is also shown under its old name (the
# same count twice, so a sum over every reason leaves the old names out).
DROP_ALIASES = {"not_ip": "not_ipv4"}


class DaemonCollector(Collector):
    """Turns the daemon's live state into metric families on each scrape."""

    def __init__(self, state: Callable[[], dict]) -> None:
        self.state = state

    def collect(self) -> Iterator:
        s = self.state()
        info = InfoMetricFamily("pyflannel", "pyflannel build and lease (subnet: IPv4, "
                                "empty in IPv6-only mode; ipv6_subnet: empty without IPv6)")
        info.add_metric([], {"version": __version__, "backend": s.get("backend", ""),
                             "subnet": s.get("subnet", ""),
                             "ipv6_subnet": s.get("ipv6_subnet", "")})
        yield info
        yield GaugeMetricFamily("pyflannel_peers", "peers in the data path",
                                value=s.get("peers", 0))
        yield GaugeMetricFamily("pyflannel_peers_ignored", "peer leases left out of the data "
                                "path because a field is unusable (a low-order or repeated "
                                "WireGuard key, a bad address or VtepMAC)",
                                value=len(s.get("peers_ignored") or ()))
        yield GaugeMetricFamily("pyflannel_data_path_behind", "1 while the data path has not "
                                "confirmed the newest peer table (it is sent again)",
                                value=1 if s.get("data_path_behind") else 0)
        yield GaugeMetricFamily("pyflannel_fastpath_refused_rows", "rows of the last peer "
                                "tables the fast path refused", value=s.get("refused_rows", 0))
        yield GaugeMetricFamily("pyflannel_lease_expiry_timestamp_seconds",
                                "when our lease expires unless renewed (0: none, +Inf: reserved)",
                                value=s.get("lease_expiry", 0.0))
        yield CounterMetricFamily("pyflannel_lease_renewals", "successful lease renewals",
                                  value=s.get("renewals", 0))
        yield CounterMetricFamily("pyflannel_etcd_errors", "etcd requests that failed",
                                  value=s.get("etcd_errors", 0))
        yield GaugeMetricFamily("pyflannel_ready", "1 while the node holds a lease and its "
                                "data path is programmed", value=1 if s.get("ready") else 0)
        c = s.get("counters", {})
        packets = CounterMetricFamily("pyflannel_packets", "packets forwarded",
                                      labels=["direction"])
        octets = CounterMetricFamily("pyflannel_bytes", "inner bytes forwarded",
                                     labels=["direction"])
        for direction in ("tx", "rx"):
            packets.add_metric([direction], c.get(f"{direction}_packets", 0))
            octets.add_metric([direction], c.get(f"{direction}_bytes", 0))
        yield packets
        yield octets
        packets6 = CounterMetricFamily("pyflannel_ipv6_packets", "the IPv6 share of "
                                       "pyflannel_packets (udp backend)", labels=["direction"])
        octets6 = CounterMetricFamily("pyflannel_ipv6_bytes", "the IPv6 share of "
                                      "pyflannel_bytes (udp backend)", labels=["direction"])
        for direction in ("tx", "rx"):
            packets6.add_metric([direction], c.get(f"{direction}_packets_ipv6", 0))
            octets6.add_metric([direction], c.get(f"{direction}_bytes_ipv6", 0))
        yield packets6
        yield octets6
        drops = CounterMetricFamily("pyflannel_dropped_packets", "packets dropped, by reason "
                                    "(not_ipv4 is not_ip under its old name: leave it out of "
                                    "sums)", labels=["reason"])
        for name, value in sorted(c.items()):
            if name.startswith(DROP_PREFIX):
                reason = name[len(DROP_PREFIX):]
                drops.add_metric([reason], value)
                if reason in DROP_ALIASES:
                    drops.add_metric([DROP_ALIASES[reason]], value)
        yield drops
        yield CounterMetricFamily(
            "pyflannel_offload_finished", "super-packets segmented or partial checksums "
            "finished for flannel-framing peers", value=c.get("segmented", 0))
        per_peer = s.get("peer_counters") or {}
        pp = CounterMetricFamily("pyflannel_peer_packets", "packets to and from each peer",
                                 labels=["peer", "direction"])
        pb = CounterMetricFamily("pyflannel_peer_bytes", "bytes to and from each peer",
                                 labels=["peer", "direction"])
        age = GaugeMetricFamily("pyflannel_peer_last_receive_age_seconds",
                                "seconds since the last datagram from each peer",
                                labels=["peer"])
        for peer, st in sorted(per_peer.items()):
            for direction in ("tx", "rx"):
                pp.add_metric([peer, direction], st.get(f"{direction}_packets", 0))
                pb.add_metric([peer, direction], st.get(f"{direction}_bytes", 0))
            if st.get("last_rx_age_s") is not None:
                age.add_metric([peer], st["last_rx_age_s"])
        yield pp
        yield pb
        yield age
        yield CounterMetricFamily("pyflannel_icmp_unreachable_sent",
                                  "ICMP net-unreachable answers for destinations without lease",
                                  value=c.get("icmp_unreachable_sent", 0))
        yield CounterMetricFamily(
            "pyflannel_coalesced_segments", "TCP segments joined into super-packets before "
            "the TUN write (GRO in user space)", value=c.get("coalesced", 0))
        if s.get("backend") == "wireguard":
            yield from _wireguard(c, per_peer)
        if s.get("bgp"):
            yield from _bgp(s["bgp"])
        if s.get("policy"):
            yield from _policy(s["policy"])


def _policy(p: dict) -> Iterator:
    """Network policy: what is in force, what is broken, rule hits by action, rebuilds."""
    yield GaugeMetricFamily("pyflannel_policies", "network policies in force (the last good "
                            "version of each)", value=p.get("policies", 0))
    broken = GaugeMetricFamily("pyflannel_policy_broken", "policies and network sets in "
                               "etcd that do not parse now, by kind", labels=["kind"])
    kinds = [tag.split("/", 1)[0] for tag in p.get("broken") or {}]
    for kind in ("policy", "networkset"):
        broken.add_metric([kind], kinds.count(kind))
    yield broken
    hits = CounterMetricFamily("pyflannel_policy_rule_hits", "packets matched by policy "
                               "rules, by action (NoRuleDecided: the default deny)",
                               labels=["action"])
    for action, n in sorted((p.get("hits") or {}).items()):
        hits.add_metric([action], n)
    yield hits
    yield CounterMetricFamily("pyflannel_policy_rebuilds", "rulesets applied to nftables",
                              value=p.get("rebuilds", 0))
    yield GaugeMetricFamily("pyflannel_policy_last_rebuild_seconds", "how long the last "
                            "applied rebuild took (etcd reads, compile, nft)",
                            value=p.get("last_rebuild_s", 0.0))


def _bgp(sessions: list[dict]) -> Iterator:
    """The bgp backend's sessions: state, messages and NOTIFICATIONs by type and code,
    prefixes received, accepted and refused by reason, graceful-restart events."""
    state = GaugeMetricFamily("pyflannel_bgp_session_state", "1 for the state each BGP "
                              "session is in", labels=["peer", "kind", "state"])
    prefixes = GaugeMetricFamily("pyflannel_bgp_prefixes", "prefixes per session: received "
                                 "(all told), accepted (in the RIB now), sent",
                                 labels=["peer", "what"])
    refused = CounterMetricFamily("pyflannel_bgp_prefixes_refused", "prefixes refused by the "
                                  "import policy, by reason", labels=["peer", "reason"])
    messages = CounterMetricFamily("pyflannel_bgp_messages", "BGP messages by direction and "
                                   "type", labels=["peer", "direction", "type"])
    notes = CounterMetricFamily("pyflannel_bgp_notifications", "NOTIFICATIONs by direction "
                                "and code/subcode", labels=["peer", "direction", "code"])
    gr = CounterMetricFamily("pyflannel_bgp_graceful_restart_events", "graceful-restart "
                             "events (a peer's routes kept, swept, a peer restarted)",
                             labels=["peer", "event"])
    for r in sessions:
        peer = str(r.get("peer"))
        state.add_metric([peer, str(r.get("kind")), str(r.get("state"))], 1)
        for what in ("received", "accepted", "sent"):
            prefixes.add_metric([peer, what], r.get(what) or 0)
        for reason, n in (r.get("refused") or {}).items():
            refused.add_metric([peer, reason], n)
        for direction, field in (("in", "messages_in"), ("out", "messages_out")):
            for kind, n in (r.get(field) or {}).items():
                messages.add_metric([peer, direction, kind], n)
        for direction, field in (("in", "notifications_in"), ("out", "notifications_out")):
            for code, n in (r.get(field) or {}).items():
                notes.add_metric([peer, direction, code], n)
        for event, n in (r.get("graceful_restart") or {}).items():
            gr.add_metric([peer, event], n)
    yield GaugeMetricFamily("pyflannel_bgp_sessions_established", "BGP sessions in "
                            "Established", value=sum(r.get("state") == "Established"
                                                     for r in sessions))
    yield from (state, prefixes, refused, messages, notes, gr)


# Device drop reasons that are handshake failures, and those that are datagrams failing
# authentication (the fast path counts both as drop_<reason>).
HANDSHAKE_FAILURES = ("bad_mac1", "bad_mac2", "unknown_peer", "handshake_replay",
                      "handshake_flood", "bad_cookie", "rate_limited")
UNAUTHENTICATED = ("bad_auth", "malformed", "unknown_index", "bad_mac1", "unknown_peer")


def _wireguard(c: dict, per_peer: dict) -> Iterator:
    """The wireguard backend's protocol metrics: handshakes, their failures by reason, the
    last handshake per peer, replayed and unauthenticated datagrams."""
    yield CounterMetricFamily("pyflannel_wireguard_handshakes",
                              "WireGuard handshakes completed",
                              value=c.get("wg_handshakes_completed", 0))
    yield CounterMetricFamily("pyflannel_wireguard_initiations_sent",
                              "WireGuard handshake initiations sent (retransmissions included)",
                              value=c.get("wg_initiations_sent", 0))
    failures = CounterMetricFamily(
        "pyflannel_wireguard_handshake_failures", "WireGuard handshake messages refused, or "
        "handshakes given up after 90 s (abandoned), by reason", labels=["reason"])
    for reason in HANDSHAKE_FAILURES:
        failures.add_metric([reason], c.get(f"drop_{reason}", 0))
    failures.add_metric(["abandoned"], c.get("wg_handshakes_abandoned", 0))
    yield failures
    yield CounterMetricFamily("pyflannel_wireguard_cookie_replies_sent",
                              "WireGuard cookie replies sent to handshakes without a valid "
                              "mac2 while under load", value=c.get("wg_cookie_replies_sent", 0))
    yield CounterMetricFamily("pyflannel_wireguard_cookie_replies_limited",
                              "WireGuard cookie replies not sent because the global cookie "
                              "reply rate was used up (a handshake flood)",
                              value=c.get("wg_cookie_replies_limited", 0))
    yield CounterMetricFamily("pyflannel_wireguard_replayed_datagrams",
                              "WireGuard transport messages refused as replays",
                              value=c.get("drop_replay", 0))
    unauth = CounterMetricFamily("pyflannel_wireguard_unauthenticated_datagrams",
                                 "datagrams on the WireGuard port that failed authentication, "
                                 "by reason", labels=["reason"])
    for reason in UNAUTHENTICATED:
        unauth.add_metric([reason], c.get(f"drop_{reason}", 0))
    yield unauth
    last = GaugeMetricFamily("pyflannel_wireguard_last_handshake_timestamp_seconds",
                             "when the last WireGuard handshake with each peer completed "
                             "(Unix time)", labels=["peer", "public_key"])
    for peer, st in sorted(per_peer.items()):
        at = st.get("latest_handshake")
        if isinstance(at, int | float):
            last.add_metric([peer, str(st.get("public_key", ""))], at)
    yield last


class Metrics:
    """The registry the HTTP endpoint serves."""

    def __init__(self, state: Callable[[], dict]) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(DaemonCollector(state))
        self.programming = Histogram(
            "pyflannel_peer_programming_seconds",
            "time from a peer lease event reaching the daemon to its routes and tables "
            "being in place", registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5))

    def render(self) -> bytes:
        return generate_latest(self.registry)


REQUEST_DEADLINE_S = 5.0  # for the whole request (line and headers) and the answer
MAX_CONNECTIONS = 64  # at the cap, the oldest client still sending its request is closed
MAX_REQUEST_LINE = 8192  # the StreamReader limit: a longer line is refused with 414
MAX_HEADER_BYTES = 16384  # all header lines together: more is refused with 431
DISCARD_LIMIT = 1 << 20  # after an error answer, read (and drop) at most this much


class HealthServer:
    """``/healthz`` (alive), ``/readyz`` (lease held and data path programmed), ``/metrics``.

    A deliberately tiny HTTP/1.0 responder on asyncio: three GET routes need no framework.
    It listens on 0.0.0.0 by default (kubelet probes come from outside), so anyone who
    reaches it is held to one deadline per request, a cap on open connections and bounded
    request sizes, and nothing a client sends can make it log a traceback.

    A new connection is always taken: at the cap, room is made by closing the oldest client
    that is still sending its request (the slowest; else the oldest of all). A probe sends
    its request at once and is answered within milliseconds, so however many slow clients
    hold connections, they are the ones closed, never the probe.
    """

    def __init__(self, host: str, port: int, metrics: Metrics, ready: Callable[[], bool], *,
                 deadline: float = REQUEST_DEADLINE_S,
                 max_connections: int = MAX_CONNECTIONS,
                 max_request_line: int = MAX_REQUEST_LINE,
                 max_header_bytes: int = MAX_HEADER_BYTES) -> None:
        self.host, self.port, self.metrics, self.ready = host, port, metrics, ready
        self.deadline = deadline
        self.max_connections = max_connections
        self.max_request_line = max_request_line
        self.max_header_bytes = max_header_bytes
        self.server: asyncio.base_events.Server | None = None
        self._clients: dict[_Client, None] = {}  # being served, oldest first
        self.evicted = 0  # clients closed to make room for a newer one
        metrics.registry.register(_HealthCollector(self))

    @property
    def active(self) -> int:
        """Connections being served now."""
        return len(self._clients)

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, self.host, self.port,
                                                 limit=self.max_request_line)
        if not self.port:  # port 0 (tests): the one the kernel chose
            self.port = self.server.sockets[0].getsockname()[1]
        log.info("health and metrics on http://%s:%d/", self.host, self.port)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            while self._clients:  # nobody waits for their answers now
                self._evict()
            await self.server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while len(self._clients) >= self.max_connections:
            self._evict()
        client = _Client(writer)
        self._clients[client] = None
        done = False
        try:
            async with asyncio.timeout(self.deadline):
                await self._serve(reader, writer, client)
            done = True
        except (TimeoutError, ConnectionError):
            pass
        except asyncio.CancelledError:
            if not client.evicted:
                raise
        except Exception as e:  # noqa: BLE001 - a client must never cause a traceback
            log.debug("health request failed: %r", e)
        finally:
            self._clients.pop(client, None)
            if done:
                writer.close()  # the answer is flushed first
            else:  # too slow, broken or evicted: nothing owed, nothing kept
                writer.transport.abort()

    def _evict(self) -> None:
        """Close the oldest client still sending its request, else the oldest of all."""
        victim = next((c for c in self._clients if not c.answering), None)
        if victim is None:
            victim = next(iter(self._clients))
        del self._clients[victim]
        self.evicted += 1
        victim.evicted = True
        victim.writer.transport.abort()
        if victim.task is not None:
            victim.task.cancel()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     client: _Client) -> None:
        try:
            request = await reader.readline()
        except ValueError:  # longer than the reader's limit
            await self._refuse(reader, writer, "414 URI Too Long")
            return
        header_bytes = 0
        while True:
            try:
                line = await reader.readline()
            except ValueError:
                await self._refuse(reader, writer, "431 Request Header Fields Too Large")
                return
            header_bytes += len(line)
            if header_bytes > self.max_header_bytes:
                await self._refuse(reader, writer, "431 Request Header Fields Too Large")
                return
            if line in (b"\r\n", b"\n", b""):
                break
        parts = request.decode("latin-1").split()
        path = parts[1].split("?", 1)[0] if len(parts) >= 2 else ""
        if len(parts) < 2 or parts[0] not in ("GET", "HEAD"):
            status, body, ctype = "405 Method Not Allowed", b"GET only\n", "text/plain"
        elif path == "/healthz":
            status, body, ctype = "200 OK", b"ok\n", "text/plain"
        elif path == "/readyz":
            ok = self.ready()
            status = "200 OK" if ok else "503 Service Unavailable"
            body, ctype = (b"ready\n" if ok else b"not ready\n"), "text/plain"
        elif path == "/metrics":
            status, body = "200 OK", self.metrics.render()
            ctype = "text/plain; version=0.0.4; charset=utf-8"
        else:
            status, body, ctype = "404 Not Found", b"not found\n", "text/plain"
        client.answering = True
        self._answer(writer, status, body, ctype, head_only=parts[:1] == ["HEAD"])
        await writer.drain()

    @staticmethod
    def _answer(writer: asyncio.StreamWriter, status: str, body: bytes, ctype: str,
                head_only: bool = False) -> None:
        head = (f"HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
        writer.write(head.encode() + (b"" if head_only else body))

    async def _refuse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      status: str) -> None:
        """Answer an oversized request, then read and drop what the client is still
        sending (bounded, within the deadline): closing with unread data would reset the
        connection and the client might never see the answer."""
        self._answer(writer, status, status.split(" ", 1)[1].encode() + b"\n", "text/plain")
        await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
        dropped = 0
        while dropped < DISCARD_LIMIT:
            data = await reader.read(65536)
            if not data:
                break
            dropped += len(data)


class _HealthCollector(Collector):
    """The health server's own figures, read from it at scrape time."""

    def __init__(self, server: HealthServer) -> None:
        self.server = server

    def collect(self) -> Iterator:
        yield CounterMetricFamily("pyflannel_health_clients_evicted", "health-port clients "
                                  "closed to make room for a newer connection at the cap",
                                  value=self.server.evicted)


class _Client:
    """One connection to the health port, as the cap sees it."""

    __slots__ = ("writer", "task", "answering", "evicted")

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.task = asyncio.current_task()
        self.answering = False  # its request is read: the answer is on its way
        self.evicted = False
