"""`pyflannel config` and `pyflannel lease`: changes are validated before etcd is touched."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.test_config import INVALID

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(etcd, prefix, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pyflannel", *args, f"-etcd-endpoints={etcd.endpoint}",
         f"-etcd-prefix={prefix}"], capture_output=True, text=True, timeout=60, cwd=ROOT)


def stored(etcd, prefix: str) -> str:
    return etcd.etcdctl("get", f"{prefix}/config", "--print-value-only").stdout.strip()


def test_set_then_get_round_trips(etcd_server, etcd_prefix):
    out = cli(etcd_server, etcd_prefix, "config", "set", '{"Network": "10.1.0.0/16"}')
    assert out.returncode == 0, out.stderr
    assert "network 10.1.0.0/16" in out.stdout
    got = cli(etcd_server, etcd_prefix, "config", "get")
    assert json.loads(got.stdout) == {"Network": "10.1.0.0/16"}
    assert cli(etcd_server, etcd_prefix, "config", "validate").returncode == 0


def _as_text(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


@pytest.mark.parametrize(("config", "message"), [
    pytest.param(_as_text(p.values[0]), p.values[1], id=p.id) for p in INVALID
    if isinstance(p.values[0], str | dict) and len(_as_text(p.values[0])) < 100_000
])
def test_set_refuses_every_invalid_config_and_leaves_etcd_unchanged(etcd_server, etcd_prefix,
                                                                     config, message):
    good = '{"Network": "10.9.0.0/16"}'
    etcd_server.etcdctl("put", f"{etcd_prefix}/config", good)
    out = cli(etcd_server, etcd_prefix, "config", "set", config)
    assert out.returncode == 1
    assert message in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert stored(etcd_server, etcd_prefix) == good


def test_validate_checks_a_given_config_without_etcd():
    out = subprocess.run([sys.executable, "-m", "pyflannel", "config", "validate",
                          '{"Network": "10.1.0.0/16", "SubnetLen": 31}',
                          "-etcd-endpoints=http://127.0.0.1:1"], capture_output=True,
                         text=True, timeout=30, cwd=ROOT)
    assert out.returncode == 1 and "SubnetLen" in out.stderr


def test_reserve_list_release(etcd_server, etcd_prefix):
    cli(etcd_server, etcd_prefix, "config", "set", '{"Network": "10.1.0.0/16"}')
    out = cli(etcd_server, etcd_prefix, "lease", "reserve", "10.1.42.0/24", "198.18.0.9")
    assert out.returncode == 0, out.stderr
    key = f"{etcd_prefix}/subnets/10.1.42.0-24"
    value = etcd_server.etcdctl("get", key, "--print-value-only").stdout
    assert json.loads(value) == {"PublicIP": "198.18.0.9", "PublicIPv6": None}
    listed = cli(etcd_server, etcd_prefix, "lease", "list", "--json")
    (row,) = json.loads(listed.stdout)
    assert row["subnet"] == "10.1.42.0/24" and row["expires_in_s"] is None
    assert "reserved" in cli(etcd_server, etcd_prefix, "lease", "list").stdout
    assert cli(etcd_server, etcd_prefix, "lease", "release", "10.1.42.0/24").returncode == 0
    assert etcd_server.etcdctl("get", key, "--print-value-only").stdout == ""


@pytest.mark.parametrize(("args", "message"), [
    (["lease", "reserve", "10.1.42.5/24", "198.18.0.9"], "host bits"),
    (["lease", "reserve", "10.1.0.0/24", "198.18.0.9"], "not a leasable"),
    (["lease", "reserve", "10.2.1.0/24", "198.18.0.9"], "not a leasable"),
    (["lease", "reserve", "10.1.7.0/24", "nope"], "IPv4"),
    (["lease", "release", "10.1.99.0/24"], "no lease"),
])
def test_bad_lease_commands_are_refused(etcd_server, etcd_prefix, args, message):
    cli(etcd_server, etcd_prefix, "config", "set", '{"Network": "10.1.0.0/16"}')
    out = cli(etcd_server, etcd_prefix, *args)
    assert out.returncode == 1 and message in out.stderr, out.stderr


def test_a_subnet_held_by_another_host_is_not_reserved_over(etcd_server, etcd_prefix):
    cli(etcd_server, etcd_prefix, "config", "set", '{"Network": "10.1.0.0/16"}')
    cli(etcd_server, etcd_prefix, "lease", "reserve", "10.1.42.0/24", "198.18.0.9")
    out = cli(etcd_server, etcd_prefix, "lease", "reserve", "10.1.42.0/24", "198.18.0.10")
    assert out.returncode == 1 and "held by 198.18.0.9" in out.stderr
