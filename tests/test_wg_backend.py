"""The wireguard backend's decisions without a host: options, lease data, the peer table."""

from __future__ import annotations

import dataclasses
import logging
from ipaddress import IPv4Address, IPv4Network
from types import MappingProxyType

import pytest

from pyflannel.backend import BackendError, make_backend
from pyflannel.backend.wireguard import WireguardBackend, lease_public_key
from pyflannel.config import parse_config
from pyflannel.daemon.core import Daemon
from pyflannel.flags import Options
from pyflannel.host.netlink import ExternalInterface
from pyflannel.lease.model import Lease, LeaseAttrs
from pyflannel.lease.policy import PeerDiff
from pyflannel.wireguard.keys import PrivateKey


def cfg(**backend):
    base = parse_config('{"Network": "10.1.0.0/16"}')
    return dataclasses.replace(base, backend_type="wireguard",
                               backend=MappingProxyType({"Type": "wireguard", **backend}))


def ext(mtu: int = 1500) -> ExternalInterface:
    fields = {f.name for f in dataclasses.fields(ExternalInterface)}
    values = {"name": "eth0", "index": 2, "address": IPv4Address("198.18.0.1"),
              "public_ip": IPv4Address("198.18.0.1"), "mtu": mtu}
    return ExternalInterface(**{k: v for k, v in values.items() if k in fields})


def lease(subnet: str, ip: str, key: str | None) -> Lease:
    data = {"PublicKey": key} if key is not None else None
    return Lease(IPv4Network(subnet), LeaseAttrs(IPv4Address(ip), "wireguard", data), 1)


KEYS = [PrivateKey.generate().public_base64 for _ in range(4)]


def test_defaults_are_flanneld_s():
    be = make_backend(cfg(), ext())
    assert isinstance(be, WireguardBackend)
    assert (be.listen_port, be.listen_port_v6, be.psk, be.keepalive, be.wg_mode) == (
        51820, 51821, None, 0.0, "separate")
    assert be.mtu == 1420  # external MTU - 80


@pytest.mark.parametrize("options, message", [
    ({"PSK": "not-a-key"}, "Backend.PSK"),
    ({"Mode": "both"}, "Backend.Mode"),
    ({"ListenPort": 0}, "Backend.ListenPort"),
    ({"ListenPortV6": "51821"}, "Backend.ListenPortV6"),
    ({"PersistentKeepaliveInterval": -1}, "PersistentKeepaliveInterval"),
])
def test_bad_options_are_one_line_errors(options, message):
    with pytest.raises(BackendError, match=message) as e:
        WireguardBackend(cfg(**options), ext())
    assert "not-a-key" not in str(e.value)  # a secret is never echoed


def test_options_are_taken():
    psk = PrivateKey.generate().public_base64  # any 32 bytes of base64
    be = WireguardBackend(cfg(ListenPort=51999, PSK=psk, PersistentKeepaliveInterval=25,
                              Mode="auto"), ext())
    assert (be.listen_port, be.psk, be.keepalive, be.wg_mode) == (51999, psk, 25.0, "auto")


def test_lease_public_key_accepts_only_a_valid_key():
    assert lease_public_key(lease("10.1.2.0/24", "198.18.0.2", KEYS[0])) == KEYS[0]
    assert lease_public_key(lease("10.1.2.0/24", "198.18.0.2", "abc")) is None
    assert lease_public_key(lease("10.1.2.0/24", "198.18.0.2", None)) is None


async def _table(be: WireguardBackend, *leases: Lease):
    for item in leases:
        await be.add_peer(item)
    return be.peer_table()


async def test_each_lease_is_a_peer_with_its_subnet_and_endpoint():
    be = WireguardBackend(cfg(), ext())
    table = await _table(be, lease("10.1.2.0/24", "198.18.0.2", KEYS[0]),
                         lease("10.1.3.0/24", "198.18.0.3", KEYS[1]))
    rows = {r.public_key: r for r in table}
    assert rows[KEYS[0]].subnets == ("10.1.2.0/24",)
    assert (rows[KEYS[0]].public_ip, rows[KEYS[0]].port) == (IPv4Address("198.18.0.2"), 51820)
    assert rows[KEYS[1]].subnets == ("10.1.3.0/24",)


async def test_a_changed_key_replaces_the_peer_and_a_removed_lease_removes_it():
    be = WireguardBackend(cfg(), ext())
    await _table(be, lease("10.1.2.0/24", "198.18.0.2", KEYS[0]))
    table = await _table(be, lease("10.1.2.0/24", "198.18.0.2", KEYS[1]))
    assert [r.public_key for r in table] == [KEYS[1]]
    await be.remove_peer(lease("10.1.2.0/24", "198.18.0.2", KEYS[1]))
    assert be.peer_table() == []


