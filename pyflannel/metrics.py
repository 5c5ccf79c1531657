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


class DaemonCollector(Collector):
    """Turns the daemon's live state into metric families on each scrape."""

    def __init__(self, state: Callable[[], dict]) -> None:
        self.state = state

    def collect(self) -> Iterator:
        s = self.state()
        info = InfoMetricFamily("pyflannel", "pyflannel build and lease")
        info.add_metric([], {"version": __version__, "backend": s.get("backend", ""),
                             "subnet": s.get("subnet", "")})
        yield info
        yield GaugeMetricFamily("pyflannel_peers", "peers in the routing table",
                                value=s.get("peers", 0))
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
        drops = CounterMetricFamily("pyflannel_dropped_packets", "packets dropped, by reason",
                                    labels=["reason"])
        for name, value in sorted(c.items()):
            if name.startswith(DROP_PREFIX):
                drops.add_metric([name[len(DROP_PREFIX):]], value)
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


class HealthServer:
    """``/healthz`` (alive), ``/readyz`` (lease held and data path programmed), ``/metrics``.

    A deliberately tiny HTTP/1.0 responder on asyncio: three GET routes need no framework.
    """

    def __init__(self, host: str, port: int, metrics: Metrics,
                 ready: Callable[[], bool]) -> None:
        self.host, self.port, self.metrics, self.ready = host, port, metrics, ready
        self.server: asyncio.base_events.Server | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, self.host, self.port)
        log.info("health and metrics on http://%s:%d/", self.host, self.port)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), 5)
            while (await asyncio.wait_for(reader.readline(), 5)) not in (b"\r\n", b"\n", b""):
                pass
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
            head = (f"HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
            writer.write(head.encode() + (body if parts[:1] != ["HEAD"] else b""))
            await writer.drain()
        except (TimeoutError, ConnectionError, UnicodeDecodeError):
            pass
        finally:
            writer.close()
