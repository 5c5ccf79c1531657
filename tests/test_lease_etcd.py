"""Leases against a real etcd: atomic claims, a full pool, restarts, watches."""

from __future__ import annotations

import asyncio
import json
from ipaddress import IPv4Address, IPv4Network

import aetcd
import aetcd.exceptions
import pytest

from pyflannel.config import parse_config
from pyflannel.lease.etcd import EtcdRegistry, EtcdUnavailable
from pyflannel.lease.manager import LeaseManager
from pyflannel.lease.model import LeaseAttrs, subnet_key
from pyflannel.lease.policy import PeerDiff, SubnetPoolExhausted
from tests.conftest import until

CFG = parse_config('{"Network": "10.1.0.0/16"}')


def node(i: int) -> LeaseAttrs:
    return LeaseAttrs(IPv4Address(f"198.18.1.{i}"), "udp")


@pytest.fixture
def registry(etcd_server, etcd_prefix):
    return EtcdRegistry([etcd_server.endpoint], etcd_prefix)


async def test_twenty_nodes_starting_at_once_get_twenty_distinct_subnets(etcd_server,
                                                                          etcd_prefix):
    regs = [EtcdRegistry([etcd_server.endpoint], etcd_prefix) for _ in range(20)]
    managers = [LeaseManager(r, CFG, node(i)) for i, r in enumerate(regs, 1)]
    leases = await asyncio.gather(*(m.acquire() for m in managers))
    assert len({lease.subnet for lease in leases}) == 20
    listing = await regs[0].list_leases()
    assert {lease.subnet for lease in listing.leases} == {lease.subnet for lease in leases}
    for r in regs:
        await r.close()


async def test_a_full_pool_gives_the_fifth_node_a_clear_error(etcd_server, etcd_prefix):
    cfg = parse_config('{"Network":"10.1.0.0/16","SubnetMin":"10.1.1.0","SubnetMax":"10.1.4.0"}')
    reg = EtcdRegistry([etcd_server.endpoint], etcd_prefix)
    for i in range(1, 5):
        await LeaseManager(reg, cfg, node(i)).acquire()
    with pytest.raises(SubnetPoolExhausted, match="no free subnet"):
        await LeaseManager(reg, cfg, node(5)).acquire()
    await reg.close()


async def test_lease_value_and_ttl_are_flanneld_s(registry, etcd_server, etcd_prefix):
    lease = await LeaseManager(registry, CFG, node(1)).acquire()
    key = subnet_key(etcd_prefix, lease.subnet)
    raw = etcd_server.etcdctl("get", key, "--print-value-only").stdout.strip()
    assert json.loads(raw) == {"PublicIP": "198.18.1.1", "PublicIPv6": None,
                               "BackendType": "udp"}
    ttl = await registry.lease_ttl(lease.lease_id)
    assert 24 * 3600 - 60 < ttl <= 24 * 3600
    await registry.close()


async def test_a_restarted_node_takes_back_its_key_on_a_fresh_lease(registry):
    first = await LeaseManager(registry, CFG, node(1)).acquire()
    again = await LeaseManager(registry, CFG, node(1)).acquire()
    assert again.subnet == first.subnet and again.lease_id != first.lease_id
    assert await registry.lease_ttl(first.lease_id) == -1  # the old lease was let go
    await registry.close()


async def test_with_its_key_gone_a_node_prefers_its_previous_subnet(registry):
    first = await LeaseManager(registry, CFG, node(1)).acquire()
    await registry.delete_lease(first.subnet)
    again = await LeaseManager(registry, CFG, node(1)).acquire(previous=first.subnet)
    assert again.subnet == first.subnet
    await registry.close()


async def test_a_reservation_is_adopted_without_a_ttl(registry):
    await registry.put_lease(IPv4Network("10.1.42.0/24"), node(1))
    lease = await LeaseManager(registry, CFG, node(1)).acquire()
    assert lease.subnet == IPv4Network("10.1.42.0/24") and lease.reserved
    assert (await registry.get_lease(lease.subnet)).lease_id == 0
    await registry.close()


