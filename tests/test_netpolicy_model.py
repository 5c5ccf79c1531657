"""Policies as stored in etcd: validation (one line naming the field) and Calico's
semantics in the pure evaluator that `pyflannel policy trace` prints."""

from ipaddress import ip_address, ip_network

import pytest

from pyflannel.policy.model import (
    PolicyError,
    parse_label_flag,
    parse_network_set,
    parse_policy,
)
from pyflannel.policy.verdict import Endpoint, Flow, PolicyModel, trace


def node(name, net, net6=None, **labels):
    nets = (ip_network(net),) + ((ip_network(net6),) if net6 else ())
    gw = frozenset(ip_address(n.network_address + 1) for n in nets)
    return Endpoint(name, nets, labels, node=name, host_addresses=gw)


N1 = node("n1", "10.1.1.0/24", "fc00:10:1:1::/64", tenant="blue")
N2 = node("n2", "10.1.2.0/24", "fc00:10:1:2::/64", tenant="blue")
N3 = node("n3", "10.1.3.0/24", "fc00:10:1:3::/64", tenant="red")

ISOLATE = [
    {"Name": t, "Order": 100, "Selector": f"tenant == '{t}'", "Types": ["Ingress", "Egress"],
     "Ingress": [{"Action": "Allow", "Source": {"Selector": f"tenant == '{t}'"}}],
     "Egress": [{"Action": "Allow", "Destination": {"Selector": f"tenant == '{t}'"}}]}
    for t in ("blue", "red")
]


def model(*docs, sets=()):
    return PolicyModel([parse_policy(d) for d in docs], [N1, N2, N3],
                       [parse_network_set(s, s["Name"]) for s in sets])


def verdict(m, src, dst, **kw):
    return trace(m, Flow.of(src, dst, **kw))


def test_tenants_by_node_label_talk_within_and_not_across():
    m = model(*ISOLATE)
    assert verdict(m, "10.1.1.2", "10.1.2.2").allowed
    t = verdict(m, "10.1.1.2", "10.1.3.2")
    assert not t.allowed
    assert t.egress.reason == "no rule decided: denied" and t.egress.selecting == ("blue",)
    assert not t.ingress.allowed and t.ingress.selecting == ("red",)
    assert not verdict(m, "10.1.3.2", "10.1.1.2").allowed
    assert verdict(m, "fc00:10:1:1::2", "fc00:10:1:2::2").allowed  # IPv6 alike
    assert not verdict(m, "fc00:10:1:3::2", "fc00:10:1:1::2").allowed


def test_an_allow_for_one_port_lets_that_port_through_and_nothing_else():
    blue = dict(ISOLATE[0], Ingress=ISOLATE[0]["Ingress"] + [
        {"Action": "Allow", "Protocol": "TCP", "Source": {"Selector": "tenant == 'red'"},
         "Destination": {"Ports": [8080]}}])
    red = dict(ISOLATE[1], Egress=ISOLATE[1]["Egress"] + [
        {"Action": "Allow", "Protocol": "TCP", "Destination": {"Ports": ["8000:8099"]}}])
    m = model(blue, red)
    t = verdict(m, "10.1.3.2", "10.1.1.2", protocol=6, dport=8080)
    assert t.allowed and (t.ingress.policy, t.ingress.rule) == ("blue", 1)
    assert (t.egress.policy, t.egress.rule) == ("red", 1)
    assert not verdict(m, "10.1.3.2", "10.1.1.2", protocol=6, dport=8081).allowed
    assert not verdict(m, "10.1.3.2", "10.1.1.2").allowed  # ping stays denied


def test_order_then_name_first_allow_or_deny_decides_and_pass_moves_on():
    deny_all = {"Name": "a-deny", "Order": 10, "Selector": "all()",
                "Ingress": [{"Action": "Log"}, {"Action": "Deny", "Protocol": "ICMP"}]}
    passes = {"Name": "b-pass", "Order": 5, "Selector": "all()",
              "Ingress": [{"Action": "Pass", "Source": {"Nets": ["10.1.2.0/24"]}},
                          {"Action": "Allow"}]}
    m = model(deny_all, passes)
    from_n3 = verdict(m, "10.1.3.2", "10.1.1.2")
    assert from_n3.ingress.allowed and from_n3.ingress.policy == "b-pass"
    from_n2 = verdict(m, "10.1.2.2", "10.1.1.2")  # passed on to a-deny: logged, then denied
    assert not from_n2.ingress.allowed and from_n2.ingress.policy == "a-deny"
    assert from_n2.ingress.logged == (("a-deny", 0),)
    assert verdict(m, "10.1.2.2", "10.1.1.2", protocol=17, dport=53).ingress.reason == (
        "no rule decided: denied")
    same_order = model(dict(deny_all, Order=5, Name="a"), dict(passes, Name="b"))
    assert same_order.policies[0].name == "a"  # equal Order: by name
    no_order = model(dict(deny_all, Order=None), passes)
    assert [p.name for p in no_order.policies] == ["b-pass", "a-deny"]  # no Order: last


def test_an_endpoint_no_policy_selects_allows_and_the_node_reaches_its_own():
    m = model(ISOLATE[1])  # only red is isolated
    assert verdict(m, "10.1.1.2", "10.1.2.2").allowed  # blue: selected by nothing
    t = verdict(m, "10.1.3.1", "10.1.3.2")  # n3's bridge address to its own endpoint
    assert t.allowed and "always allowed" in t.ingress.reason
    assert not verdict(m, "10.1.1.1", "10.1.3.2").allowed  # another node's address is not


