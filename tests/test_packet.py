"""IPv4 handling on the fast path: validation, TTL with incremental checksum, ICMP errors."""

import struct

from hypothesis import given
from hypothesis import strategies as st

from pyflannel.fastpath.packet import (
    BAD_HEADER_LENGTH,
    NOT_IPV4,
    TRUNCATED,
    check_ipv4,
    checksum,
    decrement_ttl,
    header_checksum_ok,
    icmp_net_unreachable,
    wants_icmp_error,
)


def ipv4(src="10.1.1.2", dst="10.1.2.2", ttl=64, proto=17, payload=b"x" * 8, ident=0,
         frag=0) -> bytearray:
    s = bytes(map(int, src.split(".")))
    d = bytes(map(int, dst.split(".")))
    hdr = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), ident, frag,
                                ttl, proto, 0, s, d))
    struct.pack_into("!H", hdr, 10, checksum(hdr))
    return hdr + payload


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
    assert check_ipv4(b"\x60" + bytes(39), 40) == NOT_IPV4  # IPv6
    assert check_ipv4(b"", 0) == NOT_IPV4
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
    assert check_ipv4(data, len(data)) in (None, NOT_IPV4, TRUNCATED, BAD_HEADER_LENGTH)


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
