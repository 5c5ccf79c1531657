"""A WireGuard device without I/O: datagrams and TUN packets in, actions out.

The caller owns the sockets and the TUN. It hands every UDP datagram to :meth:`receive`
and every packet read from the TUN to :meth:`send` (or :meth:`send_to` when it already
knows the peer), calls :meth:`tick` when :meth:`next_deadline` comes due, and then drains
two lists the device appended to:

* ``to_tun``: ``(inner packet, peer)`` pairs, each authenticated by that peer and with an
  inner source address that peer owns (cryptokey routing: a prefix two peers list is the
  last claimant's, for sending and receiving alike);
* ``to_net``: ``(datagram, endpoint)`` pairs to send from the UDP socket.

Appending to lists the caller drains once per batch keeps the per-datagram path free of
result objects. Time comes from an injected monotonic ``clock`` so that every timer of the
protocol (rekey, retransmission, keepalives, key expiry) can be tested with a fake clock in
milliseconds, and :class:`~.constants.Limits` can be shortened.

Security rules kept here: a handshake from a static key not in the peer table is refused;
nothing reaches ``to_tun`` unless it decrypted under a peer's session and its inner source
routes back to that peer (:meth:`Device.owner`); no session seals past
REJECT_AFTER_MESSAGES (:meth:`.Keypair.take_counters`); every refused datagram is counted
in ``drops`` by reason, and no datagram, however malformed, raises.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import random
import struct
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence

from .constants import (
    COOKIE_REPLY_LEN,
    DATA_COUNTER,
    DATA_MIN_LEN,
    DATA_PAYLOAD,
    DATA_RECEIVER,
    DEFAULT_LIMITS,
    INIT_EPHEMERAL,
    INIT_LEN,
    INIT_SENDER,
    MAX_DATAGRAM,
    MSG_COOKIE_REPLY,
    MSG_INITIATION,
    MSG_RESPONSE,
    MSG_TRANSPORT,
    RESERVED,
    RESP_EPHEMERAL,
    RESP_LEN,
    RESP_RECEIVER,
    RESP_SENDER,
    TYPE_LEN,
    TYPE_OFFSET,
    Limits,
)
from .crypto import tai64n
from .keys import PrivateKey, check_public_key, short_key
from .noise import (
    ZERO_PSK,
    CookieChecker,
    HandshakeError,
    LocalIdentity,
    PeerIdentity,
    TransportKeys,
    address_bytes,
    check_mac1,
    check_mac2,
    consume_initiation,
    consume_response,
    cookie_reply_receiver,
    create_initiation,
    create_response,
    open_cookie_reply,
    seal_macs,
)
from .peer import (
    IP_VERSION,
    IPV4_HEADER,
    IPV4_VERSION_IHL5,
    IPV6_ADDR_LEN,
    IPV6_HEADER,
    IPV6_LIMIT_PREFIX,
    PORT_LEN,
    V4_DST,
    V4_SRC,
    V4_TOTAL_LEN,
    V6_DST,
    V6_SRC,
    Endpoint,
    Pacer,
    Peer,
    PeerConfig,
    Prefixes,
    SourceLimiter,
    inner_length,
)
from .transport import InvalidTag, Keypair

log = logging.getLogger(__name__)

_RESERVED_ZERO = b"\0\0\0"
# one C call each on the per-datagram path instead of a slice and an int.from_bytes:
_le32 = struct.Struct("<I").unpack_from  # type and reserved bytes, as one LE u32
# type and reserved bytes (as one LE u32), receiver index, counter: one C call
_transport_header = struct.Struct("<IIQ").unpack_from
_v4_length_source = struct.Struct(  # IPv4 total length and source address
    f"!{V4_TOTAL_LEN.start}xH{V4_SRC.start - V4_TOTAL_LEN.stop}xI").unpack_from
_NONCE_PAD = b"\0\0\0\0"  # the transport nonce: four zero bytes, then the LE64 counter
COOKIE_REPLIES_PER_SECOND = 500.0  # for the whole device
COOKIE_REPLY_BURST = 50.0
# Greetings (handshakes we start because a peer sends on a session we do not have, e.g.
# after our restart): bursts of 16, then half the load threshold a second, so that their
# responses alone never put this node under load (where a response without mac2 is
# answered with a cookie and dropped) nor overrun the fast path's HANDSHAKE_BUDGET.
GREETING_BURST = 16.0


def _host_port(endpoint: Endpoint) -> tuple[str, int]:
    """An endpoint as (address, port), whatever socket address form it came in."""
    return str(endpoint[0]).split("%")[0], int(endpoint[1])


def _same_run(data: bytes | bytearray | memoryview, index: int) -> bool:
    """Is ``data`` a transport message (by its shape) to receiver ``index``?"""
    n = len(data)
    return (DATA_MIN_LEN <= n <= MAX_DATAGRAM and _le32(data)[0] == MSG_TRANSPORT
            and _le32(data, DATA_RECEIVER)[0] == index)


DROP_REASONS = (
    "malformed", "bad_mac1", "bad_mac2", "unknown_peer", "unknown_index", "bad_auth",
    "replay", "handshake_replay", "handshake_flood", "stale_key", "bad_cookie",
    "inner_src", "inner_malformed", "no_route", "no_endpoint", "staged_overflow",
    "rate_limited", "internal_error",
)


class Device:
    """Our static key, the peer table and every session: the protocol's whole state."""

    def __init__(
        self,
        private_key: PrivateKey,
        *,
        psk: bytes | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        limits: Limits = DEFAULT_LIMITS,
        mtu: int | None = None,
        rng: random.Random | None = None,
        load_threshold: int = 64,
    ) -> None:
        self.local = LocalIdentity(private_key)
        self.psk = psk
        self.clock = clock
        self.wall_clock = wall_clock
        self.limits = limits
        # the limits the per-datagram path reads, as plain attributes
        self._reject_after_time = limits.reject_after_time
        self._receive_rekey_age = limits.receive_rekey_age
        self._keepalive_timeout = limits.keepalive_timeout
        self._rekey_after_messages = limits.rekey_after_messages
        self.mtu = mtu
        self._rng = rng or random.SystemRandom()
        self._cookies = CookieChecker(self.local, limits.cookie_refresh_time)
        self.peers: dict[bytes, Peer] = {}
        self._keypairs: dict[int, Keypair] = {}  # our index -> session, for type-4 messages
        self._pending: dict[int, Peer] = {}  # our index -> peer awaiting a response
        self._routes4: list[tuple[int, dict[int, Peer]]] = []
        self._routes6: list[tuple[int, dict[int, Peer]]] = []
        self._contested: set[tuple] = set()  # prefixes two peers claim, warned about
        self.to_tun: list[tuple[bytes, Peer]] = []
        self.to_net: list[tuple[bytes, Endpoint]] = []
        self.drops: Counter[str] = Counter()
        self.stats: Counter[str] = Counter()
        self.force_under_load: bool | None = None  # tests and operators may pin it
        self.load_threshold = load_threshold
        self._load_window = float("-inf")
        self._load_count = 0
        self._load_until = float("-inf")
        self._limiter = SourceLimiter()
        # cookie replies, from every source together: a flood of initiations must not
        # turn the node into a sender of as many replies (one bucket, the key b"")
        self._cookie_replies = SourceLimiter(COOKIE_REPLIES_PER_SECOND, COOKIE_REPLY_BURST)
        # peers to greet (they send on a session we lost), in order: a dict as ordered set
        self._greetings: dict[Peer, None] = {}
        self._by_endpoint: dict[tuple[str, int], Peer] = {}  # the table's endpoints
        self._greeting_pacer = Pacer(max(1.0, load_threshold / 2), GREETING_BURST)
        self._greet_at: float | None = None

    def __repr__(self) -> str:
        return f"Device({short_key(self.local.public)}, peers={len(self.peers)})"

    @property
    def public_key(self) -> bytes:
        """Our static public key."""
        return self.local.public

    # --- the peer table -------------------------------------------------------------------

    def set_peers(self, table: Mapping[bytes, PeerConfig]) -> dict[bytes, str]:
        """Replace the whole peer table (public key -> config), as flannel's leases say.

        A key no longer in the table loses its sessions at once; a new key starts from
        nothing; a kept key keeps its sessions, with subnets and endpoint updated. Each row
        is checked first (the key by :func:`~.keys.check_public_key`, its subnets, its
        pre-shared key): a bad row is left out, as if absent, and never holds up the
        others. Returns the rows left out, with why.
        """
        prepared: dict[bytes, tuple[PeerConfig, Prefixes, PeerIdentity | None]] = {}
        refused: dict[bytes, str] = {}
        for key, config in table.items():
            psk = config.psk or self.psk
            peer = self.peers.get(key)
            identity = None
            try:
                check_public_key(key, own=self.local.public)
                if peer is None or peer.identity.psk != (psk or ZERO_PSK):
                    identity = PeerIdentity.derive(self.local, key, psk)
                prepared[key] = (config, Prefixes(config.allowed), identity)
            except (ValueError, TypeError) as e:
                refused[key] = str(e)
        now = self.clock()
        for key in list(self.peers):
            if key not in prepared:
                self._forget(self.peers.pop(key))
        for key, (config, prefixes, identity) in prepared.items():
            peer = self.peers.get(key)
            if peer is None:
                assert identity is not None
                peer = Peer(identity, config, prefixes, config.endpoint)
                peer.keepalive_interval = max(0.0, config.persistent_keepalive)
                self.peers[key] = peer
                if config.persistent_keepalive > 0:
                    peer.t_persistent = now  # like `wg set`: say hello at once
                continue
            if identity is not None:  # the pre-shared key changed
                peer.identity = identity
            if config.endpoint != peer.config.endpoint:
                peer.endpoint = config.endpoint
            if config.persistent_keepalive != peer.config.persistent_keepalive:
                peer.t_persistent = now if config.persistent_keepalive > 0 else None
            peer.config = config
            peer.prefixes = prefixes
            peer.keepalive_interval = max(0.0, config.persistent_keepalive)
        self._build_routes(prepared)
        self._by_endpoint = {_host_port(p.config.endpoint): p for p in self.peers.values()
                             if p.config.endpoint is not None}
        return refused

    def _greet(self, src: Endpoint, now: float) -> None:
        """A transport message to an index we do not know came from ``src``. If that is a
        peer's endpoint (as the table gives it) and we have no session with it, it still
        sends on one we lost (we restarted), and would until its own timers gave up on it
        (some 15 s): start a handshake now; the keepalive that completes it moves the
        peer to the new session. Paced (:data:`GREETING_BURST`), each peer at most once per
        REKEY_TIMEOUT (:meth:`_initiate`); a forged source gets the real peer a handshake."""
        peer = self._by_endpoint.get(_host_port(src))
        if peer is None or peer.current is not None or peer in self._greetings:
            return
        self._greetings[peer] = None
        if self._greet_at is None:
            self._send_greetings(now)

    def _send_greetings(self, now: float) -> None:
        queue = self._greetings
        while queue:
            peer = next(iter(queue))
            if (self.peers.get(peer.public_key) is not peer or peer.current is not None
                    or peer.pending is not None
                    or now - peer.last_initiation_sent < self.limits.rekey_timeout):
                del queue[peer]  # gone, talking, or a handshake on its way: nothing to say
                continue
            wait = self._greeting_pacer.wait(now)
            if wait > 0:
                self._greet_at = now + wait
                return
            del queue[peer]
            self.stats["greetings_sent"] += 1
            self._initiate(peer, now, retry=False)
        self._greet_at = None

    def _forget(self, peer: Peer) -> None:
        for kp in (peer.current, peer.previous, peer.next):
            if kp is not None:
                self._keypairs.pop(kp.local_index, None)
        if peer.pending is not None:
            self._pending.pop(peer.pending.sender_index, None)
        peer.current = peer.previous = peer.next = None
        peer.pending = None
        peer.staged.clear()

    def _build_routes(self, claim_order: Iterable[bytes]) -> None:
        """Cryptokey routing: each prefix belongs to one peer, the last in ``claim_order``
        (the table's order) to claim it. That peer alone is sent its destinations and may
        send from its addresses (:meth:`owner`), as in WireGuard."""
        by_len4: dict[int, dict[int, Peer]] = {}
        by_len6: dict[int, dict[int, Peer]] = {}
        contested: dict[tuple[int, int, int], tuple[Peer, Peer]] = {}
        for key in claim_order:
            peer = self.peers[key]
            for by_len, pairs, bits in ((by_len4, peer.prefixes.v4, 32),
                                        (by_len6, peer.prefixes.v6, 128)):
                for net, mask in pairs:
                    shift = bits - mask.bit_count()
                    table = by_len.setdefault(shift, {})
                    old = table.get(net >> shift)
                    if old is not None and old is not peer:
                        contested[(bits, net, shift)] = (old, peer)
                    table[net >> shift] = peer
        for (bits, net, shift), (old, new) in contested.items():
            if (bits, net, shift, new.public_key) not in self._contested:
                kind = ipaddress.IPv4Network if bits == 32 else ipaddress.IPv6Network
                prefix = kind((net, bits - shift))
                log.warning("wireguard: %s is claimed by peers %s and %s; the last claim, "
                            "%s, routes it and alone may send from it", prefix,
                            short_key(old.public_key), short_key(new.public_key),
                            short_key(new.public_key))
        self._contested = {(*k, v[1].public_key) for k, v in contested.items()}
        # the longest prefix (smallest shift) first
        self._routes4 = sorted(by_len4.items())
        self._routes6 = sorted(by_len6.items())

    def route(self, packet: bytes | memoryview) -> Peer | None:
        """The peer whose allowed subnets hold the packet's destination (longest prefix)."""
        if not packet:
            return None
        version = packet[IP_VERSION] >> 4
        if version == 4 and len(packet) >= IPV4_HEADER:
            return self.owner(self._routes4, int.from_bytes(packet[V4_DST], "big"))
        if version == 6 and len(packet) >= IPV6_HEADER:
            return self.owner(self._routes6, int.from_bytes(packet[V6_DST], "big"))
        return None

    @staticmethod
    def owner(routes: list[tuple[int, dict[int, Peer]]], address: int) -> Peer | None:
        """The peer that owns ``address`` (longest prefix) in ``_routes4``/``_routes6``:
        where a packet to it goes, and the only peer a packet from it may come from."""
        for shift, table in routes:
            peer = table.get(address >> shift)
            if peer is not None:
                return peer
        return None

    def status(self) -> list[dict[str, object]]:
        """Per peer what `wg show` prints, for `pyflannel status` and metrics: no secrets."""
        rows: list[dict[str, object]] = []
        for peer in self.peers.values():
            ep = peer.endpoint
            rows.append({
                "public_key": short_key(peer.public_key),
                "endpoint": None if ep is None else f"{ep[0]}:{ep[1]}",
                "allowed": list(peer.config.allowed),
                "latest_handshake": peer.last_handshake,
                "rx_bytes": peer.rx_bytes,
                "tx_bytes": peer.tx_bytes,
                "session": peer.current is not None,
                "persistent_keepalive": peer.config.persistent_keepalive,
            })
        return rows

    # --- output ---------------------------------------------------------------------------

    def drain(self) -> tuple[list[tuple[bytes, Peer]], list[tuple[bytes, Endpoint]]]:
        """Take what the device produced since the last drain: (to_tun, to_net)."""
        tun, net = self.to_tun, self.to_net
        self.to_tun, self.to_net = [], []
        return tun, net

    # --- receive --------------------------------------------------------------------------

    def receive(self, data: bytes | bytearray | memoryview, src: Endpoint) -> None:
        """Consume one UDP datagram from ``src``. Never raises; refusals are counted."""
        n = len(data)
        try:
            if n < TYPE_LEN or n > MAX_DATAGRAM or data[RESERVED] != _RESERVED_ZERO:
                self.drops["malformed"] += 1
                return
            kind = data[TYPE_OFFSET]
            if kind == MSG_TRANSPORT and n >= DATA_MIN_LEN:
                self._transport_run([(data, src)], 0, self.clock())
            elif kind == MSG_INITIATION and n == INIT_LEN:
                self._receive_initiation(bytes(data), src)
            elif kind == MSG_RESPONSE and n == RESP_LEN:
                self._receive_response(bytes(data), src)
            elif kind == MSG_COOKIE_REPLY and n == COOKIE_REPLY_LEN:
                self._receive_cookie_reply(bytes(data))
            else:
                self.drops["malformed"] += 1
        except HandshakeError as e:
            self.drops[e.reason] += 1
        except Exception:  # a bug must not take the data path down with it
            log.exception("wireguard: internal error on a %d-byte datagram", n)
            self.drops["internal_error"] += 1

    def receive_many(self, datagrams: Iterable[tuple[bytes, Endpoint]]) -> None:
        """Consume a batch of datagrams (one recvmmsg's worth), as :meth:`receive` would.

        Each run of transport messages to one receiver index, the bulk of the traffic, goes
        to :meth:`_transport_run` whole, so the peer's bookkeeping is done once per run;
        anything else goes through :meth:`receive`, in its place in the batch.
        """
        batch = datagrams if isinstance(datagrams, (list, tuple)) else list(datagrams)
        total = len(batch)
        now = self.clock()
        i = 0
        while i < total:
            data, src = batch[i]
            n = len(data)
            if n < DATA_MIN_LEN or n > MAX_DATAGRAM or _le32(data)[0] != MSG_TRANSPORT:
                self.receive(data, src)
                i += 1
                continue
            try:
                i = max(i + 1, self._transport_run(batch, i, now))  # always onwards
            except Exception:  # a bug must not take the data path down with it
                log.exception("wireguard: internal error on a transport message")
                self.drops["internal_error"] += 1
                i += 1

    def _transport_run(self, batch: Sequence[tuple[bytes, Endpoint]], i: int,
                       now: float) -> int:
        """The transport receive rules, the only place they live: for ``batch[i]`` (a
        type-4 message of at least 32 bytes) and the messages after it to the same receiver
        index. Returns the position after that run.

        Per message: a session for the index that has not expired, the tag (a forgery
        never moves the replay window), a fresh counter, a sane inner IP header, and an
        inner source that the session's peer owns (cryptokey routing, :meth:`owner`).
        Once per run, if anything authenticated: the peer's endpoint (from the last
        authenticated message), byte count, timers, and the session's promotion or rekey.
        """
        drops = self.drops
        index = _le32(batch[i][0], DATA_RECEIVER)[0]
        total = len(batch)
        kp = self._keypairs.get(index)
        if kp is None or now >= kp.expires_at:
            j = i + 1
            while j < total and _same_run(batch[j][0], index):
                j += 1
            drops["unknown_index" if kp is None else "stale_key"] += j - i
            if kp is None:
                self._greet(batch[i][1], now)
            return j
        peer: Peer = kp.peer  # type: ignore[assignment]
        decrypt, accept = kp.opener()
        routes4, routes6 = self._routes4, self._routes6
        append = self.to_tun.append
        nbytes = keepalives = 0
        data_seen = False
        last_src: Endpoint | None = None
        j = i
        while j < total:
            data, src = batch[j]
            n = len(data)
            if n < DATA_MIN_LEN or n > MAX_DATAGRAM:
                break
            kind, receiver, counter = _transport_header(data)
            if kind != MSG_TRANSPORT or receiver != index:
                break
            j += 1
            try:
                plain = decrypt(_NONCE_PAD + data[DATA_COUNTER:DATA_PAYLOAD],
                                data[DATA_PAYLOAD:], None)
            except InvalidTag:
                drops["bad_auth"] += 1
                continue
            if not accept(counter):
                drops["replay"] += 1
                continue
            # authenticated from here on
            nbytes += n
            last_src = src
            if not plain:
                keepalives += 1
                continue
            size = len(plain)
            if plain[IP_VERSION] == IPV4_VERSION_IHL5 and size >= IPV4_HEADER:
                # the common case (IPv4 without options), in one struct call
                length, address = _v4_length_source(plain)
                if not IPV4_HEADER <= length <= size:
                    drops["inner_malformed"] += 1
                    continue
                routes = routes4
            else:
                length = inner_length(plain)
                if length < 0:
                    drops["inner_malformed"] += 1
                    continue
                if plain[IP_VERSION] >> 4 == 4:
                    address, routes = int.from_bytes(plain[V4_SRC], "big"), routes4
                else:
                    address, routes = int.from_bytes(plain[V6_SRC], "big"), routes6
            for shift, table in routes:  # Device.owner, inlined: once per packet
                owner = table.get(address >> shift)
                if owner is not None:
                    break
            else:
                owner = None
            if owner is not peer:
                drops["inner_src"] += 1
                continue
            data_seen = True
            append((plain if length == size else plain[:length], peer))
        if keepalives:
            self.stats["keepalives_received"] += keepalives
        if last_src is not None:
            self._authenticated(peer, kp, nbytes, data_seen, last_src, now)
        return j

    def _authenticated(self, peer: Peer, kp: Keypair, nbytes: int, data: bool,
                       src: Endpoint, now: float) -> None:
        """The peer's bookkeeping after authenticated transport messages on ``kp``."""
        if peer.endpoint != src:
            peer.endpoint = src
        peer.rx_bytes += nbytes
        peer.t_new_handshake = None  # any authenticated packet received
        if peer.keepalive_interval:
            peer.t_persistent = now + peer.keepalive_interval
        if kp is not peer.current:
            if kp is peer.next:
                self._confirm_next(peer, now)
        elif (kp.initiator and now - kp.created >= self._receive_rekey_age
                and not peer.sent_lastminute_handshake):
            peer.sent_lastminute_handshake = True
            self._initiate(peer, now, retry=False)
        if data:  # data received: answer within KEEPALIVE_TIMEOUT
            if peer.t_keepalive is None:
                peer.t_keepalive = now + self._keepalive_timeout
            else:
                peer.need_another_keepalive = True

    def _confirm_next(self, peer: Peer, now: float) -> None:
        """The initiator used the session we answered with: it becomes current."""
        old_prev = peer.previous
        if old_prev is not None:
            self._keypairs.pop(old_prev.local_index, None)
        peer.previous = peer.current
        peer.current = peer.next
        peer.next = None
        self._handshake_complete(peer, now)
        self._flush_staged(peer, now)

    def _under_load(self, now: float) -> bool:
        if self.force_under_load is not None:
            return self.force_under_load
        if now - self._load_window >= 1.0:
            self._load_window = now
            self._load_count = 0
        self._load_count += 1
        if self._load_count > self.load_threshold:
            self._load_until = now + 1.0
        return now < self._load_until

    def _check_handshake_macs(self, msg: bytes, src: Endpoint, receiver: int) -> bool:
        """mac1 always; under load mac2 too, answering a missing one with a cookie reply."""
        if not check_mac1(msg, self.local.mac1_key):
            self.drops["bad_mac1"] += 1
            return False
        now = self.clock()
        if not self._under_load(now):
            return True
        host = str(src[0]).split("%")[0]
        source = address_bytes(host, int(src[1]))
        if check_mac2(msg, self._cookies.cookie_for(source, now)):
            # a proven address may still flood: a token bucket per address (IPv6 per /64)
            address = source[:-PORT_LEN]
            if len(address) == IPV6_ADDR_LEN:
                address = address[:IPV6_LIMIT_PREFIX]
            if self._limiter.allow(address, now):
                return True
            self.drops["rate_limited"] += 1
            return False
        self.drops["bad_mac2"] += 1
        if not self._cookie_replies.allow(b"", now):
            self.stats["cookie_replies_limited"] += 1
            return False
        self.to_net.append((self._cookies.make_reply(msg, receiver, source, now), src))
        self.stats["cookie_replies_sent"] += 1
        return False

    def _receive_initiation(self, msg: bytes, src: Endpoint) -> None:
        sender = int.from_bytes(msg[INIT_SENDER:INIT_EPHEMERAL], "little")
        if not self._check_handshake_macs(msg, src, sender):
            return
        peers = self.peers

        def lookup(key: bytes) -> PeerIdentity | None:
            peer = peers.get(key)
            return None if peer is None else peer.identity

        init = consume_initiation(self.local, msg, lookup)
        peer = peers[init.peer.public]
        now = self.clock()
        if init.timestamp <= peer.last_timestamp:  # both 12-byte big-endian: bytes order
            self.drops["handshake_replay"] += 1
            return
        if now - peer.last_initiation_consumed < 1.0 / self.limits.initiations_per_second:
            self.drops["handshake_flood"] += 1
            return
        peer.last_timestamp = init.timestamp
        peer.last_initiation_consumed = now
        peer.rx_bytes += INIT_LEN
        # Simultaneous initiations (two greetings, a greeting and a rekey): ours stays
        # pending. Both sides answer both, each then sends on the session it initiated and
        # receives on the other (kept as `previous`); a peer that drops its own (the
        # kernel, wireguard-go) still gets our response and confirms ours. Dropping ours
        # when both do so would leave neither side a session until a retransmission.
        index = self._new_index()
        reply, keys = create_response(self.local, init, index)
        peer.last_mac1 = seal_macs(reply, peer.identity.mac1_key, self._cookie_for_peer(peer, now))
        kp = self._keypair(keys, peer, now)
        # the responder's new session waits in `next` until the initiator uses it
        for old in (peer.next, peer.previous):
            if old is not None:
                self._keypairs.pop(old.local_index, None)
        peer.next = kp
        peer.previous = None
        self._keypairs[index] = kp
        peer.endpoint = src
        peer.t_new_handshake = None
        peer.t_zero_keys = now + self.limits.zero_keys_after
        self.stats["initiations_received"] += 1
        self._send_datagram(peer, bytes(reply), now)
        self.stats["responses_sent"] += 1

    def _receive_response(self, msg: bytes, src: Endpoint) -> None:
        receiver = int.from_bytes(msg[RESP_RECEIVER:RESP_EPHEMERAL], "little")
        sender = int.from_bytes(msg[RESP_SENDER:RESP_RECEIVER], "little")
        if not self._check_handshake_macs(msg, src, sender):
            return
        peer = self._pending.get(receiver)
        if peer is None or peer.pending is None or peer.pending.sender_index != receiver:
            self.drops["unknown_index"] += 1
            return
        keys = consume_response(self.local, peer.identity, peer.pending, msg)
        now = self.clock()
        del self._pending[receiver]
        peer.pending = None
        peer.rx_bytes += RESP_LEN
        kp = self._keypair(keys, peer, now)
        # the initiator may use its new session at once
        if peer.next is not None:
            drop_old = [peer.previous, peer.current]
            peer.previous, peer.next = peer.next, None
        else:
            drop_old = [peer.previous]
            peer.previous = peer.current
        for old in drop_old:
            if old is not None:
                self._keypairs.pop(old.local_index, None)
        peer.current = kp
        self._keypairs[keys.local_index] = kp
        peer.endpoint = src
        peer.t_new_handshake = None
        peer.t_zero_keys = now + self.limits.zero_keys_after
        self._traversal(peer, now)
        self._handshake_complete(peer, now)
        self.stats["responses_received"] += 1
        if not peer.staged:  # tell the responder its session is confirmed
            peer.staged.append(b"")
        self._flush_staged(peer, now)

    def _keypair(self, keys: TransportKeys, peer: Peer, now: float) -> Keypair:
        limits = self.limits
        kp = Keypair(keys.send, keys.recv, keys.local_index, keys.remote_index, keys.initiator,
                     now, reject_after_messages=limits.reject_after_messages, peer=peer)
        kp.expires_at = now + limits.reject_after_time
        if keys.initiator:  # only the initiator rekeys because of age
            kp.rekey_at = now + limits.rekey_after_time
        return kp

    def _receive_cookie_reply(self, msg: bytes) -> None:
        index = cookie_reply_receiver(msg)
        peer = self._pending.get(index)
        if peer is None:
            kp = self._keypairs.get(index)
            peer = kp.peer if kp is not None else None  # type: ignore[assignment]
        if peer is None or peer.last_mac1 is None:
            self.drops["unknown_index"] += 1
            return
        peer.cookie = open_cookie_reply(msg, peer.identity.cookie_key, peer.last_mac1)
        peer.cookie_time = self.clock()
        self.stats["cookie_replies_received"] += 1

    def _cookie_for_peer(self, peer: Peer, now: float) -> bytes | None:
        if peer.cookie is None:
            return None
        if now - peer.cookie_time >= self.limits.cookie_refresh_time - self.limits.rekey_timeout:
            peer.cookie = None
            return None
        return peer.cookie

    # --- send -----------------------------------------------------------------------------

    def send(self, packet: bytes | bytearray | memoryview) -> Peer | None:
        """Encrypt one packet from the TUN for the peer its destination routes to."""
        peer = self.route(packet)
        if peer is None:
            self.drops["no_route"] += 1
            return None
        self.send_to(peer, packet)
        return peer

    def send_to(self, peer: Peer, packet: bytes | bytearray | memoryview) -> None:
        """Encrypt for ``peer`` now, or hold the packet and start a handshake."""
        now = self.clock()
        kp = peer.current
        if kp is None or now >= kp.expires_at or kp.counters_left() <= 0:
            if len(peer.staged) >= self.limits.max_staged_packets:
                peer.staged.popleft()
                self.drops["staged_overflow"] += 1
            peer.staged.append(bytes(packet))
            self._initiate(peer, now, retry=False)
            return
        endpoint = peer.endpoint
        if endpoint is None:
            self.drops["no_endpoint"] += 1
            return
        msg = kp.seal(packet, self.mtu)
        self.to_net.append((msg, endpoint))
        peer.tx_bytes += len(msg)
        peer.t_keepalive = None  # any authenticated packet sent
        if peer.keepalive_interval:
            peer.t_persistent = now + peer.keepalive_interval
        if packet:
            if peer.t_new_handshake is None:  # data sent: expect to hear back
                peer.t_new_handshake = now + self.limits.new_handshake_after + self._jitter()
        else:
            self.stats["keepalives_sent"] += 1
        if now >= kp.rekey_at or kp.send_counter > self._rekey_after_messages:
            self._initiate(peer, now, retry=False)

    def sender(self, peer: Peer) -> Keypair | None:
        """The session to encrypt with now, for a caller that seals a batch itself.

        None means there is no usable session: hand the packets to :meth:`send_to`, which
        holds them and starts a handshake. Seal with the keypair (``seal_into``, or
        ``take_counters`` then ``seal_parts``), handing :meth:`send_to` whatever it has no
        counter left for, then call :meth:`sent` once for the batch.
        """
        kp = peer.current
        if (kp is None or peer.endpoint is None or self.clock() >= kp.expires_at
                or kp.counters_left() <= 0):
            return None
        return kp

    def sent(self, peer: Peer, kp: Keypair, nbytes: int, data: bool = True) -> None:
        """Account for messages sealed outside :meth:`send_to`: counters, timers, rekey."""
        now = self.clock()
        limits = self.limits
        peer.tx_bytes += nbytes
        peer.t_keepalive = None
        if peer.keepalive_interval:
            peer.t_persistent = now + peer.keepalive_interval
        if data and peer.t_new_handshake is None:
            peer.t_new_handshake = now + limits.new_handshake_after + self._jitter()
        if now >= kp.rekey_at or kp.send_counter > limits.rekey_after_messages:
            self._initiate(peer, now, retry=False)

    def initiate(self, public_key: bytes) -> None:
        """Start a handshake with a peer now (rate-limited to one per REKEY_TIMEOUT)."""
        self._initiate(self.peers[public_key], self.clock(), retry=False)

    def _initiate(self, peer: Peer, now: float, *, retry: bool) -> None:
        if not retry:
            peer.handshake_attempts = 0
        if now - peer.last_initiation_sent < self.limits.rekey_timeout:
            return
        if peer.endpoint is None:
            self.drops["no_endpoint"] += 1
            return
        peer.last_initiation_sent = now
        if peer.pending is not None:
            self._pending.pop(peer.pending.sender_index, None)
        index = self._new_index()
        msg, state = create_initiation(self.local, peer.identity, index, tai64n(self.wall_clock()))
        peer.last_mac1 = seal_macs(msg, peer.identity.mac1_key, self._cookie_for_peer(peer, now))
        peer.pending = state
        self._pending[index] = peer
        self._send_datagram(peer, bytes(msg), now)
        peer.t_retransmit = now + self.limits.rekey_timeout + self._jitter()
        self.stats["initiations_sent"] += 1

    def _send_datagram(self, peer: Peer, msg: bytes, now: float) -> None:
        """Send a handshake message: an authenticated packet for the keepalive timers."""
        if peer.endpoint is None:
            self.drops["no_endpoint"] += 1
            return
        self.to_net.append((msg, peer.endpoint))
        peer.tx_bytes += len(msg)
        peer.t_keepalive = None
        self._traversal(peer, now)

    def _traversal(self, peer: Peer, now: float) -> None:
        if peer.keepalive_interval:
            peer.t_persistent = now + peer.keepalive_interval

    def _handshake_complete(self, peer: Peer, now: float) -> None:
        peer.t_retransmit = None
        peer.handshake_attempts = 0
        peer.sent_lastminute_handshake = False
        peer.last_handshake = self.wall_clock()
        self.stats["handshakes_completed"] += 1

    def _flush_staged(self, peer: Peer, now: float) -> None:
        staged = list(peer.staged)
        peer.staged.clear()
        for packet in staged:
            self.send_to(peer, packet)

    def _jitter(self) -> float:
        return self._rng.uniform(0.0, self.limits.jitter_max)

    def _new_index(self) -> int:
        while True:
            index = int.from_bytes(os.urandom(4), "little")
            if index not in self._keypairs and index not in self._pending:
                return index

    # --- timers ---------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        """The earliest armed timer (device clock), for the caller's poll timeout."""
        best: float | None = self._greet_at
        for peer in self.peers.values():
            for t in (peer.t_retransmit, peer.t_keepalive, peer.t_new_handshake,
                      peer.t_persistent, peer.t_zero_keys):
                if t is not None and (best is None or t < best):
                    best = t
        return best

    def tick(self) -> None:
        """Run every timer that is due: retransmissions, keepalives, rekeys, key expiry."""
        now = self.clock()
        limits = self.limits
        if self._greet_at is not None and now >= self._greet_at:
            self._send_greetings(now)
        for peer in list(self.peers.values()):
            if peer.t_retransmit is not None and now >= peer.t_retransmit:
                peer.t_retransmit = None
                if peer.handshake_attempts >= limits.max_handshake_attempts - 1:
                    # REKEY_ATTEMPT_TIME is over: give up until there is new data to send
                    self.stats["handshakes_abandoned"] += 1
                    if peer.pending is not None:
                        self._pending.pop(peer.pending.sender_index, None)
                        peer.pending = None
                    peer.t_keepalive = None
                    self.drops["staged_overflow"] += len(peer.staged)
                    peer.staged.clear()
                    if peer.t_zero_keys is None:
                        peer.t_zero_keys = now + limits.zero_keys_after
                else:
                    peer.handshake_attempts += 1
                    self.stats["initiation_retransmits"] += 1
                    self._initiate(peer, now, retry=True)
            if peer.t_keepalive is not None and now >= peer.t_keepalive:
                peer.t_keepalive = None
                self.send_to(peer, b"")
                if peer.need_another_keepalive:
                    peer.need_another_keepalive = False
                    peer.t_keepalive = now + limits.keepalive_timeout
            if peer.t_new_handshake is not None and now >= peer.t_new_handshake:
                peer.t_new_handshake = None
                self.stats["handshakes_for_silence"] += 1
                self._initiate(peer, now, retry=False)
            if peer.t_persistent is not None and now >= peer.t_persistent:
                peer.t_persistent = None
                if peer.keepalive_interval:
                    self.send_to(peer, b"")
            if peer.t_zero_keys is not None and now >= peer.t_zero_keys:
                peer.t_zero_keys = None
                self._forget(peer)
