"""Specification of the network config (the JSON at <etcd-prefix>/config)."""

from __future__ import annotations

import json
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyflannel.config import (
    MAX_CONFIG_BYTES,
    ConfigError,
    NetworkConfig,
    SubnetPool,
    parse_config,
)

UDP = {"Type": "udp", "Port": 8285, "Framing": "auto"}
VXLAN = {"Type": "vxlan", "VNI": 1, "Port": 0, "GBP": False, "DirectRouting": False, "MTU": 0}
HOST_GW = {"Type": "host-gw"}

# (config, network, subnet_len, subnet_min, subnet_max, backend)
VALID = [
    pytest.param(
        {"Network": "10.1.0.0/16"},
        "10.1.0.0/16", 24, "10.1.1.0", "10.1.255.0", UDP,
        id="minimal-/16-gets-/24-subnets-and-udp",
    ),
    pytest.param(
        {"Network": "10.0.0.0/8"},
        "10.0.0.0/8", 24, "10.0.1.0", "10.255.255.0", UDP,
        id="/8",
    ),
    pytest.param(
        {"Network": "10.0.0.0/22"},
        "10.0.0.0/22", 24, "10.0.1.0", "10.0.3.0", UDP,
        id="/22-is-the-last-prefix-defaulting-to-/24",
    ),
    pytest.param(
        {"Network": "10.0.0.0/23"},
        "10.0.0.0/23", 25, "10.0.0.128", "10.0.1.128", UDP,
        id="/23-defaults-to-prefix+2",
    ),
    pytest.param(
        {"Network": "10.0.0.0/28"},
        "10.0.0.0/28", 30, "10.0.0.4", "10.0.0.12", UDP,
        id="/28-is-the-smallest-network",
    ),
    pytest.param(
        {"Network": "10.1.0.0/16", "SubnetLen": 0},
        "10.1.0.0/16", 24, "10.1.1.0", "10.1.255.0", UDP,
        id="SubnetLen-0-means-default",
    ),
    pytest.param(
        {"Network": "10.1.0.0/16", "SubnetLen": 18},
        "10.1.0.0/16", 18, "10.1.64.0", "10.1.192.0", UDP,
        id="SubnetLen-prefix+2",
    ),
    pytest.param(
        {"Network": "10.0.0.0/8", "SubnetLen": 30},
        "10.0.0.0/8", 30, "10.0.0.4", "10.255.255.252", UDP,
        id="/8-with-SubnetLen-30",
    ),
    pytest.param(
        {"Network": "10.1.0.0/16", "SubnetMin": "10.1.10.0", "SubnetMax": "10.1.20.0"},
        "10.1.0.0/16", 24, "10.1.10.0", "10.1.20.0", UDP,
        id="explicit-min-max",
    ),
    pytest.param(
        {"Network": "10.1.0.0/16", "SubnetMin": "10.1.0.0"},
        "10.1.0.0/16", 24, "10.1.0.0", "10.1.255.0", UDP,
        id="SubnetMin-may-name-the-first-subnet",
    ),
    pytest.param(
        {"Network": "10.1.0.0/16", "SubnetMin": "10.1.7.0", "SubnetMax": "10.1.7.0"},
        "10.1.0.0/16", 24, "10.1.7.0", "10.1.7.0", UDP,
        id="min-equal-max-is-one-subnet",
    ),
    pytest.param(
        {"network": "10.1.0.0/16", "SUBNETLEN": 20, "subnetmin": "10.1.16.0",
         "SubNetMax": "10.1.32.0", "BACKEND": {"type": "vxlan", "vni": 42}},
        "10.1.0.0/16", 20, "10.1.16.0", "10.1.32.0", {**VXLAN, "VNI": 42},
        id="keys-are-case-insensitive",
    ),
    pytest.param(
        {"Network": "10.1.0.0/16", "EnableIPv6": True, "IPv6Network": "fc00::/48", "x": [1]},
        "10.1.0.0/16", 24, "10.1.1.0", "10.1.255.0", UDP,
        id="unknown-keys-ignored",
    ),
    pytest.param(
        {"Network": "10.1.0.0/16", "SubnetLen": None, "SubnetMin": None, "Backend": None},
        "10.1.0.0/16", 24, "10.1.1.0", "10.1.255.0", UDP,
        id="null-means-not-given",
    ),
    pytest.param(
        {"Network": "10.1.0.0/16", "Backend": {}},
        "10.1.0.0/16", 24, "10.1.1.0", "10.1.255.0", UDP,
        id="empty-backend-is-udp",
    ),
    pytest.param(
        {"Network": "10.1.0.0/16", "Backend": {"Type": ""}},
        "10.1.0.0/16", 24, "10.1.1.0", "10.1.255.0", UDP,
        id="empty-backend-type-is-udp",
    ),
    pytest.param(
        {"Network": "10.1.0.0/16", "Backend": {"Type": "udp", "Port": 9000}},
        "10.1.0.0/16", 24, "10.1.1.0", "10.1.255.0",
        {"Type": "udp", "Port": 9000, "Framing": "auto"},
        id="udp-port",
    ),
    pytest.param(
        {"Network": "10.1.0.0/16", "Backend": {"Type": "udp", "Framing": "flannel"}},
        "10.1.0.0/16", 24, "10.1.1.0", "10.1.255.0",
        {"Type": "udp", "Port": 8285, "Framing": "flannel"},
        id="udp-plain-framing",
    ),
    pytest.param(
        {"Network": "10.1.0.0/16", "Backend": {"Type": "vxlan"}},
        "10.1.0.0/16", 24, "10.1.1.0", "10.1.255.0", VXLAN,
        id="vxlan-defaults",
    ),
    pytest.param(
        {"Network": "10.1.0.0/16", "Backend": {"Type": "vxlan", "VNI": 0, "Port": 4789,
                                               "GBP": True, "directrouting": True, "mtu": 1400}},
        "10.1.0.0/16", 24, "10.1.1.0", "10.1.255.0",
        {"Type": "vxlan", "VNI": 0, "Port": 4789, "GBP": True, "DirectRouting": True,
         "MTU": 1400},
        id="vxlan-all-options",
    ),
    pytest.param(
        {"Network": "10.1.0.0/16", "Backend": {"Type": "vxlan", "VNI": 16777215, "MTU": 68}},
        "10.1.0.0/16", 24, "10.1.1.0", "10.1.255.0", {**VXLAN, "VNI": 16777215, "MTU": 68},
        id="vxlan-limits",
    ),
    pytest.param(
        {"Network": "10.1.0.0/16", "Backend": {"Type": "host-gw"}},
        "10.1.0.0/16", 24, "10.1.1.0", "10.1.255.0", HOST_GW,
        id="host-gw",
    ),
    pytest.param(
        {"Network": "10.1.0.0/16", "Backend": {"Type": "udp", "Colour": "blue"}},
        "10.1.0.0/16", 24, "10.1.1.0", "10.1.255.0", {**UDP, "Colour": "blue"},
        id="unknown-backend-option-kept-verbatim",
    ),
]


