"""Real Docker on pyflannel: one dockerd per lab node, started from mk-docker-opts' output,
and busybox containers on different nodes reaching each other across every backend.

Each backend gets one two-node cluster shared by its tests (they run in file order): a
web server container on n2 (busybox httpd serving 10 MB of random bytes and a CGI page
that answers with the client's address) and a client container on n1. Every node's FORWARD
policy is DROP, as on a real Docker host, so what crosses between nodes is what
pyflanneld's forward rules let through.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pyflannel import labdocker
from pyflannel.lab import Lab, LabNode
from pyflannel.labdocker import LabDocker, NodeDocker, cgroup_remounts
from tests.labtools import CONFIG_KEY, HEALTHZ_PORT, ready, require_lab, wait_until

ROOT = Path(__file__).resolve().parent.parent
BLOB = 10 * 1024 * 1024
lab_test = pytest.mark.lab
EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"

# Runs in the server container: the blob to fetch, and a CGI page naming the client.
SERVE = f"""
head -c {BLOB} /dev/urandom > /www/blob
printf '#!/bin/sh\\necho Content-Type: text/plain\\necho\\necho $REMOTE_ADDR\\n' \\
    > /www/cgi-bin/peer
chmod +x /www/cgi-bin/peer
"""


# ------------------------------------------------------------------ the demo


def require_docker() -> None:
    """Fail in CI, skip elsewhere, when Debian's docker.io or busybox-static is missing."""
    require_lab()
    if reason := labdocker.docker_missing():
        (pytest.fail if os.environ.get("CI") else pytest.skip)(reason)


def namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def leftovers(prefix: str, workdir: str) -> list[str]:
    """Anything of lab ``prefix``'s Docker still on the host: namespaces, cgroup
    directories, mounts, processes (dockerd, containerd, shims, containers), files."""
    found = [ns for ns in namespaces() if ns.startswith(prefix + "-")]
    found += [str(p) for p in Path("/sys/fs/cgroup").glob(f"*/pyflannel-{prefix}-*")]
    found += [str(p) for p in Path("/sys/fs/cgroup").glob(f"pyflannel-{prefix}-*")]
    found += [line for line in Path("/proc/self/mounts").read_text().splitlines()
              if prefix in line or workdir in line or "pyflannel-run" in line]
    found += [workdir] if Path(workdir).exists() else []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes()
            if f"pyflannel-{prefix}-".encode() in argv or workdir.encode() in argv:
                found.append(f"{cmdline}: {argv!r}")
        except OSError:
            pass
    return found


def host_paths() -> dict[str, list[str] | None]:
    return {p: sorted(q.name for q in Path(p).iterdir()) if Path(p).is_dir() else None
            for p in ("/run/docker", "/run/containerd", "/etc/docker")}


