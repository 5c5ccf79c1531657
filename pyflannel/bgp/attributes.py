"""Prefixes and path attributes (RFC 4271 4.3 and 5, RFC 1997, 4456, 4760, 6793, 7606): pure codecs.

Decoding an attribute list never decides alone what a bad attribute costs: it reports each
problem as *treat-as-withdraw* or *discard* (RFC 7606's two soft outcomes), and raises
:class:`~pyflannel.bgp.errors.BgpError` only where RFC 7606 still demands a session reset
(the NLRI cannot be located, or a well-known attribute is unknown).
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass, field
from typing import NamedTuple

from . import errors as E
from .errors import BgpError

IPv4Net = ipaddress.IPv4Network
IPv6Net = ipaddress.IPv6Network
Prefix = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

AS_TRANS = 23456  # RFC 6793: stands in for a 4-octet AS where only 2 octets fit
AFI_IPV4, AFI_IPV6 = 1, 2
SAFI_UNICAST = 1
IPV4_UNICAST = (AFI_IPV4, SAFI_UNICAST)
IPV6_UNICAST = (AFI_IPV6, SAFI_UNICAST)

# Attribute flag bits.
OPTIONAL = 0x80
TRANSITIVE = 0x40
PARTIAL = 0x20
EXTENDED_LENGTH = 0x10

# Attribute type codes.
ORIGIN = 1
AS_PATH = 2
NEXT_HOP = 3
MULTI_EXIT_DISC = 4
LOCAL_PREF = 5
ATOMIC_AGGREGATE = 6
AGGREGATOR = 7
COMMUNITIES = 8
ORIGINATOR_ID = 9
CLUSTER_LIST = 10
MP_REACH_NLRI = 14
MP_UNREACH_NLRI = 15
AS4_PATH = 17
AS4_AGGREGATOR = 18

# The optional and transitive bits each known attribute must carry.
EXPECTED_FLAGS = {
    ORIGIN: TRANSITIVE, AS_PATH: TRANSITIVE, NEXT_HOP: TRANSITIVE, LOCAL_PREF: TRANSITIVE,
    ATOMIC_AGGREGATE: TRANSITIVE, MULTI_EXIT_DISC: OPTIONAL, AGGREGATOR: OPTIONAL | TRANSITIVE,
    COMMUNITIES: OPTIONAL | TRANSITIVE, ORIGINATOR_ID: OPTIONAL, CLUSTER_LIST: OPTIONAL,
    MP_REACH_NLRI: OPTIONAL, MP_UNREACH_NLRI: OPTIONAL,
}

ORIGIN_IGP, ORIGIN_EGP, ORIGIN_INCOMPLETE = 0, 1, 2
AS_SET, AS_SEQUENCE, AS_CONFED_SEQUENCE, AS_CONFED_SET = 1, 2, 3, 4
MAX_SEGMENT = 255


@dataclass(frozen=True, slots=True)
class CodecOptions:
    """What the session negotiated that changes the wire format or the error rules."""

    four_octet_as: bool = True  # RFC 6793 capability on both sides
    ibgp: bool = True  # LOCAL_PREF from an external peer is discarded (RFC 7606 7.5)


DEFAULT_OPTIONS = CodecOptions()


class AsPathSegment(NamedTuple):
    kind: int  # AS_SET or AS_SEQUENCE (confederation kinds are parsed, never made)
    asns: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class MpReach:
    """MP_REACH_NLRI (RFC 4760): an IPv6 next hop is (global,) or (global, link-local)."""

    afi: int
    safi: int
    next_hop: tuple[Address, ...]
    nlri: tuple[Prefix, ...] = ()


@dataclass(frozen=True, slots=True)
class MpUnreach:
    """MP_UNREACH_NLRI (RFC 4760); with no prefixes it is that family's End-of-RIB."""

    afi: int
    safi: int
    withdrawn: tuple[Prefix, ...] = ()


@dataclass(frozen=True, slots=True)
class UnknownAttribute:
    """An optional transitive attribute we pass on untouched but marked Partial (RFC 4271 5)."""

    flags: int  # without the extended-length bit: the encoder chooses that from the length
    type_code: int
    value: bytes