@pytest.mark.parametrize(("doc", "network", "subnet_len", "smin", "smax", "backend"), VALID)
def test_valid_config(doc, network, subnet_len, smin, smax, backend):
    cfg = parse_config(json.dumps(doc))
    assert cfg.network == IPv4Network(network)
    assert cfg.subnet_len == subnet_len
    assert cfg.subnet_min == IPv4Address(smin)
    assert cfg.subnet_max == IPv4Address(smax)
    assert cfg.backend_type == backend["Type"]
    assert dict(cfg.backend) == backend
    assert dict(cfg.raw) == doc




def net(**fields) -> str:
    """A config for 10.1.0.0/16 plus ``fields``."""
    return json.dumps({"Network": "10.1.0.0/16", **fields})


# (config text, expected substring of the ConfigError message)
INVALID = [
    pytest.param("{}", "config: Network is required", id="missing-network"),
    pytest.param('{"Network": null}', "Network is required", id="null-network"),
    pytest.param('{"Network": "10.1.0.0"}', "is not an IPv4 CIDR", id="cidr-without-prefix"),
    pytest.param('{"Network": "10.1.0.0/33"}', "is not an IPv4 CIDR", id="prefix-33"),
    pytest.param('{"Network": "10.1.300.0/16"}', "is not an IPv4 CIDR", id="octet-300"),
    pytest.param('{"Network": "banana"}', 'Network "banana" is not an IPv4 CIDR', id="bad-cidr"),
    pytest.param('{"Network": "fc00::/48"}', "is not an IPv4 CIDR", id="ipv6-network"),
    pytest.param('{"Network": "10.1.0.0/255.255.0.0"}', "not an IPv4 CIDR", id="netmask-form"),
    pytest.param('{"Network": 167837696}', "Network must be a string", id="network-number"),
    pytest.param('{"Network": "10.1.0.1/16"}',
                 'config: Network "10.1.0.1/16" has host bits set', id="host-bits"),
    pytest.param('{"Network": "10.1.0.0/29"}',
                 "config: Network /29 is too small (the minimum useful network is /28)",
                 id="/29-network"),
    pytest.param('{"Network": "10.1.0.0/28", "SubnetLen": 30, "Backend": 1}',
                 "Backend must be a JSON object", id="/28-ok-but-backend-not-object"),
    pytest.param('{"Network": "10.1.0.1/32"}', "Network /32 is too small", id="/32-network"),
    pytest.param(net(SubnetLen=31), "config: SubnetLen 31 must be at most 30",
                 id="SubnetLen-31"),
    pytest.param(net(SubnetLen=17),
                 "config: SubnetLen 17 must be at least the network prefix + 2 (18)",
                 id="SubnetLen-too-small"),
    pytest.param(net(SubnetLen=-1), "SubnetLen -1 must be at least",
                 id="SubnetLen-negative"),
    pytest.param(net(SubnetLen="24"), "SubnetLen must be an integer",
                 id="SubnetLen-string"),
    pytest.param(net(SubnetLen=24.0), "SubnetLen must be an integer",
                 id="SubnetLen-float"),
    pytest.param(net(SubnetLen=True), "SubnetLen must be an integer",
                 id="SubnetLen-bool"),
    pytest.param(net(SubnetMin="10.2.0.0"),
                 'config: SubnetMin "10.2.0.0" is outside Network 10.1.0.0/16',
                 id="SubnetMin-outside"),
    pytest.param(net(SubnetMin="10.1.1.128"),
                 'config: SubnetMin "10.1.1.128" is not aligned to SubnetLen 24',
                 id="SubnetMin-unaligned"),
    pytest.param(net(SubnetMin="10.1.1"), "SubnetMin \"10.1.1\" is not an IPv4",
                 id="SubnetMin-not-address"),
    pytest.param(net(SubnetMin=5), "SubnetMin must be a string",
                 id="SubnetMin-number"),
    pytest.param(net(SubnetMax="11.0.0.0"), "SubnetMax \"11.0.0.0\" is outside",
                 id="SubnetMax-outside"),
    pytest.param(net(SubnetMax="10.1.2.1"), "SubnetMax \"10.1.2.1\" is not aligned",
                 id="SubnetMax-unaligned"),
    pytest.param(net(SubnetMin="10.1.5.0", SubnetMax="10.1.2.0"),
                 "config: SubnetMin 10.1.5.0 must not be above SubnetMax 10.1.2.0",
                 id="SubnetMax-below-SubnetMin"),
    pytest.param(net(Backend={"Type": "foo"}),
                 'config: Backend.Type "foo" is unknown '
                 '(known: udp, vxlan, host-gw, wireguard, bgp, gre, ipip, alloc, extension)',
                 id="unknown-backend"),
    pytest.param(net(Backend={"Type": "VXLAN"}), 'Backend.Type "VXLAN" is unknown',
                 id="backend-type-is-case-sensitive"),
    pytest.param(net(Backend={"Type": 1}), "Backend.Type must be a string",
                 id="backend-type-number"),
    pytest.param(net(Backend="udp"), "Backend must be a JSON object, got string",
                 id="backend-string"),
    pytest.param(net(Backend={"Type": "udp", "Port": -1}),
                 "config: Backend.Port -1 is out of range (1..65535)", id="udp-negative-port"),
    pytest.param(net(Backend={"Type": "udp", "Port": 0}),
                 "Backend.Port 0 is out of range (1..65535)", id="udp-port-0"),
    pytest.param(net(Backend={"Framing": "fast"}),
                 'Backend.Framing must be "auto" or "flannel"', id="udp-unknown-framing"),
    pytest.param(net(Backend={"Port": 70000}),
                 "Backend.Port 70000 is out of range", id="udp-port-70000"),
    pytest.param(net(Backend={"Type": "vxlan", "Port": 70000}),
                 "Backend.Port 70000 is out of range (0..65535", id="vxlan-port-70000"),
    pytest.param(net(Backend={"Port": "8285"}),
                 'Backend.Port must be an integer, got string "8285"', id="port-as-string"),
    pytest.param(net(Backend={"Port": 8285.5}),
                 "Backend.Port must be an integer", id="port-as-float"),
    pytest.param(net(Backend={"Port": True}),
                 "Backend.Port must be an integer, got boolean", id="port-as-bool"),
    pytest.param(net(Backend={"Type": "vxlan", "VNI": 16777216}),
                 "Backend.VNI 16777216 is out of range (0..16777215)", id="vni-too-big"),
    pytest.param(net(Backend={"Type": "vxlan", "VNI": -1}),
                 "Backend.VNI -1 is out of range", id="vni-negative"),
    pytest.param(net(Backend={"Type": "vxlan", "GBP": 1}),
                 "Backend.GBP must be true or false, got number 1", id="gbp-not-bool"),
    pytest.param(net(Backend={"Type": "vxlan", "DirectRouting": "true"}),
                 "Backend.DirectRouting must be true or false", id="directrouting-string"),
    pytest.param(net(Backend={"Type": "vxlan", "MTU": 67}),
                 "Backend.MTU 67 is out of range (0 or 68..65535)", id="mtu-too-small"),
    pytest.param(net(Backend={"Type": "vxlan", "MTU": 65536}),
                 "Backend.MTU 65536 is out of range", id="mtu-too-big"),
    pytest.param(net(x="a" * (1024 * 1024)),
                 "bytes is over the 65536-byte limit", id="1MB-config"),
    pytest.param('["Network", "10.1.0.0/16"]',
                 "config: top level must be a JSON object, got array", id="json-array"),
    pytest.param('"10.1.0.0/16"', "top level must be a JSON object, got string", id="json-string"),
    pytest.param("null", "top level must be a JSON object, got null", id="json-null"),
    pytest.param('{"Network": "10.1.0.0/16",}', "config: invalid JSON:", id="invalid-json"),
    pytest.param("", "config: invalid JSON:", id="empty"),
    pytest.param('{"Network": "10.1.0.0/16", "x": NaN}', "invalid JSON: NaN", id="nan"),
    pytest.param('{"x": Infinity}', "invalid JSON: Infinity", id="infinity"),
    pytest.param('{"x": ' + "9" * 5000 + "}", "config: invalid JSON:", id="5000-digit-number"),
    pytest.param("[" * 30000 + "]" * 30000, "invalid JSON: nested too deeply", id="deep-nesting"),
    pytest.param(b'{"Network": "\xff"}', "config: not valid UTF-8", id="bad-utf8"),
]


