"""`policy trace`'s pure verdict and the kernel agree: hypothesis draws policies and flows,
the node's compiled ruleset is applied in a namespace router, and real packets (TCP
connects and pings) cross it in both directions."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from ipaddress import ip_address, ip_network

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from pyflannel.lease.model import Lease, LeaseAttrs
from pyflannel.policy.keeper import PolicyBook, build_model, ruleset_for
from pyflannel.policy.nft import EMPTY, apply_sync
from pyflannel.policy.verdict import Flow, decide
from tests.labtools import require_lab

pytestmark = pytest.mark.lab

LOCAL = "10.1.1.2"  # the container behind the node under test
REMOTE = ["10.1.2.2", "10.1.3.2", "203.0.113.9", "198.51.100.7"]  # blue, red, office, none
PORTS = [80, 8080]
PROBE = r"""
import json, socket, subprocess, sys, threading
probes, out = json.loads(sys.argv[1]), {}
def run(i, p):
    if p["proto"] == "icmp":
        r = subprocess.run(["ping", "-n", "-q", "-c", "1", "-W", "0.4", "-I", p["src"],
                            p["dst"]], capture_output=True)
        out[i] = r.returncode == 0
        return
    s = socket.socket(); s.settimeout(0.4)
    try:
        s.bind((p["src"], 0)); s.connect((p["dst"], p["port"])); out[i] = True
    except OSError:
        out[i] = False
    finally:
        s.close()
ts = [threading.Thread(target=run, args=(i, p)) for i, p in enumerate(probes)]
[t.start() for t in ts]; [t.join() for t in ts]
print(json.dumps([out[i] for i in range(len(probes))]))
"""
SERVE = r"""
import socket, threading
def serve(port):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port)); s.listen(64)
    while True:
        c, _ = s.accept(); c.close()
for p in (80, 8080):
    threading.Thread(target=serve, args=(p,), daemon=True).start()
