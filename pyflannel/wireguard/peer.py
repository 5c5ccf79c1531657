"""Per-peer state and the inner-packet checks: what a peer may send, and where it is.

``Peer`` holds one remote static key's sessions (current, previous, next), its pending
handshake, timer deadlines and counters; ``Device`` (``device.py``) drives it, and decides
from its routes which inner source addresses a peer may use. The IP header helpers here
read inner packets.
"""

from __future__ import annotations

import ipaddress
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from .keys import short_key
from .noise import InitiatorState, PeerIdentity
from .transport import Keypair

Endpoint = tuple  # (host, port) or the 4-tuple of an IPv6 socket address
TAI64N_ZERO = bytes(12)
IPV4_HEADER = 20
IP_VERSION = 0  # the byte whose high nibble is the IP version
PORT_LEN = 2
IPV6_ADDR_LEN = 16
IPV6_LIMIT_PREFIX = 8  # handshake rate limits apply per IPv6 /64
IPV4_VERSION_IHL5 = 0x45  # version 4, 20-byte header: almost every packet
IPV6_HEADER = 40
# IP header fields used to route and check inner packets.
V4_TOTAL_LEN = slice(2, 4)
V4_SRC = slice(12, 16)
V4_DST = slice(16, 20)
V6_PAYLOAD_LEN = slice(4, 6)
V6_SRC = slice(8, 24)
V6_DST = slice(24, 40)


@dataclass(frozen=True, slots=True)
class PeerConfig:
    """One row of the peer table, as flannel derives it from a lease."""

    allowed: tuple[str, ...]  # subnets, e.g. ("10.1.2.0/24",)
    endpoint: Endpoint | None = None  # (PublicIP, ListenPort)
    persistent_keepalive: float = 0.0  # seconds; 0 is off
    psk: bytes | None = None  # overrides the device's pre-shared key


class Prefixes:
    """A peer's subnets per address family as (network int, mask int) pairs, parsed (and
    so checked) once per table; the device's routes are built from them."""

    __slots__ = ("v4", "v6")

    def __init__(self, subnets: Iterable[str]) -> None:
        self.v4: list[tuple[int, int]] = []
        self.v6: list[tuple[int, int]] = []
        for text in subnets:
            net = ipaddress.ip_network(text, strict=False)
            pair = (int(net.network_address), int(net.netmask))
            (self.v4 if net.version == 4 else self.v6).append(pair)


@dataclass(slots=True, repr=False, eq=False)
class Peer:
    """A remote WireGuard peer: its sessions, handshake state, timers and counters."""

    identity: PeerIdentity
    config: PeerConfig
    prefixes: Prefixes
    endpoint: Endpoint | None
    current: Keypair | None = None
    previous: Keypair | None = None
    next: Keypair | None = None
    pending: InitiatorState | None = None  # our initiation awaiting a response
    last_initiation_sent: float = float("-inf")
    handshake_attempts: int = 0
    last_timestamp: bytes = TAI64N_ZERO  # greatest TAI64N seen in an initiation from them
    last_initiation_consumed: float = float("-inf")
    last_mac1: bytes | None = None  # mac1 of the last handshake message we sent them
    cookie: bytes | None = None
    cookie_time: float = float("-inf")
    sent_lastminute_handshake: bool = False
    need_another_keepalive: bool = False
    # timer deadlines on the device clock, None when not armed
    t_retransmit: float | None = None
    t_keepalive: float | None = None
    t_new_handshake: float | None = None
    t_persistent: float | None = None
    t_zero_keys: float | None = None
    staged: deque = field(default_factory=deque)
    rx_bytes: int = 0
    tx_bytes: int = 0
    last_handshake: float | None = None  # wall-clock time of the last completed handshake
    keepalive_interval: float = 0.0  # the config's persistent keepalive, read per packet

    @property
    def public_key(self) -> bytes:
        """The peer's static public key (32 bytes)."""
        return self.identity.public

    def __repr__(self) -> str:
        return f"Peer({short_key(self.identity.public)}, endpoint={self.endpoint})"


def inner_length(packet: bytes | memoryview) -> int:
    """The length an IP packet claims (padding excluded); -1 if the header is not sane."""
    n = len(packet)
    if n == 0:
        return -1
    version = packet[IP_VERSION] >> 4
    if version == 4 and n >= IPV4_HEADER:
        total = int.from_bytes(packet[V4_TOTAL_LEN], "big")
        return total if IPV4_HEADER <= total <= n else -1
    if version == 6 and n >= IPV6_HEADER:
        total = IPV6_HEADER + int.from_bytes(packet[V6_PAYLOAD_LEN], "big")
        return total if total <= n else -1
    return -1


class SourceLimiter:
    """Handshakes per source address under load: 20 a second, bursts of 5 (wireguard-go's).

    Only consulted for messages whose mac2 proved the source address, so spoofed
    addresses cannot fill it; idle entries are dropped once a second.
    """

    __slots__ = ("_buckets", "_swept", "rate", "burst")

    def __init__(self, rate: float = 20.0, burst: float = 5.0) -> None:
        self._buckets: dict[bytes, tuple[float, float]] = {}
        self._swept = float("-inf")
        self.rate = rate
        self.burst = burst

    def allow(self, address: bytes, now: float) -> bool:
        """Take a token for this address if it has one."""
        if now - self._swept >= 1.0:
            self._swept = now
            self._buckets = {a: b for a, b in self._buckets.items() if now - b[1] < 1.0}
        tokens, last = self._buckets.get(address, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if tokens < 1.0:
            self._buckets[address] = (tokens, now)
            return False
        self._buckets[address] = (tokens - 1.0, now)
        return True




class Pacer:
    """One token bucket for the whole device: how fast a queue of our own handshakes may go
    out. ``wait(now)`` says how long until the next token (0: take one now)."""

    __slots__ = ("_tokens", "_last", "rate", "burst")

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._last = float("-inf")

    def wait(self, now: float) -> float:
        """Seconds until a token is there; takes it when that is now."""
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return 0.0
        return (1.0 - self._tokens) / self.rate