@pytest.mark.parametrize(("data", "message"), INVALID)
def test_invalid_config(data, message):
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    text = str(info.value)
    assert message in text
    assert "\n" not in text
    assert text.startswith("config: ")


# ---------------------------------------------------------------------------------------
# Dual-stack: flanneld v0.20.2's IPv6 fields and rules

DUAL = {"Network": "10.1.0.0/16", "EnableIPv6": True, "IPv6Network": "fc00:10:1::/48"}

# (config, ipv6 network, ipv6 subnet_len, ipv6 subnet_min, ipv6 subnet_max)
VALID_V6 = [
    pytest.param(
        {**DUAL, "Backend": {"Type": "vxlan"}},
        "fc00:10:1::/48", 64, "fc00:10:1:1::", "fc00:10:1:ffff::",
        id="issue-example-/48-gets-/64-from-the-second-to-the-last",
    ),
    pytest.param(
        {**DUAL, "IPv6Network": "fc00::/62"},
        "fc00::/62", 64, "fc00:0:0:1::", "fc00:0:0:3::",
        id="/62-is-the-last-prefix-defaulting-to-/64",
    ),
    pytest.param(
        {**DUAL, "IPv6Network": "fc00::/63"},
        "fc00::/63", 65, "fc00::8000:0:0:0", "fc00:0:0:1:8000::",
        id="/63-defaults-to-prefix+2",
    ),
    pytest.param(
        {**DUAL, "IPv6Network": "fc00::/124"},
        "fc00::/124", 126, "fc00::4", "fc00::c",
        id="/124-is-the-smallest-network",
    ),
    pytest.param(
        {**DUAL, "IPv6SubnetLen": 0},
        "fc00:10:1::/48", 64, "fc00:10:1:1::", "fc00:10:1:ffff::",
        id="IPv6SubnetLen-0-means-default",
    ),
    pytest.param(
        {**DUAL, "IPv6SubnetLen": 56},
        "fc00:10:1::/48", 56, "fc00:10:1:100::", "fc00:10:1:ff00::",
        id="explicit-IPv6SubnetLen",
    ),
    pytest.param(
        {**DUAL, "IPv6SubnetLen": 50},
        "fc00:10:1::/48", 50, "fc00:10:1:4000::", "fc00:10:1:c000::",
        id="IPv6SubnetLen-prefix+2",
    ),
    pytest.param(
        {**DUAL, "IPv6SubnetLen": 126},
        "fc00:10:1::/48", 126, "fc00:10:1::4", "fc00:10:1:ffff:ffff:ffff:ffff:fffc",
        id="IPv6SubnetLen-126-is-the-longest",
    ),
    pytest.param(
        {**DUAL, "IPv6SubnetMin": "fc00:10:1:10::", "IPv6SubnetMax": "fc00:10:1:20::"},
        "fc00:10:1::/48", 64, "fc00:10:1:10::", "fc00:10:1:20::",
        id="explicit-min-max",
    ),
    pytest.param(
        {**DUAL, "IPv6SubnetMin": "FC00:10:1:0:0:0:0:0"},
        "fc00:10:1::/48", 64, "fc00:10:1::", "fc00:10:1:ffff::",
        id="IPv6SubnetMin-may-name-the-first-subnet-in-any-spelling",
    ),
    pytest.param(
        {"network": "10.1.0.0/16", "enableipv6": True, "IPV6NETWORK": "fc00:10:1::/48",
         "ipv6subnetlen": 60},
        "fc00:10:1::/48", 60, "fc00:10:1:10::", "fc00:10:1:fff0::",
        id="keys-are-case-insensitive",
    ),
    pytest.param(
        {**DUAL, "EnableIPv4": True},
        "fc00:10:1::/48", 64, "fc00:10:1:1::", "fc00:10:1:ffff::",
        id="EnableIPv4-true-is-the-default",
    ),
]


