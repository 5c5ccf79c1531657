"""The BGP codec as a specification: byte layouts from the RFCs, RFC 7606 outcomes, properties.

The hand-written messages below are built field by field from the RFC layouts, never by the
encoder under test, so a shared misunderstanding cannot make both sides agree.
"""

from __future__ import annotations

import contextlib
import ipaddress
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyflannel.bgp.attributes import (
    AS_SEQUENCE,
    AS_SET,
    AsPathSegment,
    CodecOptions,
    MpReach,
    MpUnreach,
    PathAttributes,
    UnknownAttribute,
    community,
    decode_prefixes,
)
from pyflannel.bgp.errors import BgpError
from pyflannel.bgp.messages import (
    Capabilities,
    GracefulRestart,
    GracefulRestartFamily,
    Keepalive,
    Notification,
    Open,
    RouteRefresh,
    Update,
    announce,
    decode,
    encode,
    end_of_rib,
    split_stream,
    withdraw,
)

MARKER = b"\xff" * 16
V4 = ipaddress.IPv4Network
V6 = ipaddress.IPv6Network
A4 = ipaddress.IPv4Address
A6 = ipaddress.IPv6Address


def frame(kind: int, body: bytes) -> bytes:
    return MARKER + struct.pack("!HB", 19 + len(body), kind) + body


def update_body(withdrawn: bytes, attrs: bytes, nlri: bytes) -> bytes:
    return (struct.pack("!H", len(withdrawn)) + withdrawn
            + struct.pack("!H", len(attrs)) + attrs + nlri)


# Attributes written out by hand: flags, type, length, value.
ORIGIN_IGP = bytes([0x40, 1, 1, 0])
AS_PATH_64512 = bytes([0x40, 2, 6, 2, 1]) + (64512).to_bytes(4, "big")
NEXT_HOP_NODE = bytes([0x40, 3, 4, 198, 18, 0, 1])
LOCAL_PREF_100 = bytes([0x40, 5, 4, 0, 0, 0, 100])
NLRI_10_1_15 = bytes([24, 10, 1, 15])


def errors_of(data: bytes, **kw) -> tuple[int, int]:
    with pytest.raises(BgpError) as info:
        decode(data, CodecOptions(**kw))
    return info.value.code, info.value.subcode


# --- byte-exact messages --------------------------------------------------------------------


def test_keepalive_is_the_bare_header():
    wire = MARKER + b"\x00\x13\x04"
    assert encode(Keepalive()) == wire
    assert decode(wire) == Keepalive()


def bird_open_as64512() -> bytes:
    """What BIRD 2 sends for AS 64512, hold 240, with 4-octet AS and MP IPv4/IPv6 (one param)."""
    caps = (bytes([1, 4, 0, 1, 0, 1])  # multiprotocol IPv4 unicast
            + bytes([1, 4, 0, 2, 0, 1])  # multiprotocol IPv6 unicast
            + bytes([2, 0])  # route refresh
            + bytes([64, 2, 0x00, 120])  # graceful restart aware, restart time 120 s
            + bytes([65, 4]) + (64512).to_bytes(4, "big")  # 4-octet AS
            + bytes([70, 0]))  # enhanced route refresh: not ours, kept as unknown
    params = bytes([2, len(caps)]) + caps
    body = bytes([4]) + (64512).to_bytes(2, "big") + (240).to_bytes(2, "big") \
        + bytes([198, 18, 0, 1]) + bytes([len(params)]) + params
    return frame(1, body)


def test_open_as_bird_sends_it_decodes_and_encodes_byte_for_byte():
    wire = bird_open_as64512()
    assert len(wire) == 57
    msg = decode(wire)
    assert msg == Open(64512, 240, A4("198.18.0.1"), Capabilities(
        multiprotocol=((1, 1), (2, 1)), route_refresh=True, four_octet_as=True,
        graceful_restart=GracefulRestart(120), unknown=((70, b""),)))
    assert encode(msg) == wire


