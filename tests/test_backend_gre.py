"""gre and ipip without a lab: the GRE codec (RFC 2784/2890) against hand-built bytes and
tcpdump's reading of them, the leases and MTUs, and which leases become peers."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
from ipaddress import IPv4Address

import pytest

from pyflannel.backend import make_backend
from pyflannel.backend.base import BackendError
from pyflannel.backend.tunnel import GreBackend, IpipBackend
from pyflannel.config import ConfigError, parse_config
from pyflannel.fastpath.packet import checksum
from pyflannel.fastpath.rawip import fast_checksum, gre_header, outer_ipv4, parse_gre
from pyflannel.host.netlink import ExternalInterface
from pyflannel.lease.model import Lease

EXT = ExternalInterface("eth0", 2, IPv4Address("198.18.0.1"), IPv4Address("198.18.0.1"), 1500)


def ipv4(src: str, dst: str, proto: int, payload: bytes, ttl: int = 64) -> bytes:
    """An IPv4 header built field by field, with its checksum, then ``payload``."""
    head = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 1, 0, ttl, proto, 0,
                       IPv4Address(src).packed, IPv4Address(dst).packed)
    head = head[:10] + struct.pack("!H", checksum(head)) + head[12:]
    return head + payload


def echo_request() -> bytes:
    icmp = struct.pack("!BBHHH", 8, 0, 0, 7, 1) + b"pyflannel"
    icmp = icmp[:2] + struct.pack("!H", checksum(icmp)) + icmp[4:]
    return ipv4("10.1.5.1", "10.1.7.1", 1, icmp)


INNER = echo_request()


def test_plain_gre_is_four_bytes_flags_zero_then_the_ethertype():
    assert gre_header(4, None, False) == bytes.fromhex("00000800")
    assert gre_header(6, None, False) == bytes.fromhex("000086dd")


def test_a_key_sets_k_and_follows_the_header():
    assert gre_header(4, 42, False) == bytes.fromhex("20000800" "0000002a")


def test_a_checksum_covers_header_and_payload_and_comes_before_the_key():
    head = gre_header(4, 42, True, INNER)
    assert head[:4] == bytes.fromhex("a0000800") and head[6:8] == b"\0\0"
    assert head[8:] == bytes.fromhex("0000002a")
    assert checksum(head + INNER) == 0


@pytest.mark.parametrize("data", [b"", b"\0\0", b"\xff\xff", b"\x01", b"\xff\xff\0\0",
                                  bytes(range(256)) * 6, b"\x80\x00" * 700 + b"\x7f"])
def test_the_fast_checksum_is_the_internet_checksum(data):
    import random

    assert fast_checksum(data) == checksum(data)
    rng = random.Random(len(data))
    for size in (1, 2, 3, 40, 1401, 1500):
        blob = rng.randbytes(size)
        assert fast_checksum(blob) == checksum(blob)


@pytest.mark.parametrize("key,csum", [(None, False), (42, False), (None, True), (7, True)])
def test_what_we_send_we_take(key, csum):
    data = gre_header(4, key, csum, INNER) + INNER
    at, why = parse_gre(data, 0, len(data), key)
    assert why is None and data[at:] == INNER


@pytest.mark.parametrize("data,key,why", [
    (gre_header(4, 7, False) + INNER, 42, "drop_key_mismatch"),
    (gre_header(4, 7, False) + INNER, None, "drop_key_mismatch"),
    (gre_header(4, None, False) + INNER, 42, "drop_key_mismatch"),
    (bytes.fromhex("80000800ffff0000") + INNER, None, "drop_bad_checksum"),
    (bytes.fromhex("40000800") + INNER, None, "drop_unexpected_framing"),  # routing
    (bytes.fromhex("00010800") + INNER, None, "drop_unexpected_framing"),  # version 1 (PPTP)
    (bytes.fromhex("00006558") + INNER, None, "drop_unexpected_framing"),  # Ethernet inside
    (bytes.fromhex("2000"), 42, "drop_truncated"),
    (bytes.fromhex("20000800" "0000"), 42, "drop_truncated"),
], ids=["other-key", "key-unexpected", "key-missing", "bad-checksum", "routing",
        "version-1", "transparent-ethernet", "short", "short-key"])
def test_what_we_refuse_and_the_counter_it_goes_to(data, key, why):
    assert parse_gre(data, 0, len(data), key) == (0, why)


def test_a_sequence_number_is_skipped():
    data = bytes.fromhex("30000800" "0000002a" "00000005") + INNER
    assert parse_gre(data, 0, len(data), 42) == (12, None)


def test_the_outer_header_of_a_raw_socket_datagram():
    pkt = ipv4("198.18.0.2", "198.18.0.1", 47, gre_header(4, None, False) + INNER)
    assert outer_ipv4(pkt, len(pkt)) == (20, IPv4Address("198.18.0.2").packed)
    assert outer_ipv4(b"\x65" + pkt[1:], len(pkt)) is None  # IPv6 version nibble
    assert outer_ipv4(b"\x44" + pkt[1:], len(pkt)) is None  # header length below 20


def tcpdump_reads(packet: bytes, tmp_path) -> str:
    """tcpdump -v's reading of one raw-IP packet (pcap link type 101)."""
    tcpdump = shutil.which("tcpdump") or "/usr/bin/tcpdump"
    path = tmp_path / "one.pcap"
    path.write_bytes(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 101)
                     + struct.pack("<IIII", 1, 0, len(packet), len(packet)) + packet)
    out = subprocess.run([tcpdump, "-n", "-v", "-r", str(path)], capture_output=True,
                         text=True, check=True)
    return " ".join(out.stdout.split())