@pytest.mark.parametrize(("doc", "network", "subnet_len", "smin", "smax"), VALID_V6)
def test_valid_dual_stack_config(doc, network, subnet_len, smin, smax):
    cfg = parse_config(json.dumps(doc))
    assert cfg.enable_ipv4 and cfg.enable_ipv6
    assert cfg.network == IPv4Network("10.1.0.0/16"), "IPv4 is unchanged by IPv6"
    assert cfg.ipv6_network == IPv6Network(network)
    assert cfg.ipv6_subnet_len == subnet_len
    assert cfg.ipv6_subnet_min == IPv6Address(smin)
    assert cfg.ipv6_subnet_max == IPv6Address(smax)
    assert cfg.ipv6 == SubnetPool(IPv6Network(network), subnet_len, IPv6Address(smin),
                                  IPv6Address(smax))


def test_ipv4_only_config_has_no_ipv6_pool():
    cfg = parse_config('{"Network": "10.1.0.0/16"}')
    assert cfg.enable_ipv4 and not cfg.enable_ipv6
    assert cfg.ipv6 is None and cfg.ipv6_network is None and cfg.ipv6_subnet_len is None
    assert cfg.pools == (cfg.ipv4,)


def test_ipv6_fields_are_ignored_unless_enabled():
    cfg = parse_config(net(EnableIPv6=False, IPv6Network="banana", IPv6SubnetLen=500))
    assert cfg.ipv6 is None


