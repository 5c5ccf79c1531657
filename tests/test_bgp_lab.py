"""The bgp backend against real BGP speakers: BIRD 2 as a top-of-rack router and GoBGP.

One lab for the module: three nodes (mesh), BIRD at .201 peering over eBGP with every node
(and announcing what nobody may install), gobgpd at .202 (iBGP) and .203 (eBGP), a second
BIRD at .204 that only n1 has the right TCP MD5 password for, and at .205 a small speaker
built on pyflannel's codec that establishes with n1 and then sends what it must not. A host
behind the router, on its own link, stands for the data centre.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time

import pytest

from pyflannel.lab import Lab
from tests.labtools import (
    CONFIG_KEY,
    metric,
    pods_ping_every_ordered_pair,
    require_lab,
    restart_node,
    start_node,
    status_json,
    wait_until,
)

pytestmark = pytest.mark.lab

TOR, GOBGP_I, GOBGP_E, BIRD_PW = "198.18.0.201", "198.18.0.202", "198.18.0.203", "198.18.0.204"
HOSTILE = "198.18.0.205"  # a configured peer that turns hostile once Established
CONFIG = {"Network": "10.1.0.0/16", "Backend": {
    "Type": "bgp", "HoldTime": 9, "KeepaliveTime": 3, "GracefulRestartTime": 5,
    "Peers": [{"PeerIP": TOR, "ASNumber": 64600},
              {"PeerIP": GOBGP_I, "ASNumber": 64512},
              {"PeerIP": GOBGP_E, "ASNumber": 64700},
              {"PeerIP": BIRD_PW, "ASNumber": 64600, "Password": "right"},
              {"PeerIP": HOSTILE, "ASNumber": 64800}]}}

BIRD_CONF = """
router id {me};
protocol device {{ }}
protocol kernel {{ ipv4 {{ import none; export where source = RTS_BGP; }}; merge paths on; }}
protocol static hostile {{
  ipv4;
  route 192.168.77.0/24 blackhole;  # outside the Network
  route 10.1.0.0/16 blackhole;      # an aggregate of the Network
  {own}
}}
template bgp node {{
  local {me} as 64600;
  hold time 9; keepalive time 3;
  graceful restart on; graceful restart time 3;
  ipv4 {{ import all; export all; }};
}}
{neighbors}
"""

GOBGP_CONF = """
[global.config]
  as = {asn}
  router-id = "{me}"
  local-address-list = ["{me}"]
{neighbors}
"""
GOBGP_NEIGHBOR = """
[[neighbors]]
  [neighbors.config]
    neighbor-address = "{ip}"
    peer-as = 64512
  [neighbors.timers.config]
    hold-time = 9
    keepalive-interval = 3
  [[neighbors.afi-safis]]
    [neighbors.afi-safis.config]
      afi-safi-name = "ipv4-unicast"
