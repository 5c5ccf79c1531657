"""Interop with a real, independent WireGuard: Debian's wireguard-go, configured by `wg`.

Two network namespaces joined by a veth pair (underlay 198.18.77.0/24). In one runs
wireguard-go, configured the way flanneld configures its device (listen port 51820, the
node's key, one peer per lease: AllowedIPs = the lease subnet, Endpoint = PublicIP:port;
the device holds the subnet's network address as /32 and routes the whole Network). In
the other runs our pure-Python device on a UDP socket, in a child process.

Both directions are exercised: wireguard-go initiates (a ping from its namespace) and we
respond and answer the ping; then we initiate, send an ICMP echo request inside a transport
message, and decrypt the kernel's echo reply that wireguard-go encrypted for us. Last, our
side rekeys every second (shortened limits) while pinging, and every ping is answered
across the key rotations. Run with and without a pre-shared key.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from pyflannel.wireguard.keys import PrivateKey, encode_key
from tests.conftest import _need

PY_UNDERLAY = "198.18.77.1"
GO_UNDERLAY = "198.18.77.2"
PY_OVERLAY = "10.1.1.1"  # an address in our lease 10.1.1.0/24
GO_OVERLAY = "10.1.2.0"  # wireguard-go's device address, as flanneld assigns it
NETWORK = "10.1.0.0/16"
PORT = 51820
SOCK_DIR = Path("/var/run/wireguard")

# The Python side: a Device on a UDP socket, driven by a tiny loop. It answers ICMP echo
# requests that arrive through the tunnel, then initiates a handshake of its own, pings
# wireguard-go's kernel and prints one JSON line per phase.
CHILD = r"""
import ipaddress, json, select, socket, sys, time
from pyflannel.wireguard.device import Device, PeerConfig
from pyflannel.wireguard.keys import PrivateKey, decode_key

priv, go_pub, go_endpoint, phase_a_timeout, psk = sys.argv[1:6]
dev = Device(PrivateKey.from_base64(priv), psk=decode_key(psk) if psk != "-" else None)
go_key = decode_key(go_pub)
host, port = go_endpoint.rsplit(":", 1)
dev.set_peers({go_key: PeerConfig(("10.1.2.0/24",), (host, int(port)))})
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind(("0.0.0.0", 51820))

def csum(b):
    if len(b) % 2: b += b"\0"
    s = sum(int.from_bytes(b[i:i + 2], "big") for i in range(0, len(b), 2))
    while s >> 16: s = (s & 0xffff) + (s >> 16)
    return (~s) & 0xffff

def ipv4(src, dst, proto, payload, ident=0x1234):
    h = bytearray(20); h[0] = 0x45; h[2:4] = (20 + len(payload)).to_bytes(2, "big")
    h[4:6] = ident.to_bytes(2, "big"); h[8] = 64; h[9] = proto
    h[12:16] = ipaddress.ip_address(src).packed; h[16:20] = ipaddress.ip_address(dst).packed
    h[10:12] = csum(bytes(h)).to_bytes(2, "big")
    return bytes(h) + payload

def icmp(kind, ident, seq, data):
    m = bytearray(bytes([kind, 0, 0, 0]) + ident.to_bytes(2, "big") + seq.to_bytes(2, "big") + data)
    m[2:4] = csum(bytes(m)).to_bytes(2, "big")
    return bytes(m)

def pump(until, on_packet):
    while time.monotonic() < until:
        dl = dev.next_deadline()
        wait = max(0.0, min(until, dl if dl is not None else until) - time.monotonic())
        r, _, _ = select.select([sock], [], [], min(wait, 0.05))
        if r:
            data, src = sock.recvfrom(65535)
            dev.receive(data, src)
        dev.tick()
        tun, net = dev.drain()
        for msg, ep in net:
            sock.sendto(msg, ep)
        for pkt, peer in tun:
            if on_packet(pkt):
                tun2, net2 = dev.drain()
                for msg, ep in net2:
                    sock.sendto(msg, ep)
                return True
    return False

print(json.dumps({"ready": True}), flush=True)

# Phase A: wireguard-go initiates (the test pings us from its namespace); we respond and
# answer its echo requests through the tunnel.
seen = {"requests": 0}
def answer(pkt):
    if pkt[9] == 1 and pkt[20] == 8:  # ICMP echo request
        seen["requests"] += 1
        src = str(ipaddress.ip_address(pkt[12:16])); dst = str(ipaddress.ip_address(pkt[16:20]))
        body = pkt[20:]
        ident, seq = int.from_bytes(body[4:6], "big"), int.from_bytes(body[6:8], "big")
        reply = icmp(0, ident, seq, body[8:])
        dev.send(ipv4(dst, src, 1, reply))
        seen["src"] = src
    return seen["requests"] >= 3
pump(time.monotonic() + float(phase_a_timeout), answer)
stats_a = dict(dev.stats)
print(json.dumps({"phase": "A", "requests": seen["requests"], "src": seen.get("src"),
                  "stats": stats_a, "drops": dict(dev.drops)}), flush=True)