def test_ipv6_only_needs_no_network():
    cfg = parse_config(json.dumps({"EnableIPv4": False, "EnableIPv6": True,
                                   "IPv6Network": "fc00:10:1::/48"}))
    assert not cfg.enable_ipv4 and cfg.enable_ipv6
    assert cfg.ipv4 is None
    assert cfg.network is None and cfg.subnet_len is None
    assert cfg.subnet_min is None and cfg.subnet_max is None
    assert cfg.pools == (cfg.ipv6,)
    assert cfg.subnet_count() == 0, "no IPv4 subnets to lease"
    with pytest.raises(IndexError):
        cfg.nth_subnet(0)
    assert not cfg.contains_subnet(IPv4Network("0.0.0.0/0"))
    assert cfg.contains_subnet(IPv6Network("fc00:10:1:4f::/64"))


def test_ipv6_only_ignores_the_ipv4_fields():
    cfg = parse_config(json.dumps({"EnableIPv4": False, "EnableIPv6": True,
                                   "IPv6Network": "fc00:10:1::/48", "Network": "10.1.0.0/29",
                                   "SubnetLen": 99}))
    assert cfg.ipv4 is None


def test_one_pool_class_serves_both_families():
    cfg = parse_config(json.dumps(DUAL))
    assert type(cfg.ipv4) is SubnetPool and type(cfg.ipv6) is SubnetPool
    assert (cfg.ipv4.version, cfg.ipv6.version) == (4, 6)
    assert cfg.pools == (cfg.ipv4, cfg.ipv6)


def test_ipv6_subnet_count_and_indexing():
    pool = parse_config(json.dumps(DUAL)).ipv6
    assert pool.subnet_count() == 65535
    assert pool.subnet_size == 2**64
    assert pool.nth_subnet(0) == IPv6Network("fc00:10:1:1::/64")
    assert pool.nth_subnet(0x4e) == IPv6Network("fc00:10:1:4f::/64")
    assert pool.nth_subnet(65534) == IPv6Network("fc00:10:1:ffff::/64")
    for bad in (-1, 65535):
        with pytest.raises(IndexError):
            pool.nth_subnet(bad)


def test_huge_ipv6_pool_is_indexed_without_listing():
    pool = parse_config(net(EnableIPv6=True, IPv6Network="::/0")).ipv6
    assert pool.subnet_count() == 2**64 - 1
    assert pool.nth_subnet(2**64 - 2) == IPv6Network("ffff:ffff:ffff:ffff::/64")


def test_ipv6_contains_subnet():
    cfg = parse_config(json.dumps({**DUAL, "IPv6SubnetMin": "fc00:10:1:10::",
                                   "IPv6SubnetMax": "fc00:10:1:20::"}))
    pool = cfg.ipv6
    assert pool.contains_subnet(IPv6Network("fc00:10:1:10::/64"))
    assert pool.contains_subnet(IPv6Network("fc00:10:1:20::/64"))
    assert not pool.contains_subnet(IPv6Network("fc00:10:1:f::/64")), "below IPv6SubnetMin"
    assert not pool.contains_subnet(IPv6Network("fc00:10:1:21::/64")), "above IPv6SubnetMax"
    assert not pool.contains_subnet(IPv6Network("fc00:10:1:10::/80")), "wrong length"
    assert not pool.contains_subnet(IPv6Network("fc00:10:2:10::/64")), "other network"
    assert not pool.contains_subnet(IPv4Network("10.1.10.0/24")), "other family"
    assert not cfg.ipv4.contains_subnet(IPv6Network("fc00:10:1:10::/64")), "other family"
    # NetworkConfig.contains_subnet asks the pool of the subnet's family.
    assert cfg.contains_subnet(IPv6Network("fc00:10:1:10::/64"))
    assert cfg.contains_subnet(IPv4Network("10.1.10.0/24"))
    assert not parse_config(net()).contains_subnet(IPv6Network("fc00:10:1:10::/64"))


def v6(**fields) -> str:
    """The dual-stack config DUAL plus ``fields``."""
    return json.dumps({**DUAL, **fields})


