"""One peer lease with an unusable field is left out with one warning naming it, and never
holds up the rest of the table, in every backend; and a table the fast path did not take
keeps the node unready until it is sent again and confirmed (issue 15, items 1 and 2)."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

import pytest

from pyflannel.backend.hostgw import HostGwBackend
from pyflannel.backend.udp import UdpBackend
from pyflannel.backend.vxlan import VxlanBackend
from pyflannel.config import parse_config
from pyflannel.daemon.core import Daemon
from pyflannel.fastpath.handle import FastPath, Installed, InstallError
from pyflannel.flags import Options
from pyflannel.host.netlink import ExternalInterface
from pyflannel.lease.manager import LeaseManager
from pyflannel.lease.memory import MemoryRegistry
from pyflannel.lease.model import Lease, LeaseAttrs

ME = IPv4Address("198.18.0.1")
EXT = ExternalInterface("eth0", 2, ME, ME, 1500)


def cfg(kind: str):
    return parse_config(f'{{"Network":"10.1.0.0/16","Backend":{{"Type":"{kind}"}}}}')


def peer(subnet: str, ip: str, kind: str, data: dict | None = None) -> Lease:
    return Lease(IPv4Network(subnet), LeaseAttrs(IPv4Address(ip), kind, data), 1)


@pytest.mark.parametrize("address", ["0.0.0.0", "127.0.0.1", "224.0.0.5", "255.255.255.255"])
async def test_udp_leaves_out_a_peer_whose_address_cannot_carry_traffic(address, caplog):
    be = UdpBackend(cfg("udp"), EXT)
    await be.add_peer(peer("10.1.2.0/24", address, "udp"))
    await be.add_peer(peer("10.1.3.0/24", "198.18.0.3", "udp"))
    assert [str(r.subnet) for r in be.routes()] == ["10.1.3.0/24"]
    be.routes()
    said = [r.getMessage() for r in caplog.records if "10.1.2.0/24" in r.getMessage()]
    assert len(said) == 1 and f"({address}) ignored" in said[0]
    assert list(be.peer_problems()) == ["10.1.2.0-24"]


@pytest.mark.parametrize("address", ["127.0.0.1", "224.0.0.5", "240.0.0.1"])
async def test_host_gw_routes_every_peer_but_one_whose_address_cannot_be_a_gateway(address):
    be = HostGwBackend(cfg("host-gw"), EXT)
    await be.add_peer(peer("10.1.2.0/24", address, "host-gw"))
    await be.add_peer(peer("10.1.3.0/24", "198.18.0.3", "host-gw"))
    assert [str(d) for d in be.desired_routes()] == ["10.1.3.0/24"]
    assert list(be.peer_problems()) == ["10.1.2.0-24"]


@pytest.mark.parametrize("mac", ["00:00:00:00:00:00", "01:00:5e:00:00:01", "zz:zz:zz:zz:zz:zz",
                                 "0a:58:0a:01", 7])
async def test_vxlan_programs_every_peer_but_one_without_a_unicast_vtep_mac(mac, caplog):
    """An all-zero MAC would even become the device's flood entry towards that host."""
    be = VxlanBackend(cfg("vxlan"), EXT)
    await be.add_peer(peer("10.1.2.0/24", "198.18.0.2", "vxlan", {"VNI": 1, "VtepMAC": mac}))
    await be.add_peer(peer("10.1.3.0/24", "198.18.0.3", "vxlan",
                           {"VNI": 1, "VtepMAC": "0a:58:0a:01:03:00"}))
    assert list(be._wanted_l2(be.v4)) == ["10.1.3.0-24"]
    assert list(be.peer_problems()) == ["10.1.2.0-24"]
    assert any("10.1.2.0/24 (198.18.0.2) ignored" in r.getMessage() and "VtepMAC" in
               r.getMessage() for r in caplog.records)


class QuietFastPath:
    """A fast path that takes tables but does not answer until told to."""

    route_rows = staticmethod(FastPath.route_rows)

    def __init__(self) -> None:
        self.tables: list[list] = []
        self.answering = False
        self.behind = False

    def alive(self) -> bool:
        return True

    def counters(self) -> dict[str, int]:
        return {}

    async def configure_async(self, local, icmp_src, routes, *rest) -> Installed:
        self.tables.append(list(routes))
        self.behind = not self.answering
        if self.behind:
            raise InstallError("no answer within 5s")
        return Installed(len(self.tables))


def udp_on(fastpath: QuietFastPath) -> UdpBackend:
    """A udp backend handing its tables to ``fastpath``; the host's routes are not these
    tests' business."""
    be = UdpBackend(cfg("udp"), EXT)
    be.fastpath = fastpath  # type: ignore[assignment]

    async def no_routes() -> None:
        return None

    be.reconcile = no_routes  # type: ignore[method-assign]
    return be


