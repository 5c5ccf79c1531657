"""The systemd unit: valid for systemd, shaped like flanneld's, and its command line, fed the
seed-style /etc/sysconfig/flanneld, starts a working daemon that tells systemd it is ready."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pyflannel.host.subnetfile import read_env_file
from pyflannel.lab import Lab
from tests.labtools import require_lab

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "pyflanneld.service"
SYSCONFIG = ROOT / "systemd" / "flanneld.sysconfig"
DROPIN = ROOT / "systemd" / "docker.service.d" / "flannel.conf"
BIN = Path(sys.executable).parent


def entries(path: Path) -> list[tuple[str, str, str]]:
    """(section, key, value) in order; systemd allows a key more than once."""
    out, section = [], ""
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.append((section, key.strip(), value.strip()))
    return out


def values(path: Path, section: str, key: str) -> list[str]:
    return [v for s, k, v in entries(path) if s == section and k == key]


def installed_copy(tmp_path: Path) -> Path:
    """The unit as installed in a virtualenv: the same file, binaries from this venv."""
    unit = tmp_path / "pyflanneld.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/", f"{BIN}/"))
    return unit


def test_systemd_analyze_verify_finds_nothing_to_say(tmp_path):
    tool = shutil.which("systemd-analyze")
    if tool is None:
        (pytest.fail if os.environ.get("CI") else pytest.skip)("systemd-analyze not installed")
    out = subprocess.run([tool, "verify", str(installed_copy(tmp_path))], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and out.stdout == "" and out.stderr == "", out.stderr


def test_the_unit_is_shaped_like_flanneld_s():
    assert values(UNIT, "Service", "Type") == ["notify"]
    assert values(UNIT, "Service", "Restart") == ["always"]
    assert values(UNIT, "Service", "RestartSec") == ["5"]
    after = " ".join(values(UNIT, "Unit", "After")).split()
    assert "network-online.target" in after and "etcd.service" in after
    assert values(UNIT, "Unit", "Wants") == ["network-online.target"]
    assert values(UNIT, "Unit", "Before") == ["docker.service"]
    assert values(UNIT, "Service", "EnvironmentFile") == [
        "/etc/sysconfig/flanneld", "-/etc/sysconfig/docker-network"]
    (start,) = values(UNIT, "Service", "ExecStart")
    assert "-etcd-endpoints=${FLANNEL_ETCD_ENDPOINTS}" in start
    assert "-etcd-prefix=${FLANNEL_ETCD_PREFIX}" in start and start.endswith("$FLANNEL_OPTIONS")
    assert values(UNIT, "Service", "ExecStartPost") == [
        "/usr/local/bin/pyflannel mk-docker-opts -k DOCKER_NETWORK_OPTIONS -d /run/flannel/docker"]
    assert values(UNIT, "Install", "RequiredBy") == ["docker.service"]


def test_the_docker_drop_in_reads_the_options_pyflannel_writes():
    assert values(DROPIN, "Service", "EnvironmentFile") == ["-/run/flannel/docker"]
    starts = values(DROPIN, "Service", "ExecStart")
    assert starts[0] == "" and "$DOCKER_NETWORK_OPTIONS" in starts[1]


def expand(command: str, env: dict[str, str]) -> list[str]:
    """systemd's rules: ``${VAR}`` is replaced inside a word; a lone ``$VAR`` word becomes
    the variable's value split on white space."""
    argv = []
    for word in shlex.split(command):
        m = re.fullmatch(r"\$([A-Za-z_][A-Za-z0-9_]*)", word)
        if m:
            argv += env.get(m.group(1), "").split()
            continue
        argv.append(re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}",
                           lambda x: env.get(x.group(1), ""), word))
    return argv


def test_expansion_follows_systemd():
    env = {"A": "x y", "B": "-f=1 -g=2"}
    assert expand("/bin/p -a=${A} $B", env) == ["/bin/p", "-a=x y", "-f=1", "-g=2"]


def test_the_unit_s_command_line_with_the_seed_sysconfig_runs_a_ready_daemon(tmp_path):
    require_lab()
    env = read_env_file(SYSCONFIG)
    assert env == {"FLANNEL_ETCD_ENDPOINTS": "http://127.0.0.1:2379",
                   "FLANNEL_ETCD_PREFIX": "/atomic.io/network"}
    notify_path = tmp_path / "notify"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.settimeout(30)
    with Lab(1) as lab:
        node = lab.nodes[0]
        lab.etcdctl("put", "/atomic.io/network/config", '{"Network": "10.1.0.0/16"}')
        env["FLANNEL_ETCD_ENDPOINTS"] = lab.etcd_endpoint  # the only line an operator edits
        env["FLANNEL_OPTIONS"] = f"-iface=eth0 -subnet-file={node.subnet_file}"
        (start,) = values(installed_copy(tmp_path), "Service", "ExecStart")
        argv = expand(start, env)
        assert argv[0] == f"{BIN}/pyflanneld"
        log = open(node.log_file, "ab")  # noqa: SIM115 - the daemon's output
        proc = lab.popen(node.ns, argv, stdout=log, stderr=log,
                         env={"NOTIFY_SOCKET": str(notify_path)})
        assert notify.recv(4096) == b"READY=1"
        subnet = lab.wait_subnet_file(node)["FLANNEL_SUBNET"]
        assert "/atomic.io/network/subnets/" in lab.etcdctl(
            "get", "--prefix", "/atomic.io/network/subnets/", "--keys-only")
        (post,) = values(installed_copy(tmp_path), "Service", "ExecStartPost")
        docker_env = tmp_path / "docker"
        post_argv = expand(post, env)
        post_argv[post_argv.index("-d") + 1] = str(docker_env)
        subprocess.run([*post_argv, "-f", str(node.subnet_file)], check=True, timeout=30)
        opts = read_env_file(docker_env)
        assert opts["DOCKER_NETWORK_OPTIONS"] == (
            f" --bip={subnet} --ip-masq=true --mtu=1472")
        proc.terminate()
        assert proc.wait(10) == 0
    notify.close()
