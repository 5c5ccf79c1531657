"""Tests for pyflannel.lab: the namespace cluster must work and must leave nothing behind."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyflannel.lab import DaemonExitedError, Lab, LabError, require_root_and_tools

_REASON = require_root_and_tools()
pytestmark = pytest.mark.lab


@pytest.fixture(autouse=True)
def _lab_gate() -> None:
    """No root or tools: fail in CI (a green run must mean the lab ran), skip elsewhere."""
    if _REASON is not None:
        (pytest.fail if os.environ.get("CI") else pytest.skip)(_REASON)

REPO_ROOT = Path(__file__).resolve().parent.parent
LAB_LINK_NAMES = {"br0", "eth0", "docker0"}


def lab_namespaces(prefix: str) -> list[str]:
    from pyroute2 import netns

    return [ns for ns in netns.listnetns() if ns.startswith(f"{prefix}-")]


def root_links() -> set[tuple[int, str]]:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        return {(link["index"], link.get("ifname")) for link in ipr.get_links()}


def lab_like(links: set[tuple[int, str]]) -> set[tuple[int, str]]:
    """Links the lab could have made (others' concurrent tests may add unrelated ones)."""
    return {(i, n) for i, n in links if n in LAB_LINK_NAMES or n.startswith("v-")}


def ns_addresses(ns: str, ifname: str) -> list[str]:
    from pyroute2 import NetNS

    with NetNS(ns, flags=0) as nl:  # flags=0: never create the namespace
        idx = nl.link_lookup(ifname=ifname)
        assert idx, f"{ifname} missing in {ns}"
        return [
            f"{a.get('IFA_ADDRESS')}/{a['prefixlen']}" for a in nl.get_addr(index=idx[0], family=2)
        ]


def ns_addresses6(ns: str, ifname: str) -> list[str]:
    """Global IPv6 addresses (link-local ones left out) of ``ifname`` in ``ns``."""
    from pyroute2 import NetNS

    with NetNS(ns, flags=0) as nl:
        idx = nl.link_lookup(ifname=ifname)
        assert idx, f"{ifname} missing in {ns}"
        return [f"{a.get('IFA_ADDRESS')}/{a['prefixlen']}"
                for a in nl.get_addr(index=idx[0], family=10)
                if not a.get("IFA_ADDRESS").startswith("fe80:")]


def ns_mtu(ns: str, ifname: str) -> int:
    from pyroute2 import NetNS

    with NetNS(ns, flags=0) as nl:
        return nl.get_links(nl.link_lookup(ifname=ifname)[0])[0].get("IFLA_MTU")


def gone(proc: subprocess.Popen) -> bool:
    return proc.poll() is not None


def pid_dead(pid: int) -> bool:
    """True if ``pid`` no longer runs (absent or a zombie awaiting an absent reaper)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in {"Z", "X"}


@pytest.fixture(scope="module")
def root_before() -> set[tuple[int, str]]:
    return root_links()


@pytest.fixture(scope="module")
def lab(root_before: set[tuple[int, str]]) -> Iterator[Lab]:
    with Lab(2, mtu=1450) as lab:
        yield lab


def test_require_root_and_tools_ok_here() -> None:
    assert require_root_and_tools() is None


def test_layout(lab: Lab, root_before: set[tuple[int, str]]) -> None:
    assert len(lab.prefix) == 8 and lab.prefix.startswith("pf")
    assert sorted(lab_namespaces(lab.prefix)) == sorted(
        [f"{lab.prefix}-br", f"{lab.prefix}-etcd", f"{lab.prefix}-n1", f"{lab.prefix}-n2"]
    )
    n1, n2 = lab.nodes
    assert (n1.name, n1.ns, n1.underlay_ip) == ("n1", f"{lab.prefix}-n1", "198.18.0.1")
    assert n2.underlay_ip == "198.18.0.2"
    assert n1.subnet_file == n1.workdir / "subnet.env"
    assert n1.log_file == n1.workdir / "daemon.log"
    assert n1.workdir.is_dir() and n1.workdir.parent == lab.workdir
    assert ns_addresses(n1.ns, "eth0") == ["198.18.0.1/24"]
    assert ns_addresses(lab.etcd_ns, "eth0") == ["198.18.0.100/24"]
    assert ns_mtu(n1.ns, "eth0") == 1450
    out = lab.run(n1.ns, ["cat", "/proc/sys/net/ipv4/ip_forward"]).stdout
    assert out == b"1\n"
    # nothing of ours in the root namespace while the lab is up
    assert lab_like(root_links() - root_before) == set()


def test_underlay_ping(lab: Lab) -> None:
    n1, n2 = lab.nodes
    assert lab.ping(n1, n2.underlay_ip)
    assert lab.ping(n2, n1.underlay_ip, count=2)
    assert lab.ping(n1, "198.18.0.100", src_ip=n1.underlay_ip)
    assert not lab.ping(n1, "198.18.0.99", timeout=0.5)


def test_dual_stack_underlay(lab: Lab, root_before: set[tuple[int, str]]) -> None:
    """Each namespace also has the fd00:198::/64 twin of its IPv4 address, usable at once
    (no DAD), and nodes have an IPv6 default route (how flanneld finds its IPv6 side) and
    IPv6 forwarding on."""
    n1, n2 = lab.nodes
    assert (n1.underlay_ip6, n2.underlay_ip6) == ("fd00:198::1", "fd00:198::2")
    assert ns_addresses6(n1.ns, "eth0") == ["fd00:198::1/64"]
    assert ns_addresses6(lab.etcd_ns, "eth0") == ["fd00:198::100/64"]
    assert ns_addresses6(lab.bridge_ns, "br0") == ["fd00:198::ffff/64"]
    route = lab.run(n1.ns, ["ip", "-6", "route", "show", "default"], text=True).stdout
    assert route.startswith("default via fd00:198::ffff dev eth0")
    assert lab.run(n1.ns, ["ip", "-4", "route", "show", "default"], text=True).stdout == ""
    fwd = lab.run(n1.ns, ["cat", "/proc/sys/net/ipv6/conf/all/forwarding"]).stdout
    assert fwd == b"1\n"
    assert lab.ping(n1, n2.underlay_ip6)
    assert lab.ping(n2, "fd00:198::100", src_ip=n2.underlay_ip6)
    assert lab_like(root_links() - root_before) == set()


def test_run_check_timeout_and_input(lab: Lab) -> None:
    ns = lab.nodes[0].ns
    assert lab.run(ns, ["cat"], input=b"hello").stdout == b"hello"
    assert lab.run(ns, ["false"], check=False).returncode == 1
    with pytest.raises(subprocess.CalledProcessError):
        lab.run(ns, ["false"])
    assert lab.run(ns, ["sh", "-c", "echo $LABX"], env={"LABX": "y"}, text=True).stdout == "y\n"
    with pytest.raises(subprocess.TimeoutExpired):
        lab.run(ns, ["sleep", "30"], timeout=0.3)
    with pytest.raises(LabError):
        lab.run("not-a-lab-ns", ["true"])


def test_etcdctl_put_get_and_restart(lab: Lab) -> None:
    assert lab.etcdctl("put", "/lab/key", "value1").strip() == "OK"
    assert lab.etcdctl("get", "/lab/key", "--print-value-only").strip() == "value1"

    lab.stop_etcd()
    with pytest.raises(subprocess.CalledProcessError):
        lab.etcdctl("--dial-timeout=300ms", "--command-timeout=500ms", "get", "/lab/key")
    lab.start_etcd()
    assert lab.etcdctl("get", "/lab/key", "--print-value-only").strip() == "value1"

    lab.stop_etcd(wipe=True)
    assert not (lab.workdir / "etcd").exists()
    lab.start_etcd()
    assert lab.etcdctl("get", "/lab/key", "--print-value-only").strip() == ""


def test_add_docker0(lab: Lab) -> None:
    n1 = lab.nodes[0]
    lab.add_docker0(n1, "10.1.15.1/24")
    assert ns_addresses(n1.ns, "docker0") == ["10.1.15.1/24"]
    lab.add_docker0(n1, "10.1.16.1/24")  # a new lease replaces the old address
    assert ns_addresses(n1.ns, "docker0") == ["10.1.16.1/24"]
    assert lab.ping(n1, "10.1.16.1")
    with pytest.raises(ValueError):
        lab.add_docker0(n1, "10.1.17.1")


def test_add_docker0_dual_stack_and_ipv6_only(lab: Lab) -> None:
    n2 = lab.nodes[1]
    lab.add_docker0(n2, "10.1.15.1/24", "fc00:10:1:5c::1/64")
    assert ns_addresses(n2.ns, "docker0") == ["10.1.15.1/24"]
    assert ns_addresses6(n2.ns, "docker0") == ["fc00:10:1:5c::1/64"]
    assert lab.ping(n2, "fc00:10:1:5c::1")
    lab.add_docker0(n2, None, "fc00:10:1:5d::1/64")  # IPv6 only: no IPv4 left
    assert ns_addresses(n2.ns, "docker0") == []
    assert ns_addresses6(n2.ns, "docker0") == ["fc00:10:1:5d::1/64"]
    with pytest.raises(ValueError):
        lab.add_docker0(n2, None, "fc00:10:1:5d::1")
    with pytest.raises(ValueError):
        lab.add_docker0(n2, None)


def test_add_host(lab: Lab) -> None:
    ns = lab.add_host("inet", "198.18.0.200")
    assert ns == f"{lab.prefix}-inet"
    assert ns_addresses(ns, "eth0") == ["198.18.0.200/24"]
    assert lab.ping(lab.nodes[1], "198.18.0.200")
    assert lab.ping(ns, lab.nodes[0].underlay_ip)
    with pytest.raises(ValueError):
        lab.add_host("other", "198.18.0.200")  # address taken
    with pytest.raises(ValueError):
        lab.add_host("far", "192.0.2.1")


def test_daemon_argv(lab: Lab) -> None:
    n1 = lab.nodes[0]
    assert lab.daemon_argv(n1, "-v=2") == [
        sys.executable,
        "-m",
        "pyflannel",
        "run",
        "-etcd-endpoints=http://198.18.0.100:2379",
        f"-subnet-file={n1.subnet_file}",
        "-iface=eth0",
        "-v=2",
    ]


def test_wait_subnet_file(lab: Lab) -> None:
    n2 = lab.nodes[1]
    with pytest.raises(TimeoutError):
        lab.wait_subnet_file(n2, timeout=0.3)
    n2.subnet_file.write_text("FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET=10.1.7.1/24\n")
    env = lab.wait_subnet_file(n2, timeout=1)
    assert env == {"FLANNEL_NETWORK": "10.1.0.0/16", "FLANNEL_SUBNET": "10.1.7.1/24"}
    n2.subnet_file.write_text("FLANNEL_SUBNET=10.1.8.1/24")  # no final newline: still ok
    assert lab.wait_subnet_file(n2, timeout=1) == {"FLANNEL_SUBNET": "10.1.8.1/24"}
    n2.subnet_file.write_text("not an env file\n")
    with pytest.raises(TimeoutError, match="no valid"):
        lab.wait_subnet_file(n2, timeout=0.3)
    n2.subnet_file.unlink()


def test_daemon_lifecycle_with_stand_in(lab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    """start/stop_daemon mechanics, with a shell script standing in for pyflannel."""
    n1 = lab.nodes[0]
    script = (
        'echo "started unbuffered=$PYTHONUNBUFFERED x=$X $*"; '
        'echo FLANNEL_SUBNET=10.1.9.1/24 > "$SUBNET"; '
        "trap 'exit 7' TERM; sleep 60 & wait"
    )
    monkeypatch.setattr(lab, "daemon_argv", lambda node, *extra: ["sh", "-c", script, "sh", *extra])
    proc = lab.start_daemon(n1, "-a", env={"X": "1", "SUBNET": str(n1.subnet_file)})
    assert n1.process is proc
    assert lab.wait_subnet_file(n1, timeout=5) == {"FLANNEL_SUBNET": "10.1.9.1/24"}
    with pytest.raises(LabError, match="already running"):
        lab.start_daemon(n1)
    assert lab.stop_daemon(n1) == 7
    assert n1.process is None and lab.stop_daemon(n1) is None
    assert "started unbuffered=1 x=1 -a" in lab.tail_log(n1)

    script = "trap '' TERM; sleep 60"  # ignores SIGTERM: must be SIGKILLed
    lab.start_daemon(n1)
    time.sleep(0.2)  # let the trap be installed
    assert lab.stop_daemon(n1, timeout=0.5) == -signal.SIGKILL

    script = "echo dying; exit 3"
    n1.subnet_file.unlink()
    lab.start_daemon(n1)
    with pytest.raises(DaemonExitedError, match="dying"):
        lab.wait_subnet_file(n1, timeout=5)
    lab.stop_daemon(n1)


def test_teardown_removes_everything() -> None:
    before = root_links()
    lab = Lab(1)
    with lab:
        sleeper = lab.popen(lab.nodes[0].ns, ["sleep", "60"])
        etcd_pid = lab._etcd.pid if lab._etcd else None
        # an orphan the lab never saw: a backgrounded child of a tracked shell
        orphan = lab.run(lab.nodes[0].ns, ["sh", "-c", "setsid sleep 61 >/dev/null 2>&1 & echo $!"])
        orphan_pid = int(orphan.stdout)
        assert not pid_dead(orphan_pid)
        lab.add_docker0(lab.nodes[0], "10.1.3.1/24")
        lab.add_host("inet", "198.18.0.200")
        assert len(lab_namespaces(lab.prefix)) == 4
        assert not gone(sleeper)
    assert gone(sleeper)
    assert etcd_pid is not None and pid_dead(etcd_pid)
    assert pid_dead(orphan_pid)  # found through its namespace, killed by PID
    assert lab_namespaces(lab.prefix) == []
    assert not lab.workdir.exists()
    assert lab_like(root_links() - before) == set()
    lab.teardown()  # idempotent, does not raise
    with pytest.raises(LabError):
        lab.start()


def test_failure_inside_with_tears_down() -> None:
    with pytest.raises(RuntimeError, match="boom"), Lab(1, with_etcd=False) as lab:
        sleeper = lab.popen(lab.nodes[0].ns, ["sleep", "60"])
        assert lab_namespaces(lab.prefix)
        raise RuntimeError("boom")
    assert gone(sleeper)
    assert lab_namespaces(lab.prefix) == []
    assert not lab.workdir.exists()


def test_etcd_failure_tears_down_with_log_tail(tmp_path: Path) -> None:
    lab = Lab(1, workdir=tmp_path)
    (tmp_path / "etcd").write_text("a file where etcd wants its data dir\n")
    with pytest.raises(LabError, match="not a directory") as info:
        lab.start()
    assert "etcd.log" in str(info.value)
    assert lab_namespaces(lab.prefix) == []
    assert tmp_path.exists()  # a caller-supplied directory is never deleted


def test_prefix_collision_is_refused() -> None:
    prefix = f"pf{secrets.token_hex(3)}"
    with Lab(1, prefix=prefix, with_etcd=False) as first:
        with pytest.raises(LabError, match="already exists"):
            Lab(1, prefix=prefix, with_etcd=False).start()
        # the refused lab must not have deleted the first lab's namespaces
        assert len(lab_namespaces(prefix)) == 2
        assert first.ping(first.nodes[0], first.nodes[0].underlay_ip)
    assert lab_namespaces(prefix) == []


CHILD = textwrap.dedent(
    """
    import signal, sys, time
    from pyflannel.lab import Lab
    # CI may start us with SIGINT ignored; we want Ctrl-C semantics
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with Lab(1, prefix=sys.argv[1], with_etcd=False) as lab:
        p = lab.popen(lab.nodes[0].ns, ["sleep", "60"])
        print(lab.workdir, p.pid, flush=True)
        time.sleep(60)
    """
)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_to_owner_tears_down(sig: signal.Signals) -> None:
    prefix = f"pf{secrets.token_hex(3)}"
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    env.pop("PYFLANNEL_LAB_KEEP", None)
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, prefix], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=env, text=True,
    )  # fmt: skip
    try:
        assert child.stdout is not None
        line = child.stdout.readline().split()
        assert line, child.stderr.read() if child.stderr else ""
        workdir, sleeper_pid = Path(line[0]), int(line[1])
        assert lab_namespaces(prefix)
        child.send_signal(sig)
        child.wait(timeout=20)
        assert child.returncode == -sig  # died of the signal, after cleaning up
        assert lab_namespaces(prefix) == []
        assert not workdir.exists()
        deadline = time.monotonic() + 5
        while not pid_dead(sleeper_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pid_dead(sleeper_pid)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        # belt and braces: these namespaces carry this test's own unique prefix
        for ns in lab_namespaces(prefix):
            subprocess.run(["ip", "netns", "del", ns], check=False)
