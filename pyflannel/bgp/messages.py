"""BGP-4 messages (RFC 4271 4, RFC 2918, 4724, 4760, 5492, 6793): pure encode and decode.

``encode(message, options)`` gives the bytes on the wire, ``decode(data, options)`` the
message, or raises :class:`~pyflannel.bgp.errors.BgpError` carrying the NOTIFICATION to send.
``split_stream`` cuts a TCP byte stream into whole messages, checking each header first, so
the session layer needs no knowledge of the layout.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass, replace

from . import errors as E
from .attributes import (
    AFI_IPV4,
    AFI_IPV6,
    AS_TRANS,
    DEFAULT_OPTIONS,
    IPV4_UNICAST,
    CodecOptions,
    MpReach,
    MpUnreach,
    PathAttributes,
    Prefix,
    decode_attributes,
    decode_prefixes,
    encode_attributes,
    encode_prefixes,
)
from .errors import BgpError

MARKER = b"\xff" * 16
HEADER_LEN = 19
MAX_MESSAGE_LEN = 4096
BGP_VERSION = 4

OPEN, UPDATE, NOTIFICATION, KEEPALIVE, ROUTE_REFRESH = 1, 2, 3, 4, 5
# The smallest length of each type, and for fixed-size types the only one.
MIN_LEN = {OPEN: 29, UPDATE: 23, NOTIFICATION: 21, KEEPALIVE: 19, ROUTE_REFRESH: 23}
FIXED_LEN = {KEEPALIVE: 19, ROUTE_REFRESH: 23}

PARAM_CAPABILITIES = 2
CAP_MULTIPROTOCOL = 1
CAP_ROUTE_REFRESH = 2
CAP_GRACEFUL_RESTART = 64
CAP_FOUR_OCTET_AS = 65

GR_RESTART_STATE = 0x8  # R: the sender has restarted
GR_NOTIFICATION = 0x4  # N: RFC 8538 graceful NOTIFICATION support
GR_FORWARDING_PRESERVED = 0x80


@dataclass(frozen=True, slots=True)
class GracefulRestartFamily:
    afi: int
    safi: int
    forwarding_preserved: bool = False


@dataclass(frozen=True, slots=True)
class GracefulRestart:
    """RFC 4724 capability: restart time (0..4095 s) and the families kept across a restart."""

    restart_time: int
    restarting: bool = False
    notification: bool = False
    families: tuple[GracefulRestartFamily, ...] = ()


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What an OPEN offers; the 4-octet AS number itself is ``Open.asn``."""

    multiprotocol: tuple[tuple[int, int], ...] = ()
    route_refresh: bool = False
    four_octet_as: bool = False
    graceful_restart: GracefulRestart | None = None
    unknown: tuple[tuple[int, bytes], ...] = ()  # (code, value), kept in arrival order


@dataclass(frozen=True, slots=True)
class Open:
    asn: int  # the real AS: from the 4-octet capability when present (RFC 6793)
    hold_time: int
    router_id: ipaddress.IPv4Address
    capabilities: Capabilities = Capabilities()
    version: int = BGP_VERSION


@dataclass(frozen=True, slots=True)
class Keepalive:
    pass


@dataclass(frozen=True, slots=True)
class Notification:
    code: int
    subcode: int
    data: bytes = b""

    @classmethod
    def of(cls, error: BgpError) -> Notification:
        return cls(error.code, error.subcode, error.data)

    def describe(self) -> str:
        return E.describe(self.code, self.subcode)


@dataclass(frozen=True, slots=True)
class RouteRefresh:
    afi: int
    safi: int
    reserved: int = 0  # RFC 7313 puts a subtype here; plain RFC 2918 sends 0


