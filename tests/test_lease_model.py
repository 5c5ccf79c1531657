"""Lease keys and values are flanneld's, byte for byte: the two share one etcd."""

from ipaddress import IPv4Address, IPv4Network

import pytest

from pyflannel.lease.model import (
    LeaseAttrs,
    LeaseFormatError,
    parse_subnet_key,
    subnet_key,
)


def test_key_layout_matches_flanneld():
    assert (subnet_key("/coreos.com/network", IPv4Network("10.1.15.0/24"))
            == "/coreos.com/network/subnets/10.1.15.0-24")
    assert (subnet_key("/atomic.io/network/", IPv4Network("10.1.15.0/24"))
            == "/atomic.io/network/subnets/10.1.15.0-24")
    assert parse_subnet_key("/coreos.com/network/subnets/10.1.15.0-24") == IPv4Network(
        "10.1.15.0/24")


@pytest.mark.parametrize("key", ["/p/subnets/10.1.15.0", "/p/subnets/10.1.15.1-24",
                                 "/p/subnets/300.1.1.0-24", "/p/subnets/x-24"])
def test_bad_keys_are_rejected(key):
    with pytest.raises(LeaseFormatError):
        parse_subnet_key(key)


def test_udp_lease_value_is_flanneld_shape():
    attrs = LeaseAttrs(IPv4Address("192.0.2.1"), backend_type="udp")
    assert attrs.to_json() == '{"PublicIP":"192.0.2.1","PublicIPv6":null,"BackendType":"udp"}'


def test_vxlan_lease_value_round_trips():
    raw = ('{"PublicIP":"192.0.2.7","PublicIPv6":null,"BackendType":"vxlan",'
           '"BackendData":{"VNI":1,"VtepMAC":"6a:1b:2c:3d:4e:5f"}}')
    attrs = LeaseAttrs.from_json(raw)
    assert attrs.public_ip == IPv4Address("192.0.2.7")
    assert attrs.backend_data == {"VNI": 1, "VtepMAC": "6a:1b:2c:3d:4e:5f"}
    assert attrs.to_json() == raw


def test_flanneld_udp_lease_without_backend_type_counts_as_udp():
    attrs = LeaseAttrs.from_json('{"PublicIP":"192.0.2.1"}')
    assert attrs.backend_type == ""
    assert attrs.effective_backend == "udp"


def test_unknown_fields_from_other_nodes_are_ignored():
    attrs = LeaseAttrs.from_json(
        '{"PublicIP":"192.0.2.1","PublicIPv6":"2001:db8::1","BackendType":"udp",'
        '"BackendV6Data":null,"SomethingNew":{"x":1}}')
    assert attrs.public_ip == IPv4Address("192.0.2.1")
    assert attrs.public_ipv6 == "2001:db8::1"


@pytest.mark.parametrize("raw", ["", "nope", "[]", "{}", '{"PublicIP":5}',
                                 '{"PublicIP":"10.1.1"}', '{"PublicIP":"1.2.3.4","BackendType":3}',
                                 b"\xff\xfe"])
def test_malformed_values_raise_one_clear_error(raw):
    with pytest.raises(LeaseFormatError) as e:
        LeaseAttrs.from_json(raw)
    assert "\n" not in str(e.value)
