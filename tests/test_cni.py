"""pyflannel-cni without a network: the delegate config it builds from subnet.env and the
network config, and how it answers a runtime (CNI error JSON, codes, saved configs).

The delegate here is a stand-in script that records what it was given; the real bridge
and host-local plugins run in tests/test_cni_lab.py.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from pyflannel.cni import main
from pyflannel.cni.errors import CniError
from pyflannel.cni.netconf import (
    build_delegate,
    parse_flannel_env,
    parse_plugin_conf,
)

DUAL_ENV = {
    "FLANNEL_NETWORK": "10.1.0.0/16",
    "FLANNEL_SUBNET": "10.1.15.1/24",
    "FLANNEL_IPV6_NETWORK": "fc00:10:1::/48",
    "FLANNEL_IPV6_SUBNET": "fc00:10:1:5c::1/64",
    "FLANNEL_MTU": "1450",
    "FLANNEL_IPMASQ": "false",
}
V4_ENV = {k: v for k, v in DUAL_ENV.items() if "IPV6" not in k}


def conf(**extra) -> bytes:
    return json.dumps({"cniVersion": "1.0.0", "name": "cbr0", "type": "flannel", **extra}).encode()


def delegate_for(env: dict, **extra) -> dict:
    return build_delegate(parse_plugin_conf(conf(**extra)), parse_flannel_env(env))


# ------------------------------------------------------------------ the delegate config


def test_defaults_give_flannel_s_bridge_with_host_local_over_the_node_s_subnet():
    assert delegate_for(V4_ENV) == {
        "cniVersion": "1.0.0",
        "name": "cbr0",
        "type": "bridge",
        "bridge": "cni0",
        "isGateway": True,
        "mtu": 1450,
        "ipMasq": True,  # the daemon does not masquerade (FLANNEL_IPMASQ=false): the bridge does
        "ipam": {
            "type": "host-local",
            "ranges": [[{"subnet": "10.1.15.0/24"}]],
            "routes": [{"dst": "10.1.0.0/16", "gw": "10.1.15.1"}],
        },
    }


def test_the_daemon_masquerading_turns_the_bridge_s_masquerade_off():
    assert delegate_for({**V4_ENV, "FLANNEL_IPMASQ": "true"})["ipMasq"] is False


def test_dual_stack_gives_a_range_and_a_route_per_family():
    ipam = delegate_for(DUAL_ENV)["ipam"]
    assert ipam["ranges"] == [[{"subnet": "10.1.15.0/24"}], [{"subnet": "fc00:10:1:5c::/64"}]]
    assert ipam["routes"] == [{"dst": "10.1.0.0/16", "gw": "10.1.15.1"},
                              {"dst": "fc00:10:1::/48", "gw": "fc00:10:1:5c::1"}]


def test_ipv6_only_gives_only_the_ipv6_range_and_route():
    env = {k: v for k, v in DUAL_ENV.items() if k not in ("FLANNEL_NETWORK", "FLANNEL_SUBNET")}
    ipam = delegate_for(env)["ipam"]
    assert ipam["ranges"] == [[{"subnet": "fc00:10:1:5c::/64"}]]
    assert ipam["routes"] == [{"dst": "fc00:10:1::/48", "gw": "fc00:10:1:5c::1"}]


def test_the_delegate_s_own_settings_win_and_extra_keys_pass_through():
    d = delegate_for(V4_ENV, delegate={"ipMasq": False, "mtu": 1400, "bridge": "kube0",
                                       "isGateway": False, "hairpinMode": True,
                                       "isDefaultGateway": True, "name": "ignored"})
    assert (d["ipMasq"], d["mtu"], d["bridge"], d["isGateway"]) == (False, 1400, "kube0", False)
    assert d["hairpinMode"] is True and d["isDefaultGateway"] is True
    assert d["name"] == "cbr0"  # the network's name, as flannel does


def test_another_delegate_type_gets_no_bridge_keys():
    d = delegate_for(V4_ENV, delegate={"type": "ptp"})
    assert d["type"] == "ptp" and "bridge" not in d and "isGateway" not in d
    assert d["mtu"] == 1450 and d["ipMasq"] is True


def test_ipam_is_merged_ranges_replaced_and_routes_appended():
    d = delegate_for(V4_ENV, ipam={"dataDir": "/var/lib/pods",
                                   "ranges": [[{"subnet": "1.2.3.0/24"}]],
                                   "routes": [{"dst": "192.0.2.0/24"}]})
    assert d["ipam"] == {
        "type": "host-local",
        "dataDir": "/var/lib/pods",
        "ranges": [[{"subnet": "10.1.15.0/24"}]],
        "routes": [{"dst": "192.0.2.0/24"}, {"dst": "10.1.0.0/16", "gw": "10.1.15.1"}],
    }


def test_building_does_not_change_the_parsed_config():
    parsed = parse_plugin_conf(conf(ipam={"routes": []}, delegate={"hairpinMode": True}))
    build_delegate(parsed, parse_flannel_env(V4_ENV))
    assert parsed.ipam == {"routes": []} and parsed.delegate == {"hairpinMode": True}


@pytest.mark.parametrize(("change", "message"), [
    ({"FLANNEL_SUBNET": None}, "neither FLANNEL_SUBNET nor FLANNEL_IPV6_SUBNET"),
    ({"FLANNEL_NETWORK": None}, "neither FLANNEL_NETWORK nor FLANNEL_IPV6_NETWORK"),
    ({"FLANNEL_MTU": None}, "missing FLANNEL_MTU"),
    ({"FLANNEL_IPMASQ": None}, "missing FLANNEL_IPMASQ"),
    ({"FLANNEL_SUBNET": "10.1.300.1/24"}, "FLANNEL_SUBNET=10.1.300.1/24 is not a CIDR"),
    ({"FLANNEL_SUBNET": "fc00::1/64"}, "FLANNEL_SUBNET=fc00::1/64 is not an IPv4 network"),
    ({"FLANNEL_SUBNET": "10.2.0.1/24"}, "outside the network 10.1.0.0/16"),
    ({"FLANNEL_MTU": "big"}, "FLANNEL_MTU=big is not an MTU"),
    ({"FLANNEL_MTU": "0"}, "FLANNEL_MTU=0 is not an MTU"),
    ({"FLANNEL_IPMASQ": "yes"}, "FLANNEL_IPMASQ=yes is not true or false"),
])
def test_a_bad_subnet_env_is_one_line_naming_the_key(change, message):
    env = {k: v for k, v in {**V4_ENV, **change}.items() if v is not None}
    with pytest.raises(CniError) as err:
        parse_flannel_env(env, where="/run/flannel/subnet.env")
    assert message in err.value.msg and err.value.code == 7
    assert "/run/flannel/subnet.env" in err.value.msg and "\n" not in err.value.msg


@pytest.mark.parametrize(("doc", "code", "message"), [
    (b"{", 7, "not JSON"),
    (b"[]", 7, "not a JSON object"),
    (json.dumps({"name": "cbr0"}).encode(), 7, "no cniVersion"),
    (json.dumps({"cniVersion": "1.0.0"}).encode(), 7, "no name"),
    (json.dumps({"cniVersion": "0.2.0", "name": "x"}).encode(), 1, "0.2.0 is not supported"),
    (json.dumps({"cniVersion": "1.1.0", "name": "x"}).encode(), 1, "1.1.0 is not supported"),
    (conf(delegate=[]), 7, "delegate must be a JSON object"),
    (conf(ipam="host-local"), 7, "ipam must be a JSON object"),
    (conf(subnetFile=5), 7, "subnetFile must be a path"),
])
def test_a_bad_network_config_is_refused_with_the_spec_s_code(doc, code, message):
    with pytest.raises(CniError) as err:
        parse_plugin_conf(doc)
    assert err.value.code == code and message in err.value.msg


@pytest.mark.parametrize(("delegate", "ipam", "message"), [
    ({"type": "flannel"}, {}, "delegate.type cannot be flannel"),
    ({"type": 3}, {}, "delegate.type must be a name"),
    ({}, {"routes": {"dst": "0.0.0.0/0"}}, "ipam.routes must be a list"),
])
def test_a_delegate_that_cannot_work_is_refused(delegate, ipam, message):
    with pytest.raises(CniError) as err:
        delegate_for(V4_ENV, delegate=delegate, ipam=ipam)
    assert err.value.code == 7 and message in err.value.msg


# ------------------------------------------------------------------ the plugin as a runtime sees it

# Records its stdin and CNI_* environment, then answers as a delegate would.
FAKE_DELEGATE = """#!/bin/sh
cat > "$(dirname "$0")/calls/$CNI_COMMAND.json"
env | grep '^CNI_' | sort > "$(dirname "$0")/calls/$CNI_COMMAND.env"
if [ -e "$(dirname "$0")/fail" ]; then
  echo '{"code": 11, "msg": "busy", "details": "try later"}'; exit 1