@dataclass(frozen=True, slots=True)
class Update:
    """An UPDATE; IPv6 prefixes travel in ``attributes.mp_reach``/``mp_unreach``.

    When ``treat_as_withdraw`` is set (RFC 7606) nothing in it may be installed:
    ``withdrawals()`` lists every prefix it names, announced or withdrawn.
    """

    withdrawn: tuple[ipaddress.IPv4Network, ...] = ()
    attributes: PathAttributes = PathAttributes()
    nlri: tuple[ipaddress.IPv4Network, ...] = ()
    treat_as_withdraw: bool = False
    problems: tuple[str, ...] = ()  # one line per malformed or discarded attribute

    def announcements(self) -> tuple[Prefix, ...]:
        if self.treat_as_withdraw:
            return ()
        mp = self.attributes.mp_reach
        return self.nlri + (mp.nlri if mp else ())

    def withdrawals(self) -> tuple[Prefix, ...]:
        mp_u = self.attributes.mp_unreach
        out = self.withdrawn + (mp_u.withdrawn if mp_u else ())
        if self.treat_as_withdraw:
            mp = self.attributes.mp_reach
            out += self.nlri + (mp.nlri if mp else ())
        return out

    def end_of_rib(self) -> tuple[int, int] | None:
        """(AFI, SAFI) if this is an End-of-RIB marker (RFC 4724 2), else None."""
        if self.withdrawn or self.nlri or self.treat_as_withdraw:
            return None
        if self.attributes == PathAttributes():
            return IPV4_UNICAST
        u = self.attributes.mp_unreach
        if u is not None and not u.withdrawn and self.attributes == PathAttributes(mp_unreach=u):
            return (u.afi, u.safi)
        return None


Message = Open | Update | Notification | Keepalive | RouteRefresh


def end_of_rib(afi: int, safi: int) -> Update:
    """The End-of-RIB marker for a family: empty UPDATE for IPv4, empty MP_UNREACH otherwise."""
    if (afi, safi) == IPV4_UNICAST:
        return Update()
    return Update(attributes=PathAttributes(mp_unreach=MpUnreach(afi, safi)))


# --- header and stream ------------------------------------------------------------------


def parse_header(header: bytes) -> tuple[int, int]:
    """(length, type) from the 19-octet header, or BgpError 1/x (RFC 4271 6.1)."""
    if len(header) < HEADER_LEN:
        raise BgpError(E.MESSAGE_HEADER_ERROR, E.BAD_MESSAGE_LENGTH, reason="short header")
    if header[:16] != MARKER:
        raise BgpError(E.MESSAGE_HEADER_ERROR, E.CONNECTION_NOT_SYNCHRONIZED,
                       reason="marker is not all ones")
    length, kind = struct.unpack_from("!HB", header, 16)
    if kind not in MIN_LEN:
        raise BgpError(E.MESSAGE_HEADER_ERROR, E.BAD_MESSAGE_TYPE, bytes((kind,)),
                       reason=f"unknown message type {kind}")
    if (length < MIN_LEN[kind] or length > MAX_MESSAGE_LEN
            or (kind in FIXED_LEN and length != FIXED_LEN[kind])):
        raise BgpError(E.MESSAGE_HEADER_ERROR, E.BAD_MESSAGE_LENGTH, header[16:18],
                       reason=f"bad length {length} for message type {kind}")
    return length, kind


def split_stream(buffer: bytes) -> tuple[list[bytes], bytes]:
    """The whole messages at the front of ``buffer`` and the incomplete rest."""
    out = []
    pos = 0
    while len(buffer) - pos >= HEADER_LEN:
        length, _ = parse_header(buffer[pos:pos + HEADER_LEN])
        if len(buffer) - pos < length:
            break
        out.append(buffer[pos:pos + length])
        pos += length
    return out, buffer[pos:]


def _frame(kind: int, body: bytes) -> bytes:
    length = HEADER_LEN + len(body)
    if length > MAX_MESSAGE_LEN:
        raise ValueError(f"message of {length} octets is over {MAX_MESSAGE_LEN}")
    return MARKER + struct.pack("!HB", length, kind) + body


# --- encoding ---------------------------------------------------------------------------