INVALID_V6 = [
    pytest.param(net(EnableIPv6=True),
                 "config: IPv6Network is required when EnableIPv6 is true",
                 id="EnableIPv6-without-IPv6Network"),
    pytest.param(net(EnableIPv6=True, IPv6Network=None),
                 "IPv6Network is required when EnableIPv6 is true", id="null-IPv6Network"),
    pytest.param(json.dumps({"EnableIPv4": False, "EnableIPv6": True}),
                 "IPv6Network is required", id="ipv6-only-without-IPv6Network"),
    pytest.param(json.dumps({"EnableIPv4": False}),
                 "config: EnableIPv4 and EnableIPv6 are both false", id="no-family"),
    pytest.param(json.dumps({"EnableIPv6": True, "IPv6Network": "fc00::/48"}),
                 "config: Network is required", id="dual-stack-without-Network"),
    pytest.param(net(EnableIPv6="true", IPv6Network="fc00::/48"),
                 'config: EnableIPv6 must be true or false, got string "true"',
                 id="EnableIPv6-string"),
    pytest.param(net(EnableIPv4=1), "config: EnableIPv4 must be true or false, got number 1",
                 id="EnableIPv4-number"),
    pytest.param(v6(IPv6Network="10.1.0.0/16"),
                 'config: IPv6Network "10.1.0.0/16" is not an IPv6 CIDR like fc00:10:1::/48',
                 id="ipv4-cidr-as-IPv6Network"),
    pytest.param(v6(IPv6Network="fc00::"), "is not an IPv6 CIDR", id="cidr-without-prefix"),
    pytest.param(v6(IPv6Network="fc00::/129"), "is not an IPv6 CIDR", id="prefix-129"),
    pytest.param(v6(IPv6Network="fc00::g/48"), "is not an IPv6 CIDR", id="not-hex"),
    pytest.param(v6(IPv6Network="fe80::%eth0/64"), "is not an IPv6 CIDR", id="scoped"),
    pytest.param(v6(IPv6Network=["fc00::/48"]),
                 "config: IPv6Network must be a string, got array", id="IPv6Network-array"),
    pytest.param(v6(IPv6Network="fc00:10:1::1/48"),
                 'config: IPv6Network "fc00:10:1::1/48" has host bits set', id="host-bits"),
    pytest.param(v6(IPv6Network="fc00::/125"),
                 "config: IPv6Network is too small: /125 (the minimum useful network is /124)",
                 id="/125-network"),
    pytest.param(v6(IPv6Network="fc00::1/128"), "IPv6Network is too small: /128",
                 id="/128-network"),
    pytest.param(v6(IPv6Network="fc00::/125", IPv6SubnetLen=126),
                 "IPv6Network is too small", id="/125-network-even-with-IPv6SubnetLen"),
    pytest.param(v6(IPv6SubnetLen=127), "config: IPv6SubnetLen 127 must be at most 126",
                 id="IPv6SubnetLen-127"),
    pytest.param(v6(IPv6SubnetLen=49),
                 "config: IPv6SubnetLen 49 must be at least the network prefix + 2 (50)",
                 id="IPv6SubnetLen-below-prefix+2"),
    pytest.param(v6(IPv6SubnetLen=-64), "IPv6SubnetLen -64 must be at least",
                 id="IPv6SubnetLen-negative"),
    pytest.param(v6(IPv6SubnetLen="64"), "config: IPv6SubnetLen must be an integer, got string",
                 id="IPv6SubnetLen-string"),
    pytest.param(v6(IPv6SubnetLen=True), "IPv6SubnetLen must be an integer, got boolean",
                 id="IPv6SubnetLen-bool"),
    pytest.param(v6(IPv6SubnetMin="fc00:10:2::"),
                 'config: IPv6SubnetMin "fc00:10:2::" is outside IPv6Network fc00:10:1::/48',
                 id="IPv6SubnetMin-outside"),
    pytest.param(v6(IPv6SubnetMin="fc00:10:1:1::1"),
                 'config: IPv6SubnetMin "fc00:10:1:1::1" is not aligned to IPv6SubnetLen 64',
                 id="IPv6SubnetMin-unaligned"),
    pytest.param(v6(IPv6SubnetMin="10.1.1.0"),
                 'config: IPv6SubnetMin "10.1.1.0" is not an IPv6 address',
                 id="IPv6SubnetMin-ipv4"),
    pytest.param(v6(IPv6SubnetMin="fe80::%eth0"), "is not an IPv6 address",
                 id="IPv6SubnetMin-scoped"),
    pytest.param(v6(IPv6SubnetMin=1), "config: IPv6SubnetMin must be a string, got number",
                 id="IPv6SubnetMin-number"),
    pytest.param(v6(IPv6SubnetMax="fc00:11::"),
                 'IPv6SubnetMax "fc00:11::" is outside IPv6Network fc00:10:1::/48',
                 id="IPv6SubnetMax-outside"),
    pytest.param(v6(IPv6SubnetMax="fc00:10:1:2:8000::"),
                 'IPv6SubnetMax "fc00:10:1:2:8000::" is not aligned to IPv6SubnetLen 64',
                 id="IPv6SubnetMax-unaligned"),
    pytest.param(v6(IPv6SubnetMin="fc00:10:1:5::", IPv6SubnetMax="fc00:10:1:2::"),
                 "config: IPv6SubnetMin fc00:10:1:5:: must not be above IPv6SubnetMax "
                 "fc00:10:1:2::",
                 id="IPv6SubnetMax-below-IPv6SubnetMin"),
]


@pytest.mark.parametrize(("data", "message"), INVALID_V6)
def test_invalid_dual_stack_config(data, message):
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    text = str(info.value)
    assert message in text
    assert "\n" not in text
    assert text.startswith("config: ")


def test_size_limit_is_64KiB_of_utf8():
    pad = " " * (MAX_CONFIG_BYTES - len('{"Network":"10.1.0.0/16"}'))
    assert parse_config('{"Network":"10.1.0.0/16"}' + pad).subnet_len == 24
    with pytest.raises(ConfigError, match="over the 65536-byte limit"):
        parse_config('{"Network":"10.1.0.0/16"}' + pad + " ")
    with pytest.raises(ConfigError, match="over the 65536-byte limit"):
        parse_config(net(x="é" * 40000))