async def test_a_table_the_fast_path_did_not_confirm_keeps_the_node_unready_until_resent():
    reg = MemoryRegistry()
    daemon = Daemon(Options())
    be = udp_on(fastpath := QuietFastPath())
    manager = LeaseManager(reg, be.cfg, LeaseAttrs(ME, "udp"))
    daemon.backend, daemon.manager, daemon.cfg = be, manager, be.cfg
    lease = await manager.acquire()
    be.lease = lease
    manager.activated(lease)
    daemon.ready.set()
    await be.add_peer(peer("10.1.3.0/24", "198.18.0.3", "udp"))
    await be.commit()  # not answered
    assert not daemon.is_ready() and be.data_path_behind()
    assert b"pyflannel_data_path_behind 1.0" in daemon.metrics.render()
    fastpath.answering = True
    await be.reconcile_all()  # the reconciler sends it again
    assert len(fastpath.tables) == 2 and [str(r.subnet) for r in fastpath.tables[1]] == [
        "10.1.3.0/24"]
    assert daemon.is_ready() and b"pyflannel_data_path_behind 0.0" in daemon.metrics.render()


def test_status_marks_a_lease_that_repeats_another_s_key_and_one_ignored_here():
    from pyflannel.status import render_table, repeated_keys

    key, other = "KqXTRBS18BQQUQWR/h86beAeAsrtbn0Ive79VpUBGls=", "A" * 43 + "="
    leases = [peer("10.1.2.0/24", "198.18.0.2", "wireguard", {"PublicKey": key}),
              peer("10.1.9.0/24", "198.18.0.9", "wireguard", {"PublicKey": key}),
              peer("10.1.3.0/24", "198.18.0.3", "wireguard", {"PublicKey": other})]
    assert repeated_keys(leases) == {"10.1.2.0-24": ["10.1.9.0/24"],
                                     "10.1.9.0-24": ["10.1.2.0/24"]}

    def row(lease: Lease, ignored: str | None) -> dict:
        return {"key": lease.key_name, "subnet": str(lease.subnet), "ipv6_subnet": None,
                "public_ip": str(lease.attrs.public_ip), "public_ipv6": None,
                "backend": "wireguard", "backend_data": lease.attrs.backend_data,
                "backend_v6_data": None, "expires_in_s": 86000, "this_node": False,
                "counters": None, "ignored": ignored,
                "same_key_as": repeated_keys(leases).get(lease.key_name, [])}

    text = render_table([row(leases[0], None), row(leases[1], "it repeats a key"),
                         row(leases[2], "its BackendData.PublicKey is unusable")])
    lines = {line.split()[0]: line for line in text.splitlines()[1:]}
    assert lines["10.1.2.0/24"].endswith("<- same WireGuard key as 10.1.9.0/24")
    assert "<- ignored here: it repeats a key <- same WireGuard key as 10.1.2.0/24" in lines[
        "10.1.9.0/24"]
    assert lines["10.1.3.0/24"].endswith("<- ignored here: its BackendData.PublicKey is unusable")


class PickyFastPath(QuietFastPath):
    """A fast path that takes every table but its first row."""

    async def configure_async(self, local, icmp_src, routes, *rest) -> Installed:
        self.tables.append(list(routes))
        return Installed(len(self.tables), ((0, "ValueError: port out of range"),))


async def test_rows_the_fast_path_refused_are_named_once_and_the_table_sent_again(caplog):
    be = udp_on(fastpath := PickyFastPath())
    be.lease = peer("10.1.1.0/24", str(ME), "udp")
    await be.add_peer(peer("10.1.3.0/24", "198.18.0.3", "udp"))
    await be.commit()
    await be.reconcile_all()  # a table taken in part is sent again
    assert len(fastpath.tables) == 2 and be.refused_rows == {"flannel0": [
        "10.1.3.0/24 via 198.18.0.3"]}
    said = [r.getMessage() for r in caplog.records if "left out" in r.getMessage()]
    assert said == ["the fast path of flannel0 left out 10.1.3.0/24 via 198.18.0.3: "
                    "ValueError: port out of range"]
    assert not be.data_path_behind()


async def test_a_table_not_confirmed_before_the_reconciler_starts_is_sent_at_once(monkeypatch):
    import asyncio

    class NoMonitor:  # the host's netlink events are not this test's business
        def __init__(self, *args) -> None:
            pass

        def start(self) -> None:
            pass

        def stop(self) -> None:
            pass

    monkeypatch.setattr("pyflannel.backend.base.NetlinkMonitor", NoMonitor)
    be = udp_on(fastpath := QuietFastPath())
    be.lease = peer("10.1.1.0/24", str(ME), "udp")
    await be.commit()  # at start-up, before the reconciler runs: not answered
    fastpath.answering = True
    reconciler = asyncio.create_task(be.run())
    try:
        for _ in range(100):  # 1 s, where the periodic check comes only after 10 s
            if not be.data_path_behind():
                break
            await asyncio.sleep(0.01)
        assert not be.data_path_behind() and len(fastpath.tables) == 2
    finally:
        reconciler.cancel()
        await asyncio.gather(reconciler, return_exceptions=True)