def _encode_capabilities(asn: int, caps: Capabilities) -> list[bytes]:
    out = [struct.pack("!BBHBB", CAP_MULTIPROTOCOL, 4, afi, 0, safi)
           for afi, safi in caps.multiprotocol]
    if caps.route_refresh:
        out.append(bytes((CAP_ROUTE_REFRESH, 0)))
    if caps.graceful_restart is not None:
        gr = caps.graceful_restart
        flags = (GR_RESTART_STATE if gr.restarting else 0) | (
            GR_NOTIFICATION if gr.notification else 0)
        value = struct.pack("!H", flags << 12 | (gr.restart_time & 0xFFF)) + b"".join(
            struct.pack("!HBB", f.afi, f.safi, GR_FORWARDING_PRESERVED if
                        f.forwarding_preserved else 0) for f in gr.families)
        out.append(bytes((CAP_GRACEFUL_RESTART, len(value))) + value)
    if caps.four_octet_as:
        out.append(struct.pack("!BBI", CAP_FOUR_OCTET_AS, 4, asn))
    out.extend(bytes((code, len(value))) + value for code, value in caps.unknown)
    return out


def _encode_open(msg: Open) -> bytes:
    if msg.asn > 0xFFFF and not msg.capabilities.four_octet_as:
        raise ValueError(f"AS {msg.asn} needs the 4-octet AS capability")
    params = b""
    chunk = b""
    # All capabilities in one optional parameter (as BIRD sends them), a new one every 255 octets.
    for cap in _encode_capabilities(msg.asn, msg.capabilities):
        if len(chunk) + len(cap) > 0xFF:
            params += bytes((PARAM_CAPABILITIES, len(chunk))) + chunk
            chunk = b""
        chunk += cap
    if chunk:
        params += bytes((PARAM_CAPABILITIES, len(chunk))) + chunk
    if len(params) > 0xFF:
        raise ValueError(f"optional parameters of {len(params)} octets do not fit an OPEN")
    my_as = msg.asn if msg.asn <= 0xFFFF else AS_TRANS
    return _frame(OPEN, struct.pack("!BHH4sB", msg.version, my_as, msg.hold_time,
                                    msg.router_id.packed, len(params)) + params)


def _encode_update(msg: Update, options: CodecOptions) -> bytes:
    withdrawn = encode_prefixes(msg.withdrawn)
    attrs = encode_attributes(msg.attributes, options)
    return _frame(UPDATE, struct.pack("!H", len(withdrawn)) + withdrawn
                  + struct.pack("!H", len(attrs)) + attrs + encode_prefixes(msg.nlri))


def encode(msg: Message, options: CodecOptions = DEFAULT_OPTIONS) -> bytes:
    """The wire form of ``msg``; ValueError if it cannot be sent (over 4096 octets, ...)."""
    if isinstance(msg, Keepalive):
        return _frame(KEEPALIVE, b"")
    if isinstance(msg, Open):
        return _encode_open(msg)
    if isinstance(msg, Update):
        return _encode_update(msg, options)
    if isinstance(msg, Notification):
        return _frame(NOTIFICATION, struct.pack("!BB", msg.code, msg.subcode) + msg.data)
    if isinstance(msg, RouteRefresh):
        return _frame(ROUTE_REFRESH, struct.pack("!HBB", msg.afi, msg.reserved, msg.safi))
    raise TypeError(f"not a BGP message: {msg!r}")


# --- decoding ---------------------------------------------------------------------------


def _open_error(reason: str, subcode: int = 0, data: bytes = b"") -> BgpError:
    return BgpError(E.OPEN_MESSAGE_ERROR, subcode, data, reason=reason)