def test_bytes_are_accepted():
    assert parse_config(b'{"Network": "10.1.0.0/16"}').network == IPv4Network("10.1.0.0/16")


def test_later_duplicate_key_wins_like_go():
    cfg = parse_config('{"Network": "10.1.0.0/16", "network": "10.2.0.0/16", "NETWORK": null}')
    assert cfg.network == IPv4Network("10.2.0.0/16")


def test_long_values_are_truncated_in_messages():
    with pytest.raises(ConfigError) as info:
        parse_config(json.dumps({"Network": "x" * 5000}))
    assert len(str(info.value)) < 200


def test_subnet_count_and_indexing():
    cfg = parse_config('{"Network": "10.1.0.0/16"}')
    assert cfg.subnet_count() == 255
    assert cfg.nth_subnet(0) == IPv4Network("10.1.1.0/24")
    assert cfg.nth_subnet(254) == IPv4Network("10.1.255.0/24")
    for bad in (-1, 255):
        with pytest.raises(IndexError):
            cfg.nth_subnet(bad)


def test_slash8_with_subnetlen_30_has_2_pow_22_minus_1_subnets():
    cfg = parse_config('{"Network": "10.0.0.0/8", "SubnetLen": 30}')
    assert cfg.subnet_count() == 2**22 - 1
    assert cfg.nth_subnet(2**22 - 2) == IPv4Network("10.255.255.252/30")


def test_contains_subnet():
    cfg = parse_config('{"Network": "10.1.0.0/16", "SubnetMin": "10.1.10.0",'
                       ' "SubnetMax": "10.1.20.0"}')
    assert cfg.contains_subnet(IPv4Network("10.1.10.0/24"))
    assert cfg.contains_subnet(IPv4Network("10.1.20.0/24"))
    assert not cfg.contains_subnet(IPv4Network("10.1.9.0/24")), "below SubnetMin"
    assert not cfg.contains_subnet(IPv4Network("10.1.21.0/24")), "above SubnetMax"
    assert not cfg.contains_subnet(IPv4Network("10.1.10.0/25")), "wrong length"
    assert not cfg.contains_subnet(IPv4Network("10.1.0.0/16")), "wrong length"
    assert not cfg.contains_subnet(IPv4Network("10.2.10.0/24")), "other network"


def test_backend_option_lookup_ignores_case():
    cfg = parse_config('{"Network": "10.1.0.0/16", "Backend": {"Type": "vxlan", "VNI": 7}}')
    assert cfg.backend_option("vni") == 7
    assert cfg.backend_option("VNI") == 7
    assert cfg.backend_option("directrouting") is False
    assert cfg.backend_option("nope") is None
    assert cfg.backend_option("nope", 3) == 3


def test_config_is_immutable_and_hashable():
    cfg = parse_config('{"Network": "10.1.0.0/16"}')
    with pytest.raises(AttributeError):
        cfg.subnet_len = 25  # type: ignore[misc]
    with pytest.raises(TypeError):
        cfg.backend["Port"] = 1  # type: ignore[index]
    assert hash(cfg) == hash(parse_config('{"Network": "10.1.0.0/16"}'))


# ---------------------------------------------------------------------------------------
# Properties


def _check_invariants(cfg: NetworkConfig) -> None:
    assert cfg.pools, "at least one family is enabled"
    for pool in cfg.pools:
        bits = pool.network.max_prefixlen
        size = 2 ** (bits - pool.subnet_len)
        base = int(pool.network.network_address)
        assert pool.network.prefixlen + 2 <= pool.subnet_len <= bits - 2
        assert pool.subnet_min <= pool.subnet_max
        assert pool.subnet_min in pool.network
        assert pool.subnet_max in pool.network
        assert (int(pool.subnet_min) - base) % size == 0
        assert (int(pool.subnet_max) - base) % size == 0
        count = pool.subnet_count()
        assert count >= 1
        first, last = pool.nth_subnet(0), pool.nth_subnet(count - 1)
        assert first.network_address == pool.subnet_min
        assert last.network_address == pool.subnet_max
        assert cfg.contains_subnet(first) and cfg.contains_subnet(last)
    assert cfg.backend_type in ("udp", "vxlan", "host-gw")


def _parse_or_config_error(data):
    try:
        return parse_config(data)
    except ConfigError as exc:
        assert "\n" not in str(exc)
        return None


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=10,
)


