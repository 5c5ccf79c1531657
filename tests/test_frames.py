"""The vnet1 framing and the offload arithmetic, as properties (hypothesis)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyflannel.fastpath.coalesce import joinable
from pyflannel.fastpath.frames import (
    CHUNK_HDR_LEN,
    F_NEEDS_CSUM,
    GSO_NONE,
    GSO_TCPV4,
    MAX_DATAGRAM,
    VNET,
    VNET_LEN,
    FrameError,
    Reassembler,
    check_vnet,
    classify,
    encode_train,
    finish_checksum,
    ones_sum,
    segment_tcp4,
    to_plain,
)
from pyflannel.fastpath.packet import checksum, header_checksum_ok
from tests.test_forwarder import tcp_segment
from tests.test_forwarder_ipv6 import OURS, THEIRS, tcp6
from tests.test_packet import ipv4

DGRAM = 1472  # a 1500-byte underlay


def reference_sum(data: bytes) -> int:
    """RFC 1071 the slow, obvious way."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


@given(st.binary(max_size=3000))
def test_the_fast_ones_complement_sum_equals_rfc1071(data):
    assert ones_sum(data) == reference_sum(data)


def tcp_super_packet(payload: bytes, flags: int = 0x18, seq: int = 1000) -> bytearray:
    """An IPv4/TCP packet whose TCP checksum holds only the pseudo-header sum, as the
    kernel hands it up with a partial checksum."""
    src, dst = bytes([10, 1, 1, 2]), bytes([10, 1, 2, 3])
    tcp = bytearray(struct.pack("!HHIIBBHHH", 40000, 5201, seq, 7, 5 << 4, flags, 512, 0, 0))
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + 20 + len(payload), 99, 0x4000,
                               64, 6, 0, src, dst))
    ip[10:12] = struct.pack("!H", checksum(ip))
    pseudo = reference_sum(src + dst + b"\x00\x06" + struct.pack("!H", 20 + len(payload)))
    tcp[16:18] = struct.pack("!H", pseudo)
    return ip + tcp + payload


def tcp_checksum_ok(seg: bytes) -> bool:
    ihl = (seg[0] & 0x0F) * 4
    pseudo = seg[12:20] + b"\x00\x06" + struct.pack("!H", len(seg) - ihl)
    return reference_sum(pseudo + seg[ihl:]) == 0xFFFF


@given(st.binary(min_size=1, max_size=1400))
def test_a_partial_checksum_is_finished_as_a_nic_would(payload):
    pkt = tcp_super_packet(payload)
    vnet = VNET.pack(F_NEEDS_CSUM, GSO_NONE, 0, 0, 20, 16)
    (out,) = to_plain(vnet, pkt)
    assert tcp_checksum_ok(bytes(out)) and header_checksum_ok(out)


@settings(max_examples=60, deadline=None)
@given(size=st.integers(1, 65000 - 40), mss=st.sampled_from([536, 1000, 1420, 1432]),
       fin=st.booleans())