# Phase B: we initiate, then ping wireguard-go's kernel through the tunnel.
before = dev.stats["responses_received"]
dev.initiate(go_key)
got = {}
deadline = time.monotonic() + 10
while dev.stats["responses_received"] == before and time.monotonic() < deadline:
    pump(time.monotonic() + 0.05, lambda pkt: False)
peer = dev.peers[go_key]
initiated = peer.current is not None and peer.current.initiator
dev.send(ipv4("10.1.1.1", "10.1.2.0", 1, icmp(8, 0x4242, 7, b"pyflannel-wireguard-interop")))
def reply(pkt):
    if pkt[9] == 1 and pkt[20] == 0:
        got["src"] = str(ipaddress.ip_address(pkt[12:16]))
        got["dst"] = str(ipaddress.ip_address(pkt[16:20]))
        got["ident"] = int.from_bytes(pkt[24:26], "big")
        got["seq"] = int.from_bytes(pkt[26:28], "big")
        got["data"] = pkt[28:].decode(errors="replace")
        return True
    return False
pump(time.monotonic() + 10, reply)
print(json.dumps({"phase": "B", "initiated": initiated, "reply": got,
                  "stats": dict(dev.stats), "drops": dict(dev.drops)}), flush=True)

# Phase C: rekeying against a real peer. Our device restarts (same key) with its limits
# shortened so that it rekeys every second (wireguard-go keeps its own 120 s); a ping every
# 100 ms for 4 s must keep being answered across the key rotations.
from pyflannel.wireguard.constants import Limits
dev = Device(PrivateKey.from_base64(priv), psk=decode_key(psk) if psk != "-" else None,
             limits=Limits(rekey_after_time=1.0, reject_after_time=2.5, rekey_timeout=0.3,
                           keepalive_timeout=0.5))
dev.set_peers({go_key: PeerConfig(("10.1.2.0/24",), (host, int(port)))})
answered = set()
def echo_reply(pkt):
    if pkt[9] == 1 and pkt[20] == 0 and pkt[24:26] == b"\x43\x43":
        answered.add(int.from_bytes(pkt[26:28], "big"))
    return False
for seq in range(40):
    dev.send(ipv4("10.1.1.1", "10.1.2.0", 1, icmp(8, 0x4343, seq, b"rekey")))
    pump(time.monotonic() + 0.1, echo_reply)
pump(time.monotonic() + 0.5, echo_reply)
print(json.dumps({"phase": "C", "answered": len(answered), "stats": dict(dev.stats),
                  "drops": dict(dev.drops)}), flush=True)
