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


# -- dual-stack and IPv6-only --------------------------------------------------------------

DUAL = ('{"Network": "10.1.0.0/16", "EnableIPv6": true, "IPv6Network": "fc00:10:1::/48",'
        ' "Backend": {"Type": "vxlan"}}')
V6ONLY = '{"EnableIPv4": false, "EnableIPv6": true, "IPv6Network": "fc00:10:1::/48"}'


def get_json(etcd, key: str):
    value = etcd.etcdctl("get", key, "--print-value-only").stdout
    return json.loads(value) if value.strip() else None


def test_validate_applies_the_ipv6_rules_and_describes_both_networks():
    def validate(config: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pyflannel", "config", "validate", config,
                               "-etcd-endpoints=http://127.0.0.1:1"], capture_output=True,
                              text=True, timeout=30, cwd=ROOT)

    ok = validate(DUAL)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == ("valid: network 10.1.0.0/16, /24, IPv6 network "
                                 "fc00:10:1::/48, /64, backend vxlan")
    ok = validate(V6ONLY)
    assert ok.stdout.strip() == "valid: IPv6 network fc00:10:1::/48, /64, backend udp"
    for config, message in [
        ('{"Network": "10.1.0.0/16", "EnableIPv6": true}', "IPv6Network is required"),
        ('{"EnableIPv6": true, "Network": "10.1.0.0/16", "IPv6Network": "fc00::/126"}',
         "IPv6Network is too small"),
        ('{"EnableIPv6": true, "Network": "10.1.0.0/16", "IPv6Network": "fc00::/48",'
         ' "IPv6SubnetLen": 127}', "IPv6SubnetLen"),
        ('{"EnableIPv6": true, "Network": "10.1.0.0/16", "IPv6Network": "fc00::/48",'
         ' "IPv6SubnetMin": "fc00:0:0:1::1"}', "IPv6SubnetMin"),
    ]:
        bad = validate(config)
        assert bad.returncode == 1 and message in bad.stderr, (config, bad.stderr)


def test_set_stores_an_ipv6_only_config(etcd_server, etcd_prefix):
    out = cli(etcd_server, etcd_prefix, "config", "set", V6ONLY)
    assert out.returncode == 0, out.stderr
    assert "IPv6 network fc00:10:1::/48, /64" in out.stdout and "None" not in out.stdout


def test_a_dual_stack_reservation_is_one_key_naming_both_subnets(etcd_server, etcd_prefix):
    cli(etcd_server, etcd_prefix, "config", "set", DUAL)
    out = cli(etcd_server, etcd_prefix, "lease", "reserve", "10.1.42.0/24",
              "fc00:10:1:2a::/64", "198.18.0.9", "fd00:198::9")
    assert out.returncode == 0, out.stderr
    key = f"{etcd_prefix}/subnets/10.1.42.0-24&fc00:10:1:2a::-64"
    assert key in out.stdout
    assert get_json(etcd_server, key) == {"PublicIP": "198.18.0.9", "PublicIPv6": "fd00:198::9"}
    (row,) = json.loads(cli(etcd_server, etcd_prefix, "lease", "list", "--json").stdout)
    assert (row["subnet"], row["ipv6_subnet"]) == ("10.1.42.0/24", "fc00:10:1:2a::/64")
    assert row["expires_in_s"] is None
    # Either subnet names the key to release.
    out = cli(etcd_server, etcd_prefix, "lease", "release", "fc00:10:1:2a::/64")
    assert out.returncode == 0, out.stderr
    assert get_json(etcd_server, key) is None


def test_an_ipv6_only_reservation_is_flanneld_s_layout(etcd_server, etcd_prefix):
    cli(etcd_server, etcd_prefix, "config", "set", V6ONLY)
    out = cli(etcd_server, etcd_prefix, "lease", "reserve", "fd00:198::9", "fc00:10:1:2a::/64")
    assert out.returncode == 0, out.stderr
    key = f"{etcd_prefix}/subnets/0.0.0.0-0&fc00:10:1:2a::-64"
    assert get_json(etcd_server, key) == {"PublicIP": "0.0.0.0", "PublicIPv6": "fd00:198::9"}
    assert cli(etcd_server, etcd_prefix, "lease", "release", "fc00:10:1:2a::/64").returncode == 0
    assert get_json(etcd_server, key) is None


@pytest.mark.parametrize(("config", "args", "message"), [
    (DUAL, ["10.1.42.0/24", "198.18.0.9"], "enables IPv6: give an IPv6 subnet"),
    (DUAL, ["10.1.42.0/24", "fc00:10:1::/64", "198.18.0.9"], "not a leasable /64"),
    (DUAL, ["10.1.42.0/24", "fc00:10:2:1::/64", "198.18.0.9"], "not a leasable /64"),
    (DUAL, ["10.1.42.0/24", "fc00:10:1:1::5/64", "198.18.0.9"], "host bits"),
    (DUAL, ["10.1.42.0/24", "fc00:10:1:1::/64", "fd00:198::9"], "IPv4 address (its PublicIP)"),
    (V6ONLY, ["fc00:10:1:2a::/64", "198.18.0.9"], "give the host's IPv6 address"),
    (V6ONLY, ["10.1.42.0/24", "fc00:10:1:2a::/64", "fd00:198::9"], "does not enable IPv4"),
    ('{"Network": "10.1.0.0/16"}', ["10.1.42.0/24", "fc00:10:1:2a::/64", "198.18.0.9"],
     "does not enable IPv6"),
])
def test_bad_dual_stack_reservations_are_refused(etcd_server, etcd_prefix, config, args,
                                                  message):
    cli(etcd_server, etcd_prefix, "config", "set", config)
    out = cli(etcd_server, etcd_prefix, "lease", "reserve", *args)
    assert out.returncode == 1 and message in out.stderr, out.stderr
    assert etcd_server.etcdctl("get", f"{etcd_prefix}/subnets/", "--prefix").stdout == ""


def test_a_subnet_held_under_another_key_is_not_reserved_over(etcd_server, etcd_prefix):
    """Dual-stack keys name two subnets: a subnet is taken when any key holds it."""
    cli(etcd_server, etcd_prefix, "config", "set", DUAL)
    etcd_server.etcdctl("put", f"{etcd_prefix}/subnets/10.1.42.0-24&fc00:10:1:99::-64",
                        '{"PublicIP":"198.18.0.10","PublicIPv6":"fd00:198::10"}')
    out = cli(etcd_server, etcd_prefix, "lease", "reserve", "10.1.42.0/24",
              "fc00:10:1:2a::/64", "198.18.0.9")
    assert out.returncode == 1
    assert "10.1.42.0/24 is held by 198.18.0.10 (key 10.1.42.0-24&fc00:10:1:99::-64)" \
        in out.stderr