def test_network_sets_label_outside_addresses_for_rule_selectors():
    office = {"Name": "office", "Labels": {"role": "office"}, "Nets": ["203.0.113.0/24"]}
    web = {"Name": "blue", "Selector": "tenant == 'blue'",
           "Ingress": [{"Action": "Allow", "Protocol": "TCP",
                        "Source": {"Selector": "role == 'office'"},
                        "Destination": {"Ports": [443]}}]}
    m = model(web, sets=[office])
    t = verdict(m, "203.0.113.9", "10.1.1.2", protocol=6, dport=443)
    assert t.allowed and t.src_labels == {"role": "office"}
    assert not verdict(m, "203.0.113.9", "10.1.1.2", protocol=6, dport=22).allowed
    assert not verdict(m, "198.51.100.1", "10.1.1.2", protocol=6, dport=443).allowed


def test_not_selectors_nets_and_ports_exclude():
    doc = {"Name": "x", "Selector": "all()", "Ingress": [
        {"Action": "Allow", "Protocol": "UDP",
         "Source": {"NotSelector": "tenant == 'red'", "NotNets": ["10.1.2.128/25"]},
         "Destination": {"NotPorts": ["1:1023"]}}]}
    m = model(doc)
    assert verdict(m, "10.1.2.2", "10.1.1.2", protocol=17, dport=5000).allowed
    assert not verdict(m, "10.1.2.200", "10.1.1.2", protocol=17, dport=5000).allowed
    assert not verdict(m, "10.1.3.2", "10.1.1.2", protocol=17, dport=5000).allowed
    assert not verdict(m, "10.1.2.2", "10.1.1.2", protocol=17, dport=53).allowed


def test_icmp_type_and_ip_version_narrow_a_rule():
    doc = {"Name": "x", "Selector": "all()", "Ingress": [
        {"Action": "Allow", "Protocol": "ICMP", "ICMP": {"Type": 8, "Code": 0}},
        {"Action": "Allow", "IPVersion": 6}]}
    m = model(doc)
    assert verdict(m, "10.1.2.2", "10.1.1.2").allowed
    assert not verdict(m, "10.1.2.2", "10.1.1.2", icmp_type=13, icmp_code=0).allowed
    assert verdict(m, "fc00:10:1:2::2", "fc00:10:1:1::2", protocol=6, dport=1).allowed
    assert not verdict(m, "10.1.2.2", "10.1.1.2", protocol=6, dport=1).allowed


@pytest.mark.parametrize("doc, where", [
    ({"Name": "Bad Name"}, "Name"),
    ({"Name": "p", "Selecter": "all()"}, "Selecter: unknown field"),
    ({"Name": "p", "Selector": "tenant = 'x'"}, "Selector: "),
    ({"Name": "p", "Order": "first"}, "Order"),
    ({"Name": "p", "Ingress": [{"Action": "Accept"}]}, "Ingress[0].Action"),
    ({"Name": "p", "Ingress": [{"Action": "Allow", "Protocol": "GRE"}]}, "Ingress[0].Protocol"),
    ({"Name": "p", "Ingress": [{"Action": "Allow", "Destination": {"Ports": [80]}}]},
     "Ingress[0].Destination.Ports: ports need Protocol"),
    ({"Name": "p", "Ingress": [{"Action": "Allow", "Protocol": "TCP",
                                "Destination": {"Ports": [80, "90-99"]}}]},
     "Ingress[0].Destination.Ports[1]"),
    ({"Name": "p", "Ingress": [{"Action": "Allow", "Protocol": "TCP",
                                "Destination": {"Ports": ["99:90"]}}]},
     "Destination.Ports[0]"),
    ({"Name": "p", "Egress": [{"Action": "Allow", "Source": {"Nets": ["10.1.0.0/33"]}}]},
     "Egress[0].Source.Nets[0]"),
    ({"Name": "p", "Egress": [{"Action": "Allow", "IPVersion": 4,
                               "Source": {"Nets": ["fc00::/64"]}}]}, "is not IPv4"),
    ({"Name": "p", "Egress": [{"Action": "Allow", "ICMP": {"Type": 8}}]}, "ICMP: needs"),
    ({"Name": "p", "Egress": [{"Action": "Allow", "Protocol": "ICMP",
                               "ICMP": {"Code": 1}}]}, "ICMP.Code: needs a Type"),
    ({"Name": "p", "Types": ["Ingress"], "Egress": [{"Action": "Allow"}]},
     "Egress: rules given but Types"),
    ({"Name": "p", "Ingress": {"Action": "Allow"}}, "Ingress: not a list"),
])
def test_a_bad_policy_is_one_line_naming_the_field(doc, where):
    with pytest.raises(PolicyError) as e:
        parse_policy(doc)
    assert where in str(e.value) and "\n" not in str(e.value)


def test_name_must_equal_the_key_and_garbage_json_is_one_line():
    with pytest.raises(PolicyError, match="key's last part"):
        parse_policy({"Name": "blue"}, key_name="red")
    with pytest.raises(PolicyError, match="^policy 'x': not JSON") as e:
        parse_policy(b'{"Name": \n', key_name="x")
    assert "\n" not in str(e.value)


def test_types_default_as_in_calico():
    assert parse_policy({"Name": "p"}).types == {"Ingress"}
    assert parse_policy({"Name": "p", "Egress": [{"Action": "Deny"}]}).types == {
        "Ingress", "Egress"}


def test_node_labels_flag():
    assert parse_label_flag("tenant=blue, zone=a") == {"tenant": "blue", "zone": "a"}
    assert parse_label_flag("") == {}
    for bad in ("tenant", "=x", "a=b c", "k=" + "v" * 64):
        with pytest.raises(PolicyError, match="-node-labels"):
            parse_label_flag(bad)