"""


def _run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, check=check, timeout=30)


def _requirements() -> str | None:
    if os.geteuid() != 0:
        return "wireguard interop needs root (network namespaces)"
    if not Path("/dev/net/tun").exists():
        return "wireguard interop needs /dev/net/tun"
    for tool in ("ip", "ping", "wireguard-go", "wg"):
        if shutil.which(tool) is None:
            return (f"wireguard interop needs {tool!r} "
                    "(apt-get install wireguard-go wireguard-tools)")
    return None


class WgLab:
    """Two namespaces and a veth; everything it makes it removes, also after a failure."""

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:6]
        self.ns_go = f"pfwg-{tag}-go"
        self.ns_py = f"pfwg-{tag}-py"
        self.dev = f"wgo{tag}"  # wireguard-go's device; its socket is shared by all namespaces
        self.dir = Path(tempfile.mkdtemp(prefix="pfwg-"))
        self.namespaces: list[str] = []
        self.procs: list[subprocess.Popen] = []

    def build(self) -> None:
        for ns in (self.ns_go, self.ns_py):
            _run("ip", "netns", "add", ns)
            self.namespaces.append(ns)
            _run("ip", "-n", ns, "link", "set", "lo", "up")
        # created inside one namespace with its peer moved straight to the other, so the
        # root namespace never sees the pair
        _run("ip", "-n", self.ns_py, "link", "add", "eth0", "type", "veth",
             "peer", "name", "eth0", "netns", self.ns_go)
        _run("ip", "-n", self.ns_py, "addr", "add", f"{PY_UNDERLAY}/24", "dev", "eth0")
        _run("ip", "-n", self.ns_go, "addr", "add", f"{GO_UNDERLAY}/24", "dev", "eth0")
        _run("ip", "-n", self.ns_py, "link", "set", "eth0", "up")
        _run("ip", "-n", self.ns_go, "link", "set", "eth0", "up")

    def start_wireguard_go(self, go_key: PrivateKey, py_public_b64: str,
                           psk: str | None = None) -> None:
        log = open(self.dir / "wireguard-go.log", "wb")  # noqa: SIM115 - handed to the child
        env = {**os.environ, "WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD": "1",
               "LOG_LEVEL": "debug"}
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.ns_go, "wireguard-go", "-f", self.dev],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
        )
        log.close()
        self.procs.append(proc)
        sock = SOCK_DIR / f"{self.dev}.sock"
        deadline = time.monotonic() + 10
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("wireguard-go did not start: " + self.log_tail())
            time.sleep(0.05)
        keyfile = self.dir / "go.key"
        fd = os.open(keyfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, go_key.to_base64().encode() + b"\n")
        os.close(fd)
        # as flanneld configures its device: port, key, one peer per lease
        _run("ip", "netns", "exec", self.ns_go, "wg", "set", self.dev,
             "listen-port", str(PORT), "private-key", str(keyfile),
             "peer", py_public_b64, "allowed-ips", "10.1.1.0/24",
             "endpoint", f"{PY_UNDERLAY}:{PORT}", *self._psk_args(psk))
        _run("ip", "-n", self.ns_go, "addr", "add", f"{GO_OVERLAY}/32", "dev", self.dev)
        _run("ip", "-n", self.ns_go, "link", "set", self.dev, "up")
        _run("ip", "-n", self.ns_go, "route", "add", NETWORK, "dev", self.dev)

    def _psk_args(self, psk: str | None) -> list[str]:
        if psk is None:
            return []
        path = self.dir / "psk"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, psk.encode() + b"\n")
        os.close(fd)
        return ["preshared-key", str(path)]

    def log_tail(self) -> str:
        path = self.dir / "wireguard-go.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def teardown(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
        for ns in self.namespaces:
            _run("ip", "netns", "del", ns, check=False)
        (SOCK_DIR / f"{self.dev}.sock").unlink(missing_ok=True)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def wg_lab():
    _need(_requirements())
    lab = WgLab()
    try:
        lab.build()
        yield lab
    finally:
        lab.teardown()


def _read_json(proc: subprocess.Popen, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    os.set_blocking(proc.stdout.fileno(), True)
    import selectors

    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    try:
        while time.monotonic() < deadline:
            if sel.select(timeout=max(0.0, deadline - time.monotonic())):
                line = proc.stdout.readline()
                if not line:
                    break
                return json.loads(line)
        raise AssertionError("the Python WireGuard device said nothing in time")
    finally:
        sel.close()


@pytest.mark.parametrize("with_psk", [False, True], ids=["no-psk", "psk"])
def test_interop_with_wireguard_go_both_directions(wg_lab: WgLab, with_psk: bool) -> None:
    go_key, py_key = PrivateKey.generate(), PrivateKey.generate()
    psk = encode_key(os.urandom(32)) if with_psk else None
    wg_lab.start_wireguard_go(go_key, py_key.public_base64, psk)
    child = subprocess.Popen(
        ["ip", "netns", "exec", wg_lab.ns_py, sys.executable, "-c", CHILD,
         py_key.to_base64(), go_key.public_base64, f"{GO_UNDERLAY}:{PORT}", "8", psk or "-"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    wg_lab.procs.append(child)
    try:
        assert _read_json(child, 15) == {"ready": True}
        # wireguard-go initiates: its kernel pings our overlay address through the tunnel
        ping = _run("ip", "netns", "exec", wg_lab.ns_go, "ping", "-c", "3", "-i", "0.2",
                    "-W", "2", PY_OVERLAY, check=False)
        phase_a = _read_json(child, 15)
        assert phase_a["phase"] == "A"
        assert phase_a["stats"].get("initiations_received", 0) >= 1, phase_a
        assert phase_a["stats"].get("responses_sent", 0) >= 1, phase_a
        # wireguard-go used the session we answered with: its transport data decrypted
        assert phase_a["stats"].get("handshakes_completed", 0) >= 1, phase_a
        assert phase_a["requests"] >= 1 and phase_a["src"] == GO_OVERLAY, phase_a
        assert ping.returncode == 0, ping.stdout + ping.stderr  # and our replies got back
        phase_b = _read_json(child, 25)
        print("phase A:", phase_a, "\nphase B:", phase_b, "\nping:", ping.stdout)
        assert phase_b["phase"] == "B"
        assert phase_b["initiated"], phase_b  # our initiation was answered by wireguard-go
        assert phase_b["reply"] == {
            "src": GO_OVERLAY, "dst": PY_OVERLAY, "ident": 0x4242, "seq": 7,
            "data": "pyflannel-wireguard-interop",
        }, phase_b
        bad = {k: v for k, v in phase_b["drops"].items() if k != "staged_overflow"}
        assert not bad, phase_b
        phase_c = _read_json(child, 30)
        print("phase C:", phase_c)
        assert phase_c["phase"] == "C"
        assert phase_c["answered"] >= 36, phase_c  # replies kept coming across the rekeys
        assert phase_c["stats"].get("responses_received", 0) >= 3, phase_c
        bad = {k: v for k, v in phase_c["drops"].items() if k != "staged_overflow"}
        assert not bad, phase_c
        show = _run("ip", "netns", "exec", wg_lab.ns_go, "wg", "show", wg_lab.dev, "dump")
        assert py_key.public_base64 in show.stdout
        assert f"{PY_UNDERLAY}:{PORT}" in show.stdout
    except BaseException:
        if child.poll() is None:
            child.terminate()
        out, err = child.communicate(timeout=10)
        print("child stdout:", out, "\nchild stderr:", err[-3000:])
        print("wireguard-go log:", wg_lab.log_tail())
        raise
    child.wait(20)