def test_open_with_a_4_octet_as_puts_as_trans_in_my_as():
    caps = bytes([65, 4]) + (4200000000).to_bytes(4, "big")
    params = bytes([2, len(caps)]) + caps
    wire = frame(1, bytes([4]) + (23456).to_bytes(2, "big") + (90).to_bytes(2, "big")
                 + bytes([10, 0, 0, 1, len(params)]) + params)
    msg = Open(4200000000, 90, A4("10.0.0.1"), Capabilities(four_octet_as=True))
    assert encode(msg) == wire
    assert decode(wire) == msg


def test_open_one_capability_per_parameter_as_gobgp_sends_it_means_the_same():
    caps = [bytes([1, 4, 0, 1, 0, 1]), bytes([2, 0]), bytes([65, 4]) + (65001).to_bytes(4, "big"),
            bytes([64, 6, 0x80, 90, 0, 1, 1, 0x80])]
    params = b"".join(bytes([2, len(c)]) + c for c in caps)
    wire = frame(1, bytes([4]) + (65001).to_bytes(2, "big") + (90).to_bytes(2, "big")
                 + bytes([1, 2, 3, 4, len(params)]) + params)
    msg = decode(wire)
    assert msg.capabilities == Capabilities(
        multiprotocol=((1, 1),), route_refresh=True, four_octet_as=True,
        graceful_restart=GracefulRestart(
            90, restarting=True, families=(GracefulRestartFamily(1, 1, True),)))
    assert msg.asn == 65001


def test_open_without_4_octet_capability_takes_my_as():
    wire = frame(1, bytes([4]) + (65010).to_bytes(2, "big") + bytes([0, 90, 1, 2, 3, 4, 0]))
    msg = decode(wire)
    assert (msg.asn, msg.capabilities.four_octet_as) == (65010, False)


def test_notification_and_route_refresh_layouts():
    cease = MARKER + b"\x00\x15\x03\x06\x02"
    assert encode(Notification(6, 2)) == cease
    assert decode(cease) == Notification(6, 2)
    rr = MARKER + b"\x00\x17\x05\x00\x02\x00\x01"
    assert encode(RouteRefresh(2, 1)) == rr
    assert decode(rr) == RouteRefresh(2, 1)


def test_ipv4_update_byte_for_byte():
    attrs = ORIGIN_IGP + AS_PATH_64512 + NEXT_HOP_NODE + LOCAL_PREF_100 \
        + bytes([0xC0, 8, 4]) + (64512 << 16 | 100).to_bytes(4, "big")
    wire = frame(2, update_body(b"", attrs, NLRI_10_1_15))
    msg = Update(attributes=PathAttributes(
        origin=0, as_path=(AsPathSegment(AS_SEQUENCE, (64512,)),), next_hop=A4("198.18.0.1"),
        local_pref=100, communities=(community("64512:100"),)), nlri=(V4("10.1.15.0/24"),))
    assert encode(msg) == wire
    assert decode(wire) == msg
    assert decode(wire).announcements() == (V4("10.1.15.0/24"),)


def test_as_path_is_2_octet_without_the_capability():
    attrs = ORIGIN_IGP + bytes([0x40, 2, 6, 2, 2, 0xFD, 0xE8, 0xFC, 0x00]) + NEXT_HOP_NODE
    wire = frame(2, update_body(b"", attrs, NLRI_10_1_15))
    msg = decode(wire, CodecOptions(four_octet_as=False))
    assert msg.attributes.as_path == (AsPathSegment(AS_SEQUENCE, (65000, 64512)),)
    assert encode(msg, CodecOptions(four_octet_as=False)) == wire


def test_ipv6_mp_reach_with_global_and_link_local_next_hop():
    nh = A6("fd00::1").packed + A6("fe80::1").packed
    prefix = bytes([64]) + A6("fc00:10:1:5::").packed[:8]
    mp = bytes([0, 2, 1, 32]) + nh + b"\x00" + prefix
    attrs = bytes([0x80, 14, len(mp)]) + mp + ORIGIN_IGP + bytes([0x40, 2, 0]) + LOCAL_PREF_100
    wire = frame(2, update_body(b"", attrs, b""))
    msg = decode(wire)
    assert msg.attributes.mp_reach == MpReach(2, 1, (A6("fd00::1"), A6("fe80::1")),
                                              (V6("fc00:10:1:5::/64"),))
    assert msg.announcements() == (V6("fc00:10:1:5::/64"),)
    assert not msg.treat_as_withdraw
    assert encode(msg) == wire