def test_tcpdump_reads_our_gre_with_key_and_checksum(tmp_path):
    pkt = ipv4("198.18.0.1", "198.18.0.2", 47, gre_header(4, 42, True, INNER) + INNER)
    text = tcpdump_reads(pkt, tmp_path)
    head = gre_header(4, 42, True, INNER)
    assert ("198.18.0.1 > 198.18.0.2: GREv0, Flags [checksum present, key present], "
            f"sum 0x{head[4:6].hex()}, off 0x0, key=0x2a, length 49 IP ") in text
    # tcpdump does not check GRE checksums: the sum is checked above, this one the inner
    assert "10.1.5.1 > 10.1.7.1: ICMP echo request, id 7, seq 1" in text
    assert "bad cksum" not in text


def test_tcpdump_reads_our_ipip(tmp_path):
    # IP-in-IP has no header of its own: protocol 4 and the inner packet as is
    text = tcpdump_reads(ipv4("198.18.0.1", "198.18.0.2", 4, INNER), tmp_path)
    assert "proto IPIP (4)" in text
    assert "198.18.0.1 > 198.18.0.2: IP" in text
    assert "10.1.5.1 > 10.1.7.1: ICMP echo request, id 7, seq 1" in text


# -- the backends' leases, MTUs and peers -------------------------------------------------

def cfg(backend: dict, **more) -> str:
    return json.dumps({"Network": "10.1.0.0/16", "Backend": backend, **more})


def lease(subnet: str, ip: str, btype: str, data: object = "absent") -> Lease:
    doc = {"PublicIP": ip, "PublicIPv6": None, "BackendType": btype}
    if data != "absent":
        doc["BackendData"] = data
    return Lease.from_kv(subnet.replace("/", "-"), json.dumps(doc))


@pytest.mark.parametrize("backend,mtu", [
    ({"Type": "gre"}, 1476), ({"Type": "gre", "Key": 0}, 1472),
    ({"Type": "gre", "Checksum": True}, 1472), ({"Type": "gre", "Key": 1, "Checksum": True}, 1468),
    ({"Type": "ipip"}, 1480)])
