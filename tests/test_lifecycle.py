"""The lease life cycle against the in-memory registry: every race, in milliseconds.

Each test drives one fault class (hostile etcd content, session expiry, a failure or an
interleaving between two awaits) and states what a node does about it.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import tracemalloc
from ipaddress import IPv4Address, IPv4Network, IPv6Network

import pytest

from pyflannel.config import parse_config
from pyflannel.lease.manager import LeaseManager
from pyflannel.lease.memory import MemoryRegistry
from pyflannel.lease.model import NO_IPV4_SUBNET, LeaseAttrs, lease_key_name, subnet_key
from pyflannel.lease.registry import EtcdAuthError, EtcdUnavailable
from tests.conftest import until as wait_until

CFG = parse_config(b'{"Network":"10.1.0.0/16","SubnetLen":24}')
SMALL = parse_config(b'{"Network":"10.1.0.0/22","SubnetLen":24}')  # 3 subnets: .1 .2 .3
ME = IPv4Address("198.18.0.1")
PREFIX = "/coreos.com/network"


def attrs(ip: IPv4Address | str = ME) -> LeaseAttrs:
    return LeaseAttrs(IPv4Address(ip), "udp")


def net(text: str) -> IPv4Network:
    return IPv4Network(text)


def key(text: str) -> str:
    """The peer-table key (the lease's key name) of an IPv4-only lease."""
    return lease_key_name(IPv4Network(text))


class Node:
    """A manager with recording callbacks, and its two tasks."""

    def __init__(self, registry: MemoryRegistry, cfg=CFG, ip=ME) -> None:
        self.programmed: list[IPv4Network] = []
        self.torn_down: list[IPv4Network] = []
        self.diffs = []
        self.fail_activation = 0
        self.m = LeaseManager(registry, cfg, attrs(ip), ttl_s=60,
                              on_lease=self.on_lease, on_lease_lost=self.on_lost,
                              on_peers=self.on_peers)
        self.tasks: list[asyncio.Task] = []

    async def on_lease(self, lease) -> None:
        if self.fail_activation:
            self.fail_activation -= 1
            raise OSError("flannel.1 vanished")
        self.programmed.append(lease.subnet)

    async def on_lost(self, old) -> None:
        self.torn_down.append(old.subnet)

    async def on_peers(self, diff) -> None:
        self.diffs.append(diff)

    async def start(self, previous: IPv4Network | None = None):
        lease = await self.m.acquire(previous)
        self.m.activated(lease)
        self.tasks = [asyncio.create_task(self.m.watch_forever()),
                      asyncio.create_task(self.m.renew_forever())]
        await settle()
        return lease

    async def stop(self) -> None:
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for t in self.tasks:
            assert t.cancelled(), "a life-cycle task ended by itself"


async def settle(rounds: int = 50) -> None:
    for _ in range(rounds):
        await asyncio.sleep(0)


async def until(cond, timeout: float = 2.0) -> None:
    await wait_until(cond, timeout, step=0.001)


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch):
    monkeypatch.setattr(LeaseManager, "retry_first_s", 0.001)
    monkeypatch.setattr(LeaseManager, "retry_ceiling_s", 0.01)
    monkeypatch.setattr(LeaseManager, "watch_retry_first_s", 0.001)
    monkeypatch.setattr(LeaseManager, "watch_retry_ceiling_s", 0.01)


@pytest.fixture
def reg() -> MemoryRegistry:
    return MemoryRegistry(PREFIX)


def warnings_about(caplog, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno >= logging.WARNING and text in r.getMessage()]


# -- hostile etcd content ----------------------------------------------------------------


async def test_a_malformed_value_at_the_preferred_key_is_taken_and_named_once(reg, caplog):
    reg.put_raw(subnet_key(PREFIX, net("10.1.5.0/24")), "notjson")
    node = Node(reg)
    lease = await node.m.acquire(previous=net("10.1.5.0/24"))
    assert lease.subnet != net("10.1.5.0/24")
    await node.m.resync()
    said = warnings_about(caplog, "10.1.5.0-24")
    assert len(said) == 1
    assert "not JSON" in said[0] and "counts as taken" in said[0]
    assert reg.calls["create"] == 1  # no lost races against a key that exists