async def test_the_watch_follows_peers_joining_and_leaving(registry, etcd_server, etcd_prefix):
    diffs: list[PeerDiff] = []

    async def on_peers(diff: PeerDiff) -> None:
        diffs.append(diff)

    me = LeaseManager(registry, CFG, node(1), on_peers=on_peers)
    await me.acquire()
    watcher = asyncio.create_task(me.watch_forever())
    other_reg = EtcdRegistry([etcd_server.endpoint], etcd_prefix)
    other = await LeaseManager(other_reg, CFG, node(2)).acquire()
    await until(lambda: other.key_name in me.peers)
    assert me.lease.key_name not in me.peers
    await other_reg.delete_lease(other.subnet)
    await until(lambda: other.key_name not in me.peers)
    assert any(other.subnet in {x.subnet for x in d.removed} for d in diffs)
    watcher.cancel()
    await other_reg.close()
    await registry.close()


async def test_losing_its_own_key_makes_a_node_take_a_lease_again(registry):
    taken = []

    async def on_lease(lease):
        taken.append(lease)

    me = LeaseManager(registry, CFG, node(1), on_lease=on_lease)
    first = await me.acquire()
    me.activated(first)  # as the daemon does after programming it at start-up
    tasks = [asyncio.create_task(me.watch_forever()), asyncio.create_task(me.renew_forever())]
    await asyncio.sleep(0.3)
    await registry.delete_lease(first.subnet)
    await until(lambda: taken)
    assert taken[0].subnet == first.subnet  # the old subnet was free, so it came back
    assert (await registry.get_lease(first.subnet)) is not None
    for t in tasks:
        t.cancel()
    await registry.close()


async def test_malformed_peer_values_are_ignored(registry, etcd_server, etcd_prefix):
    etcd_server.etcdctl("put", f"{etcd_prefix}/subnets/10.1.99.0-24", "not json")
    etcd_server.etcdctl("put", f"{etcd_prefix}/subnets/garbage", "{}")
    me = LeaseManager(registry, CFG, node(1))
    lease = await me.acquire()
    await me.resync()
    assert lease.subnet != IPv4Network("10.1.99.0/24")
    assert me.peers == {}
    await registry.close()


async def test_an_unreachable_etcd_is_one_clear_error():
    reg = EtcdRegistry(["http://127.0.0.1:1", "http://127.0.0.1:2"], "/coreos.com/network")
    with pytest.raises(EtcdUnavailable) as e:
        await reg.get_config()
    assert "127.0.0.1:1" in str(e.value) and "127.0.0.1:2" in str(e.value)
    assert "\n" not in str(e.value)
    await reg.close()


async def test_a_second_endpoint_is_used_when_the_first_is_down(etcd_server, etcd_prefix):
    reg = EtcdRegistry(["http://127.0.0.1:1", etcd_server.endpoint], etcd_prefix)
    assert await reg.get_config() is None
    await reg.close()


async def test_a_reservation_keeps_no_ttl_through_many_renewal_periods(etcd_server, etcd_prefix):
    """Time runs fast here: 2-second leases stand for 24-hour ones, so four seconds are
    many renewal periods (an hour of renewals, and more, at real scale)."""
    reg = EtcdRegistry([etcd_server.endpoint], etcd_prefix)
    await reg.put_lease(IPv4Network("10.1.42.0/24"), node(1))
    reserved = LeaseManager(reg, CFG, node(1), ttl_s=2, renew_margin_s=1)
    ordinary = LeaseManager(reg, CFG, node(2), ttl_s=2, renew_margin_s=1)
    assert (await reserved.acquire()).reserved
    other = await ordinary.acquire()
    tasks = [asyncio.create_task(m.renew_forever()) for m in (reserved, ordinary)]
    await asyncio.sleep(4)
    for t in tasks:
        t.cancel()
    kept = await reg.get_lease(IPv4Network("10.1.42.0/24"))
    assert kept is not None and kept.lease_id == 0 and kept.attrs.public_ip == node(1).public_ip
    assert ordinary.renewals >= 3 and reserved.renewals == 0
    assert (await reg.get_lease(other.subnet)).lease_id == other.lease_id
    await reg.close()