fi
[ "$CNI_COMMAND" = ADD ] && echo '{"cniVersion": "1.0.0", "ips": [{"address": "10.1.15.2/24"}]}'
exit 0
"""


@pytest.fixture
def host(tmp_path):
    """A node's files: subnet.env, a CNI bin directory with a recording delegate, a dataDir."""
    bindir = tmp_path / "bin"
    (bindir / "calls").mkdir(parents=True)
    fake = bindir / "bridge"
    fake.write_text(FAKE_DELEGATE)
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    subnet_env = tmp_path / "subnet.env"
    subnet_env.write_text("".join(f"{k}={v}\n" for k, v in V4_ENV.items()))
    return tmp_path


def netconf(host: Path, **extra) -> bytes:
    return conf(subnetFile=str(host / "subnet.env"), dataDir=str(host / "data"), **extra)


def environ(host: Path, command: str, **extra) -> dict:
    env = {"CNI_COMMAND": command, "CNI_CONTAINERID": "c0ffee", "CNI_NETNS": "/run/netns/pod",
           "CNI_IFNAME": "eth0", "CNI_PATH": f"/nonexistent:{host / 'bin'}",
           "PATH": os.environ.get("PATH", "")}
    env.update(extra)
    return {k: v for k, v in env.items() if v is not None}