@lab_test
def test_the_docker_demo_runs_real_containers_and_leaves_nothing_on_the_host():
    require_docker()
    before = host_paths()
    out = subprocess.run([sys.executable, "-m", "pyflannel", "demo", "--docker", "--nodes", "2"],
                         cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    pairs = [line for line in out.stdout.splitlines() if line.startswith("== ping+http")]
    assert len(pairs) == 2 and all(": ok" in line for line in pairs), out.stdout
    assert "dockerd --bip=10.1." in out.stdout
    prefix, workdir = re.search(r"^== lab (\S+):.*, work directory (\S+)$", out.stdout,
                                re.M).groups()
    assert leftovers(prefix, workdir) == []
    assert host_paths() == before


def test_the_docker_demo_says_how_to_install_docker_when_it_is_missing(
        monkeypatch, capsys, tmp_path):
    require_lab()
    from pyflannel import demo

    monkeypatch.setattr(labdocker, "DOCKERD", tmp_path / "dockerd")
    assert demo.main(["--docker"]) == 1
    out = capsys.readouterr()
    assert out.out == ""  # no lab was built
    assert "apt-get install docker.io busybox-static" in out.err
    assert out.err.count("\n") == 1


def test_a_dynamically_linked_busybox_is_refused_with_the_package_to_install(monkeypatch):
    """Debian's plain "busybox" needs libc, which the container image does not have."""
    require_docker()
    assert labdocker.is_static_elf(labdocker.BUSYBOX)
    assert not labdocker.is_static_elf(Path(sys.executable).resolve())
    monkeypatch.setattr(labdocker, "BUSYBOX", Path(sys.executable).resolve())
    assert "not statically linked: apt-get install docker.io busybox-static" in (
        labdocker.docker_missing() or "")


def test_lab_cleanups_run_first_and_after_the_namespaces_are_gone():
    """A dockerd and its containers go before the lab stops its processes; the cgroup
    directories only once the lab's namespaces (and what ran in them) are gone."""
    require_lab()
    seen: list[tuple[str, bool]] = []
    lab = Lab(1, with_etcd=False)
    with lab:
        ns = Path("/run/netns") / lab.nodes[0].ns
        lab.add_cleanup(before=lambda: seen.append(("first", ns.exists())),
                        after=lambda: seen.append(("first", ns.exists())))
        lab.add_cleanup(before=lambda: seen.append(("second", ns.exists())))
    assert seen == [("second", True), ("first", True), ("first", False)]


# ------------------------------------------------------------------ pure parts


HYBRID = """\
sysfs /sys sysfs rw,nosuid,nodev,noexec,relatime 0 0
tmpfs /sys/fs/cgroup tmpfs ro,nosuid,nodev,noexec,mode=755 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,nosuid,nodev,noexec,relatime,nsdelegate 0 0
cgroup /sys/fs/cgroup/cpu,cpuacct cgroup rw,nosuid,nodev,noexec,relatime,cpu,cpuacct 0 0
garbage
cgroup /sys/fs/cgroup/devices cgroup rw,nosuid,nodev,noexec,relatime,devices 0 0
tmpfs /run tmpfs rw,nosuid,nodev,mode=755 0 0
"""


def test_the_hosts_cgroup_hierarchies_are_mounted_again_tmpfs_first_and_writable():
    """systemd mounts the tmpfs read-only; ours must take the mount points."""
    assert cgroup_remounts(HYBRID) == [
        ["mount", "-t", "tmpfs", "-o", "rw,nosuid,nodev,noexec,mode=755", "tmpfs",
         "/sys/fs/cgroup"],
        ["mkdir", "-p", "/sys/fs/cgroup/unified"],
        ["mount", "-t", "cgroup2", "-o", "rw,nosuid,nodev,noexec,relatime,nsdelegate",
         "cgroup2", "/sys/fs/cgroup/unified"],
        ["mkdir", "-p", "/sys/fs/cgroup/cpu,cpuacct"],
        ["mount", "-t", "cgroup", "-o", "rw,nosuid,nodev,noexec,relatime,cpu,cpuacct",
         "cgroup", "/sys/fs/cgroup/cpu,cpuacct"],
        ["mkdir", "-p", "/sys/fs/cgroup/devices"],
        ["mount", "-t", "cgroup", "-o", "rw,nosuid,nodev,noexec,relatime,devices", "cgroup",
         "/sys/fs/cgroup/devices"],
    ]


def test_a_unified_cgroup2_host_gets_its_one_hierarchy_back():
    mounts = "cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid,nodev,noexec,relatime 0 0\n"
    assert cgroup_remounts(mounts) == [
        ["mount", "-t", "cgroup2", "-o", "rw,nosuid,nodev,noexec,relatime", "cgroup2",
         "/sys/fs/cgroup"]]


# ------------------------------------------------------------------ one cluster per backend


@dataclass
class Cluster:
    backend: str
    lab: Lab
    docker: LabDocker
    client_node: LabNode  # n1
    server_node: LabNode  # n2
    subnets: dict[str, str]  # node name -> FLANNEL_SUBNET
    mtu: str  # FLANNEL_MTU
    client: str = ""  # the client container's address
    server: str = ""  # the server container's address

    @property
    def n1(self) -> NodeDocker:
        return self.docker[self.client_node]

    @property
    def n2(self) -> NodeDocker:
        return self.docker[self.server_node]

    def start_containers(self) -> None:
        self.server = self.n2.run("srv", "httpd", "-f", "-p", "80", "-h", "/www")
        self.n2.exec("srv", SERVE)
        self.client = self.n1.run("cli", "sleep", "3600")

    def ping(self, count: int = 2) -> bool:
        return self.n1.exec("cli", f"ping -c {count} -W 1 {self.server}",
                            check=False).returncode == 0

    def fetch(self, path: str) -> str:
        """What the client container's wget gets from the server (with a timeout)."""
        return self.n1.exec("cli", f"timeout 20 wget -q -O - http://{self.server}/{path}",
                            timeout=30).stdout

    def seen_client_address(self) -> str:
        """The client's address as the server sees it ([::ffff:a.b.c.d] from httpd)."""
        seen = self.fetch("cgi-bin/peer").strip().strip("[]")
        return seen.removeprefix("::ffff:")

    def restart_daemons(self, *nodes: LabNode, extra: tuple[str, ...] = ()) -> None:
        """Stop pyflanneld on ``nodes`` and start it again with ``extra`` flags; wait
        until each is ready again."""
        for node in nodes:
            self.lab.stop_daemon(node)
        for node in nodes:
            self.lab.start_daemon(node, f"-healthz-port={HEALTHZ_PORT}", *extra)
        for node in nodes:
            wait_until(lambda n=node: ready(self.lab, n), 20, f"{node.name} ready")


def _cluster(backend: str) -> Iterator[Cluster]:
    require_docker()
    with Lab(2) as lab:
        lab.etcdctl("put", CONFIG_KEY,
                    json.dumps({"Network": "10.1.0.0/16", "Backend": {"Type": backend}}))
        for node in lab.nodes:
            lab.run(node.ns, ["iptables", "-P", "FORWARD", "DROP"])
            lab.start_daemon(node, f"-healthz-port={HEALTHZ_PORT}")
        envs = {node.name: lab.wait_subnet_file(node) for node in lab.nodes}
        docker = LabDocker(lab)
        docker.start_all()
        for node in lab.nodes:
            docker[node].import_busybox()
        n1, n2 = lab.nodes
        cluster = Cluster(backend, lab, docker, n1, n2,
                          {name: env["FLANNEL_SUBNET"] for name, env in envs.items()},
                          envs["n1"]["FLANNEL_MTU"])
        cluster.start_containers()
        yield cluster


@pytest.fixture(scope="module", params=["udp", "vxlan", "host-gw", "wireguard", "bgp"])
def cluster(request) -> Iterator[Cluster]:
    yield from _cluster(request.param)


def in_subnet(address: str, flannel_subnet: str) -> bool:
    return ipaddress.ip_address(address) in ipaddress.ip_interface(flannel_subnet).network


@lab_test
def test_a_container_pings_one_on_another_node_and_fetches_10_mb_intact_at_flannels_mtu(
        cluster):
    """dockerd built docker0 from mk-docker-opts' --bip and --mtu: each container has an
    address in its node's lease and FLANNEL_MTU on its eth0, and 10 MB cross intact."""
    assert in_subnet(cluster.client, cluster.subnets["n1"])
    assert in_subnet(cluster.server, cluster.subnets["n2"])
    for node, name in ((cluster.n1, "cli"), (cluster.n2, "srv")):
        assert node.exec(name, "cat /sys/class/net/eth0/mtu").stdout.strip() == cluster.mtu
    assert cluster.ping()
    want = cluster.n2.exec("srv", "head -c 20000000 /www/blob | sha256sum").stdout.split()[0]
    got = cluster.n1.exec("cli", f"timeout 30 wget -q -O - http://{cluster.server}/blob"
                          " | sha256sum", timeout=40).stdout.split()[0]
    assert got == want != EMPTY_SHA256


@lab_test
def test_with_dockers_own_masquerading_the_server_sees_the_client_nodes_address(cluster):
    """mk-docker-opts' default is --ip-masq=true: Docker masquerades what leaves docker0,
    so the server sees n1's address on the way out (its flannel device, or eth0 when
    host-gw or bgp route over the underlay), never the container's."""
    seen = cluster.seen_client_address()
    if cluster.backend in ("host-gw", "bgp"):  # routed over eth0, no flannel device
        assert seen == cluster.client_node.underlay_ip
    else:
        assert seen == str(ipaddress.ip_interface(cluster.subnets["n1"]).network.network_address)


@lab_test
@pytest.mark.parametrize("cluster", ["udp", "host-gw"], indirect=True)
def test_without_pyflannels_forward_rules_cross_node_traffic_is_dropped(cluster):
    """The FORWARD policy is DROP and Docker accepts only what leaves its bridge or answers
    it: the new connection into n2's docker0 passes by pyflanneld's rules alone. (The rules
    are the same for every backend; udp forwards through a device, host-gw over eth0.)"""
    cluster.restart_daemons(cluster.server_node, extra=("-iptables-forward-rules=false",))
    assert not cluster.ping(count=1)
    cluster.restart_daemons(cluster.server_node)
    assert cluster.ping()


@lab_test
def test_restarting_pyflanneld_under_running_containers_keeps_their_addresses_and_traffic(
        cluster):
    before = (cluster.n1.address("cli"), cluster.n2.address("srv"))
    cluster.restart_daemons(cluster.client_node, cluster.server_node)
    for node in (cluster.client_node, cluster.server_node):
        assert cluster.lab.wait_subnet_file(node)["FLANNEL_SUBNET"] == cluster.subnets[node.name]
    assert (cluster.n1.address("cli"), cluster.n2.address("srv")) == before
    wait_until(cluster.ping, 15, "ping after the restart")  # wireguard: a new handshake
    assert cluster.seen_client_address()


@lab_test
def test_with_pyflanneld_ip_masq_the_server_sees_the_containers_own_address(cluster):
    """pyflanneld -ip-masq writes FLANNEL_IPMASQ=true, so mk-docker-opts turns Docker's
    masquerading off; flannel's own rules leave traffic inside the network alone."""
    cluster.restart_daemons(cluster.client_node, cluster.server_node, extra=("-ip-masq",))
    cluster.docker.stop_all()
    assert all("--ip-masq=false" in opts for opts in cluster.docker.start_all().values())
    cluster.start_containers()
    assert cluster.seen_client_address() == cluster.client