def _decode_capability(code: int, value: bytes, found: dict) -> None:
    if code == CAP_MULTIPROTOCOL:
        if len(value) != 4:
            raise _open_error("multiprotocol capability is not 4 octets")
        afi, _reserved, safi = struct.unpack("!HBB", value)
        if (afi, safi) not in found["multiprotocol"]:
            found["multiprotocol"].append((afi, safi))
    elif code == CAP_ROUTE_REFRESH:
        found["route_refresh"] = True
    elif code == CAP_FOUR_OCTET_AS:
        if len(value) != 4:
            raise _open_error("4-octet AS capability is not 4 octets")
        found.setdefault("asn4", struct.unpack("!I", value)[0])
    elif code == CAP_GRACEFUL_RESTART:
        if len(value) < 2 or (len(value) - 2) % 4:
            raise _open_error("graceful restart capability has a bad length")
        head = struct.unpack_from("!H", value)[0]
        families = tuple(
            GracefulRestartFamily(afi, safi, bool(flags & GR_FORWARDING_PRESERVED))
            for afi, safi, flags in struct.iter_unpack("!HBB", value[2:]))
        found.setdefault("graceful_restart", GracefulRestart(
            head & 0xFFF, bool(head >> 12 & GR_RESTART_STATE),
            bool(head >> 12 & GR_NOTIFICATION), families))
    else:
        found["unknown"].append((code, value))


def _decode_open(body: bytes) -> Open:
    version = body[0]
    if version != BGP_VERSION:
        raise _open_error(f"BGP version {version}", E.UNSUPPORTED_VERSION,
                          struct.pack("!H", BGP_VERSION))
    my_as, hold, router_id, opt_len = struct.unpack_from("!HH4sB", body, 1)
    params = body[10:]
    if opt_len != len(params):
        raise _open_error(f"optional parameters length {opt_len}, {len(params)} octets follow")
    found: dict = {"multiprotocol": [], "unknown": []}
    pos = 0
    while pos < len(params):
        if len(params) - pos < 2:
            raise _open_error("optional parameter cut short")
        ptype, plen = params[pos], params[pos + 1]
        value = params[pos + 2:pos + 2 + plen]
        if len(value) != plen:
            raise _open_error("optional parameter runs past the message")
        pos += 2 + plen
        if ptype != PARAM_CAPABILITIES:
            raise _open_error(f"optional parameter type {ptype}",
                              E.UNSUPPORTED_OPTIONAL_PARAMETER)
        cpos = 0
        while cpos < len(value):
            if len(value) - cpos < 2 or cpos + 2 + value[cpos + 1] > len(value):
                raise _open_error("capability runs past its parameter")
            code, clen = value[cpos], value[cpos + 1]
            _decode_capability(code, value[cpos + 2:cpos + 2 + clen], found)
            cpos += 2 + clen
    caps = Capabilities(tuple(found["multiprotocol"]), found.get("route_refresh", False),
                        "asn4" in found, found.get("graceful_restart"),
                        tuple(found["unknown"]))
    return Open(found.get("asn4", my_as), hold, ipaddress.IPv4Address(router_id), caps, version)


def _decode_update(body: bytes, options: CodecOptions) -> Update:
    malformed = BgpError(E.UPDATE_MESSAGE_ERROR, E.MALFORMED_ATTRIBUTE_LIST,
                         reason="withdrawn or attribute length past the message")
    wlen = struct.unpack_from("!H", body)[0]
    if 2 + wlen + 2 > len(body):
        raise malformed
    alen = struct.unpack_from("!H", body, 2 + wlen)[0]
    if 4 + wlen + alen > len(body):
        raise malformed
    withdrawn = decode_prefixes(body[2:2 + wlen], AFI_IPV4)
    decoded = decode_attributes(body[4 + wlen:4 + wlen + alen], options)
    nlri = decode_prefixes(body[4 + wlen + alen:], AFI_IPV4)
    attrs = decoded.attributes
    reasons = list(decoded.withdraw_reasons)
    if nlri or (attrs.mp_reach and attrs.mp_reach.nlri):
        # RFC 7606 3.d: a missing well-known mandatory attribute makes the UPDATE a withdraw.
        missing = [name for name, value in (("ORIGIN", attrs.origin), ("AS_PATH", attrs.as_path))
                   if value is None]
        if nlri and attrs.next_hop is None:
            missing.append("NEXT_HOP")
        reasons += [f"{name} missing" for name in missing]
    return Update(withdrawn, attrs, nlri, bool(reasons), tuple(reasons) + decoded.discarded)