async def test_of_two_keys_at_one_address_the_newer_wins():
    """flanneld removes older peers at the endpoint address of a newly added one."""
    be = WireguardBackend(cfg(), ext())
    table = await _table(be, lease("10.1.2.0/24", "198.18.0.2", KEYS[0]),
                         lease("10.1.9.0/24", "198.18.0.2", KEYS[1]))
    assert [r.public_key for r in table] == [KEYS[1]]


async def test_a_lease_without_a_valid_key_is_skipped():
    be = WireguardBackend(cfg(), ext())
    table = await _table(be, lease("10.1.2.0/24", "198.18.0.2", "garbage"),
                         lease("10.1.3.0/24", "198.18.0.3", KEYS[2]))
    assert [r.public_key for r in table] == [KEYS[2]]


async def test_our_own_key_is_never_a_peer():
    be = WireguardBackend(cfg(), ext())
    be.public_key = KEYS[3]
    assert await _table(be, lease("10.1.7.0/24", "198.18.0.1", KEYS[3])) == []


async def test_ipv6_peers_come_from_backend_v6_data_and_listen_port_v6():
    from ipaddress import IPv6Address, IPv6Network

    be = WireguardBackend(cfg(ListenPortV6=51999), ext())
    dual = Lease(IPv4Network("10.1.2.0/24"),
                 LeaseAttrs(IPv4Address("198.18.0.2"), "wireguard", {"PublicKey": KEYS[0]},
                            IPv6Address("fd00:198::2"), {"PublicKey": KEYS[0]}),
                 1, ipv6_subnet=IPv6Network("fc00:10:1:4f::/64"))
    v4_only = lease("10.1.3.0/24", "198.18.0.3", KEYS[1])
    await _table(be, dual, v4_only)
    (row,) = be.peer_table(6)
    assert row.public_key == KEYS[0] and row.subnets == ("fc00:10:1:4f::/64",)
    assert (row.public_ip, row.port) == (IPv6Address("fd00:198::2"), 51999)
    assert {r.public_key for r in be.peer_table(4)} == {KEYS[0], KEYS[1]}


async def test_single_device_modes_give_each_peer_both_subnets_over_one_underlay():
    from ipaddress import IPv6Address, IPv6Network

    dual = Lease(IPv4Network("10.1.2.0/24"),
                 LeaseAttrs(IPv4Address("198.18.0.2"), "wireguard", {"PublicKey": KEYS[0]},
                            IPv6Address("fd00:198::2"), {"PublicKey": KEYS[0]}),
                 1, ipv6_subnet=IPv6Network("fc00:10:1:4f::/64"))
    for mode, family, endpoint in (("auto", 4, IPv4Address("198.18.0.2")),
                                   ("ipv4", 4, IPv4Address("198.18.0.2")),
                                   ("ipv6", 6, IPv6Address("fd00:198::2"))):
        be = WireguardBackend(cfg(Mode=mode), ext())
        await be.add_peer(dual)
        (row,) = be.peer_table(family, (4, 6))
        assert row.subnets == ("10.1.2.0/24", "fc00:10:1:4f::/64"), mode
        assert (row.public_ip, row.port) == (endpoint, 51820), mode  # ListenPort in both


# -- hostile or copied keys (issue 15, items 1 and 7) ----------------------------------------

LOW_ORDER = "A" * 43 + "="  # the all-zero point: no shared secret can come of it


async def test_a_lease_with_a_low_order_key_is_left_out_with_one_warning_and_the_rest_apply(
        caplog):
    be = WireguardBackend(cfg(), ext())
    bad = lease("10.1.77.0/24", "192.0.2.77", LOW_ORDER)
    table = await _table(be, lease("10.1.2.0/24", "198.18.0.2", KEYS[0]), bad,
                         lease("10.1.3.0/24", "198.18.0.3", KEYS[1]))
    assert {r.public_key for r in table} == {KEYS[0], KEYS[1]}
    be.peer_table()  # built again: not said again
    said = [r.getMessage() for r in caplog.records if "10.1.77.0/24" in r.getMessage()]
    assert len(said) == 1 and "192.0.2.77" in said[0] and "low-order" in said[0]
    assert list(be.peer_problems()) == ["10.1.77.0-24"]


