"""Specification of the network config (the JSON at <etcd-prefix>/config)."""

from __future__ import annotations

import json
from ipaddress import IPv4Address, IPv4Network

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyflannel.config import MAX_CONFIG_BYTES, ConfigError, NetworkConfig, parse_config

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
                 'config: Backend.Type "foo" is unknown (known: udp, vxlan, host-gw)',
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
    size = 2 ** (32 - cfg.subnet_len)
    base = int(cfg.network.network_address)
    assert cfg.network.prefixlen + 2 <= cfg.subnet_len <= 30
    assert cfg.subnet_min <= cfg.subnet_max
    assert cfg.subnet_min in cfg.network
    assert cfg.subnet_max in cfg.network
    assert (int(cfg.subnet_min) - base) % size == 0
    assert (int(cfg.subnet_max) - base) % size == 0
    count = cfg.subnet_count()
    assert count >= 1
    first, last = cfg.nth_subnet(0), cfg.nth_subnet(count - 1)
    assert first.network_address == cfg.subnet_min
    assert last.network_address == cfg.subnet_max
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