@dataclass(frozen=True, slots=True)
class PathAttributes:
    """The attributes of one UPDATE; None (or empty) means absent."""

    origin: int | None = None
    as_path: tuple[AsPathSegment, ...] | None = None
    next_hop: ipaddress.IPv4Address | None = None
    med: int | None = None
    local_pref: int | None = None
    atomic_aggregate: bool = False
    aggregator: tuple[int, ipaddress.IPv4Address] | None = None
    communities: tuple[int, ...] = ()  # RFC 1997 values, (AS << 16) | value
    originator_id: ipaddress.IPv4Address | None = None
    cluster_list: tuple[ipaddress.IPv4Address, ...] = ()
    mp_reach: MpReach | None = None
    mp_unreach: MpUnreach | None = None
    unknown: tuple[UnknownAttribute, ...] = field(default=())


@dataclass(frozen=True, slots=True)
class DecodedAttributes:
    """The attributes that parsed, and what RFC 7606 says the bad ones cost."""

    attributes: PathAttributes
    withdraw_reasons: tuple[str, ...] = ()  # non-empty: treat the whole UPDATE as a withdraw
    discarded: tuple[str, ...] = ()  # attributes dropped, the routes kept


def community(text: str) -> int:
    """``"64512:100"`` as the 32-bit RFC 1997 value; ValueError names what is wrong."""
    high, sep, low = text.partition(":")
    if not sep or not high.isdigit() or not low.isdigit():
        raise ValueError(f"community {text!r} is not AS:VALUE")
    asn, value = int(high), int(low)
    if asn > 0xFFFF or value > 0xFFFF:
        raise ValueError(f"community {text!r}: both halves must be 0..65535")
    return asn << 16 | value


def as_path_length(segments: tuple[AsPathSegment, ...] | None) -> int:
    """Path length for best-path selection: a set counts one, confederation segments none."""
    total = 0
    for seg in segments or ():
        if seg.kind == AS_SEQUENCE:
            total += len(seg.asns)
        elif seg.kind == AS_SET:
            total += 1
    return total


def as_path_contains(segments: tuple[AsPathSegment, ...] | None, asn: int) -> bool:
    return any(asn in seg.asns for seg in segments or ())


def prepend_as(segments: tuple[AsPathSegment, ...] | None, asn: int) -> tuple[AsPathSegment, ...]:
    """The AS_PATH an eBGP speaker sends: its own AS in front (RFC 4271 5.1.2)."""
    segments = segments or ()
    if segments and segments[0].kind == AS_SEQUENCE and len(segments[0].asns) < MAX_SEGMENT:
        return (AsPathSegment(AS_SEQUENCE, (asn, *segments[0].asns)), *segments[1:])
    return (AsPathSegment(AS_SEQUENCE, (asn,)), *segments)


# --- prefixes ---------------------------------------------------------------------------


