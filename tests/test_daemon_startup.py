"""How the daemon starts, waits and refuses: config rules, an absent etcd, bad flags."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from pyflannel.lab import Lab
from tests.labtools import CONFIG_KEY, ready, require_lab, wait_until

pytestmark = pytest.mark.lab


@pytest.fixture
def lab():
    require_lab()
    with Lab(1) as lab:
        yield lab


def links(lab: Lab, ns: str) -> set[str]:
    from pyroute2 import NetNS

    with NetNS(ns, flags=0) as nl:
        return {link.get("ifname") for link in nl.get_links()}


def routes(lab: Lab, ns: str) -> set[str]:
    from pyroute2 import NetNS

    with NetNS(ns, flags=0) as nl:
        return {f"{r.get('dst')}/{r['dst_len']}" for r in nl.get_routes(family=2, table=254)}


@pytest.mark.parametrize(("config", "message"), [
    ('{"Network": "10.1.0.0/16", "SubnetLen": 31}', "SubnetLen"),
    ('{"Backend": {"Type": "udp"}}', "Network is required"),
    ('{"Network": "10.1.0.0/16", "Backend": {"Type": "nope"}}', "nope"),
    ("{not json", "invalid JSON"),
])
def test_a_config_that_breaks_a_rule_stops_the_daemon_before_any_device(lab, config, message):
    node = lab.nodes[0]
    before_links, before_routes = links(lab, node.ns), routes(lab, node.ns)
    lab.etcdctl("put", CONFIG_KEY, config)
    proc = lab.start_daemon(node)
    assert proc.wait(20) == 1
    errors = [line for line in lab.tail_log(node).splitlines() if " E pyflannel" in line]
    assert len(errors) == 1 and message in errors[0], lab.tail_log(node)
    assert links(lab, node.ns) == before_links and "flannel0" not in before_links
    assert routes(lab, node.ns) == before_routes
    assert not node.subnet_file.exists()


def test_an_unreachable_etcd_is_retried_and_said_once_then_the_daemon_gets_ready(lab):
    node = lab.nodes[0]
    lab.stop_etcd()
    lab.start_daemon(node, "-healthz-port=9180")
    time.sleep(4)
    log = lab.tail_log(node, 200)
    unreachable = [line for line in log.splitlines() if "etcd unreachable" in line]
    assert len(unreachable) == 1, log  # said once, then rate-limited
    assert node.process.poll() is None and not node.subnet_file.exists()
    lab.start_etcd()
    lab.etcdctl("put", CONFIG_KEY, '{"Network": "10.1.0.0/16"}')
    env = lab.wait_subnet_file(node, timeout=20)
    assert env["FLANNEL_SUBNET"].startswith("10.1.")
    wait_until(lambda: ready(lab, node), 10, "readyz")
    assert "connected to etcd" in lab.tail_log(node, 200)


def test_a_missing_config_is_waited_for_and_said_once(lab):
    node = lab.nodes[0]
    lab.start_daemon(node)
    time.sleep(3)
    log = lab.tail_log(node, 200)
    assert sum("not found in etcd; waiting" in line for line in log.splitlines()) == 1, log
    lab.etcdctl("put", CONFIG_KEY, '{"Network": "10.1.0.0/16"}')
    lab.wait_subnet_file(node, timeout=20)


def test_etcd_prefix_is_honoured(lab):
    node = lab.nodes[0]
    lab.etcdctl("put", "/atomic.io/network/config", '{"Network": "10.1.0.0/16"}')
    lab.start_daemon(node, "-etcd-prefix=/atomic.io/network")
    env = lab.wait_subnet_file(node)
    key = "/atomic.io/network/subnets/" + env["FLANNEL_SUBNET"].replace(".1/", ".0-")
    assert "198.18.0.1" in lab.etcdctl("get", key, "--print-value-only")


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pyflannel", *args], capture_output=True,
                          text=True, timeout=30, env={**os.environ, **(env or {})})


@pytest.mark.parametrize(("args", "needle"), [
    (["run", "-no-such-flag"], "unknown flag"),
    (["run", "-subnet-lease-renew-margin=0"], "subnet-lease-renew-margin"),
    (["run", "-etcd-endpoints=localhost"], "etcd-endpoints"),
])
def test_bad_flags_fail_at_once_with_one_line(args, needle):
    out = run_cli(*args)
    assert out.returncode == 2
    assert needle in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_status_with_etcd_unreachable_is_one_line():
    out = run_cli("status", "-etcd-endpoints=http://127.0.0.1:1")
    assert out.returncode == 1
    assert len(out.stderr.strip().splitlines()) == 1 and "unreachable" in out.stderr


def test_version_and_help():
    assert run_cli("--version").stdout.strip() == run_cli("version").stdout.strip()
    assert "-etcd-endpoints" in run_cli("run", "--help").stdout


def test_readyz_is_503_until_the_node_holds_a_lease(lab):
    from tests.labtools import http_get

    node = lab.nodes[0]
    lab.start_daemon(node, "-healthz-port=9180")
    wait_until(lambda: http_get(lab, node, "/healthz")[0] == 200, 10, "healthz")
    assert http_get(lab, node, "/readyz")[0] == 503  # no config yet, so no lease
    lab.etcdctl("put", CONFIG_KEY, '{"Network": "10.1.0.0/16"}')
    wait_until(lambda: ready(lab, node), 15, "readyz 200")
    from prometheus_client.parser import text_string_to_metric_families

    names = {f.name for f in text_string_to_metric_families(http_get(lab, node, "/metrics")[1])}
    for name in ("pyflannel_info", "pyflannel_peers", "pyflannel_packets", "pyflannel_bytes",
                 "pyflannel_dropped_packets", "pyflannel_lease_expiry_timestamp_seconds",
                 "pyflannel_lease_renewals", "pyflannel_etcd_errors",
                 "pyflannel_peer_programming_seconds"):
        assert name in names, name


def test_a_config_change_while_running_is_logged_once_and_nothing_is_reprogrammed(lab):
    node = lab.nodes[0]
    lab.etcdctl("put", CONFIG_KEY, '{"Network": "10.1.0.0/16"}')
    lab.start_daemon(node)
    env = lab.wait_subnet_file(node)
    routes_before = routes(lab, node.ns)
    lab.etcdctl("put", CONFIG_KEY, '{"Network": "10.7.0.0/16"}')
    lab.etcdctl("put", CONFIG_KEY, '{"Network": "10.1.0.0/16", "SubnetLen": 31}')

    def said() -> list[str]:
        return [line for line in lab.tail_log(node, 200).splitlines()
                if "network config changed" in line]

    wait_until(lambda: len(said()) == 2, 10, "both changes logged")
    assert "10.1.0.0/16 -> 10.7.0.0/16" in said()[0] and "invalid" in said()[1]
    time.sleep(1)
    assert len(said()) == 2  # once each
    assert node.process.poll() is None
    assert lab.wait_subnet_file(node) == env and routes(lab, node.ns) == routes_before


def test_the_daemon_with_etcd_auth_and_its_password_kept_out_of_logs(lab):
    node = lab.nodes[0]
    lab.etcdctl("put", CONFIG_KEY, '{"Network": "10.1.0.0/16"}')
    lab.etcdctl("user", "add", "root", "--new-user-password=r00t-pw")
    lab.etcdctl("auth", "enable")
    proc = lab.start_daemon(node, "-etcd-username=root", "-etcd-password=Wr0ng-Secret")
    assert proc.wait(30) == 1
    log = lab.tail_log(node, 100)
    assert "refused the credentials" in log and "Wr0ng-Secret" not in log.split("\n", 1)[1]
    lab.start_daemon(node, "-etcd-username=root", env={"FLANNELD_ETCD_PASSWORD": "r00t-pw"})
    lab.wait_subnet_file(node)
    assert "r00t-pw" not in lab.tail_log(node, 200)


def test_a_reserved_subnet_is_taken_by_the_daemon_on_that_address(lab):
    node = lab.nodes[0]
    lab.etcdctl("put", CONFIG_KEY, '{"Network": "10.1.0.0/16"}')
    out = lab.run(node.ns, [sys.executable, "-m", "pyflannel", "lease", "reserve",
                            "10.1.77.0/24", node.underlay_ip,
                            f"-etcd-endpoints={lab.etcd_endpoint}"], text=True)
    assert "reserved 10.1.77.0/24" in out.stdout
    lab.start_daemon(node)
    assert lab.wait_subnet_file(node)["FLANNEL_SUBNET"] == "10.1.77.1/24"
    kv = lab.etcdctl("get", "/coreos.com/network/subnets/10.1.77.0-24", "-w", "json")
    assert '"lease"' not in kv  # still no TTL: a reservation is never put on a lease