def test_super_packets_of_any_size_are_cut_into_valid_segments(size, mss, fin):
    payload = bytes((i * 7) & 0xFF for i in range(size))
    pkt = tcp_super_packet(payload, flags=0x19 if fin else 0x18)
    segs = segment_tcp4(pkt, mss)
    assert len(segs) == -(-size // mss)
    assert b"".join(bytes(s[40:]) for s in segs) == payload
    for i, s in enumerate(segs):
        assert header_checksum_ok(s) and tcp_checksum_ok(bytes(s))
        assert struct.unpack_from("!I", s, 24)[0] == 1000 + i * mss
        last = i == len(segs) - 1
        assert bool(s[33] & 0x01) == (fin and last)  # FIN only on the last segment
        assert bool(s[33] & 0x08) == last  # PSH likewise


@pytest.mark.parametrize("bad", [b"", b"\x45" * 30, bytes(60)])
def test_a_broken_super_packet_is_refused(bad):
    with pytest.raises(FrameError):
        segment_tcp4(bad, 1400)


@settings(max_examples=80, deadline=None)
@given(size=st.integers(1, 65000), train_id=st.integers(0, 0xFFFF))
def test_a_train_round_trips_at_every_size_and_never_exceeds_limits(size, train_id):
    payload = bytes((i * 13) & 0xFF for i in range(size))
    dgrams = encode_train(payload, train_id, DGRAM)
    assert all(len(d) <= DGRAM for d in dgrams)
    assert sum(len(d) for d in dgrams) <= MAX_DATAGRAM + CHUNK_HDR_LEN * 64
    assert all(classify(d) == "vnet1" for d in dgrams)
    r = Reassembler()
    out = [r.feed("peer", d) for d in dgrams]
    assert all(x is None for x in out[:-1])
    assert bytes(out[-1]) == payload


@given(st.binary(min_size=1, max_size=200))
def test_the_two_framings_are_never_confused(data):
    kind = classify(data)
    if data[0] >> 4 == 4:
        assert kind == "flannel"
    elif kind == "vnet1":
        assert data[0] == 0xF7


def test_a_lost_chunk_drops_only_its_train():
    r = Reassembler()
    first = encode_train(bytes(5000), 1, DGRAM)
    second = encode_train(b"x" * 3000, 2, DGRAM)
    for d in first[:1] + first[2:]:
        assert r.feed("p", d) is None
    assert r.dropped == 1
    got = [r.feed("p", d) for d in second]
    assert bytes(got[-1]) == b"x" * 3000


def test_interleaved_peers_are_reassembled_separately():
    r = Reassembler()
    a, b = encode_train(b"a" * 4000, 5, DGRAM), encode_train(b"b" * 4000, 5, DGRAM)
    results = []
    for x, y in zip(a, b, strict=True):
        results += [r.feed("A", x), r.feed("B", y)]
    assert bytes(results[-2]) == b"a" * 4000 and bytes(results[-1]) == b"b" * 4000


@given(st.lists(st.binary(min_size=7, max_size=100).map(lambda b: b"\xf7\x01" + b),
                max_size=30))
def test_garbage_trains_never_crash_the_reassembler(dgrams):
    r = Reassembler()
    for d in dgrams:
        if classify(d) == "vnet1":
            r.feed("p", d)


@pytest.mark.parametrize(("vnet", "length"), [
    (VNET.pack(0, 9, 0, 0, 0, 0), 100),  # unknown GSO type
    (VNET.pack(F_NEEDS_CSUM, 0, 0, 0, 90, 16), 100),  # checksum field outside
    (VNET.pack(0, GSO_TCPV4, 40, 0, 0, 0), 100),  # GSO without a segment size
])
def test_offload_headers_the_kernel_would_refuse_are_refused_here(vnet, length):
    with pytest.raises(FrameError):
        check_vnet(vnet, length)


def test_finish_checksum_refuses_an_offset_outside_the_packet():
    with pytest.raises(FrameError):
        finish_checksum(bytearray(30), 28, 16)
    assert len(VNET.pack(0, 0, 0, 0, 0, 0)) == VNET_LEN


@settings(max_examples=200, deadline=None)
@given(payload=st.binary(min_size=1, max_size=1500), v6=st.booleans(),
       where=st.integers(min_value=0), flip=st.integers(min_value=1, max_value=255))
def test_a_segment_joins_only_while_its_tcp_checksum_holds(payload, v6, where, flip):
    """joinable() is the kernel's GRO checksum check: an intact TCP segment passes; any
    byte changed in its TCP header or data (so its checksum no longer matches) fails.
    (But the data offset: a segment whose header seems to swallow its data is never
    joined, so it needs no check.)"""
    seg = bytearray(tcp6(THEIRS, OURS, 7, payload) if v6 else tcp_segment(7, payload))
    assert joinable(seg) and joinable(memoryview(seg))
    at = 40 if v6 else 20
    i = at + where % (len(seg) - at)
    seg[i + 1 if i == at + 12 else i] ^= flip
    assert not joinable(seg)


def test_what_is_never_joined_needs_no_checksum():
    """Segments without data, fragments and other protocols are never joined: nothing to
    verify, whatever their checksum."""
    bare = bytearray(tcp_segment(7, b""))
    bare[36] ^= 0xFF  # a bad checksum on a pure ACK: the kernel alone decides
    fragment = bytearray(tcp_segment(7, b"x" * 100))
    fragment[6:8] = b"\x20\x00"  # more fragments
    fragment[30] ^= 1
    assert joinable(bare) and joinable(fragment)
    assert joinable(ipv4(src="10.1.2.7", dst="10.1.1.5", payload=b"udp")) and joinable(b"")