def test_end_of_rib_markers():
    v4 = MARKER + b"\x00\x17\x02\x00\x00\x00\x00"
    v6 = MARKER + b"\x00\x1d\x02\x00\x00\x00\x06\x80\x0f\x03\x00\x02\x01"
    assert encode(end_of_rib(1, 1)) == v4 and decode(v4).end_of_rib() == (1, 1)
    assert encode(end_of_rib(2, 1)) == v6 and decode(v6).end_of_rib() == (2, 1)
    assert decode(frame(2, update_body(b"", ORIGIN_IGP, b""))).end_of_rib() is None


def test_extended_length_attributes_both_ways():
    value = bytes(range(256)) + bytes(44)  # 300 octets: needs the extended length
    attr = bytes([0xD0, 200]) + len(value).to_bytes(2, "big") + value
    # ORIGIN with the extended-length bit set although one octet would do: still valid.
    origin_ext = bytes([0x50, 1, 0, 1, 0])
    wire = frame(2, update_body(b"", origin_ext + AS_PATH_64512 + NEXT_HOP_NODE + attr,
                                NLRI_10_1_15))
    msg = decode(wire)
    assert msg.attributes.origin == 0 and not msg.treat_as_withdraw
    # Kept and marked Partial, since we pass on what we do not understand.
    assert msg.attributes.unknown == (UnknownAttribute(0xE0, 200, value),)
    again = encode(msg)
    assert bytes([0xF0, 200, 1, 44]) in again  # optional|transitive|partial|extended, 300
    assert decode(again) == msg


def test_unknown_optional_non_transitive_attribute_is_dropped_quietly():
    wire = frame(2, update_body(b"", ORIGIN_IGP + AS_PATH_64512 + NEXT_HOP_NODE
                                + bytes([0x80, 99, 2, 1, 2]), NLRI_10_1_15))
    msg = decode(wire)
    assert msg.attributes.unknown == () and not msg.treat_as_withdraw


# --- errors that reset the session (RFC 4271 6) ------------------------------------------


@pytest.mark.parametrize("wire, expected", [
    (b"\xfe" + b"\xff" * 15 + b"\x00\x13\x04", (1, 1)),
    (MARKER + b"\x00\x12\x04", (1, 2)),
    (MARKER + b"\x10\x01\x02" + bytes(4078), (1, 2)),
    (MARKER + b"\x00\x14\x04\x00", (1, 2)),
    (MARKER + b"\x00\x13\x09", (1, 3)),
    (MARKER + b"\x00\x18\x05\x00\x01\x00\x01\x00", (1, 2)),
], ids=["marker", "under-19", "over-4096", "keepalive-20", "type-9", "route-refresh-24"])
def test_header_errors(wire, expected):
    assert errors_of(wire) == expected


def test_header_error_data_is_the_bad_length_or_type():
    with pytest.raises(BgpError) as info:
        decode(MARKER + b"\x00\x12\x04")
    assert info.value.data == b"\x00\x12"
    with pytest.raises(BgpError) as info:
        decode(MARKER + b"\x00\x13\x09")
    assert info.value.data == b"\x09"


def test_open_errors():
    v3 = frame(1, bytes([3, 0xFC, 0, 0, 90, 1, 2, 3, 4, 0]))
    with pytest.raises(BgpError) as info:
        decode(v3)
    assert (info.value.code, info.value.subcode, info.value.data) == (2, 1, b"\x00\x04")
    auth_param = frame(1, bytes([4, 0xFC, 0, 0, 90, 1, 2, 3, 4, 3, 1, 1, 0]))
    assert errors_of(auth_param) == (2, 4)
    bad_opt_len = frame(1, bytes([4, 0xFC, 0, 0, 90, 1, 2, 3, 4, 5, 2, 0]))
    assert errors_of(bad_opt_len) == (2, 0)
    short_mp = frame(1, bytes([4, 0xFC, 0, 0, 90, 1, 2, 3, 4, 5, 2, 3, 1, 1, 0]))
    assert errors_of(short_mp) == (2, 0)