def test_flannel_mtu(backend, mtu):
    assert make_backend(parse_config(cfg(backend)), EXT).mtu == mtu


def test_gre_publishes_its_key_and_ipip_nothing_as_flanneld():
    gre = make_backend(parse_config(cfg({"Type": "gre", "Key": 42})), EXT)
    ipip = make_backend(parse_config(cfg({"Type": "ipip"})), EXT)
    assert isinstance(gre, GreBackend) and isinstance(ipip, IpipBackend)
    assert gre.lease_data()[0] == {"Key": 42}
    assert make_backend(parse_config(cfg({"Type": "gre"})), EXT).lease_data()[0] == {"Key": None}
    assert ipip.lease_data() == (None, None)


def peers_of(b, *leases: Lease) -> tuple[list[str], dict[str, str]]:
    for p in leases:
        b.peers[p.key_name] = p
    return sorted(f"{r.subnet} via {r.public_ip}" for r in b.routes()), b.peer_problems()


def test_a_gre_peer_with_another_key_or_backend_is_left_out_with_why(caplog):
    b = make_backend(parse_config(cfg({"Type": "gre", "Key": 42})), EXT)
    table, problems = peers_of(
        b, lease("10.1.2.0/24", "198.18.0.2", "gre", {"Key": 42}),
        lease("10.1.3.0/24", "198.18.0.3", "gre", {"Key": 7}),
        lease("10.1.4.0/24", "198.18.0.4", "gre", {"Key": None}),
        lease("10.1.5.0/24", "198.18.0.5", "vxlan", {"VtepMAC": "aa:bb:cc:dd:ee:ff"}),
        lease("10.1.6.0/24", "198.18.0.6", "gre"),
        lease("10.1.8.0/24", "127.0.0.1", "gre", {"Key": 42}))
    assert table == ["10.1.2.0/24 via 198.18.0.2"]
    assert problems == {
        "10.1.3.0-24": "its GRE key is 7, ours is 42",
        "10.1.4.0-24": "its GRE key is none, ours is 42",
        "10.1.5.0-24": "its BackendType is 'vxlan', not 'gre'",
        "10.1.6.0-24": 'its BackendData states no GRE key ({"Key": n} or {"Key": null})',
        "10.1.8.0-24": "its address 127.0.0.1 is a loopback, multicast, broadcast or "
                       "reserved one"}
    b.routes()  # a second table: each peer was warned about once
    warnings = [r.getMessage() for r in caplog.records if "GRE key is 7" in r.getMessage()]
    assert len(warnings) == 1


def test_ipip_direct_routing_routes_peers_on_our_network_directly():
    from ipaddress import IPv4Network

    b = make_backend(parse_config(cfg({"Type": "ipip", "DirectRouting": True})), EXT)
    b.l2_networks = [IPv4Network("198.18.0.0/24")]
    b.lease = lease("10.1.1.0/24", "198.18.0.1", "ipip")
    b.tun_index = 9
    table, problems = peers_of(b, lease("10.1.2.0/24", "198.18.0.2", "ipip"),
                               lease("10.1.3.0/24", "198.18.1.3", "ipip"))
    assert table == ["10.1.3.0/24 via 198.18.1.3"] and problems == {}
    routes = b.desired_routes()
    direct = routes[lease("10.1.2.0/24", "198.18.0.2", "ipip").subnet]
    assert (direct.oif, str(direct.gateway)) == (2, "198.18.0.2")


def test_config_rules():
    with pytest.raises(ConfigError, match=r"Backend.Key 4294967296 is out of range"):
        parse_config(cfg({"Type": "gre", "Key": 1 << 32}))
    with pytest.raises(ConfigError, match=r"Backend.Checksum must be true or false"):
        parse_config(cfg({"Type": "gre", "Checksum": "yes"}))
    with pytest.raises(ConfigError, match=r"Backend.DirectRouting must be true or false"):
        parse_config(cfg({"Type": "ipip", "DirectRouting": 1}))