def call(capsys, host: Path, command: str, stdin: bytes | None = None, **env) -> tuple[int, str]:
    rc = main(environ(host, command, **env), netconf(host) if stdin is None else stdin)
    return rc, capsys.readouterr().out


def error(out: str) -> dict:
    doc = json.loads(out)
    assert set(doc) <= {"cniVersion", "code", "msg", "details"} and doc["cniVersion"]
    return doc


def test_version_lists_the_supported_versions(capsys, host):
    rc, out = call(capsys, host, "VERSION", b'{"cniVersion": "1.0.0"}')
    assert rc == 0
    assert json.loads(out) == {"cniVersion": "1.0.0",
                               "supportedVersions": ["0.3.1", "0.4.0", "1.0.0"]}


def test_add_hands_the_delegate_its_config_and_the_same_environment(capsys, host):
    rc, out = call(capsys, host, "ADD")
    assert rc == 0 and json.loads(out)["ips"] == [{"address": "10.1.15.2/24"}]
    given = json.loads((host / "bin/calls/ADD.json").read_text())
    assert given["type"] == "bridge" and given["name"] == "cbr0" and given["cniVersion"] == "1.0.0"
    assert given["ipam"]["ranges"] == [[{"subnet": "10.1.15.0/24"}]]
    env = (host / "bin/calls/ADD.env").read_text()
    assert "CNI_CONTAINERID=c0ffee" in env and "CNI_NETNS=/run/netns/pod" in env
    assert "CNI_IFNAME=eth0" in env and "CNI_COMMAND=ADD" in env
    assert json.loads((host / "data/c0ffee").read_text()) == given


def test_del_hands_over_the_saved_config_even_after_subnet_env_changed(capsys, host):
    assert call(capsys, host, "ADD")[0] == 0
    added = json.loads((host / "bin/calls/ADD.json").read_text())
    (host / "subnet.env").write_text("FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET=10.1.99.1/24\n"
                                     "FLANNEL_MTU=1400\nFLANNEL_IPMASQ=true\n")
    assert call(capsys, host, "DEL") == (0, "")
    assert json.loads((host / "bin/calls/DEL.json").read_text()) == added
    assert not (host / "data/c0ffee").exists()


def test_del_without_a_saved_config_succeeds_and_runs_nothing(capsys, host):
    (host / "subnet.env").unlink()  # not needed either: DEL works while the daemon is down
    assert call(capsys, host, "DEL") == (0, "")
    assert call(capsys, host, "DEL", CNI_NETNS=None) == (0, "")
    assert not (host / "bin/calls/DEL.json").exists()