async def test_fifty_nodes_starting_at_once_get_fifty_distinct_subnets(etcd_server, etcd_prefix):
    regs = [EtcdRegistry([etcd_server.endpoint], etcd_prefix) for _ in range(50)]
    managers = [LeaseManager(r, CFG, node(i)) for i, r in enumerate(regs, 1)]
    leases = await asyncio.gather(*(m.acquire() for m in managers))
    assert len({lease.subnet for lease in leases}) == 50
    for r in regs:
        await r.close()


async def test_a_compacted_watch_revision_means_one_relist_and_on(registry, etcd_server,
                                                                  etcd_prefix, caplog):
    from pyflannel.lease.etcd import WatchCompacted

    me = LeaseManager(registry, CFG, node(1))
    await me.acquire()
    old = await me.resync()
    for i in range(20):
        etcd_server.etcdctl("put", f"{etcd_prefix}/noise", str(i))
    rev = (await registry.list_leases()).revision
    etcd_server.etcdctl("compact", str(rev))
    with pytest.raises(WatchCompacted):
        async for _ev in await registry.watch(old):
            pass
    # the manager itself: its first watch starts at the compacted revision
    real_resync, calls = me.resync, []

    async def resync_once_stale():
        calls.append(1)
        fresh = await real_resync()
        return old if len(calls) == 1 else fresh

    me.resync = resync_once_stale
    caplog.set_level("INFO")
    watcher = asyncio.create_task(me.watch_forever())
    other_reg = EtcdRegistry([etcd_server.endpoint], etcd_prefix)
    await asyncio.sleep(0.5)
    other = await LeaseManager(other_reg, CFG, node(2)).acquire()
    await until(lambda: other.key_name in me.peers)
    watcher.cancel()
    assert len(calls) == 2  # listed again once, then watched on
    assert sum("compacted" in r.getMessage() for r in caplog.records) == 1
    await other_reg.close()
    await registry.close()


# -- dual-stack and IPv6-only against real etcd ------------------------------------------

DUAL = parse_config('{"Network": "10.1.0.0/16", "EnableIPv6": true,'
                    ' "IPv6Network": "fc00:10:1::/48"}')
V6ONLY = parse_config('{"EnableIPv4": false, "EnableIPv6": true,'
                      ' "IPv6Network": "fc00:10:1::/48"}')


def node6(i: int, v4: bool = True) -> LeaseAttrs:
    return LeaseAttrs(IPv4Address(f"198.18.1.{i}" if v4 else "0.0.0.0"), "vxlan",
                      public_ipv6=f"fd00:198::{i}")


async def test_a_dual_stack_key_is_written_read_renewed_and_watched_whole(
        registry, etcd_server, etcd_prefix):
    me = LeaseManager(registry, DUAL, node6(1))
    lease = await me.acquire()
    key = subnet_key(etcd_prefix, lease.subnet, lease.ipv6_subnet)
    assert key.endswith(f"{lease.subnet.network_address}-24&{lease.ipv6_subnet.network_address}-64")
    raw = etcd_server.etcdctl("get", key, "--print-value-only").stdout.strip()
    assert json.loads(raw) == {"PublicIP": "198.18.1.1", "PublicIPv6": "fd00:198::1",
                               "BackendType": "vxlan"}
    got = await registry.get_lease(lease.subnet, lease.ipv6_subnet)
    assert got is not None and got.ipv6_subnet == lease.ipv6_subnet
    # A restart takes the same key back, on a fresh etcd lease.
    again = await LeaseManager(registry, DUAL, node6(1)).acquire()
    assert again.key_name == lease.key_name and again.lease_id != lease.lease_id
    # Peers: an IPv6-only key from etcdctl, as flanneld writes it, arrives whole.
    watcher = asyncio.create_task(me.watch_forever())
    await asyncio.sleep(0.3)
    v6key = f"{etcd_prefix}/subnets/0.0.0.0-0&fc00:10:1:4f::-64"
    etcd_server.etcdctl("put", v6key, '{"PublicIP":"0.0.0.0","PublicIPv6":"fd00:198::9",'
                        '"BackendType":"vxlan"}')
    await until(lambda: "0.0.0.0-0&fc00:10:1:4f::-64" in me.peers)
    etcd_server.etcdctl("del", v6key)
    await until(lambda: "0.0.0.0-0&fc00:10:1:4f::-64" not in me.peers)
    watcher.cancel()
    await registry.close()