def decode(data: bytes, options: CodecOptions = DEFAULT_OPTIONS) -> Message:
    """One whole message (header included) as a message object, or BgpError."""
    length, kind = parse_header(data)
    if length != len(data):
        raise BgpError(E.MESSAGE_HEADER_ERROR, E.BAD_MESSAGE_LENGTH, data[16:18],
                       reason=f"length field {length}, {len(data)} octets given")
    body = data[HEADER_LEN:]
    if kind == KEEPALIVE:
        return Keepalive()
    if kind == OPEN:
        return _decode_open(body)
    if kind == UPDATE:
        return _decode_update(body, options)
    if kind == NOTIFICATION:
        return Notification(body[0], body[1], body[2:])
    afi, reserved, safi = struct.unpack("!HBB", body)
    return RouteRefresh(afi, safi, reserved)


def announce(attributes: PathAttributes, prefixes: list[Prefix],
             options: CodecOptions = DEFAULT_OPTIONS) -> list[Update]:
    """UPDATEs carrying ``prefixes`` with ``attributes``, each under 4096 octets.

    IPv4 prefixes go in the NLRI field, IPv6 ones in MP_REACH_NLRI (``attributes.mp_reach``
    gives the IPv6 next hop; its own NLRI is replaced).
    """
    v4 = [p for p in prefixes if p.version == 4]
    v6 = [p for p in prefixes if p.version == 6]
    out: list[Update] = []
    base = attributes if attributes.mp_reach is None else _without_mp(attributes)
    room = MAX_MESSAGE_LEN - HEADER_LEN - 4 - len(encode_attributes(base, options))
    for chunk in _chunks(v4, room):
        out.append(Update(attributes=base, nlri=tuple(chunk)))
    if v6:
        if attributes.mp_reach is None:
            raise ValueError("IPv6 prefixes need attributes.mp_reach for their next hop")
        mp = attributes.mp_reach
        empty = _with_mp(attributes, MpReach(mp.afi, mp.safi, mp.next_hop, ()))
        room = MAX_MESSAGE_LEN - HEADER_LEN - 4 - len(encode_attributes(empty, options)) - 2
        for chunk in _chunks(v6, room):
            out.append(Update(attributes=_with_mp(
                attributes, MpReach(mp.afi, mp.safi, mp.next_hop, tuple(chunk)))))
    return out


def withdraw(prefixes: list[Prefix]) -> list[Update]:
    """UPDATEs withdrawing ``prefixes`` (IPv6 through MP_UNREACH_NLRI), each under 4096 octets."""
    v4 = [p for p in prefixes if p.version == 4]
    v6 = [p for p in prefixes if p.version == 6]
    room = MAX_MESSAGE_LEN - HEADER_LEN - 4
    out = [Update(withdrawn=tuple(chunk)) for chunk in _chunks(v4, room)]
    out += [Update(attributes=PathAttributes(mp_unreach=MpUnreach(AFI_IPV6, 1, tuple(chunk))))
            for chunk in _chunks(v6, room - 4 - 3)]
    return out


def _chunks(prefixes: list[Prefix], room: int) -> list[list[Prefix]]:
    out: list[list[Prefix]] = []
    current: list[Prefix] = []
    used = 0
    for p in prefixes:
        size = 1 + (p.prefixlen + 7) // 8
        if current and used + size > room:
            out.append(current)
            current, used = [], 0
        current.append(p)
        used += size
    if current:
        out.append(current)
    return out


def _without_mp(attrs: PathAttributes) -> PathAttributes:
    return _with_mp(attrs, None)


def _with_mp(attrs: PathAttributes, mp: MpReach | None) -> PathAttributes:
    return replace(attrs, mp_reach=mp)
