"""Specification of the bgp backend's config (Backend of the network config) and its flags."""

from __future__ import annotations

import json
from ipaddress import IPv4Address, IPv6Address

import pytest

from pyflannel.config import BgpPeer, ConfigError, parse_config
from pyflannel.flags import FlagError, parse_flags


def bgp(**backend) -> str:
    return json.dumps({"Network": "10.1.0.0/16", "Backend": {"Type": "bgp", **backend}})


def test_defaults_are_calicos_as_and_bgps_usual_timers():
    cfg = parse_config(bgp())
    assert cfg.backend_type == "bgp"
    assert {k: cfg.backend[k] for k in ("ASNumber", "NodeToNodeMesh", "Peers", "HoldTime",
                                         "KeepaliveTime", "GracefulRestartTime", "ListenPort",
                                         "Communities")} == {
        "ASNumber": 64512, "NodeToNodeMesh": True, "Peers": (), "HoldTime": 90,
        "KeepaliveTime": 30, "GracefulRestartTime": 120, "ListenPort": 179, "Communities": ()}


def test_the_issues_example_parses_with_keys_in_any_case():
    cfg = parse_config(json.dumps({"Network": "10.1.0.0/16", "Backend": {
        "Type": "bgp", "asnumber": 64512, "NodeToNodeMesh": False,
        "Peers": [{"PeerIP": "192.0.2.200", "ASNumber": 64600, "Password": "s3cret"},
                  {"peerip": "fd00::1", "asnumber": 4200000000, "Port": 1179,
                   "KeepOriginalNextHop": True}],
        "HoldTime": 90, "KeepaliveTime": 30, "GracefulRestartTime": 120, "ListenPort": 179,
        "Communities": ["64512:100"]}}))
    assert cfg.backend["NodeToNodeMesh"] is False
    assert cfg.backend["Peers"] == (
        BgpPeer(IPv4Address("192.0.2.200"), 64600, "s3cret"),
        BgpPeer(IPv6Address("fd00::1"), 4200000000, "", 1179, True))
    assert cfg.backend["Communities"] == ("64512:100",)


def test_a_peers_password_is_never_in_its_repr():
    cfg = parse_config(bgp(Peers=[{"PeerIP": "192.0.2.1", "ASNumber": 1, "Password": "s3cret"}]))
    assert "s3cret" not in repr(cfg.backend["Peers"])
    assert "s3cret" not in repr(cfg)


BAD = [
    ({"ASNumber": 0}, "config: Backend.ASNumber 0 is out of range (1..4294967295)"),
    ({"ASNumber": "64512"}, 'config: Backend.ASNumber must be an integer, got string "64512"'),
    ({"NodeToNodeMesh": "yes"}, 'config: Backend.NodeToNodeMesh must be true or false, got '
                                'string "yes"'),
    ({"HoldTime": 2}, "config: Backend.HoldTime 2 is out of range (0 or 3..65535)"),
    ({"HoldTime": 9, "KeepaliveTime": 4},
     "config: Backend.KeepaliveTime 4 must be at most a third of Backend.HoldTime 9"),
    ({"GracefulRestartTime": 4096},
     "config: Backend.GracefulRestartTime 4096 is out of range (0..4095 seconds)"),
    ({"ListenPort": 0}, "config: Backend.ListenPort 0 is out of range (1..65535)"),
    ({"Peers": {}}, "config: Backend.Peers must be an array, got object"),
    ({"Peers": ["192.0.2.1"]}, "config: Backend.Peers[0] must be a JSON object, got string"),
    ({"Peers": [{"PeerIP": "192.0.2.0/24", "ASNumber": 1}]},
     'config: Backend.Peers[0].PeerIP must be an IPv4 or IPv6 address, got string '
     '"192.0.2.0/24"'),
    ({"Peers": [{"PeerIP": "127.0.0.1", "ASNumber": 1}]},
     'config: Backend.Peers[0].PeerIP "127.0.0.1" is not a unicast address of another host'),
    ({"Peers": [{"PeerIP": "192.0.2.1"}]}, "config: Backend.Peers[0].ASNumber is required"),
    ({"Peers": [{"PeerIP": "192.0.2.1", "ASNumber": 1},
                {"PeerIP": "192.0.2.2", "ASNumber": 4294967296}]},
     "config: Backend.Peers[1].ASNumber 4294967296 is out of range (1..4294967295)"),
    ({"Peers": [{"PeerIP": "192.0.2.1", "ASNumber": 1, "Port": 70000}]},
     "config: Backend.Peers[0].Port 70000 is out of range (1..65535)"),
    ({"Peers": [{"PeerIP": "192.0.2.1", "ASNumber": 1, "KeepOriginalNextHop": 1}]},
     "config: Backend.Peers[0].KeepOriginalNextHop must be true or false, got number 1"),
    ({"Peers": [{"PeerIP": "192.0.2.1", "ASNumber": 1},
                {"PeerIP": "192.0.2.1", "ASNumber": 2}]},
     "config: Backend.Peers[1].PeerIP 192.0.2.1 is listed twice"),
    ({"Communities": "64512:100"}, "config: Backend.Communities must be an array, got string"),
    ({"Communities": ["64512:100", "65536:1"]},
     'config: Backend.Communities[1] must be "ASN:VALUE" (each 0..65535), got string '
     '"65536:1"'),
]


@pytest.mark.parametrize(("backend", "message"), BAD, ids=[m.split(":")[1].split()[0]
                                                          for _b, m in BAD])
def test_a_bad_value_is_one_line_naming_the_field(backend, message):
    with pytest.raises(ConfigError) as e:
        parse_config(bgp(**backend))
    assert str(e.value) == message


@pytest.mark.parametrize("password", ["x" * 81, 12345, ["s3cret-in-a-list"]])
def test_a_bad_password_is_refused_without_showing_it(password):
    with pytest.raises(ConfigError) as e:
        parse_config(bgp(Peers=[{"PeerIP": "192.0.2.1", "ASNumber": 1, "Password": password}]))
    assert str(e.value) == ("config: Backend.Peers[0].Password must be a string of at most "
                            "80 bytes (value not shown)")
    assert "xxxx" not in str(e.value) and "12345" not in str(e.value)
    assert "s3cret" not in str(e.value)


def test_per_node_flags_default_to_the_config():
    opts = parse_flags([], environ={})
    assert (opts.bgp_route_reflector_cluster_id, opts.bgp_as_number, opts.bgp_router_id) == (
        "", 0, "")


def test_per_node_flags_and_their_variables():
    opts = parse_flags(["-bgp-route-reflector-cluster-id=10.0.0.1", "-bgp-as-number",
                        "4200000000"], environ={"FLANNELD_BGP_ROUTER_ID": "192.0.2.9"})
    assert opts.bgp_route_reflector_cluster_id == "10.0.0.1"
    assert opts.bgp_as_number == 4200000000
    assert opts.bgp_router_id == "192.0.2.9"


@pytest.mark.parametrize(("args", "message"), [
    (["-bgp-router-id=fd00::1"], 'flag -bgp-router-id: "fd00::1" is not an IPv4 address'),
    (["-bgp-route-reflector-cluster-id=1.2.3"],
     'flag -bgp-route-reflector-cluster-id: "1.2.3" is not an IPv4 address'),
    (["-bgp-as-number=4294967296"],
     "flag -bgp-as-number: 4294967296 is out of range (0..4294967295)"),
])
def test_bad_per_node_flags_are_one_line(args, message):
    with pytest.raises(FlagError) as e:
        parse_flags(args, environ={})
    assert str(e.value) == message