def test_update_errors_that_reset_the_session():
    good = ORIGIN_IGP + AS_PATH_64512 + NEXT_HOP_NODE
    # Withdrawn Routes Length past the end of the message.
    assert errors_of(frame(2, b"\x00\x10\x00\x00")) == (3, 1)
    # Total Path Attribute Length past the end.
    assert errors_of(frame(2, b"\x00\x00\x00\x40" + good)) == (3, 1)
    # Prefix length 33 and a cut-off prefix in the NLRI.
    assert errors_of(frame(2, update_body(b"", good, bytes([33, 10, 1, 15, 0, 0])))) == (3, 10)
    assert errors_of(frame(2, update_body(b"", good, bytes([24, 10, 1])))) == (3, 10)
    assert errors_of(frame(2, update_body(bytes([24, 10, 1]), b"", b""))) == (3, 10)
    # Unrecognised well-known attribute: data is the attribute itself.
    bad = bytes([0x40, 99, 1, 7])
    with pytest.raises(BgpError) as info:
        decode(frame(2, update_body(b"", good + bad, NLRI_10_1_15)))
    assert (info.value.code, info.value.subcode, info.value.data) == (3, 2, bad)


def mp_reach_v6(prefixes: bytes, nh_len: int = 16) -> bytes:
    mp = bytes([0, 2, 1, nh_len]) + bytes(nh_len) + b"\x00" + prefixes
    return bytes([0x80, 14, len(mp)]) + mp


def test_malformed_or_repeated_mp_attributes_reset_the_session():
    base = ORIGIN_IGP + bytes([0x40, 2, 0])
    assert errors_of(frame(2, update_body(b"", mp_reach_v6(bytes([129]) + bytes(16)) + base,
                                          b""))) == (3, 9)
    assert errors_of(frame(2, update_body(b"", mp_reach_v6(b"", nh_len=20) + base, b""))) == (3, 9)
    twice = mp_reach_v6(bytes([64]) + bytes(8))
    assert errors_of(frame(2, update_body(b"", twice + twice + base, b""))) == (3, 1)


def test_prefix_fields_reject_long_lengths_and_trailing_garbage():
    assert decode_prefixes(bytes([0, 8, 10, 32, 1, 2, 3, 4]), 1) == (
        V4("0.0.0.0/0"), V4("10.0.0.0/8"), V4("1.2.3.4/32"))
    assert decode_prefixes(bytes([24, 10, 1, 15 | 0]), 1) == (V4("10.1.15.0/24"),)
    for bad, afi in [(bytes([33, 1, 2, 3, 4, 5]), 1), (bytes([129]) + bytes(17), 2),
                     (bytes([24, 10, 1, 15, 16]), 1), (bytes([64, 1, 2]), 2)]:
        with pytest.raises(BgpError):
            decode_prefixes(bad, afi)


# --- RFC 7606: treat-as-withdraw and attribute-discard --------------------------------------