@st.composite
def plausible_configs(draw):
    """Documents shaped like real configs, mostly valid, often just off."""
    prefix = draw(st.integers(0, 32))
    addr = draw(st.integers(0, 2**32 - 1))
    if draw(st.booleans()):
        addr &= (0xFFFFFFFF << (32 - prefix)) & 0xFFFFFFFF
    doc = {draw(st.sampled_from(["Network", "network", "NETWORK"])):
           f"{IPv4Address(addr)}/{prefix}"}
    subnet_len = draw(st.integers(min(prefix + 2, 30), 30) | st.integers(-2, 34))
    if draw(st.booleans()):
        doc[draw(st.sampled_from(["SubnetLen", "subnetlen"]))] = subnet_len
    for key in ("SubnetMin", "SubnetMax"):
        if draw(st.booleans()):
            span = 2 ** max(0, 32 - max(prefix, 0))
            size = 2 ** max(0, 32 - max(subnet_len, 0))
            offset = draw(st.integers(0, span - 1))
            if draw(st.booleans()):
                offset -= offset % size
            base = addr & ((0xFFFFFFFF << (32 - prefix)) & 0xFFFFFFFF)
            doc[key] = str(IPv4Address((base + offset) & 0xFFFFFFFF))
    if draw(st.booleans()):
        doc["Backend"] = draw(st.fixed_dictionaries({}, optional={
            "Type": st.sampled_from(["udp", "vxlan", "host-gw", "", "foo"]) | json_values,
            "Port": st.integers(-1, 70000) | json_values,
            "VNI": st.integers(-1, 2**24) | json_values,
            "GBP": st.booleans() | json_values,
            "MTU": st.integers(0, 70000),
        }))
    if draw(st.booleans()):
        doc[draw(st.text(max_size=12))] = draw(json_values)
    return doc


@settings(max_examples=300)
@given(st.text(max_size=200))
def test_arbitrary_text_only_raises_config_error(text):
    _parse_or_config_error(text)


@settings(max_examples=200)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_only_raise_config_error(data):
    _parse_or_config_error(data)


@settings(max_examples=300)
@given(st.dictionaries(st.text(max_size=12), json_values, max_size=6))
def test_arbitrary_json_dicts_only_raise_config_error(doc):
    cfg = _parse_or_config_error(json.dumps(doc))
    if cfg is not None:
        _check_invariants(cfg)


@settings(max_examples=500)
@given(plausible_configs())
def test_plausible_configs_valid_results_are_consistent(doc):
    cfg = _parse_or_config_error(json.dumps(doc))
    if cfg is not None:
        _check_invariants(cfg)


@st.composite
def plausible_v6_configs(draw):
    """Dual-stack and IPv6-only documents, mostly valid, often just off."""
    doc = {"Network": "10.1.0.0/16", "EnableIPv6": True}
    if draw(st.booleans()):
        doc["EnableIPv4"] = draw(st.booleans())
    prefix = draw(st.integers(0, 128))
    addr = draw(st.integers(0, 2**128 - 1))
    mask = ((1 << 128) - 1) ^ ((1 << (128 - prefix)) - 1)
    if draw(st.booleans()):
        addr &= mask
    doc["IPv6Network"] = f"{IPv6Address(addr)}/{prefix}"
    subnet_len = draw(st.integers(min(prefix + 2, 126), 126) | st.integers(-2, 130))
    if draw(st.booleans()):
        doc["IPv6SubnetLen"] = subnet_len
    for key in ("IPv6SubnetMin", "IPv6SubnetMax"):
        if draw(st.booleans()):
            size = 2 ** max(0, 128 - max(subnet_len, 0))
            offset = draw(st.integers(0, 2 ** (128 - prefix) - 1))
            if draw(st.booleans()):
                offset -= offset % size
            doc[key] = str(IPv6Address(((addr & mask) + offset) % 2**128))
    return doc


@settings(max_examples=300)
@given(plausible_v6_configs())
def test_plausible_ipv6_configs_valid_results_are_consistent(doc):
    cfg = _parse_or_config_error(json.dumps(doc))
    if cfg is not None:
        _check_invariants(cfg)
        assert cfg.enable_ipv6


def test_the_wireguard_backend_takes_flanneld_s_options_and_defaults():
    cfg = parse_config(b'{"Network":"10.1.0.0/16","Backend":{"Type":"wireguard"}}')
    assert cfg.backend == {"Type": "wireguard", "ListenPort": 51820, "ListenPortV6": 51821,
                           "PSK": "", "PersistentKeepaliveInterval": 0, "Mode": "separate"}
    psk = "A" * 43 + "="
    cfg = parse_config(('{"Network":"10.1.0.0/16","Backend":{"Type":"wireguard","listenport":'
                        f'5000,"PSK":"{psk}","Mode":"auto"}}}}').encode())
    assert (cfg.backend["ListenPort"], cfg.backend["PSK"], cfg.backend["Mode"]) == (5000, psk,
                                                                                    "auto")


@pytest.mark.parametrize("backend,message", [
    ('{"Type":"wireguard","Mode":"both"}', 'Backend.Mode must be "separate", "auto"'),
    ('{"Type":"wireguard","ListenPort":0}', "Backend.ListenPort 0 is out of range"),
    ('{"Type":"wireguard","PersistentKeepaliveInterval":-1}', "out of range"),
])
def test_bad_wireguard_options_are_one_line(backend, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(f'{{"Network":"10.1.0.0/16","Backend":{backend}}}'.encode())


def test_a_bad_pre_shared_key_is_refused_without_showing_it():
    with pytest.raises(ConfigError) as e:
        parse_config(b'{"Network":"10.1.0.0/16","Backend":{"Type":"wireguard",'
                     b'"PSK":"c2VjcmV0LWJ1dC1zaG9ydA=="}}')
    assert "PSK" in str(e.value) and "c2VjcmV0" not in str(e.value)
