"""IP handling on the fast path: validation, TTL (hop limit) with incremental checksum,
ICMP and ICMPv6 errors."""

import struct
from ipaddress import IPv6Address

from hypothesis import given
from hypothesis import strategies as st

from pyflannel.fastpath.packet import (
    BAD_HEADER_LENGTH,
    NOT_IP,
    TRUNCATED,
    check_ipv4,
    check_ipv6,
    checksum,
    decrement_hop_limit,
    decrement_ttl,
    header_checksum_ok,
    icmp_net_unreachable,
    icmpv6_no_route,
    wants_icmp_error,
    wants_icmpv6_error,
)


def ipv4(src="10.1.1.2", dst="10.1.2.2", ttl=64, proto=17, payload=b"x" * 8, ident=0,
         frag=0) -> bytearray:
    s = bytes(map(int, src.split(".")))
    d = bytes(map(int, dst.split(".")))
    hdr = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), ident, frag,
                                ttl, proto, 0, s, d))
    struct.pack_into("!H", hdr, 10, checksum(hdr))
    return hdr + payload


def ipv6(src="fc00:10:1:1::2", dst="fc00:10:1:2::2", hops=64, nxt=17, payload=b"x" * 8
         ) -> bytearray:
    """An IPv6 packet without extension headers."""
    return bytearray(struct.pack("!IHBB16s16s", 6 << 28, len(payload), nxt, hops,
                                 IPv6Address(src).packed, IPv6Address(dst).packed) + payload)


@given(ttl=st.integers(2, 255), ident=st.integers(0, 0xFFFF), tos_payload=st.binary(max_size=40))
def test_ttl_decrement_keeps_the_header_checksum_valid(ttl, ident, tos_payload):
    pkt = ipv4(ttl=ttl, ident=ident, payload=tos_payload)
    assert decrement_ttl(pkt)
    assert pkt[8] == ttl - 1
    assert header_checksum_ok(pkt)


def test_ttl_one_is_dropped_untouched():
    pkt = ipv4(ttl=1)
    before = bytes(pkt)
    assert not decrement_ttl(pkt)
    assert bytes(pkt) == before


def test_valid_packet_passes():
    pkt = ipv4()
    assert check_ipv4(pkt, len(pkt)) is None


def test_each_kind_of_bad_packet_has_its_reason():
    good = ipv4(payload=b"y" * 30)
    assert check_ipv4(b"\x60" + bytes(39), 40) == NOT_IP  # IPv6
    assert check_ipv4(b"", 0) == NOT_IP
    assert check_ipv4(good, 19) == TRUNCATED
    assert check_ipv4(good, len(good) - 1) == TRUNCATED  # total length beyond the datagram
    bad_ihl = bytearray(good)
    bad_ihl[0] = 0x44
    assert check_ipv4(bad_ihl, len(bad_ihl)) == BAD_HEADER_LENGTH
    short_total = bytearray(good)
    struct.pack_into("!H", short_total, 2, 10)
    assert check_ipv4(short_total, len(short_total)) == BAD_HEADER_LENGTH


@given(st.binary(max_size=80))
def test_check_never_raises_on_garbage(data):
    assert check_ipv4(data, len(data)) in (None, NOT_IP, TRUNCATED, BAD_HEADER_LENGTH)


def test_icmp_net_unreachable_quotes_the_packet_back_to_its_sender():
    orig = ipv4(src="10.1.1.2", dst="10.1.99.9", payload=b"ABCDEFGHIJKL")
    reply = icmp_net_unreachable(orig, len(orig), bytes([10, 1, 1, 0]))
    assert check_ipv4(reply, len(reply)) is None and header_checksum_ok(reply)
    assert reply[9] == 1 and reply[12:16] == bytes([10, 1, 1, 0])
    assert reply[16:20] == bytes([10, 1, 1, 2])
    icmp = reply[20:]
    assert icmp[0] == 3 and icmp[1] == 0 and checksum(icmp) == 0
    assert icmp[8:] == bytes(orig[:28])  # header + first 8 data bytes


