"""What the daemon may touch on a host, and when: only its own routes, only from snapshots
taken on the loop, and nothing at all before it knows it can hand its subnet over.

Each kernel test runs in a private network namespace (``unshare --net``), so the root
namespace gets no routes and nothing is left behind.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from pyflannel.lease.model import Lease, LeaseAttrs
from tests.conftest import _need

ROOT = Path(__file__).resolve().parents[1]


def in_private_netns(script: str) -> subprocess.CompletedProcess:
    _need(None if shutil.which("unshare") else "unshare (util-linux) not installed")
    return subprocess.run(["unshare", "--net", sys.executable, "-c", textwrap.dedent(script)],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)


def test_an_operators_route_to_the_network_is_never_taken_over_or_deleted():
    out = in_private_netns("""
        import subprocess
        from ipaddress import IPv4Address, IPv4Network
        from pyflannel.host.routes import RouteSpec, sync_routes
        from pyroute2 import IPRoute
        sh = lambda *a: subprocess.run(a, check=True)
        sh("ip", "link", "add", "op0", "type", "veth", "peer", "name", "op1")
        sh("ip", "link", "add", "tun9", "type", "veth", "peer", "name", "tun8")
        for dev in ("lo", "op0", "op1", "tun9", "tun8"):
            sh("ip", "link", "set", dev, "up")
        sh("ip", "route", "add", "10.1.0.0/16", "dev", "op0", "proto", "static")
        with IPRoute() as ipr:
            tun = ipr.link_lookup(ifname="tun9")[0]
            op = ipr.link_lookup(ifname="op0")[0]
        net = IPv4Network("10.1.0.0/16")
        added, removed, errors = sync_routes({net: RouteSpec(net, tun)})
        print("errors", len(errors), errors[0] if errors else "")
        sync_routes({})  # a later reconcile that wants nothing must not delete it either
        show = subprocess.run(["ip", "route", "show", "10.1.0.0/16"], capture_output=True,
                              text=True).stdout
        print("route", show.strip())
        # flanneld's own route, equal to what we want, is adopted when switching daemon
        sh("ip", "route", "add", "10.2.0.0/16", "dev", "tun9", "scope", "link")
        other = IPv4Network("10.2.0.0/16")
        print("adopt", sync_routes({other: RouteSpec(other, tun)}))
        print("ours", subprocess.run(["ip", "route", "show", "proto", "120"],
                                     capture_output=True, text=True).stdout.strip())
    """)
    assert out.returncode == 0, out.stderr
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines())
    assert lines["errors"].startswith("1 10.1.0.0/16: a route to it exists and is not pyflannel's")
    assert "dev op0" in lines["route"] and "proto static" in lines["route"]
    assert lines["adopt"].startswith("(1, 0, [])")
    assert lines["ours"] == "10.2.0.0/16 dev tun9 scope link"


def test_vxlan_programs_l2_from_a_snapshot_while_the_loop_changes_its_peers(monkeypatch):
    """The worker thread must never iterate the peer table the loop is changing."""
    from pyflannel.backend import vxlan
    from pyflannel.config import parse_config
    from pyflannel.host.netlink import ExternalInterface

    calls = []

    def slow(*args):  # a netlink call, slow enough for the loop to run meanwhile
        calls.append(args)
        time.sleep(0.002)

    for name in ("replace_fdb", "replace_neighbour", "delete_neighbour", "delete_fdb"):
        monkeypatch.setattr(vxlan.routes, name, slow)
    cfg = parse_config(b'{"Network":"10.1.0.0/16","Backend":{"Type":"vxlan"}}')
    ext = ExternalInterface("eth0", 2, IPv4Address("198.18.0.1"), IPv4Address("198.18.0.1"),
                            1500)
    backend = vxlan.VxlanBackend(cfg, ext)
    backend.index = 7

    def peer(i: int) -> Lease:
        mac = f"0a:00:00:00:00:{i:02x}"
        return Lease(IPv4Network(f"10.1.{i}.0/24"),
                     LeaseAttrs(IPv4Address(f"198.18.1.{i}"), "vxlan", {"VNI": 1, "VtepMAC": mac}))

    async def churn_while_syncing() -> None:
        sync = asyncio.create_task(backend._sync_l2())
        for i in range(1, 200):
            key = getattr(peer(i), "key_name", peer(i).subnet)
            backend.peers[key] = peer(i)
            await asyncio.sleep(0)
            if i % 3 == 0:
                backend.peers.pop(key)
        await sync
        await backend._sync_l2()  # the next sync catches up with what changed

    errors: list[BaseException] = []
    threading.excepthook = lambda a: errors.append(a.exc_value)
    asyncio.run(churn_while_syncing())
    assert not errors
    assert set(backend.programmed) == set(backend.peers)


async def test_a_failed_watch_retires_its_own_client_not_the_current_one():
    from pyflannel.lease.etcd import EtcdRegistry, EtcdUnavailable

    reg = EtcdRegistry(["http://127.0.0.1:9"], "/coreos.com/network")
    failed, current = object(), object()
    reg._client = current  # another task moved on to a new client meanwhile
    with pytest.raises(EtcdUnavailable):
        await reg._watch_failed(failed, "watch", RuntimeError("stream reset"))
    assert reg._client is current
    assert failed in reg._retired and current not in reg._retired
    reg._retired.clear()


@pytest.mark.parametrize("path,why", [
    ("/etc/hostname/subnet.env", "Not a directory"),
    ("/tmp", "is a directory"),
])
def test_an_unusable_subnet_file_stops_the_daemon_before_it_touches_anything(path, why):
    out = in_private_netns(f"""
        import subprocess, sys, time
        start = time.monotonic()
        run = subprocess.run([sys.executable, "-m", "pyflannel", "run",
                              "-etcd-endpoints=http://127.0.0.1:9", "-subnet-file={path}"],
                             capture_output=True, text=True, timeout=30)
        links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
        print("rc", run.returncode)
        print("took", round(time.monotonic() - start, 1))
        print("links", len(links.splitlines()))
        print("stderr", run.stderr.strip().replace("\\n", "|"))
    """)
    assert out.returncode == 0, out.stderr
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines())
    assert lines["rc"] == "1"
    assert float(lines["took"]) < 10  # it never waited for etcd
    assert lines["links"] == "1"  # only lo: no device was made
    err = [x for x in lines["stderr"].split("|") if " E " in x or "ERROR" in x]
    assert len(err) == 1 and "-subnet-file" in err[0] and why.lower() in err[0].lower()
    assert "Traceback" not in lines["stderr"]


def test_concurrent_reconciles_never_mistake_their_own_route_for_an_operators():
    """A peer event and a netlink event reconcile at the same moment: both must see the
    kernel one after the other, or the second 'add' fails as if someone else's route."""
    out = in_private_netns("""
        import asyncio, logging, subprocess
        from ipaddress import IPv4Address, IPv4Network
        from pyflannel.backend.base import Backend
        from pyflannel.host.routes import RouteSpec
        from pyroute2 import IPRoute
        sh = lambda *a: subprocess.run(a, check=True)
        sh("ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth1")
        for dev in ("lo", "eth0", "eth1"):
            sh("ip", "link", "set", dev, "up")
        sh("ip", "addr", "add", "198.18.0.1/24", "dev", "eth0")
        with IPRoute() as ipr:
            idx = ipr.link_lookup(ifname="eth0")[0]
        said = []
        logging.getLogger("pyflannel.backend").addHandler(
            type("H", (logging.Handler,), {"emit": lambda self, r: said.append(r.getMessage())})())

        class Routes(Backend):
            type = "test"
            mtu = 1500
            want = {}
            async def prepare(self):
                return None
            def desired_routes(self):
                return dict(self.want)

        async def main():
            b = Routes.__new__(Routes)
            Backend.__init__(b, None, None)
            b.lease = object()
            for i in range(30):
                net = IPv4Network(f"10.1.{i}.0/24")
                b.want = {net: RouteSpec(net, idx, IPv4Address("198.18.0.77"))}
                await asyncio.gather(*(b.reconcile() for _ in range(6)))
            print("errors", sum("not pyflannel's" in m for m in said))
        asyncio.run(main())
    """)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "errors 0"
