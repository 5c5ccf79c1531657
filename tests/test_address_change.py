"""The node's address changes under the daemon: which address it uses, when a change
counts, and the lease republished with the new PublicIP, without namespaces."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from ipaddress import IPv4Address, IPv6Address

import pytest

from pyflannel.backend.hostgw import HostGwBackend
from pyflannel.config import parse_config
from pyflannel.daemon import Daemon, address_watch
from pyflannel.daemon.address_watch import AddressWatch
from pyflannel.flags import Options
from pyflannel.host.extaddr import Pins, Seen, judge, pick
from pyflannel.host.netlink import NO_IPV4, ExternalInterface
from pyflannel.lease.manager import LeaseManager
from pyflannel.lease.memory import MemoryRegistry
from pyflannel.lease.model import LeaseAttrs
from tests.test_lifecycle import Node, fast_retries, settle  # noqa: F401 - fixture

A1, A2, A3 = IPv4Address("198.18.0.1"), IPv4Address("198.18.0.51"), IPv4Address("198.18.0.52")
B1, B2 = IPv6Address("fd00:198::1"), IPv6Address("fd00:198::51")
ETH0 = ExternalInterface("eth0", 2, A1, A1, 1500)
ETH0_DUAL = replace(ETH0, address6=B1, public_ipv6=B1)
AUTO = Pins()
CFG = parse_config(b'{"Network": "10.1.0.0/16", "Backend": {"Type": "host-gw"}}')


def seen(*v4: IPv4Address, v6: tuple[IPv6Address, ...] = (), index: int = 2) -> Seen:
    return Seen("eth0", index, tuple(v4), v6)


def verdict(s: Seen | None, running=ETH0, pins=AUTO, v6=False, patterns=()):
    return judge(running, s, pins, want_ipv4=running.address != NO_IPV4, want_ipv6=v6,
                 patterns=patterns)


# -- which address is chosen ----------------------------------------------------------


def test_the_address_in_use_is_kept_while_the_interface_has_it():
    assert pick(A1, [A2, A1]) == A1


def test_when_it_is_gone_the_first_address_is_taken_or_the_first_matching_iface_regex():
    assert pick(A1, [A2, A3]) == A2
    assert pick(A1, [A2, A3], patterns=[r"198\.18\.0\.52"]) == A3
    assert pick(A1, [A2, A3], patterns=[r"10\."]) == A2
    assert pick(A1, []) is None


def test_pins_come_from_the_flags_that_name_an_address():
    assert Pins.from_flags(("eth0",)) == AUTO
    assert Pins.from_flags(public_ip="192.0.2.1").ipv4 == "-public-ip=192.0.2.1"
    assert Pins.from_flags(("198.18.0.1", "fd00:198::1")) == Pins(
        "-iface=198.18.0.1", "-iface=fd00:198::1")
    assert Pins.from_flags(public_ipv6="fd00::1") == Pins("", "-public-ipv6=fd00::1")


# -- when a change counts -------------------------------------------------------------


def test_a_second_address_added_as_dhcp_does_before_dropping_the_old_is_no_change():
    v = verdict(seen(A1, A2))
    assert v.kind == "same" and v.settled


def test_the_address_in_use_replaced_is_followed_with_the_new_public_ip():
    v = verdict(seen(A2))
    assert v.kind == "moved" and not v.settled
    assert v.ext == replace(ETH0, address=A2, public_ip=A2)
    assert "198.18.0.1 -> 198.18.0.51" in v.line


def test_no_address_left_or_no_interface_means_waiting_not_ready():
    assert verdict(seen()).kind == "waiting"
    gone = verdict(None)
    assert gone.kind == "waiting" and "eth0 is gone" in gone.line and not gone.settled


def test_the_interface_back_under_a_new_index_is_followed_even_with_the_same_address():
    v = verdict(seen(A1, index=9))
    assert v.kind == "moved" and v.ext == replace(ETH0, index=9)


def test_a_pinned_address_is_never_swapped_and_the_node_is_not_ready_until_it_is_back():
    pins = Pins.from_flags(public_ip=str(A1))
    v = verdict(seen(A2), pins=pins)
    assert v.kind == "pinned" and not v.settled and "-public-ip=198.18.0.1" in v.line
    assert verdict(seen(A2, A1), pins=pins).kind == "same"


def test_a_nat_public_ip_stays_published_when_only_the_interface_index_changes():
    nat = replace(ETH0, public_ip=IPv4Address("192.0.2.7"))
    v = verdict(seen(A1, index=5), running=nat, pins=Pins.from_flags(public_ip="192.0.2.7"))
    assert v.kind == "moved" and v.ext.public_ip == IPv4Address("192.0.2.7")


def test_ipv6_follows_on_its_own_and_an_ipv6_only_node_ignores_ipv4():
    v = verdict(seen(A1, v6=(B2,)), running=ETH0_DUAL, v6=True)
    assert v.kind == "moved" and (v.ext.address, v.ext.address6) == (A1, B2)
    assert v.ext.public_ipv6 == B2
    v6only = replace(ETH0_DUAL, address=NO_IPV4, public_ip=NO_IPV4)
    assert verdict(seen(v6=(B1,)), running=v6only, v6=True).kind == "same"
    assert verdict(seen(v6=()), running=v6only, v6=True).kind == "waiting"


def test_an_ipv4_only_node_ignores_ipv6_changes():
    assert verdict(seen(A1, v6=(B2,)), running=ETH0_DUAL, v6=False).kind == "same"


# -- the watch carries the verdicts out -----------------------------------------------


class FakeHost:
    """What read_interface returns, and a follow that records or fails."""

    def __init__(self) -> None:
        self.now: Seen | None = seen(A1)
        self.followed: list[ExternalInterface] = []
        self.fail = 0

    def read(self, name: str) -> Seen | None:
        assert name == "eth0"
        return self.now

    async def follow(self, ext: ExternalInterface) -> None:
        if self.fail:
            self.fail -= 1
            raise OSError("cannot bind udp 198.18.0.51 port 8285")
        self.followed.append(ext)


@pytest.fixture
def host(monkeypatch) -> FakeHost:
    fake = FakeHost()
    monkeypatch.setattr(address_watch, "read_interface", fake.read)
    return fake


def watch(host: FakeHost, pins=AUTO) -> AddressWatch:
    return AddressWatch(ETH0, pins, host.follow, want_ipv4=True, want_ipv6=False)


async def test_a_followed_change_is_not_ready_until_it_worked_and_retried_until_then(
        host, caplog):
    caplog.set_level(logging.INFO)
    w = watch(host)
    host.now, host.fail = seen(A2), 1
    await w.check()
    assert not w.settled and not host.followed
    await w.check()
    assert w.settled and host.followed == [replace(ETH0, address=A2, public_ip=A2)]
    assert w.running.address == A2
    await w.check()
    assert len(host.followed) == 1, "no change: nothing more to do"
    said = [r.getMessage() for r in caplog.records if "198.18.0.1 -> 198.18.0.51" in
            r.getMessage()]
    assert len(said) == 1, said


async def test_a_vanished_interface_is_waited_for_with_one_line(host, caplog):
    w = watch(host)
    host.now = None
    for _ in range(3):
        await w.check()
    assert not w.settled and not host.followed
    assert len([r for r in caplog.records if "eth0 is gone" in r.getMessage()]) == 1
    host.now = seen(A1, index=7)
    await w.check()
    assert w.settled and host.followed[-1].index == 7


async def test_a_pinned_address_gone_and_back_is_not_ready_then_ready_without_following(
        host, caplog):
    w = watch(host, Pins.from_flags(public_ip=str(A1)))
    host.now = seen(A2)
    await w.check()
    await w.check()
    assert not w.settled
    assert len([r for r in caplog.records if "-public-ip=198.18.0.1" in r.getMessage()]) == 1
    host.now = seen(A2, A1)
    await w.check()
    assert w.settled and not host.followed


# -- the lease republished through the registry ---------------------------------------


async def test_the_lease_is_republished_with_the_new_public_ip_and_stays_ours():
    reg = MemoryRegistry()
    node = Node(reg)
    first = await node.start()
    moved = LeaseAttrs(A2, "udp")
    # A re-list that reads etcd before the new PublicIP lands there (the watch restarts
    # when the daemon reconnects from its new address) must not take our key for lost.
    reg.before("put_lease", node.m.resync)
    await node.m.republish(moved)
    await settle()
    assert reg.lease_of(first.subnet).attrs == moved
    assert node.m.lease.attrs == moved and node.m.lease.subnet == first.subnet
    await node.m.resync()
    assert node.m.holds_subnet() and not node.torn_down and not node.m.peers
    await asyncio.sleep(0)
    await node.stop()


# -- the daemon: readiness, and the move carried out end to end in memory -------------


class QuietHostGw(HostGwBackend):
    """host-gw without the kernel: routes are only computed."""

    async def reconcile(self) -> None:
        self.routes = self.desired_routes()


async def test_the_daemon_is_not_ready_while_moving_and_republishes_the_new_public_ip(host):
    reg = MemoryRegistry()
    daemon = Daemon(Options())
    daemon.registry = reg  # type: ignore[assignment]
    backend = QuietHostGw(CFG, ETH0)
    manager = LeaseManager(reg, CFG, LeaseAttrs(A1, "host-gw"))
    daemon.backend, daemon.cfg, daemon.manager = backend, CFG, manager
    lease = await manager.acquire()
    manager.activated(lease)
    daemon.ready.set()
    daemon.address_watch = w = AddressWatch(ETH0, AUTO, daemon.follow_address,
                                            want_ipv4=True, want_ipv6=False)
    assert daemon.is_ready()
    host.now = seen()  # the old address removed, the new one not there yet
    await w.check()
    assert not daemon.is_ready()
    host.now = seen(A2, index=3)
    await w.check()
    assert daemon.is_ready() and backend.ext == replace(ETH0, index=3, address=A2, public_ip=A2)
    assert reg.lease_of(lease.subnet).attrs == LeaseAttrs(A2, "host-gw")
    assert manager.lease.subnet == lease.subnet and manager.holds_subnet()