async def test_a_lease_with_this_node_s_own_key_is_left_out_with_a_warning(caplog):
    be = WireguardBackend(cfg(), ext())
    be.public_key = KEYS[3]
    assert await _table(be, lease("10.1.7.0/24", "198.18.0.7", KEYS[3])) == []
    assert any("10.1.7.0/24 (198.18.0.7) ignored" in r.getMessage() and "own" in
               r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("address", ["127.0.0.1", "224.0.0.5", "255.255.255.255"])
async def test_a_lease_whose_address_cannot_carry_traffic_is_left_out(address):
    be = WireguardBackend(cfg(), ext())
    table = await _table(be, lease("10.1.2.0/24", address, KEYS[0]),
                         lease("10.1.3.0/24", "198.18.0.3", KEYS[1]))
    assert [r.public_key for r in table] == [KEYS[1]]
    assert list(be.peer_problems()) == ["10.1.2.0-24"]


async def test_a_lease_repeating_another_lease_s_key_is_ignored_the_first_keeps_it(caplog):
    """A cloned node publishes the original's key from another address: the original's
    lease keeps its peer, the copy is said once and left out, until the original goes."""
    be = WireguardBackend(cfg(), ext())
    original = lease("10.1.2.0/24", "198.18.0.2", KEYS[0])
    clone = lease("10.1.9.0/24", "198.18.0.9", KEYS[0])
    (row,) = await _table(be, original, clone)
    assert row.subnets == ("10.1.2.0/24",) and row.public_ip == IPv4Address("198.18.0.2")
    be.peer_table()
    said = [r.getMessage() for r in caplog.records if "10.1.9.0/24" in r.getMessage()]
    assert len(said) == 1 and "repeats the WireGuard public key of peer 10.1.2.0/24" in said[0]
    assert be.peer_problems() == {"10.1.9.0-24": said[0].split("ignored: ")[1]}
    await be.remove_peer(original)
    (row,) = be.peer_table()
    assert row.subnets == ("10.1.9.0/24",) and not be.peer_problems()


async def test_the_daemon_announces_as_added_only_the_peers_the_table_takes(caplog):
    """A low-order key and a repeated key are each said once, by the backend's warning;
    the daemon's own line names only the peer that went into the table."""
    caplog.set_level(logging.INFO)
    daemon = Daemon(Options())
    daemon.backend = be = WireguardBackend(cfg(), ext())

    async def install() -> None:  # what commit hands a running device's fast path
        be.peer_table()

    be.commit = install  # type: ignore[method-assign]
    await daemon.on_peers(PeerDiff(added=(
        lease("10.1.2.0/24", "198.18.0.2", KEYS[0]),
        lease("10.1.77.0/24", "192.0.2.77", LOW_ORDER),
        lease("10.1.9.0/24", "198.18.0.9", KEYS[0])), removed=()))
    said = [r.getMessage() for r in caplog.records]
    assert [m for m in said if m.startswith("peer added")] == [
        "peer added: 10.1.2.0/24 via 198.18.0.2"]
    assert [m.split(" ignored: ")[0] for m in said if " ignored: " in m] == [
        "peer 10.1.77.0/24 (192.0.2.77)", "peer 10.1.9.0/24 (198.18.0.9)"]


def test_a_node_whose_key_another_lease_publishes_refuses_to_start_saying_what_to_do():
    be = WireguardBackend(cfg(), ext())
    be.public_key = KEYS[0]
    assert be.identity_conflict([lease("10.1.3.0/24", "198.18.0.3", KEYS[1])]) is None
    line = be.identity_conflict([lease("10.1.3.0/24", "198.18.0.3", KEYS[1]),
                                 lease("10.1.2.0/24", "198.18.0.2", KEYS[0])])
    assert "\n" not in line and "lease 10.1.2.0/24 (198.18.0.2)" in line
    assert "delete /" in line and "to make a new key" in line


async def test_start_up_refuses_a_key_another_node_s_live_lease_publishes_but_not_our_own():
    import logging

    from pyflannel.daemon.startup import refuse_a_repeated_identity
    from pyflannel.daemon.supervise import Fatal
    from pyflannel.lease.memory import MemoryRegistry
    from pyflannel.logutil import RateLimitedLog

    reg = MemoryRegistry()
    be = WireguardBackend(cfg(), ext())
    be.public_key = KEYS[0]
    ours = LeaseAttrs(IPv4Address("198.18.0.1"), "wireguard", {"PublicKey": KEYS[0]})
    errors = RateLimitedLog(logging.getLogger("test"))
    reg.put_lease_raw(IPv4Network("10.1.1.0/24"), ours, lease_id=7)  # ours, from before
    await refuse_a_repeated_identity(reg, be, be.cfg, ours, errors)
    reg.put_lease_raw(IPv4Network("10.1.5.0/24"),
                      LeaseAttrs(IPv4Address("198.18.0.5"), "wireguard", {"PublicKey": KEYS[0]}),
                      lease_id=8)
    with pytest.raises(Fatal, match=r"already published by lease 10\.1\.5\.0/24 \(198\.18\.0\.5\)"):
        await refuse_a_repeated_identity(reg, be, be.cfg, ours, errors)