def test_no_icmp_error_about_an_icmp_error_or_a_fragment():
    err = ipv4(proto=1, payload=bytes([3, 0]) + bytes(6))
    echo = ipv4(proto=1, payload=bytes([8, 0]) + bytes(6))
    frag = ipv4(frag=5)
    assert not wants_icmp_error(err, len(err))
    assert wants_icmp_error(echo, len(echo))
    assert not wants_icmp_error(frag, len(frag))


# -- IPv6 ------------------------------------------------------------------------------

NET6_SRC = IPv6Address("fc00:10:1::").packed


def icmpv6_checksum_ok(pkt: bytes) -> bool:
    """The ICMPv6 checksum covers a pseudo-header of both addresses, length and type."""
    body = pkt[40:]
    pseudo = pkt[8:40] + struct.pack("!I3xB", len(body), 58)
    return checksum(pseudo + body) == 0


def test_an_ipv6_packet_is_checked_by_its_payload_length():
    pkt = ipv6(payload=b"y" * 20)
    assert check_ipv6(pkt, len(pkt)) is None
    assert check_ipv6(pkt, len(pkt) - 1) == TRUNCATED
    assert check_ipv6(pkt[:39], 39) == TRUNCATED
    assert check_ipv6(ipv4(), 28) == NOT_IP


def test_the_hop_limit_counts_down_and_one_is_dropped_untouched():
    pkt = ipv6(hops=2)
    assert decrement_hop_limit(pkt) and pkt[7] == 1
    before = bytes(pkt)
    assert not decrement_hop_limit(pkt) and bytes(pkt) == before


def test_icmpv6_no_route_goes_back_to_the_sender_with_a_valid_checksum():
    orig = ipv6(src="fc00:10:1:1::5", dst="fc00:10:1:77::1", nxt=58,
                payload=bytes([128, 0, 0, 0, 0, 1, 0, 1]))  # an echo request
    reply = icmpv6_no_route(orig, len(orig), NET6_SRC)
    assert reply[0] >> 4 == 6 and reply[6] == 58
    assert reply[8:24] == NET6_SRC and reply[24:40] == orig[8:24]
    assert reply[40] == 1 and reply[41] == 0  # destination unreachable, no route
    assert reply[48:] == bytes(orig)
    assert struct.unpack("!H", reply[4:6])[0] == len(reply) - 40
    assert icmpv6_checksum_ok(reply)


def test_icmpv6_errors_never_exceed_the_ipv6_minimum_mtu():
    orig = ipv6(src="fc00:10:1:1::5", dst="fc00:10:1:77::1", payload=bytes(4000))
    reply = icmpv6_no_route(orig, len(orig), NET6_SRC)
    assert len(reply) == 1280 and icmpv6_checksum_ok(reply)


def test_no_icmpv6_error_answers_an_error_a_multicast_or_an_unspecified_sender():
    echo = ipv6(nxt=58, payload=bytes([128, 0]) + bytes(6))
    assert wants_icmpv6_error(echo, len(echo))
    error = ipv6(nxt=58, payload=bytes([1, 0]) + bytes(6))
    assert not wants_icmpv6_error(error, len(error))
    for src, dst in (("::", "fc00:10:1:2::2"), ("ff02::1", "fc00:10:1:2::2"),
                     ("fc00:10:1:1::2", "ff02::1")):
        pkt = ipv6(src=src, dst=dst)
        assert not wants_icmpv6_error(pkt, len(pkt))
    later_fragment = ipv6(nxt=44, payload=bytes([17, 0, 0, 8 << 3]) + bytes(12))
    assert not wants_icmpv6_error(later_fragment, len(later_fragment))
    first_fragment = ipv6(nxt=44, payload=bytes([17, 0, 0, 1]) + bytes(12))
    assert wants_icmpv6_error(first_fragment, len(first_fragment))