def test_a_reservation_no_daemon_took_is_a_static_peer_with_our_key():
    """``pyflannel lease reserve 10.1.200.0/24 198.18.0.200`` for an Open vSwitch host or a
    router configured by hand: no TTL, no BackendType."""
    b = make_backend(parse_config(cfg({"Type": "gre", "Key": 42})), EXT)
    static = Lease.from_kv("10.1.200.0-24", '{"PublicIP":"198.18.0.200","PublicIPv6":null}')
    expiring = Lease.from_kv("10.1.201.0-24", '{"PublicIP":"198.18.0.201","PublicIPv6":null}',
                             lease_id=7)
    table, problems = peers_of(b, static, expiring)
    assert table == ["10.1.200.0/24 via 198.18.0.200"]
    assert problems == {"10.1.201.0-24": "its BackendType is 'empty', not 'gre'"}


def test_an_ipv6_only_network_runs_gre_over_the_ipv6_underlay():
    from ipaddress import IPv6Address

    ext6 = ExternalInterface("eth0", 2, IPv4Address("0.0.0.0"), IPv4Address("0.0.0.0"), 1500,
                             IPv6Address("fd00:198::1"), IPv6Address("fd00:198::1"))
    v6only = {"EnableIPv4": False, "EnableIPv6": True, "IPv6Network": "fc00:10:1::/48",
              "Backend": {"Type": "gre", "Key": 3}}
    b = make_backend(parse_config(json.dumps(v6only)), ext6)
    assert b.mtu == 1500 - 40 - 8  # outer IPv6, GRE with a key
    peer = Lease.from_kv("0.0.0.0-0&fc00:10:1:4f::-64", json.dumps(
        {"PublicIP": "0.0.0.0", "PublicIPv6": "fd00:198::2", "BackendType": "gre",
         "BackendV6Data": {"Key": 3}}))
    other = Lease.from_kv("0.0.0.0-0&fc00:10:1:50::-64", json.dumps(
        {"PublicIP": "0.0.0.0", "PublicIPv6": "fd00:198::3", "BackendType": "gre",
         "BackendV6Data": {"Key": 4}}))
    table, problems = peers_of(b, peer, other)
    assert table == ["fc00:10:1:4f::/64 via fd00:198::2"]
    assert problems == {other.key_name: "its GRE key is 4, ours is 3"}


# -- start-up refusals: one line, before any device ---------------------------------------

async def test_ipip_refuses_a_dual_stack_network_in_one_line_before_any_device(monkeypatch):
    from pyflannel.backend import tunnel

    touched = []
    monkeypatch.setattr(tunnel, "run_netlink", lambda *a: touched.append(a))
    dual = {"EnableIPv6": True, "IPv6Network": "fc00:10:1::/48", "Backend": {"Type": "ipip"}}
    b = make_backend(parse_config(cfg({"Type": "ipip"}, **dual)), EXT)
    with pytest.raises(BackendError) as e:
        await b.prepare()
    assert str(e.value).startswith("ipip: carries IPv4 only") and "\n" not in str(e.value)
    assert touched == []


async def test_a_raw_socket_that_cannot_be_opened_is_one_line_naming_the_protocol(monkeypatch):
    from pyflannel.backend import tunnel

    async def no_stale_devices(*args):
        return []

    def refused(protocol, address):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(tunnel, "run_netlink", no_stale_devices)
    monkeypatch.setattr(tunnel, "open_raw_socket", refused)
    b = make_backend(parse_config(cfg({"Type": "gre"})), EXT)
    with pytest.raises(BackendError) as e:
        await b.prepare()
    assert str(e.value) == (f"gre: cannot open a raw IP socket (protocol 47) on "
                            f"{b._bind_address()}: Operation not permitted")
    assert b.tun is None and b.fastpath is None  # nothing opened after the refusal