@pytest.mark.parametrize("attrs", [
    bytes([0x40, 1, 1, 3]) + AS_PATH_64512 + NEXT_HOP_NODE,  # ORIGIN value 3
    bytes([0xC0, 1, 1, 0]) + AS_PATH_64512 + NEXT_HOP_NODE,  # ORIGIN flagged optional
    ORIGIN_IGP + bytes([0x40, 2, 3, 2, 1, 0]) + NEXT_HOP_NODE,  # AS_PATH segment cut short
    ORIGIN_IGP + bytes([0x40, 2, 2, 2, 0]) + NEXT_HOP_NODE,  # AS_PATH empty segment
    ORIGIN_IGP + bytes([0x40, 2, 6, 7, 1, 0, 0, 0, 1]) + NEXT_HOP_NODE,  # segment type 7
    ORIGIN_IGP + AS_PATH_64512 + bytes([0x40, 3, 3, 1, 2, 3]),  # NEXT_HOP of 3 octets
    ORIGIN_IGP + AS_PATH_64512 + NEXT_HOP_NODE + bytes([0x80, 4, 2, 0, 1]),  # MED of 2
    ORIGIN_IGP + AS_PATH_64512 + NEXT_HOP_NODE + bytes([0x40, 5, 0]),  # LOCAL_PREF of 0
    ORIGIN_IGP + AS_PATH_64512 + NEXT_HOP_NODE + bytes([0xC0, 8, 3, 1, 2, 3]),  # COMMUNITIES 3
    ORIGIN_IGP + AS_PATH_64512 + NEXT_HOP_NODE + bytes([0x80, 9, 2, 1, 2]),  # ORIGINATOR_ID
    ORIGIN_IGP + AS_PATH_64512 + NEXT_HOP_NODE + bytes([0x80, 10, 0]),  # CLUSTER_LIST empty
    AS_PATH_64512 + NEXT_HOP_NODE,  # ORIGIN missing
    ORIGIN_IGP + NEXT_HOP_NODE,  # AS_PATH missing
    ORIGIN_IGP + AS_PATH_64512,  # NEXT_HOP missing with IPv4 NLRI
    ORIGIN_IGP + AS_PATH_64512 + NEXT_HOP_NODE + bytes([0x40, 5, 9, 0]),  # overruns the field
    ORIGIN_IGP + AS_PATH_64512 + NEXT_HOP_NODE + bytes([0x40, 5]),  # half an attribute header
], ids=["origin-value", "origin-flags", "as-path-cut", "as-path-empty-segment",
        "as-path-segment-type", "next-hop-length", "med-length", "local-pref-length",
        "communities-length", "originator-id-length", "cluster-list-empty", "no-origin",
        "no-as-path", "no-next-hop", "attribute-overrun", "half-header"])
def test_malformed_attribute_withdraws_the_updates_prefixes(attrs):
    msg = decode(frame(2, update_body(bytes([24, 10, 1, 9]), attrs, NLRI_10_1_15)))
    assert msg.treat_as_withdraw and msg.problems
    assert msg.announcements() == ()
    assert set(msg.withdrawals()) == {V4("10.1.9.0/24"), V4("10.1.15.0/24")}


def test_treat_as_withdraw_covers_the_ipv6_prefixes_too():
    attrs = mp_reach_v6(bytes([64]) + A6("fc00:10:1:5::").packed[:8]) + ORIGIN_IGP \
        + bytes([0x40, 2, 0]) + bytes([0xC0, 8, 5, 1, 2, 3, 4, 5])
    msg = decode(frame(2, update_body(b"", attrs, b"")))
    assert msg.treat_as_withdraw
    assert msg.withdrawals() == (V6("fc00:10:1:5::/64"),)


@pytest.mark.parametrize("extra, options", [
    (bytes([0x40, 6, 1, 0]), {}),  # ATOMIC_AGGREGATE with a value
    (bytes([0xC0, 7, 5, 1, 2, 3, 4, 5]), {}),  # AGGREGATOR of 5 octets
    (LOCAL_PREF_100, {"ibgp": False}),  # LOCAL_PREF from an external peer
    (bytes([0x40, 1, 1, 2]), {}),  # ORIGIN a second time
], ids=["atomic-aggregate", "aggregator", "local-pref-ebgp", "repeated"])
def test_discarded_attribute_keeps_the_routes(extra, options):
    attrs = ORIGIN_IGP + AS_PATH_64512 + NEXT_HOP_NODE + extra
    msg = decode(frame(2, update_body(b"", attrs, NLRI_10_1_15)), CodecOptions(**options))
    assert not msg.treat_as_withdraw and msg.problems
    assert msg.announcements() == (V4("10.1.15.0/24"),)
    assert msg.attributes.origin == 0 and msg.attributes.local_pref is None
    assert not msg.attributes.atomic_aggregate and msg.attributes.aggregator is None