async def test_malformed_keys_count_as_taken_when_the_pool_is_full(reg):
    from pyflannel.lease.policy import SubnetPoolExhausted

    for third in (1, 2):
        reg.put_raw(subnet_key(PREFIX, net(f"10.1.{third}.0/24")), b"\xff garbage")
    reg.put_lease_raw(net("10.1.3.0/24"), attrs("198.18.0.9"))
    with pytest.raises(SubnetPoolExhausted, match="all 3 subnets"):
        await Node(reg, SMALL).m.acquire()


async def test_a_key_that_is_not_a_subnet_is_named_once(reg, caplog):
    reg.put_raw(f"{PREFIX}/subnets/hello", "{}")
    node = Node(reg)
    await node.start()
    reg.put_raw(f"{PREFIX}/subnets/hello", "{}")  # again, through the watch
    reg.put_raw(f"{PREFIX}/subnets/10.1.1.0-99", "{}")
    await settle()
    assert len(warnings_about(caplog, "subnets/hello")) == 1
    assert len(warnings_about(caplog, "10.1.1.0-99")) == 1
    await node.stop()


async def test_an_oversized_value_is_ignored_and_its_subnet_stays_taken(reg, caplog):
    huge = '{"PublicIP":"198.18.0.7","x":"' + "a" * 100_000 + '"}'
    reg.put_raw(subnet_key(PREFIX, net("10.1.9.0/24")), huge)
    node = Node(reg)
    lease = await node.start(previous=net("10.1.9.0/24"))
    assert lease.subnet != net("10.1.9.0/24")
    assert key("10.1.9.0/24") not in node.m.peers
    assert len(warnings_about(caplog, "far larger than any lease")) == 1
    await node.stop()


async def test_a_peer_whose_value_turns_to_garbage_is_removed(reg):
    node = Node(reg)
    await node.start()
    reg.put_lease_raw(net("10.1.50.0/24"), attrs("198.18.0.5"))
    await settle()
    assert key("10.1.50.0/24") in node.m.peers
    reg.put_raw(subnet_key(PREFIX, net("10.1.50.0/24")), "[1,2]")
    await settle()
    assert key("10.1.50.0/24") not in node.m.peers
    await node.stop()


async def test_a_lease_naming_our_address_on_another_subnet_is_never_a_peer(reg, caplog):
    node = Node(reg)
    await node.start()
    reg.put_lease_raw(net("10.1.77.0/24"), attrs(ME))
    reg.put_lease_raw(net("10.1.77.0/24"), attrs(ME))
    await settle()
    assert key("10.1.77.0/24") not in node.m.peers
    assert all(not d.added for d in node.diffs)
    assert len(warnings_about(caplog, "names this node's address")) == 1
    await node.stop()


# -- someone else's key over ours --------------------------------------------------------


async def test_a_foreign_takeover_of_our_key_moves_us_and_leaves_no_etcd_lease(reg):
    node = Node(reg)
    first = await node.start()
    reg.put_lease_raw(first.subnet, attrs("198.18.0.2"), lease_id=0)
    await until(lambda: node.m.holds_subnet() and node.m.lease.subnet != first.subnet)
    assert node.torn_down == [first.subnet]
    assert node.programmed == [node.m.lease.subnet]
    assert reg.orphaned_leases() == set()
    await node.stop()


async def test_a_deleted_key_is_taken_back_and_the_old_etcd_lease_revoked(reg):
    node = Node(reg)
    first = await node.start()
    reg.delete_raw(subnet_key(PREFIX, first.subnet))
    await until(lambda: node.m.holds_subnet() and node.programmed)
    assert node.m.lease.subnet == first.subnet  # it was free, so it came back
    assert first.lease_id not in reg.live_leases()
    assert reg.orphaned_leases() == set()
    await node.stop()


async def test_losing_the_lease_with_a_full_pool_waits_quietly_and_recovers(reg, caplog):
    others = {3: "198.18.0.3"}
    node = Node(reg, SMALL)
    mine = await node.start(previous=net("10.1.1.0/24"))
    reg.put_lease_raw(net("10.1.2.0/24"), attrs("198.18.0.2"))
    reg.put_lease_raw(net("10.1.3.0/24"), attrs(others[3]))
    await settle()
    reg.put_lease_raw(mine.subnet, attrs("198.18.0.4"))  # taken over: the pool is now full
    await until(lambda: node.torn_down)
    await asyncio.sleep(0.1)  # many back-off steps
    assert node.m.lease is None and not node.m.holds_subnet()
    errors = [r for r in caplog.records if "cannot take a lease" in r.getMessage()]
    assert len(errors) == 1 and "no free subnet" in errors[0].getMessage()
    assert not any(r.exc_info for r in caplog.records)
    assert reg.orphaned_leases() == set()
    reg.delete_raw(subnet_key(PREFIX, net("10.1.3.0/24")))  # a node leaves
    await until(lambda: node.m.holds_subnet())
    assert node.m.lease.subnet == net("10.1.3.0/24")
    assert node.programmed == [net("10.1.3.0/24")]
    await node.stop()