def test_a_failed_del_keeps_the_saved_config_for_the_runtime_s_retry(capsys, host):
    assert call(capsys, host, "ADD")[0] == 0
    (host / "bin/fail").touch()
    rc, out = call(capsys, host, "DEL")
    assert rc == 1 and error(out) == {"cniVersion": "1.0.0", "code": 11, "msg": "bridge: busy",
                                      "details": "try later"}
    assert (host / "data/c0ffee").exists()


def test_a_failed_add_keeps_the_saved_config_so_del_can_clean_up(capsys, host):
    (host / "bin/fail").touch()
    rc, out = call(capsys, host, "ADD")
    assert rc == 1 and error(out)["code"] == 11
    (host / "bin/fail").unlink()
    assert call(capsys, host, "DEL") == (0, "")
    assert (host / "bin/calls/DEL.json").exists() and not (host / "data/c0ffee").exists()


def test_check_hands_the_saved_config_with_the_runtime_s_prev_result(capsys, host):
    assert call(capsys, host, "ADD")[0] == 0
    prev = {"cniVersion": "1.0.0", "ips": [{"address": "10.1.15.2/24"}]}
    assert call(capsys, host, "CHECK", netconf(host, prevResult=prev)) == (0, "")
    given = json.loads((host / "bin/calls/CHECK.json").read_text())
    assert given["prevResult"] == prev and given["type"] == "bridge"


def test_check_of_an_unknown_container_and_without_prev_result(capsys, host):
    rc, out = call(capsys, host, "CHECK", netconf(host, prevResult={}))
    assert rc == 1 and error(out)["code"] == 3 and "c0ffee" in error(out)["msg"]
    rc, out = call(capsys, host, "CHECK")
    assert rc == 1 and error(out)["code"] == 7 and "prevResult" in error(out)["msg"]


def test_check_is_refused_for_0_3_1(capsys, host):
    doc = json.loads(netconf(host, prevResult={}))
    rc, out = call(capsys, host, "CHECK", json.dumps({**doc, "cniVersion": "0.3.1"}).encode())
    assert rc == 1 and error(out) == {"cniVersion": "0.3.1", "code": 1,
                                      "msg": "CNI 0.3.1 has no CHECK"}


def test_a_missing_subnet_env_asks_whether_pyflanneld_runs(capsys, host):
    (host / "subnet.env").unlink()
    rc, out = call(capsys, host, "ADD")
    doc = error(out)
    assert rc == 1 and doc["code"] == 11 and "is pyflanneld running?" in doc["msg"]
    assert str(host / "subnet.env") in doc["msg"] and not (host / "data").exists()


def test_a_missing_delegate_binary_is_a_clear_error(capsys, host):
    rc, out = call(capsys, host, "ADD", CNI_PATH="/nonexistent")
    doc = error(out)
    assert rc == 1 and doc["code"] == 4
    assert "delegate plugin 'bridge' not found in CNI_PATH (/nonexistent)" in doc["msg"]


@pytest.mark.parametrize(("command", "unset"), [
    ("ADD", "CNI_NETNS"), ("ADD", "CNI_CONTAINERID"), ("DEL", "CNI_IFNAME"),
    ("CHECK", "CNI_PATH"),
])
def test_a_missing_cni_variable_is_code_4(capsys, host, command, unset):
    rc, out = call(capsys, host, command, **{unset: None})
    assert rc == 1 and error(out)["code"] == 4 and unset in error(out)["msg"]


@pytest.mark.parametrize("cid", ["../../etc/passwd", ".hidden", "a/b", ""])
def test_a_container_id_that_is_no_file_name_is_refused(capsys, host, cid):
    rc, out = call(capsys, host, "ADD", CNI_CONTAINERID=cid)
    assert rc == 1 and error(out)["code"] == 4
    assert not (host / "data").exists()


@pytest.mark.parametrize("command", ["GC", "STATUS", "BOGUS", None])
def test_commands_of_other_spec_versions_are_refused(capsys, host, command):
    rc, out = call(capsys, host, "ADD", CNI_COMMAND=command)
    assert rc == 1 and error(out)["code"] == 4 and "unknown CNI_COMMAND" in error(out)["msg"]


def test_an_unsupported_version_is_code_1_in_the_fallback_version(capsys, host):
    rc, out = call(capsys, host, "ADD", conf(cniVersion="0.1.0"))
    assert rc == 1 and error(out)["code"] == 1 and error(out)["cniVersion"] == "1.0.0"