"""


class Router:
    """A BGP daemon in its own lab namespace, stopped by PID at teardown."""

    def __init__(self, lab: Lab, name: str, ip: str) -> None:
        self.lab, self.ip = lab, ip
        self.ns = lab.add_host(name, ip)
        self.dir = lab.workdir / name
        self.dir.mkdir()
        self.proc: subprocess.Popen | None = None


class Bird(Router):
    def start(self, neighbors: str, own: str = "") -> None:
        self.write(neighbors, own)
        self.sock = str(self.dir / "bird.ctl")
        log = open(self.dir / "bird.log", "ab")  # noqa: SIM115
        self.proc = self.lab.popen(self.ns, ["bird", "-f", "-c", str(self.dir / "bird.conf"),
                                             "-s", self.sock, "-P", str(self.dir / "bird.pid")],
                                   stdout=log, stderr=log)
        wait_until(lambda: (self.dir / "bird.ctl").exists() or self.proc.poll() is not None,
                   10, "bird's control socket")
        assert self.proc.poll() is None, (self.dir / "bird.log").read_text()

    def write(self, neighbors: str, own: str = "") -> None:
        (self.dir / "bird.conf").write_text(BIRD_CONF.format(me=self.ip, own=own,
                                                             neighbors=neighbors))

    def birdc(self, *args: str) -> str:
        return self.lab.run(self.ns, ["birdc", "-s", self.sock, *args], text=True).stdout

    def established(self, name: str) -> bool:
        return "Established" in self.birdc("show", "protocols", name)


class GoBgp(Router):
    def start(self, asn: int, nodes: list[str]) -> None:
        conf = self.dir / "gobgpd.toml"
        conf.write_text(GOBGP_CONF.format(asn=asn, me=self.ip, neighbors="".join(
            GOBGP_NEIGHBOR.format(ip=ip) for ip in nodes)))
        log = open(self.dir / "gobgpd.log", "ab")  # noqa: SIM115
        self.proc = self.lab.popen(self.ns, ["gobgpd", "-f", str(conf), "-t", "toml",
                                             "--api-hosts", "127.0.0.1:50051"],
                                   stdout=log, stderr=log)

    def gobgp(self, *args: str) -> object:
        out = self.lab.run(self.ns, ["gobgp", "-u", "127.0.0.1", "-p", "50051", "-j", *args],
                           check=False, text=True)
        return json.loads(out.stdout) if out.returncode == 0 and out.stdout.strip() else None

    def rib(self) -> dict[str, str]:
        """prefix -> next hop of gobgpd's best paths."""
        out = {}
        for prefix, paths in (self.gobgp("global", "rib", "-a", "ipv4") or {}).items():
            for path in paths:
                if path.get("best"):
                    hop = next((a["nexthop"] for a in path["attrs"] if a.get("type") == 3), "")
                    out[prefix] = hop
        return out


HOSTILE_SPEAKER = r"""
import select, socket, sys, time
from ipaddress import IPv4Address, IPv4Network
from pyflannel.bgp.attributes import AS_SEQUENCE, AsPathSegment, CodecOptions, PathAttributes
from pyflannel.bgp.messages import (Capabilities, Keepalive, Notification, Open, Update,
                                    decode, encode, split_stream)

me, node, log_path, bound = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
end = time.monotonic() + bound  # never outlives its test, whatever happens
opts = CodecOptions(four_octet_as=True, ibgp=False)
log = open(log_path, "a", buffering=1)
server = socket.create_server((me, 179))
while True:  # the other nodes also connect: only n1's connection is kept
    server.settimeout(max(0.1, end - time.monotonic()))
    conn, peer = server.accept()
    if peer[0] == node:
        break
    conn.close()
conn.settimeout(5)
conn.sendall(encode(Open(64800, 9, IPv4Address(me), Capabilities(
    multiprotocol=((1, 1),), four_octet_as=True)), opts))
buffer, seen = b"", set()
while not {"Open", "Keepalive"} <= seen:
    buffer += conn.recv(4096)
    messages, buffer = split_stream(buffer)
    seen.update(type(decode(m, opts)).__name__ for m in messages)
conn.sendall(encode(Keepalive(), opts))
log.write("established\n")
last_keepalive = time.monotonic()
while time.monotonic() < end:
    ready, _, _ = select.select([conn, sys.stdin], [], [], 1)
    if time.monotonic() - last_keepalive > 2:
        conn.sendall(encode(Keepalive(), opts))
        last_keepalive = time.monotonic()
    if sys.stdin in ready:
        command = sys.stdin.readline().split()
        if command[:1] == ["update"]:  # ORIGIN 7 does not exist: RFC 7606 treat-as-withdraw
            attrs = PathAttributes(origin=7, as_path=(AsPathSegment(AS_SEQUENCE, (64800,)),),
                                   next_hop=IPv4Address(me))
            conn.sendall(encode(Update(attributes=attrs, nlri=(IPv4Network(command[1]),)), opts))
            log.write("sent update\n")
        elif command[:1] == ["marker"]:  # a KEEPALIVE whose marker is not all ones
            conn.sendall(b"\xfe" * 16 + bytes((0, 19, 4)))
            log.write("sent marker\n")
    if conn in ready:
        data = conn.recv(65536)
        if not data:
            log.write("closed\n")
            break
        buffer += data
        messages, buffer = split_stream(buffer)
        for m in messages:
            msg = decode(m, opts)
            if isinstance(msg, Notification):
                log.write(f"notification {msg.code}/{msg.subcode}\n")
"""