async def test_a_re_acquisition_revokes_the_old_etcd_lease_once_and_says_so_once(reg, caplog):
    caplog.set_level("INFO")
    node = Node(reg)
    first = await node.start()
    reg.delete_raw(subnet_key(PREFIX, first.subnet))
    await until(lambda: node.m.holds_subnet() and node.programmed)
    assert first.lease_id not in reg.live_leases()
    assert reg.calls["revoke"] == 1
    said = [r.getMessage() for r in caplog.records if "revoked etcd lease" in r.getMessage()]
    assert said == [f"revoked etcd lease {first.lease_id:x}, which no longer holds our key"]
    await node.stop()


async def test_a_create_whose_answer_is_lost_is_adopted_and_leaves_no_etcd_lease(reg):
    node = Node(reg)
    first = await node.start()
    # etcd commits the create of our new key, and the answer never comes back
    reg.fail_after("create", EtcdUnavailable("etcd unreachable (connection reset)"))
    creates = reg.calls["create"]
    reg.delete_raw(subnet_key(PREFIX, first.subnet))
    await until(lambda: node.m.holds_subnet() and node.programmed)
    assert reg.calls["create"] == creates + 1  # the key it made is adopted, not made anew
    assert reg.calls["reclaim"] == 1
    mine = [kv for kv in reg.kvs.values() if b"198.18.0.1" in kv.value]
    assert len(mine) == 1 and mine[0].lease_id == node.m.lease.lease_id
    assert reg.live_leases() == {node.m.lease.lease_id}  # the lost create's lease is gone
    await node.stop()


# -- session expiry ----------------------------------------------------------------------


async def test_refused_credentials_during_renewal_are_retried_not_a_crash(reg, caplog,
                                                                        monkeypatch):
    monkeypatch.setattr("pyflannel.lease.manager.renew_delay", lambda *a: 0.001)
    monkeypatch.setattr("pyflannel.lease.manager.RENEW_RETRY_S", 0.001)
    node = Node(reg)
    await node.start()
    reg.fail("refresh", EtcdAuthError("etcd refused the credentials: invalid auth token"), 3)
    await until(lambda: node.m.renewals >= 2)
    assert node.m.holds_subnet()
    assert not any(r.exc_info for r in caplog.records)
    await node.stop()