async def test_two_ipv6_only_nodes_get_two_keys_in_etcd(etcd_server, etcd_prefix):
    regs = [EtcdRegistry([etcd_server.endpoint], etcd_prefix) for _ in range(2)]
    a, b = (LeaseManager(r, V6ONLY, node6(i, v4=False)) for i, r in enumerate(regs, 1))
    la, lb = await a.acquire(), await b.acquire()
    assert la.key_name != lb.key_name
    assert (await LeaseManager(regs[1], V6ONLY, node6(2, v4=False)).acquire()).key_name \
        == lb.key_name
    listing = await regs[0].list_leases()
    assert {x.key_name for x in listing.leases} == {la.key_name, lb.key_name}
    for r in regs:
        await r.close()


async def test_delete_if_unchanged_spares_a_key_rewritten_meanwhile(registry):
    lease = await LeaseManager(registry, DUAL, node6(1)).acquire()
    listed = (await registry.list_leases()).leases[0]
    await registry.put_lease(lease.subnet, node6(1), lease.lease_id,
                             ipv6_subnet=lease.ipv6_subnet)
    assert await registry.delete_if_unchanged(listed) is False
    fresh = (await registry.list_leases()).leases[0]
    assert await registry.delete_if_unchanged(fresh) is True
    assert (await registry.list_leases()).leases == []
    await registry.close()


def cut_next_create(monkeypatch, *, committed: bool) -> list[int]:
    """The next create's transaction fails on the wire, before it reaches etcd or after
    etcd committed it: either way the node only sees a broken connection. Returns the etcd
    leases granted meanwhile."""
    grants: list[int] = []
    real_grant, real_transaction = aetcd.Client.lease, aetcd.Client.transaction

    async def grant(self, ttl, lease_id=None):
        got = await real_grant(self, ttl, lease_id)
        grants.append(got.id)
        return got

    async def transaction(self, *args, **kwargs):
        monkeypatch.setattr(aetcd.Client, "transaction", real_transaction)  # only once
        if committed:
            await real_transaction(self, *args, **kwargs)
        raise aetcd.exceptions.ConnectionFailedError("connection reset by peer (test)")

    monkeypatch.setattr(aetcd.Client, "lease", grant)
    monkeypatch.setattr(aetcd.Client, "transaction", transaction)
    return grants


async def test_a_grant_whose_create_never_landed_is_revoked_once_etcd_answers(registry,
                                                                             monkeypatch):
    grants = cut_next_create(monkeypatch, committed=False)
    me = LeaseManager(registry, CFG, node(1))
    with pytest.raises(EtcdUnavailable, match="connection reset"):
        await me.acquire()
    (orphan,) = grants
    assert await registry.lease_ttl(orphan) > 0  # granted for a day, holding no key
    lease = await me.acquire()
    assert lease.lease_id != orphan
    assert await registry.lease_ttl(orphan) == -1  # given back before the next create
    await registry.close()


async def test_a_create_committed_but_unanswered_keeps_its_key_and_is_adopted(registry,
                                                                             monkeypatch):
    grants = cut_next_create(monkeypatch, committed=True)
    me = LeaseManager(registry, CFG, node(1))
    with pytest.raises(EtcdUnavailable, match="connection reset"):
        await me.acquire()
    (orphan,) = grants
    (made,) = (await registry.list_leases()).leases
    assert made.lease_id == orphan
    await registry.refresh(orphan)  # a renewal looks at the orphans: this one holds our key
    assert await registry.get_lease(made.subnet) is not None
    lease = await me.acquire()
    assert lease.subnet == made.subnet and lease.lease_id != orphan  # adopted, on a new lease
    assert await registry.lease_ttl(orphan) == -1
    await registry.close()