print("up", flush=True)
threading.Event().wait()
"""


def _ip(ns: str, *args: str) -> None:
    subprocess.run(["ip", "-n", ns, *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def router():
    """Namespaces: local (10.1.1.2) - router (the node) - remote (other nodes' containers,
    an office host and an unknown host)."""
    require_lab()
    prefix = f"pfag{secrets.token_hex(3)}"
    r, loc, rem = f"{prefix}-r", f"{prefix}-l", f"{prefix}-x"
    made, servers = [], []
    try:
        for ns in (r, loc, rem):
            subprocess.run(["ip", "netns", "add", ns], check=True)
            made.append(ns)
            _ip(ns, "link", "set", "lo", "up")
        _ip(r, "link", "add", "to-l", "type", "veth", "peer", "name", "eth0", "netns", loc)
        _ip(r, "link", "add", "to-x", "type", "veth", "peer", "name", "eth0", "netns", rem)
        _ip(r, "addr", "add", "10.1.1.1/24", "dev", "to-l")
        _ip(r, "addr", "add", "192.0.2.1/30", "dev", "to-x")
        _ip(loc, "addr", "add", f"{LOCAL}/24", "dev", "eth0")
        _ip(rem, "addr", "add", "192.0.2.2/30", "dev", "eth0")
        for ns, dev in ((r, "to-l"), (r, "to-x"), (loc, "eth0"), (rem, "eth0")):
            _ip(ns, "link", "set", dev, "up")
        for addr in REMOTE:
            _ip(rem, "addr", "add", f"{addr}/32", "dev", "lo")
            _ip(r, "route", "add", f"{addr}/32", "via", "192.0.2.2")
        _ip(loc, "route", "add", "default", "via", "10.1.1.1")
        _ip(rem, "route", "add", "10.1.1.0/24", "via", "192.0.2.1")
        subprocess.run(["ip", "netns", "exec", r, "sysctl", "-qw", "net.ipv4.ip_forward=1"],
                       check=True)
        for ns in (loc, rem):
            p = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", SERVE],
                                 stdout=subprocess.PIPE)
            servers.append(p)
            assert p.stdout is not None and p.stdout.readline() == b"up\n"
        yield {"router": r, "local": loc, "remote": rem}
    finally:
        for p in servers:
            p.kill()
            p.wait()
        for ns in reversed(made):
            subprocess.run(["ip", "netns", "del", ns], check=False)


def lease(n: int, **labels) -> Lease:
    return Lease(ip_network(f"10.1.{n}.0/24"),
                 LeaseAttrs(ip_address(f"198.18.0.{n}"), "host-gw",
                            labels=tuple(sorted(labels.items()))), 7, 1)


LEASES = [lease(1, tenant="blue"), lease(2, tenant="blue"), lease(3, tenant="red")]
OFFICE = {"office": json.dumps({"Labels": {"role": "office"},
                                "Nets": ["203.0.113.0/24"]}).encode()}

SELECTORS = st.sampled_from(["tenant == 'blue'", "tenant == 'red'", "role == 'office'",
                             "has(tenant)", "tenant != 'blue'", "all()",
                             "tenant in {'red', 'green'}", "!has(role)"])
NETS = st.sampled_from(["10.1.2.0/24", "203.0.113.0/25", "10.0.0.0/8", "198.51.100.0/24"])


@st.composite
def rules(draw):
    rule = {"Action": draw(st.sampled_from(["Allow", "Deny", "Pass", "Log"]))}
    proto = draw(st.sampled_from([None, "TCP", "ICMP"]))
    if proto:
        rule["Protocol"] = proto
    for side in ("Source", "Destination"):
        ent = {}
        if draw(st.booleans()):
            ent[draw(st.sampled_from(["Selector", "NotSelector"]))] = draw(SELECTORS)
        if draw(st.integers(0, 3)) == 0:
            ent[draw(st.sampled_from(["Nets", "NotNets"]))] = [draw(NETS)]
        if proto == "TCP" and draw(st.booleans()):
            ent[draw(st.sampled_from(["Ports", "NotPorts"]))] = [draw(st.sampled_from(
                [80, 8080, "8000:8100"]))]
        if ent:
            rule[side] = ent
    return rule


@st.composite
def policies(draw):
    out = {}
    for i in range(draw(st.integers(1, 3))):
        doc = {"Name": f"p{i}", "Order": draw(st.sampled_from([None, 1, 2])),
               "Selector": draw(SELECTORS), "Types": ["Ingress", "Egress"],
               "Ingress": draw(st.lists(rules(), max_size=3)),
               "Egress": draw(st.lists(rules(), max_size=3))}
        out[doc["Name"]] = json.dumps({k: v for k, v in doc.items() if v is not None}).encode()
    return out


FLOWS = st.tuples(st.sampled_from(REMOTE), st.sampled_from(["in", "out"]),
                  st.sampled_from(["icmp", "tcp"]), st.sampled_from(PORTS))


@given(policies(), st.lists(FLOWS, min_size=4, max_size=4, unique=True))
# no shrinking: each step sends real packets, and a failure already prints the policies
@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck),
          phases=[Phase.explicit, Phase.reuse, Phase.generate])
def test_trace_agrees_with_the_kernel_on_sampled_flows(router, docs, flows):
    book = PolicyBook()
    book.update(docs, OFFICE)
    model = build_model(book, LEASES, (LEASES[0], {"tenant": "blue"}))
    apply_sync(ruleset_for(model, LEASES[0]).text, router["router"])
    try:
        by_ns: dict[str, list] = {router["local"]: [], router["remote"]: []}
        expected = []
        for remote, way, proto, port in flows:
            src, dst = (remote, LOCAL) if way == "in" else (LOCAL, remote)
            ns = router["remote"] if way == "in" else router["local"]
            flow = Flow.of(src, dst, 1 if proto == "icmp" else 6,
                           None if proto == "icmp" else port)
            d = decide(model, model.workload_of(ip_address(LOCAL)), flow,
                       "Ingress" if way == "in" else "Egress")
            by_ns[ns].append({"src": src, "dst": dst, "proto": proto, "port": port})
            expected.append((ns, len(by_ns[ns]) - 1, d))
        seen = {}
        for ns, probes in by_ns.items():
            if probes:
                out = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", PROBE,
                                      json.dumps(probes)], capture_output=True, text=True,
                                     check=True).stdout
                seen[ns] = json.loads(out)
        for ns, i, d in expected:
            assert seen[ns][i] == d.allowed, (by_ns[ns][i], d, docs)
    finally:
        apply_sync(EMPTY, router["router"])