class FakeClock:
    """The manager's wall clock, moved on only by its own waits."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def time(self) -> float:
        return self.now

    def __getattr__(self, name: str):
        import time
        return getattr(time, name)


async def test_renewal_failing_through_an_outage_is_one_line(reg, caplog, monkeypatch):
    caplog.set_level("INFO")
    clock = FakeClock()
    monkeypatch.setattr("pyflannel.lease.manager.time", clock)
    node = Node(reg)

    async def waited(seconds: float) -> bool:
        clock.now += seconds
        await asyncio.sleep(0)
        return node.m.lease_is_lost()

    node.m._wait_lost = waited  # type: ignore[method-assign]
    # Renewal is due 30 s before the 60 s TTL runs out; it then retries sooner and sooner
    # (every 7.5, 5.6, 4.2, ... seconds).
    reg.fail("refresh", EtcdUnavailable("etcd unreachable (test)"), 5)
    await node.start()
    await until(lambda: node.m.renewals >= 1)
    await node.stop()
    assert reg.calls["refresh"] >= 6
    said = [r.getMessage() for r in caplog.records if "renewal" in r.getMessage()]
    assert len(said) == 2, said
    assert said[0].startswith("lease renewal failed, retrying until the lease runs out at "
                              "2027-01-15T08:01:00Z: etcd unreachable")
    assert said[1] == "lease renewal works again"


async def test_an_expired_etcd_lease_is_noticed_at_renewal_and_replaced(reg, monkeypatch):
    monkeypatch.setattr("pyflannel.lease.manager.renew_delay", lambda *a: 0.001)
    node = Node(reg)
    first = await node.start()
    node.tasks[0].cancel()  # no watch: only the renewal can notice
    reg.lease_ttl.pop(first.lease_id)
    await until(lambda: node.m.holds_subnet() and node.m.lease.lease_id != first.lease_id)
    await node.stop()


async def test_a_broken_watch_is_re_established_and_said_once(reg, caplog):
    caplog.set_level("INFO")
    node = Node(reg)
    await node.start()

    def said(text: str) -> int:
        return sum(text in r.getMessage() for r in caplog.records)

    for breaks in (1, 2, 3):
        reg.break_watches()
        await until(lambda n=breaks: said("watching leases again") == n)
    assert said("lease watch interrupted: memory registry: watch broken") == 3  # one each
    reg.down = True
    reg.break_watches()
    retries = reg.calls["list_leases"]
    await until(lambda: reg.calls["list_leases"] >= retries + 5)
    reg.down = False
    await until(lambda: said("watching leases again") == 4)
    assert said("lease watch interrupted: etcd unreachable") == 1  # one for the outage
    reg.put_lease_raw(net("10.1.60.0/24"), attrs("198.18.0.6"))
    await until(lambda: key("10.1.60.0/24") in node.m.peers)
    await node.stop()


# -- failures and interleavings between two awaits ---------------------------------------


async def test_a_failed_activation_is_retried_until_it_works(reg):
    node = Node(reg)
    first = await node.start()
    node.fail_activation = 3
    reg.delete_raw(subnet_key(PREFIX, first.subnet))
    await until(lambda: node.programmed)
    assert node.m.holds_subnet()


@pytest.mark.parametrize("op", ["list_leases", "create", "get_lease", "revoke"])
async def test_our_new_key_seen_by_the_watch_mid_reacquire_is_never_a_peer(reg, op):
    node = Node(reg)
    first = await node.start()

    def foreign_takes_one_more():
        # Whatever happens at this await point, a peer event arrives meanwhile.
        reg.put_lease_raw(net("10.1.200.0/24"), attrs("198.18.0.20"))

    reg.before(op, foreign_takes_one_more)
    reg.put_lease_raw(first.subnet, attrs("198.18.0.2"))  # taken over
    await until(lambda: node.m.holds_subnet())
    await settle()
    mine = node.m.lease.key_name
    assert mine not in node.m.peers
    assert all(lease.attrs.public_ip != ME for d in node.diffs for lease in d.added)
    assert key("10.1.200.0/24") in node.m.peers
    await node.stop()


async def test_a_listing_from_before_our_create_does_not_declare_the_new_lease_lost(reg):
    node = Node(reg)
    first = await node.start()
    node.tasks[0].cancel()  # no watch: this test drives resync by hand
    gate, real = asyncio.Event(), reg.list_leases

    async def listing_returned_late():
        listing = await real()  # taken now, while we still hold the first subnet
        await gate.wait()
        return listing

    reg.list_leases = listing_returned_late  # type: ignore[method-assign]
    resync = asyncio.create_task(node.m.resync())
    await settle()
    reg.list_leases = real  # type: ignore[method-assign]
    reg.put_lease_raw(first.subnet, attrs("198.18.0.2"))  # taken over
    node.m.lease_lost("taken over")
    await until(lambda: node.m.holds_subnet())
    assert node.m.lease.subnet != first.subnet
    gate.set()
    await resync  # its listing predates our new key
    assert not node.m.lease_is_lost()
    await node.stop()


async def test_etcd_down_during_reacquire_is_retried_without_a_traceback(reg, caplog):
    node = Node(reg)
    first = await node.start()
    reg.fail("create", EtcdUnavailable("etcd unreachable (test)"), 5)
    reg.fail("list_leases", EtcdUnavailable("etcd unreachable (test)"), 5)
    reg.delete_raw(subnet_key(PREFIX, first.subnet))
    await until(lambda: node.m.holds_subnet() and node.programmed)
    assert not any(r.exc_info for r in caplog.records)
    await node.stop()


# -- months of churn ---------------------------------------------------------------------


async def test_thousands_of_peer_events_leave_memory_where_it_was(reg):
    node = Node(reg)
    node.on_peers = None  # type: ignore[assignment]
    node.m.on_peers = None
    await node.start()

    async def churn(n: int) -> None:
        for i in range(n):
            s = net(f"10.1.{100 + i % 50}.0/24")
            reg.put_lease_raw(s, attrs(f"198.18.1.{i % 50 + 1}"))
            await settle(3)
            reg.delete_raw(subnet_key(PREFIX, s))
            await settle(3)

    await churn(500)  # warm up caches and the history's growth pattern
    reg.history.clear()
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    await churn(3000)
    reg.history.clear()  # the fake's own record, not the node's
    gc.collect()
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    grown = sum(s.size_diff for s in after.compare_to(before, "filename")
                if "pyflannel" in (s.traceback[0].filename if s.traceback else ""))
    assert grown < 64 * 1024, f"grew {grown} bytes over 6000 peer events"
    assert len(node.m.peers) == 0
    await node.stop()


# -- dual-stack and IPv6-only ------------------------------------------------------------

DUAL = parse_config(b'{"Network":"10.1.0.0/16","EnableIPv6":true,'
                    b'"IPv6Network":"fc00:10:1::/48"}')
V6ONLY = parse_config(b'{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fc00:10:1::/48"}')


def attrs6(ip: str = str(ME), ip6: str = "fd00:198::1") -> LeaseAttrs:
    return LeaseAttrs(IPv4Address(ip), "vxlan", public_ipv6=ip6)


def node6(registry: MemoryRegistry, cfg, ip: str = str(ME), ip6: str = "fd00:198::1") -> Node:
    n = Node(registry, cfg)
    n.m.attrs = attrs6(ip, ip6)
    return n


async def test_dual_stack_key_and_value_are_flanneld_s(reg):
    node = node6(reg, DUAL)
    lease = await node.m.acquire()
    assert lease.has_ipv4 and lease.has_ipv6
    stored = reg.kvs[lease.key(PREFIX).encode()]
    assert stored.key.decode() == (f"{PREFIX}/subnets/{lease.subnet.network_address}-24&"
                                   f"{lease.ipv6_subnet.network_address}-64")
    assert b'"PublicIPv6":"fd00:198::1"' in stored.value
    assert reg.lease_of(lease.subnet, lease.ipv6_subnet) == lease


async def test_dual_stack_restart_keeps_both_subnets(reg):
    first = await node6(reg, DUAL).m.acquire()
    again = await node6(reg, DUAL).m.acquire()  # the same node, restarted: its key is there
    assert (again.subnet, again.ipv6_subnet) == (first.subnet, first.ipv6_subnet)
    assert again.lease_id != first.lease_id and first.lease_id not in reg.live_leases()
    # The key is gone too (expired while the node was down): the subnet file's two subnets.
    reg.expire(again.lease_id)
    third = await node6(reg, DUAL).m.acquire(first.subnet, first.ipv6_subnet)
    assert (third.subnet, third.ipv6_subnet) == (first.subnet, first.ipv6_subnet)
    assert len(reg.kvs) == 1


async def test_a_lost_dual_stack_key_is_taken_again_with_both_subnets(reg):
    node = node6(reg, DUAL)
    first = await node.start()
    reg.delete_raw(first.key(PREFIX))
    await until(lambda: node.m.holds_subnet() and node.programmed)
    got = node.m.lease
    assert (got.subnet, got.ipv6_subnet) == (first.subnet, first.ipv6_subnet)
    assert reg.orphaned_leases() == set()
    await node.stop()


async def test_two_ipv6_only_nodes_never_share_a_lease(reg):
    a = node6(reg, V6ONLY, ip="0.0.0.0", ip6="fd00:198::1")
    b = node6(reg, V6ONLY, ip="0.0.0.0", ip6="fd00:198::2")
    la = await a.start()
    lb = await b.start()
    assert la.key_name != lb.key_name and la.ipv6_subnet != lb.ipv6_subnet
    assert la.key_name.startswith("0.0.0.0-0&") and lb.subnet == la.subnet
    await until(lambda: lb.key_name in a.m.peers and la.key_name in b.m.peers)
    # b restarts: it takes back its own key, not a's (which also says PublicIP 0.0.0.0).
    await b.stop()
    b2 = node6(reg, V6ONLY, ip="0.0.0.0", ip6="fd00:198::2")
    assert (await b2.m.acquire()).key_name == lb.key_name
    assert a.m.holds_subnet() and a.m.lease.key_name == la.key_name
    await a.stop()


async def test_ipv6_only_peers_are_told_apart_by_key_name(reg):
    node = node6(reg, DUAL)
    await node.start()
    for i in (5, 6):
        reg.put_lease_raw(NO_IPV4_SUBNET, attrs6("0.0.0.0", f"fd00:198::{i}"),
                          ipv6_subnet=IPv6Network(f"fc00:10:1:{i}::/64"))
    await settle()
    names = {"0.0.0.0-0&fc00:10:1:5::-64", "0.0.0.0-0&fc00:10:1:6::-64"}
    assert names <= set(node.m.peers)
    reg.delete_raw(f"{PREFIX}/subnets/0.0.0.0-0&fc00:10:1:5::-64")
    await settle()
    assert "0.0.0.0-0&fc00:10:1:5::-64" not in node.m.peers
    assert "0.0.0.0-0&fc00:10:1:6::-64" in node.m.peers
    await node.stop()


async def test_an_ipv4_only_node_never_takes_an_ipv6_only_lease_as_a_peer(reg, caplog):
    node = Node(reg)
    await node.start()
    reg.put_lease_raw(NO_IPV4_SUBNET, attrs6("0.0.0.0", "fd00:198::5"),
                      ipv6_subnet=IPv6Network("fc00:10:1:5::/64"))
    reg.put_lease_raw(net("10.1.50.0/24"), attrs6("198.18.0.5", "fd00:198::50"),
                      ipv6_subnet=IPv6Network("fc00:10:1:50::/64"))
    await settle()
    # 0.0.0.0/0 is never routed; the dual-stack peer is an IPv4 peer here.
    assert set(node.m.peers) == {"10.1.50.0-24&fc00:10:1:50::-64"}
    assert len(warnings_about(caplog, "0.0.0.0-0&fc00:10:1:5::-64")) == 1
    await node.stop()


async def test_a_peer_whose_ipv6_subnet_lies_outside_the_ipv6_network_is_ignored(reg, caplog):
    node = node6(reg, DUAL)
    await node.start()
    reg.put_lease_raw(net("10.1.50.0/24"), attrs6("198.18.0.5", "fd00:198::5"),
                      ipv6_subnet=IPv6Network("fc00:99::/64"))
    reg.put_lease_raw(net("10.1.51.0/24"), attrs6("198.18.0.6", "fd00:198::6"),
                      ipv6_subnet=IPv6Network("fc00:10:1:51::/120"))
    reg.put_lease_raw(net("10.1.52.0/24"), attrs("198.18.0.7"))  # not yet dual-stack
    await settle()
    assert set(node.m.peers) == {"10.1.52.0-24"}
    assert len(warnings_about(caplog, "outside the network config")) == 2
    await node.stop()


async def test_republishing_keeps_the_ipv6_subnet_and_its_key(reg):
    node = node6(reg, DUAL)
    first = await node.start()
    new = LeaseAttrs(ME, "vxlan", {"VNI": 1, "VtepMAC": "96:cd:e4:4f:c9:30"},
                     "fd00:198::1", {"VNI": 1, "VtepMAC": "5e:80:d2:17:9a:d2"})
    await node.m.republish(new)
    await settle()
    assert node.m.lease.ipv6_subnet == first.ipv6_subnet
    assert node.m.lease.key_name == first.key_name
    assert len(reg.kvs) == 1 and reg.lease_of(first.subnet, first.ipv6_subnet).attrs == new
    assert node.m.holds_subnet() and not node.torn_down
    await node.stop()


async def test_turning_ipv6_on_keeps_the_ipv4_subnet_in_a_dual_stack_key(reg):
    old = await Node(reg).m.acquire()  # an IPv4-only cluster
    node = node6(reg, DUAL)
    lease = await node.m.acquire(previous=old.subnet)  # restarted with the new config
    assert lease.subnet == old.subnet and lease.has_ipv6
    assert [k.decode() for k in reg.kvs] == [lease.key(PREFIX)]  # the old key is gone
    assert reg.orphaned_leases() == set() and old.lease_id not in reg.live_leases()


async def test_a_dual_stack_takeover_is_noticed_by_key_name(reg):
    node = node6(reg, DUAL)
    first = await node.start()
    reg.put_lease_raw(first.subnet, attrs6("198.18.0.2", "fd00:198::2"),
                      ipv6_subnet=first.ipv6_subnet)
    await until(lambda: node.m.holds_subnet() and node.m.lease.key_name != first.key_name)
    assert node.torn_down == [first.subnet]
    await node.stop()


async def test_an_ipv6_only_node_without_a_public_ipv6_is_told_it_cannot_find_its_lease(
        reg, caplog):
    node = Node(reg, V6ONLY, ip="0.0.0.0")  # attrs without PublicIPv6
    await node.m.acquire()
    await node.m.acquire()
    assert len(warnings_about(caplog, "publishes no PublicIPv6")) == 1