def test_withdraw_only_update_needs_no_attributes():
    msg = decode(frame(2, update_body(NLRI_10_1_15, b"", b"")))
    assert not msg.treat_as_withdraw
    assert msg.withdrawals() == (V4("10.1.15.0/24"),)


# --- splitting a stream, packing many prefixes ---------------------------------------------


def test_split_stream_returns_whole_messages_and_the_rest():
    ka = encode(Keepalive())
    rr = encode(RouteRefresh(1, 1))
    messages, rest = split_stream(ka + rr + rr[:5])
    assert messages == [ka, rr] and rest == rr[:5]
    with pytest.raises(BgpError):
        split_stream(ka + b"\x00" * 19)


def test_a_thousand_prefixes_are_packed_into_messages_under_4096_octets():
    v4 = [V4(f"10.{i // 256}.{i % 256}.0/24") for i in range(1000)]
    v6 = [V6(f"fc00:10:1:{i:x}::/64") for i in range(1000)]
    attrs = PathAttributes(origin=0, as_path=(), next_hop=A4("198.18.0.1"), local_pref=100,
                           mp_reach=MpReach(2, 1, (A6("fd00::1"),)))
    updates = announce(attrs, v4 + v6)
    wires = [encode(u) for u in updates]
    assert all(len(w) <= 4096 for w in wires)
    back = [decode(w) for w in wires]
    assert [p for u in back for p in u.announcements()] == v4 + v6
    assert all(u.attributes.mp_reach is None for u in back if u.nlri)
    gone = [decode(encode(u)) for u in withdraw(v4 + v6)]
    assert [p for u in gone for p in u.withdrawals()] == v4 + v6


# --- properties ------------------------------------------------------------------------------

def v4_prefixes():
    return st.builds(lambda v, n: V4((v, n), strict=False),
                     st.integers(0, 2**32 - 1), st.integers(0, 32))


def v6_prefixes():
    return st.builds(lambda v, n: V6((v, n), strict=False),
                     st.integers(0, 2**128 - 1), st.integers(0, 128))


a4 = st.builds(A4, st.integers(0, 2**32 - 1))
a6 = st.builds(A6, st.integers(0, 2**128 - 1))
KNOWN = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 14, 15, 17, 18}


def path_attributes(asn_max: int, nlri4: bool, mp: bool):
    asn = st.integers(0, asn_max)
    segments = st.tuples(st.sampled_from([AS_SET, AS_SEQUENCE]),
                         st.lists(asn, min_size=1, max_size=8).map(tuple)).map(
                             lambda t: AsPathSegment(*t))
    mp_reach = st.one_of(
        st.builds(MpReach, st.just(2), st.just(1), st.lists(a6, min_size=1, max_size=2).map(tuple),
                  st.lists(v6_prefixes(), max_size=8).map(tuple)),
        st.builds(MpReach, st.just(1), st.just(1), st.tuples(a4),
                  st.lists(v4_prefixes(), max_size=8).map(tuple)))
    mp_unreach = st.builds(MpUnreach, st.sampled_from([1, 2]), st.just(1), st.just(()))
    unknown = st.lists(st.tuples(st.integers(19, 255).filter(lambda t: t not in KNOWN),
                                 st.binary(max_size=300)),
                       max_size=2, unique_by=lambda t: t[0]).map(
        lambda rows: tuple(UnknownAttribute(0xE0, t, v) for t, v in rows))
    return st.builds(
        PathAttributes,
        origin=st.integers(0, 2) if nlri4 or mp else st.none() | st.integers(0, 2),
        as_path=st.lists(segments, max_size=3).map(tuple) if nlri4 or mp
        else st.none() | st.lists(segments, max_size=3).map(tuple),
        next_hop=a4 if nlri4 else st.none() | a4,
        med=st.none() | st.integers(0, 2**32 - 1),
        local_pref=st.none() | st.integers(0, 2**32 - 1),
        atomic_aggregate=st.booleans(),
        aggregator=st.none() | st.tuples(asn, a4),
        communities=st.lists(st.integers(0, 2**32 - 1), max_size=4).map(tuple),
        originator_id=st.none() | a4,
        cluster_list=st.lists(a4, max_size=4).map(tuple),
        mp_reach=mp_reach if mp else st.none(),
        mp_unreach=st.none() | mp_unreach,
        unknown=unknown)


