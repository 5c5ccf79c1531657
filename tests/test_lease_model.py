"""Lease keys and values are flanneld's, byte for byte: the two share one etcd."""

from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyflannel.lease.model import (
    NO_IPV4_SUBNET,
    NO_PUBLIC_IP,
    Lease,
    LeaseAttrs,
    LeaseFormatError,
    lease_key_name,
    parse_lease_key,
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
    assert attrs.public_ipv6 == IPv6Address("2001:db8::1")


@pytest.mark.parametrize("raw", ["", "nope", "[]", "{}", '{"PublicIP":5}',
                                 '{"PublicIP":"10.1.1"}', '{"PublicIP":"1.2.3.4","BackendType":3}',
                                 b"\xff\xfe"])
def test_malformed_values_raise_one_clear_error(raw):
    with pytest.raises(LeaseFormatError) as e:
        LeaseAttrs.from_json(raw)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------
# Dual-stack: the golden keys and values of issue 10 (flanneld v0.20.2)

V4 = IPv4Network("10.1.45.0/24")
V6 = IPv6Network("fc00:10:1:4f::/64")
DUAL_KEY = "/coreos.com/network/subnets/10.1.45.0-24&fc00:10:1:4f::-64"
V6_ONLY_KEY = "/coreos.com/network/subnets/0.0.0.0-0&fc00:10:1:4f::-64"
V4_ONLY_KEY = "/coreos.com/network/subnets/10.1.45.0-24"

VXLAN_DUAL = (
    '{"PublicIP":"192.0.2.2","PublicIPv6":"fd00:198::2","BackendType":"vxlan",'
    '"BackendData":{"VNI":1,"VtepMAC":"96:cd:e4:4f:c9:30"},'
    '"BackendV6Data":{"VNI":1,"VtepMAC":"5e:80:d2:17:9a:d2"}}'
)


def test_dual_stack_key_joins_both_subnets_with_ampersand():
    assert subnet_key("/coreos.com/network", V4, V6) == DUAL_KEY
    assert parse_lease_key(DUAL_KEY) == (V4, V6)


def test_ipv6_only_key_has_the_zero_ipv4_subnet():
    assert subnet_key("/coreos.com/network", NO_IPV4_SUBNET, V6) == V6_ONLY_KEY
    assert parse_lease_key(V6_ONLY_KEY) == (IPv4Network("0.0.0.0/0"), V6)


def test_ipv4_only_key_is_unchanged():
    assert subnet_key("/coreos.com/network", V4) == V4_ONLY_KEY
    assert subnet_key("/coreos.com/network", V4, None) == V4_ONLY_KEY
    assert parse_lease_key(V4_ONLY_KEY) == (V4, None)
    assert parse_subnet_key(V4_ONLY_KEY) == V4


def test_key_name_is_the_last_path_element():
    assert lease_key_name(V4) == "10.1.45.0-24"
    assert lease_key_name(V4, V6) == "10.1.45.0-24&fc00:10:1:4f::-64"
    assert lease_key_name(NO_IPV4_SUBNET, V6) == "0.0.0.0-0&fc00:10:1:4f::-64"
    assert parse_lease_key("10.1.45.0-24&fc00:10:1:4f::-64") == (V4, V6), "no prefix needed"


@pytest.mark.parametrize("key", [DUAL_KEY, V6_ONLY_KEY])
def test_ipv4_only_parser_refuses_dual_stack_keys(key):
    # Callers that only know IPv4 would re-write or delete such a lease under the wrong key.
    with pytest.raises(LeaseFormatError, match="does not name a subnet"):
        parse_subnet_key(key)


@pytest.mark.parametrize("name", [
    "10.1.45.0-24&",                         # "&" with nothing after it
    "10.1.45.0-24&fc00:10:1:4f::",           # IPv6 part without a prefix length
    "10.1.45.0-24&fc00:10:1:4f::-129",       # prefix over 128
    "10.1.45.0-24&fc00:10:1:4f::1-64",       # host bits
    "10.1.45.0-24&FC00:10:1:4f::-64",        # upper case: not how flanneld writes it
    "10.1.45.0-24&fc00:10:1:4f:0:0:0:0-64",  # not canonical: would be re-written elsewhere
    "10.1.45.0-24&fc00:10:1:4f::/64",        # "/" instead of "-"
    "10.1.45.0-24&fc00:10:1:4g::-64",        # not hex
    "10.1.45.0-24&10.1.46.0-24",             # two IPv4 parts
    "fc00:10:1:4f::-64",                     # IPv6 part alone
    "fc00:10:1:4f::-64&10.1.45.0-24",        # parts swapped
    "10.1.45.0-24&fc00:10:1:4f::-64&x",      # trailing garbage
    "0.0.0.0-0",                             # no subnet at all
    "10.1.45.1-24&fc00:10:1:4f::-64",        # IPv4 host bits
    "10.1.45.0-24 ",                         # trailing space
    "",
])
def test_malformed_lease_keys_raise_one_line_naming_the_key(name):
    key = "/coreos.com/network/subnets/" + name
    with pytest.raises(LeaseFormatError) as e:
        parse_lease_key(key)
    assert repr(key) in str(e.value)
    assert "\n" not in str(e.value)


def test_vxlan_dual_stack_value_round_trips_byte_for_byte():
    attrs = LeaseAttrs.from_json(VXLAN_DUAL)
    assert attrs.public_ip == IPv4Address("192.0.2.2")
    assert attrs.public_ipv6 == IPv6Address("fd00:198::2")
    assert attrs.backend_type == "vxlan"
    assert attrs.backend_data == {"VNI": 1, "VtepMAC": "96:cd:e4:4f:c9:30"}
    assert attrs.backend_v6_data == {"VNI": 1, "VtepMAC": "5e:80:d2:17:9a:d2"}
    assert attrs.to_json() == VXLAN_DUAL


def test_vxlan_dual_stack_value_is_written_in_go_field_order():
    attrs = LeaseAttrs(
        public_ip=IPv4Address("192.0.2.2"),
        backend_type="vxlan",
        backend_data={"VNI": 1, "VtepMAC": "96:cd:e4:4f:c9:30"},
        public_ipv6=IPv6Address("fd00:198::2"),
        backend_v6_data={"VNI": 1, "VtepMAC": "5e:80:d2:17:9a:d2"},
    )
    assert attrs.to_json() == VXLAN_DUAL


def test_host_gw_dual_stack_value_has_no_backend_data():
    raw = '{"PublicIP":"192.0.2.2","PublicIPv6":"fd00:198::2","BackendType":"host-gw"}'
    attrs = LeaseAttrs(IPv4Address("192.0.2.2"), "host-gw", public_ipv6=IPv6Address("fd00:198::2"))
    assert attrs.to_json() == raw
    assert LeaseAttrs.from_json(raw) == attrs


def test_ipv6_only_value_has_public_ip_zero():
    raw = ('{"PublicIP":"0.0.0.0","PublicIPv6":"fd00:198::2","BackendType":"vxlan",'
           '"BackendV6Data":{"VNI":1,"VtepMAC":"5e:80:d2:17:9a:d2"}}')
    attrs = LeaseAttrs.from_json(raw)
    assert attrs.public_ip == NO_PUBLIC_IP == IPv4Address("0.0.0.0")
    assert attrs.backend_data is None
    assert attrs.to_json() == raw


def test_ipv4_only_value_still_writes_public_ipv6_null():
    # flanneld's PublicIPv6 is a pointer without omitempty: v4-only leases carry null.
    attrs = LeaseAttrs(IPv4Address("192.0.2.1"), "vxlan", {"VNI": 1, "VtepMAC": "x"})
    assert attrs.to_json() == ('{"PublicIP":"192.0.2.1","PublicIPv6":null,"BackendType":"vxlan",'
                               '"BackendData":{"VNI":1,"VtepMAC":"x"}}')


def test_public_ipv6_given_as_text_is_stored_typed():
    attrs = LeaseAttrs(IPv4Address("192.0.2.2"), "host-gw", public_ipv6="FD00:198:0::2")
    assert attrs.public_ipv6 == IPv6Address("fd00:198::2")
    assert '"PublicIPv6":"fd00:198::2"' in attrs.to_json()


@pytest.mark.parametrize("raw", [
    '{"PublicIP":"192.0.2.2","PublicIPv6":"fd00::198::2"}',
    '{"PublicIP":"192.0.2.2","PublicIPv6":"192.0.2.2"}',
    '{"PublicIP":"192.0.2.2","PublicIPv6":"fe80::1%eth0"}',
    '{"PublicIP":"192.0.2.2","PublicIPv6":7}',
])
def test_bad_public_ipv6_is_a_lease_format_error(raw):
    with pytest.raises(LeaseFormatError, match="PublicIPv6") as e:
        LeaseAttrs.from_json(raw)
    assert "\n" not in str(e.value)


def test_lease_identity_covers_both_families():
    attrs = LeaseAttrs.from_json(VXLAN_DUAL)
    dual = Lease(V4, attrs, 7, 3, ipv6_subnet=V6)
    assert dual.key_name == "10.1.45.0-24&fc00:10:1:4f::-64"
    assert dual.key("/coreos.com/network") == DUAL_KEY
    assert dual.has_ipv4 and dual.has_ipv6

    v6_only = [Lease(NO_IPV4_SUBNET, attrs, ipv6_subnet=IPv6Network(f"fc00:10:1:{i}::/64"))
               for i in (1, 2)]
    assert v6_only[0].subnet == v6_only[1].subnet, "all IPv6-only leases share 0.0.0.0/0"
    assert len({lease.key_name: lease for lease in v6_only}) == 2, "but not their key names"
    assert not v6_only[0].has_ipv4 and v6_only[0].has_ipv6

    v4 = Lease(V4, LeaseAttrs(IPv4Address("192.0.2.1"), "udp"))
    assert v4.ipv6_subnet is None and not v4.has_ipv6
    assert v4.key_name == "10.1.45.0-24"


def test_lease_positional_fields_are_unchanged():
    lease = Lease(V4, LeaseAttrs(IPv4Address("192.0.2.1")), 5, 9)
    assert (lease.subnet, lease.lease_id, lease.mod_revision, lease.ipv6_subnet) == (
        V4, 5, 9, None)


@pytest.mark.parametrize(("key", "v4", "v6"), [
    (V4_ONLY_KEY, V4, None), (DUAL_KEY, V4, V6), (V6_ONLY_KEY, NO_IPV4_SUBNET, V6)])
def test_lease_from_kv_reads_every_layout(key, v4, v6):
    lease = Lease.from_kv(key, VXLAN_DUAL.encode(), lease_id=4, mod_revision=8)
    assert (lease.subnet, lease.ipv6_subnet, lease.lease_id, lease.mod_revision) == (v4, v6, 4, 8)
    assert lease.key("/coreos.com/network") == key


@settings(max_examples=300)
@given(st.text(alphabet="0123456789abcdef.:&-/x", max_size=60))
def test_any_key_text_only_raises_lease_format_error(name):
    try:
        v4, v6 = parse_lease_key("/p/subnets/" + name)
    except LeaseFormatError as e:
        assert "\n" not in str(e)
        return
    assert lease_key_name(v4, v6) == name, "whatever parses is canonical"


@settings(max_examples=300)
@given(st.integers(0, 2**32 - 1), st.integers(1, 32), st.integers(0, 2**128 - 1),
       st.integers(0, 128), st.booleans())
def test_every_subnet_pair_round_trips_through_its_key(a4, p4, a6, p6, v6_only):
    v4 = NO_IPV4_SUBNET if v6_only else IPv4Network((a4, p4), strict=False)
    v6 = IPv6Network((a6, p6), strict=False)
    assert parse_lease_key(subnet_key("/p", v4, v6)) == (v4, v6)


# -- registry decoding: every key layout, per family -------------------------------------


def test_registry_decode_reads_all_three_key_layouts():
    from pyflannel.lease.registry import RawKV, decode

    value = b'{"PublicIP":"0.0.0.0","PublicIPv6":"fd00:198::2","BackendType":"vxlan"}'
    for name, v4, v6 in [
        ("10.1.45.0-24", "10.1.45.0/24", None),
        ("10.1.45.0-24&fc00:10:1:4f::-64", "10.1.45.0/24", "fc00:10:1:4f::/64"),
        ("0.0.0.0-0&fc00:10:1:4f::-64", "0.0.0.0/0", "fc00:10:1:4f::/64"),
    ]:
        got = decode(RawKV(f"/coreos.com/network/subnets/{name}".encode(), value, 5, 9))
        assert got.subnet == IPv4Network(v4)
        assert got.ipv6_subnet == (IPv6Network(v6) if v6 else None)
        assert got.key_name == name and (got.lease_id, got.mod_revision) == (5, 9)


def test_rejected_keys_and_watch_events_carry_the_key_name():
    from pyflannel.lease.registry import RawKV, build_listing, event_for

    a = RawKV(b"/p/subnets/0.0.0.0-0&fc00:10:1:4f::-64", b"garbage", 0, 3)
    b = RawKV(b"/p/subnets/0.0.0.0-0&fc00:10:1:50::-64", b"garbage", 0, 4)
    listing = build_listing([a, b], 4)
    names = [r.key_name for r in listing.rejected]
    assert names == ["0.0.0.0-0&fc00:10:1:4f::-64", "0.0.0.0-0&fc00:10:1:50::-64"]
    # IPv4 and IPv6 subnets are taken per family; 0.0.0.0/0 is no subnet anybody holds.
    assert listing.occupied == {IPv6Network("fc00:10:1:4f::/64"),
                                IPv6Network("fc00:10:1:50::/64")}
    assert listing.occupied_in(4) == set()
    deleted = event_for(RawKV(a.key, b"", 0, 7), deleted=True)
    assert deleted.key_name == "0.0.0.0-0&fc00:10:1:4f::-64" and deleted.lease is None
    assert deleted.ipv6_subnet == IPv6Network("fc00:10:1:4f::/64") and deleted.rejected is None
    put = event_for(b, deleted=False)
    assert put.rejected is not None and put.key_name == "0.0.0.0-0&fc00:10:1:50::-64"


def test_occupied_holds_both_families_of_a_dual_stack_key():
    from pyflannel.lease.registry import RawKV, build_listing

    kv = RawKV(b"/p/subnets/10.1.45.0-24&fc00:10:1:4f::-64", b'{"PublicIP":"192.0.2.2"}')
    listing = build_listing([kv], 1)
    assert listing.occupied == {IPv4Network("10.1.45.0/24"), IPv6Network("fc00:10:1:4f::/64")}
    assert listing.occupied_in(4) == {IPv4Network("10.1.45.0/24")}