def encode_prefix(prefix: Prefix) -> bytes:
    """Length in bits, then only the octets that length needs (RFC 4271 4.3)."""
    plen = prefix.prefixlen
    return bytes((plen,)) + prefix.network_address.packed[: (plen + 7) // 8]


def encode_prefixes(prefixes: tuple[Prefix, ...] | list[Prefix]) -> bytes:
    return b"".join(encode_prefix(p) for p in prefixes)


def decode_prefixes(data: bytes, afi: int) -> tuple[Prefix, ...]:
    """Every prefix of a field, or BgpError 3/10: a length over 32/128 or a cut-off last prefix.

    Bits beyond the prefix length are ignored, as RFC 4271 says they are irrelevant.
    """
    if afi == AFI_IPV4:
        bits, size, make = 32, 4, ipaddress.IPv4Network
    else:
        bits, size, make = 128, 16, ipaddress.IPv6Network
    out: list[Prefix] = []
    pos, end = 0, len(data)
    while pos < end:
        plen = data[pos]
        pos += 1
        if plen > bits:
            raise BgpError(E.UPDATE_MESSAGE_ERROR, E.INVALID_NETWORK_FIELD,
                           reason=f"prefix length {plen} is over {bits}")
        octets = (plen + 7) // 8
        if pos + octets > end:
            raise BgpError(E.UPDATE_MESSAGE_ERROR, E.INVALID_NETWORK_FIELD,
                           reason="a prefix runs past the end of its field")
        value = int.from_bytes(data[pos:pos + octets], "big") << (8 * (size - octets))
        pos += octets
        out.append(make((value, plen), strict=False))
    return tuple(out)


# --- encoding ---------------------------------------------------------------------------


def _attr(flags: int, type_code: int, value: bytes) -> bytes:
    if len(value) > 0xFF:
        return struct.pack("!BBH", flags | EXTENDED_LENGTH, type_code, len(value)) + value
    return struct.pack("!BBB", flags & ~EXTENDED_LENGTH, type_code, len(value)) + value


def _encode_as_path(segments: tuple[AsPathSegment, ...], four: bool) -> bytes:
    out = bytearray()
    fmt = "!I" if four else "!H"
    for seg in segments:
        asns = seg.asns
        for start in range(0, max(len(asns), 1), MAX_SEGMENT):
            chunk = asns[start:start + MAX_SEGMENT]
            out += bytes((seg.kind, len(chunk)))
            for asn in chunk:
                out += struct.pack(fmt, asn if four or asn <= 0xFFFF else AS_TRANS)
    return bytes(out)


def _encode_next_hop(next_hop: tuple[Address, ...]) -> bytes:
    return b"".join(a.packed for a in next_hop)


def encode_attributes(attrs: PathAttributes, options: CodecOptions = DEFAULT_OPTIONS) -> bytes:
    """The path attributes field: MP attributes first (RFC 7606 5.1), then by type code."""
    out: list[bytes] = []
    if attrs.mp_unreach is not None:
        u = attrs.mp_unreach
        out.append(_attr(OPTIONAL, MP_UNREACH_NLRI, struct.pack("!HB", u.afi, u.safi)
                         + encode_prefixes(u.withdrawn)))
    if attrs.mp_reach is not None:
        r = attrs.mp_reach
        nh = _encode_next_hop(r.next_hop)
        out.append(_attr(OPTIONAL, MP_REACH_NLRI, struct.pack("!HBB", r.afi, r.safi, len(nh))
                         + nh + b"\x00" + encode_prefixes(r.nlri)))
    if attrs.origin is not None:
        out.append(_attr(TRANSITIVE, ORIGIN, bytes((attrs.origin,))))
    if attrs.as_path is not None:
        out.append(_attr(TRANSITIVE, AS_PATH, _encode_as_path(attrs.as_path,
                                                              options.four_octet_as)))
    if attrs.next_hop is not None:
        out.append(_attr(TRANSITIVE, NEXT_HOP, attrs.next_hop.packed))
    if attrs.med is not None:
        out.append(_attr(OPTIONAL, MULTI_EXIT_DISC, struct.pack("!I", attrs.med)))
    if attrs.local_pref is not None:
        out.append(_attr(TRANSITIVE, LOCAL_PREF, struct.pack("!I", attrs.local_pref)))
    if attrs.atomic_aggregate:
        out.append(_attr(TRANSITIVE, ATOMIC_AGGREGATE, b""))
    if attrs.aggregator is not None:
        asn, addr = attrs.aggregator
        if options.four_octet_as:
            value = struct.pack("!I", asn) + addr.packed
        else:
            value = struct.pack("!H", asn if asn <= 0xFFFF else AS_TRANS) + addr.packed
        out.append(_attr(OPTIONAL | TRANSITIVE, AGGREGATOR, value))
    if attrs.communities:
        out.append(_attr(OPTIONAL | TRANSITIVE, COMMUNITIES,
                         b"".join(struct.pack("!I", c) for c in attrs.communities)))
    if attrs.originator_id is not None:
        out.append(_attr(OPTIONAL, ORIGINATOR_ID, attrs.originator_id.packed))
    if attrs.cluster_list:
        out.append(_attr(OPTIONAL, CLUSTER_LIST, b"".join(c.packed for c in attrs.cluster_list)))
    for unknown in attrs.unknown:
        out.append(_attr(unknown.flags, unknown.type_code, unknown.value))
    return b"".join(out)


# --- decoding ---------------------------------------------------------------------------


class _Collector:
    """Accumulates decoded fields and the RFC 7606 outcomes while walking the attributes."""

    def __init__(self) -> None:
        self.fields: dict[str, object] = {}
        self.unknown: list[UnknownAttribute] = []
        self.withdraw: list[str] = []
        self.discard: list[str] = []

    def malformed(self, what: str) -> None:
        self.withdraw.append(what)


def _split(data: bytes, c: _Collector) -> list[tuple[int, int, bytes, bytes]]:
    """(flags, type, value, raw) of every attribute; an overrun ends the walk as a withdraw."""
    out = []
    pos, end = 0, len(data)
    while pos < end:
        if end - pos < 3:
            c.malformed("path attributes end in the middle of an attribute header")
            break
        flags, type_code = data[pos], data[pos + 1]
        if flags & EXTENDED_LENGTH:
            if end - pos < 4:
                c.malformed("path attributes end in the middle of an attribute header")
                break
            length, head = struct.unpack_from("!H", data, pos + 2)[0], 4
        else:
            length, head = data[pos + 2], 3
        if pos + head + length > end:
            c.malformed(f"attribute {type_code} runs past the path attributes")
            break
        value = data[pos + head:pos + head + length]
        out.append((flags, type_code, value, data[pos:pos + head + length]))
        pos += head + length
    return out


def _decode_mp_next_hop(afi: int, safi: int, raw: bytes) -> tuple[Address, ...]:
    if afi == AFI_IPV6 and len(raw) in (16, 32):
        return tuple(ipaddress.IPv6Address(raw[i:i + 16]) for i in range(0, len(raw), 16))
    if afi == AFI_IPV4 and len(raw) == 4:
        return (ipaddress.IPv4Address(raw),)
    raise BgpError(E.UPDATE_MESSAGE_ERROR, E.OPTIONAL_ATTRIBUTE_ERROR,
                   reason=f"MP_REACH_NLRI next hop of {len(raw)} octets for AFI {afi}")


def _decode_mp(type_code: int, value: bytes) -> MpReach | MpUnreach | None:
    """An MP attribute, None for a family we never negotiate, BgpError when NLRI is lost."""
    try:
        if type_code == MP_UNREACH_NLRI:
            if len(value) < 3:
                raise BgpError(E.UPDATE_MESSAGE_ERROR, E.OPTIONAL_ATTRIBUTE_ERROR,
                               reason="MP_UNREACH_NLRI shorter than AFI and SAFI")
            afi, safi = struct.unpack_from("!HB", value)
            if (afi, safi) not in (IPV4_UNICAST, IPV6_UNICAST):
                return None
            return MpUnreach(afi, safi, decode_prefixes(value[3:], afi))
        if len(value) < 5:
            raise BgpError(E.UPDATE_MESSAGE_ERROR, E.OPTIONAL_ATTRIBUTE_ERROR,
                           reason="MP_REACH_NLRI too short")
        afi, safi, nh_len = struct.unpack_from("!HBB", value)
        if (afi, safi) not in (IPV4_UNICAST, IPV6_UNICAST):
            return None
        if 4 + nh_len + 1 > len(value):
            raise BgpError(E.UPDATE_MESSAGE_ERROR, E.OPTIONAL_ATTRIBUTE_ERROR,
                           reason="MP_REACH_NLRI next hop runs past the attribute")
        next_hop = _decode_mp_next_hop(afi, safi, value[4:4 + nh_len])
        # One reserved octet (formerly the SNPA count) follows the next hop; RFC 4760 ignores it.
        return MpReach(afi, safi, next_hop, decode_prefixes(value[5 + nh_len:], afi))
    except BgpError as exc:
        raise BgpError(E.UPDATE_MESSAGE_ERROR, E.OPTIONAL_ATTRIBUTE_ERROR,
                       reason=f"malformed MP attribute: {exc.reason}") from None


def _decode_as_path(value: bytes, four: bool) -> tuple[AsPathSegment, ...] | None:
    size, fmt = (4, "!I") if four else (2, "!H")
    segments = []
    pos = 0
    while pos < len(value):
        if len(value) - pos < 2:
            return None
        kind, count = value[pos], value[pos + 1]
        pos += 2
        if kind not in (AS_SET, AS_SEQUENCE, AS_CONFED_SEQUENCE, AS_CONFED_SET) or count == 0:
            return None
        if pos + count * size > len(value):
            return None
        asns = tuple(struct.unpack_from(fmt, value, pos + i * size)[0] for i in range(count))
        pos += count * size
        segments.append(AsPathSegment(kind, asns))
    return tuple(segments)


def _fixed(value: bytes, size: int) -> int | None:
    return int.from_bytes(value, "big") if len(value) == size else None


def _decode_known(type_code: int, value: bytes, opts: CodecOptions, c: _Collector) -> None:
    """One well-known or recognised optional attribute, with RFC 7606 section 7's rules."""
    f = c.fields
    if type_code == ORIGIN:
        if len(value) != 1 or value[0] > ORIGIN_INCOMPLETE:
            return c.malformed("ORIGIN malformed")
        f["origin"] = value[0]
    elif type_code == AS_PATH:
        path = _decode_as_path(value, opts.four_octet_as)
        if path is None:
            return c.malformed("AS_PATH malformed")
        f["as_path"] = path
    elif type_code == NEXT_HOP:
        if len(value) != 4:
            return c.malformed("NEXT_HOP is not 4 octets")
        f["next_hop"] = ipaddress.IPv4Address(value)
    elif type_code == MULTI_EXIT_DISC:
        med = _fixed(value, 4)
        if med is None:
            return c.malformed("MULTI_EXIT_DISC is not 4 octets")
        f["med"] = med
    elif type_code == LOCAL_PREF:
        if not opts.ibgp:
            return c.discard.append("LOCAL_PREF from an external peer")
        pref = _fixed(value, 4)
        if pref is None:
            return c.malformed("LOCAL_PREF is not 4 octets")
        f["local_pref"] = pref
    elif type_code == ATOMIC_AGGREGATE:
        if value:
            return c.discard.append("ATOMIC_AGGREGATE is not empty")
        f["atomic_aggregate"] = True
    elif type_code == AGGREGATOR:
        size = 4 if opts.four_octet_as else 2
        if len(value) != size + 4:
            return c.discard.append("AGGREGATOR has the wrong length")
        f["aggregator"] = (int.from_bytes(value[:size], "big"),
                           ipaddress.IPv4Address(value[size:]))
    elif type_code == COMMUNITIES:
        if not value or len(value) % 4:
            return c.malformed("COMMUNITIES length is not a non-zero multiple of 4")
        f["communities"] = struct.unpack(f"!{len(value) // 4}I", value)
    elif type_code == ORIGINATOR_ID:
        if len(value) != 4:
            return c.malformed("ORIGINATOR_ID is not 4 octets")
        f["originator_id"] = ipaddress.IPv4Address(value)
    elif type_code == CLUSTER_LIST:
        if not value or len(value) % 4:
            return c.malformed("CLUSTER_LIST length is not a non-zero multiple of 4")
        f["cluster_list"] = tuple(ipaddress.IPv4Address(value[i:i + 4])
                                  for i in range(0, len(value), 4))
    return None


def decode_attributes(data: bytes, options: CodecOptions = DEFAULT_OPTIONS) -> DecodedAttributes:
    """Decode the path attributes field of an UPDATE.

    MP_REACH_NLRI/MP_UNREACH_NLRI are decoded before anything else so that a treat-as-withdraw
    knows which IPv6 prefixes to withdraw; a malformed or repeated MP attribute still resets
    the session (RFC 7606 3.g, 7.11), since its prefixes cannot be known.
    """
    c = _Collector()
    rows = _split(data, c)
    seen: set[int] = set()
    for flags, type_code, value, _raw in rows:
        if type_code not in (MP_REACH_NLRI, MP_UNREACH_NLRI):
            continue
        if type_code in seen:
            raise BgpError(E.UPDATE_MESSAGE_ERROR, E.MALFORMED_ATTRIBUTE_LIST,
                           reason=f"attribute {type_code} appears twice")
        seen.add(type_code)
        decoded = _decode_mp(type_code, value)
        if decoded is None:
            c.discard.append(f"attribute {type_code} for a family not negotiated")
        else:
            c.fields["mp_reach" if type_code == MP_REACH_NLRI else "mp_unreach"] = decoded
        if flags & (OPTIONAL | TRANSITIVE) != OPTIONAL:
            c.malformed(f"attribute {type_code} has the wrong flags")
    for flags, type_code, value, raw in rows:
        if type_code in (MP_REACH_NLRI, MP_UNREACH_NLRI):
            continue
        if type_code in seen:
            c.discard.append(f"attribute {type_code} repeated")
            continue
        seen.add(type_code)
        expected = EXPECTED_FLAGS.get(type_code)
        if expected is None:
            _unknown(flags, type_code, value, raw, options, c)
        elif flags & (OPTIONAL | TRANSITIVE) != expected:
            c.malformed(f"attribute {type_code} has the wrong flags")
        else:
            _decode_known(type_code, value, options, c)
    return DecodedAttributes(PathAttributes(unknown=tuple(c.unknown), **c.fields),
                             tuple(c.withdraw), tuple(c.discard))


def _unknown(flags: int, type_code: int, value: bytes, raw: bytes, options: CodecOptions,
             c: _Collector) -> None:
    if not flags & OPTIONAL:
        raise BgpError(E.UPDATE_MESSAGE_ERROR, E.UNRECOGNIZED_WELL_KNOWN_ATTRIBUTE, raw,
                       reason=f"unrecognised well-known attribute {type_code}")
    if not flags & TRANSITIVE:
        return  # optional non-transitive and unknown: quietly ignored (RFC 4271 5)
    if options.four_octet_as and type_code in (AS4_PATH, AS4_AGGREGATOR):
        c.discard.append(f"attribute {type_code} between 4-octet speakers (RFC 6793)")
        return
    c.unknown.append(UnknownAttribute((flags | PARTIAL) & ~EXTENDED_LENGTH, type_code, value))