class HostilePeer:
    """A configured eBGP peer (AS 64800) that n1 connects to: it establishes with pyflannel's
    own codec, then sends what it is told on stdin; what it sees goes to its log."""

    def __init__(self, lab: Lab, node_ip: str) -> None:
        self.lab = lab
        self.ns = lab.add_host("hostile", HOSTILE)
        self.log = lab.workdir / "hostile.log"
        self.log.touch()
        self.proc = lab.popen(self.ns, [sys.executable, "-c", HOSTILE_SPEAKER, HOSTILE,
                                        node_ip, str(self.log), "300"],
                              stdin=subprocess.PIPE,
                              stderr=open(lab.workdir / "hostile.err", "ab"))  # noqa: SIM115

    def send(self, command: str) -> None:
        self.proc.stdin.write(f"{command}\n".encode())
        self.proc.stdin.flush()

    def saw(self, line: str) -> bool:
        return line in self.log.read_text().splitlines()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()  # by PID: the Popen we started
        self.proc.wait(5)


def behind_router(lab: Lab, tor: Router) -> str:
    """A namespace on its own link (198.19.5.0/24) behind the router: the data centre."""
    ns = f"{lab.prefix}-dc"
    lab._add_ns(ns)  # noqa: SLF001 - the lab has no helper for a second link yet
    lab._ip(tor.ns, "link", "add", "dc0", "type", "veth", "peer", "name", "eth0", "netns", ns)  # noqa: SLF001
    lab._ip(tor.ns, "addr", "add", "198.19.5.1/24", "dev", "dc0")  # noqa: SLF001
    lab._ip(tor.ns, "link", "set", "dc0", "up")  # noqa: SLF001
    lab._ip(ns, "link", "set", "lo", "up")  # noqa: SLF001
    lab._ip(ns, "addr", "add", "198.19.5.2/24", "dev", "eth0")  # noqa: SLF001
    lab._ip(ns, "link", "set", "eth0", "up")  # noqa: SLF001
    lab._ip(ns, "route", "add", "default", "via", "198.19.5.1")  # noqa: SLF001
    lab.run(tor.ns, ["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])
    return ns


def neighbors(nodes, template: str = "node", password: dict | None = None) -> str:
    out = []
    for n in nodes:
        pw = f'password "{password[n.name]}";' if password and n.name in password else ""
        out.append(f"protocol bgp {n.name} from {template} {{ neighbor {n.underlay_ip} "
                   f"as 64512; {pw} }}")
    return "\n".join(out)


@pytest.fixture(scope="module")
def cluster():
    require_lab()
    with Lab(3) as lab:
        lab.etcdctl("put", CONFIG_KEY, json.dumps(CONFIG))
        tor = Bird(lab, "tor", TOR)
        tor.start(neighbors(lab.nodes))
        bird_pw = Bird(lab, "birdpw", BIRD_PW)
        bird_pw.start(neighbors(lab.nodes[:2], password={"n1": "right", "n2": "wrong"}))
        gobgp_i, gobgp_e = GoBgp(lab, "gobgpi", GOBGP_I), GoBgp(lab, "gobgpe", GOBGP_E)
        gobgp_i.start(64512, [n.underlay_ip for n in lab.nodes])
        gobgp_e.start(64700, [n.underlay_ip for n in lab.nodes])
        hostile = HostilePeer(lab, lab.nodes[0].underlay_ip)
        dc = behind_router(lab, tor)
        for n in lab.nodes:  # the nodes' way back to the data centre
            lab.run(n.ns, ["ip", "route", "add", "198.19.5.0/24", "via", TOR])
        nodes = {n.name: start_node(lab, n) for n in lab.nodes}
        yield lab, nodes, tor, bird_pw, gobgp_i, gobgp_e, dc, hostile
        hostile.stop()


def kernel_routes(lab: Lab, ns: str) -> dict[str, str]:
    out = {}
    for r in json.loads(lab.run(ns, ["ip", "-j", "route"], text=True).stdout):
        if r["dst"].startswith("10.1.") and r.get("dev") != "docker0":
            out[r["dst"]] = r.get("gateway", "")
    return out


def test_top_of_rack_bird_learns_every_subnet_with_its_node_as_next_hop(cluster):
    lab, nodes, tor, *_ = cluster
    want = {n.network: n.lab_node.underlay_ip for n in nodes.values()}
    wait_until(lambda: all(tor.established(name) for name in nodes), 15, "BIRD sessions")
    wait_until(lambda: kernel_routes(lab, tor.ns) == want, 10, f"BIRD routes {want}")


def test_a_host_behind_the_router_pings_every_nodes_docker0(cluster):
    lab, nodes, tor, _pw, _gi, _ge, dc, _hostile = cluster
    for n in nodes.values():
        wait_until(lambda n=n: lab.ping(dc, n.gw), 15, f"dc -> {n.lab_node.name}")


def test_pods_ping_every_ordered_pair_over_the_mesh_without_a_device(cluster):
    lab, nodes, *_ = cluster
    pods_ping_every_ordered_pair(lab, list(nodes.values()))
    for a in nodes.values():
        routes = kernel_routes(lab, a.lab_node.ns)
        assert routes == {b.network: b.lab_node.underlay_ip for b in nodes.values()
                          if b is not a}, routes
        links = json.loads(lab.run(a.lab_node.ns, ["ip", "-j", "link"], text=True).stdout)
        assert {link["ifname"] for link in links} == {"lo", "eth0", "docker0"}
        assert lab.wait_subnet_file(a.lab_node)["FLANNEL_MTU"] == "1500"  # the external MTU


def test_gobgp_as_ibgp_and_ebgp_peer_learns_every_node(cluster):
    _lab, nodes, _tor, _pw, gobgp_i, gobgp_e, *_ = cluster
    want = {n.network: n.lab_node.underlay_ip for n in nodes.values()}
    for g in (gobgp_i, gobgp_e):
        wait_until(lambda g=g: g.rib() == want, 20, f"gobgpd {g.ip} rib {want}")


def test_hostile_prefixes_are_counted_never_installed_and_sessions_stay(cluster):
    lab, nodes, tor, *_ = cluster
    n1 = nodes["n1"]
    # Now BIRD also announces n1's own subnet (BIRD sends a route with the peer's own
    # address as next hop back to it only when it is not that: a blackhole will do).
    tor.write(neighbors(lab.nodes), own=f"route {n1.network} blackhole;")
    assert "Reconfigured" in tor.birdc("configure")
    try:
        hostile_prefixes_are_refused(lab, nodes, tor, n1)
    finally:
        tor.write(neighbors(lab.nodes))
        tor.birdc("configure")


def hostile_prefixes_are_refused(lab, nodes, tor, n1) -> None:
    def refused() -> dict:
        rows = [r for r in status_json(lab, n1.lab_node) if r.get("bgp_peer") == TOR]
        return rows[0]["refused"] if rows else {}

    wait_until(lambda: {"outside_network", "wrong_length", "own_subnet"} <= set(refused()),
               15, "the refusals to be counted")
    assert refused()["outside_network"] == 1, refused()
    assert all(tor.established(name) for name in nodes)
    assert metric(lab, n1.lab_node, "pyflannel_bgp_prefixes_refused_total", peer=TOR,
                  reason="own_subnet") == 1
    # n1: two mesh sessions, BIRD, both gobgpd, the BIRD with its password, the hostile peer.
    assert metric(lab, n1.lab_node, "pyflannel_bgp_sessions_established") == 7
    for n in nodes.values():
        routes = kernel_routes(lab, n.lab_node.ns)
        assert "10.1.0.0/16" not in routes and n.network not in routes
        out = lab.run(n.lab_node.ns, ["ip", "route", "show", "192.168.77.0/24"], text=True)
        assert out.stdout.strip() == ""


GARBAGE = r"""
import socket, sys
s = socket.create_connection((sys.argv[1], 179), 5)
s.sendall(bytes(64) + b"GET / HTTP/1.0\r\n\r\n")
s.settimeout(5)
try:
    print("closed" if s.recv(100) == b"" else "answered")
except ConnectionResetError:
    print("closed")  # closed with our garbage unread: a reset
"""


def test_garbage_on_port_179_from_a_stranger_is_closed_and_sessions_stay(cluster):
    lab, nodes, tor, _pw, gobgp_i, _ge, dc, _hostile = cluster
    n1 = nodes["n1"]
    out = lab.run(dc, [sys.executable, "-c", GARBAGE, n1.lab_node.underlay_ip], text=True)
    assert out.stdout.strip() == "closed"
    assert all(tor.established(name) for name in nodes)
    sessions = {r["peer"]: r["state"] for r in status_json(lab, n1.lab_node) if "bgp_peer" in r}
    assert sessions[TOR] == sessions[GOBGP_I] == "Established", sessions


def test_passwords_right_and_wrong(cluster):
    lab, nodes, _tor, bird_pw, *_ = cluster
    wait_until(lambda: bird_pw.established("n1"), 15, "n1 with the right password")
    rows = [r for r in status_json(lab, nodes["n2"].lab_node) if r.get("bgp_peer") == BIRD_PW]
    assert rows and rows[0]["state"] != "Established"
    assert not bird_pw.established("n2")
    wait_until(lambda: "password" in ([r for r in status_json(lab, nodes["n2"].lab_node)
                                       if r.get("bgp_peer") == BIRD_PW][0]["hint"]), 15,
               "n2's status to name the password")


def test_a_restart_of_pyflanneld_loses_at_most_a_packet(cluster):
    """Graceful restart, restarting side: BIRD keeps n3's route while n3's daemon restarts,
    n3 keeps its kernel routes, and a host pinging n3's docker0 every 0.1 s sees no gap."""
    lab, nodes, tor, _pw, _gi, _ge, dc, _hostile = cluster
    n3 = nodes["n3"]
    wait_until(lambda: lab.ping(dc, n3.gw), 15, "dc -> n3 before the restart")
    ping = lab.popen(dc, ["ping", "-n", "-q", "-i", "0.1", "-c", "50", "-W", "1", n3.gw],
                     stdout=subprocess.PIPE)
    time.sleep(0.5)
    lab.stop_daemon(n3.lab_node)
    restart_node(lab, n3.lab_node)
    wait_until(lambda: tor.established("n3"), 15, "BIRD's session with n3 again")
    out = ping.communicate(timeout=30)[0].decode()
    sent, received = (int(x) for x in re.findall(r"(\d+) packets transmitted, (\d+) received",
                                                 out)[0])
    assert sent == 50 and sent - received <= 1, out
    routes = kernel_routes(lab, n3.lab_node.ns)
    assert routes == {b.network: b.lab_node.underlay_ip for b in nodes.values()
                      if b is not n3}, routes


def test_a_killed_peers_routes_stay_until_its_restart_time(cluster):
    """Graceful restart, helper side: BIRD (restart time 3 s) announces a subnet to n1 and is
    killed; n1 keeps the route as stale, then removes it when the restart time runs out."""
    lab, nodes, _tor, bird_pw, *_ = cluster
    n1 = nodes["n1"]
    taken = {n.network for n in nodes.values()}
    spare = next(f"10.1.{i}.0/24" for i in range(250, 1, -1) if f"10.1.{i}.0/24" not in taken)
    bird_pw.write(neighbors(lab.nodes[:2], password={"n1": "right", "n2": "wrong"}),
                  own=f"route {spare} blackhole;")
    assert "Reconfigured" in bird_pw.birdc("configure")
    wait_until(lambda: kernel_routes(lab, n1.lab_node.ns).get(spare) == BIRD_PW, 10,
               f"n1 to learn {spare} from BIRD")
    bird_pw.proc.send_signal(signal.SIGKILL)
    bird_pw.proc.wait(5)
    killed = time.monotonic()
    time.sleep(1.5)
    assert kernel_routes(lab, n1.lab_node.ns).get(spare) == BIRD_PW  # kept, stale
    wait_until(lambda: spare not in kernel_routes(lab, n1.lab_node.ns), 10,
               "the stale route to go")
    assert 2.5 < time.monotonic() - killed < 6
    assert metric(lab, n1.lab_node, "pyflannel_bgp_graceful_restart_events_total",
                  peer=BIRD_PW, event="stale_swept") == 1


def test_a_hostile_peer_over_tcp_costs_only_its_own_session(cluster):
    """A configured peer, Established over real TCP, sends an UPDATE whose ORIGIN does not
    exist (RFC 7606: treat as withdraw, the session stays), then a header with a bad marker
    (RFC 4271 6.1: NOTIFICATION 1/1, that session closes). n1 counts both, installs nothing,
    and its sessions with BIRD, gobgpd and the mesh stay Established throughout."""
    lab, nodes, tor, _pw, gobgp_i, gobgp_e, _dc, hostile = cluster
    n1 = nodes["n1"]
    taken = {n.network for n in nodes.values()}
    target = next(f"10.1.{i}.0/24" for i in range(249, 1, -1) if f"10.1.{i}.0/24" not in taken)
    others = {n.lab_node.underlay_ip for n in nodes.values() if n is not n1} | {TOR, GOBGP_I,
                                                                               GOBGP_E}

    def row() -> dict:
        return next(r for r in status_json(lab, n1.lab_node) if r.get("bgp_peer") == HOSTILE)

    def others_established() -> None:
        states = {r["peer"]: r["state"] for r in status_json(lab, n1.lab_node)
                  if r.get("bgp_peer") in others}
        assert set(states) == others and set(states.values()) == {"Established"}, states
        assert all(tor.established(name) for name in nodes)

    wait_until(lambda: hostile.saw("established") and row()["state"] == "Established", 15,
               "the hostile peer's session")
    hostile.send(f"update {target}")
    wait_until(lambda: row()["refused"].get("treat_as_withdraw") == 1, 10,
               "the malformed UPDATE to be counted")
    assert row()["state"] == "Established"  # treat-as-withdraw keeps the session
    others_established()
    hostile.send("marker")
    wait_until(lambda: hostile.saw("notification 1/1"), 10, "NOTIFICATION 1/1 for the marker")
    wait_until(lambda: row()["notifications_out"] == {"1/1": 1}, 10,
               "n1's status to count the NOTIFICATION")
    assert metric(lab, n1.lab_node, "pyflannel_bgp_notifications_total", peer=HOSTILE,
                  direction="out", code="1/1") == 1
    assert metric(lab, n1.lab_node, "pyflannel_bgp_prefixes_refused_total", peer=HOSTILE,
                  reason="treat_as_withdraw") == 1
    for n in nodes.values():
        assert target not in kernel_routes(lab, n.lab_node.ns)
    others_established()
    assert gobgp_i.rib() == gobgp_e.rib() == {n.network: n.lab_node.underlay_ip
                                               for n in nodes.values()}