@st.composite
def updates(draw, asn_max: int = 2**32 - 1):
    nlri = tuple(draw(st.lists(v4_prefixes(), max_size=20)))
    mp = draw(st.booleans())
    attrs = draw(path_attributes(asn_max, bool(nlri), mp))
    if mp_unreach := attrs.mp_unreach:
        attrs = PathAttributes(**{**{f: getattr(attrs, f) for f in attrs.__slots__},
                                  "mp_unreach": MpUnreach(mp_unreach.afi, 1, tuple(draw(
                                      st.lists(v4_prefixes() if mp_unreach.afi == 1
                                               else v6_prefixes(), max_size=8))))})
    return Update(tuple(draw(st.lists(v4_prefixes(), max_size=20))), attrs, nlri)


opens = st.builds(
    lambda asn, hold, rid, mp, rr, four, gr, unknown: Open(
        asn if four else asn & 0xFFFF, hold, rid, Capabilities(mp, rr, four, gr, unknown)),
    st.integers(0, 2**32 - 1), st.integers(0, 65535), a4,
    st.lists(st.tuples(st.integers(0, 65535), st.integers(0, 255)), max_size=4, unique=True)
    .map(tuple),
    st.booleans(), st.booleans(),
    st.none() | st.builds(GracefulRestart, st.integers(0, 4095), st.booleans(), st.booleans(),
                          st.lists(st.builds(GracefulRestartFamily, st.integers(0, 65535),
                                             st.integers(0, 255), st.booleans()),
                                   max_size=3).map(tuple)),
    st.lists(st.tuples(st.integers(3, 255).filter(lambda c: c not in (64, 65)),
                       st.binary(max_size=12)), max_size=3).map(tuple))

messages = st.one_of(
    st.just(Keepalive()),
    opens,
    st.builds(Notification, st.integers(0, 255), st.integers(0, 255), st.binary(max_size=64)),
    st.builds(RouteRefresh, st.integers(0, 65535), st.integers(0, 255), st.integers(0, 255)),
    updates())


@settings(max_examples=250, suppress_health_check=[HealthCheck.too_slow])
@given(messages)
def test_every_message_round_trips(msg):
    wire = encode(msg)
    assert decode(wire) == msg
    assert split_stream(wire + wire[:7]) == ([wire], wire[:7])


@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow])
@given(updates(asn_max=65535))
def test_updates_round_trip_with_2_octet_as(msg):
    options = CodecOptions(four_octet_as=False)
    assert decode(encode(msg, options), options) == msg


@settings(max_examples=500)
@given(st.integers(19, 200).flatmap(lambda n: st.tuples(
    st.just(n), st.sampled_from([1, 2, 3, 4, 5]), st.binary(min_size=n - 19, max_size=n - 19))))
def test_random_bodies_raise_nothing_but_bgp_errors(case):
    length, kind, body = case
    with contextlib.suppress(BgpError):
        decode(MARKER + struct.pack("!HB", length, kind) + body)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(messages, st.data())
def test_damaged_messages_raise_nothing_but_bgp_errors(msg, data):
    wire = bytearray(encode(msg))
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(16, len(wire) - 1))
        wire[at] = data.draw(st.integers(0, 255))
    for options in (CodecOptions(), CodecOptions(four_octet_as=False, ibgp=False)):
        with contextlib.suppress(BgpError):
            decode(bytes(wire), options)


@given(st.binary(max_size=300))
def test_random_streams_raise_nothing_but_bgp_errors(data):
    with contextlib.suppress(BgpError):
        split_stream(data)


def test_encoder_refuses_what_cannot_be_sent():
    with pytest.raises(ValueError):
        encode(Open(70000, 90, A4("1.2.3.4")))
    with pytest.raises(ValueError):
        encode(Update(nlri=tuple(V4(f"10.{i // 256}.{i % 256}.0/24") for i in range(1100))))
