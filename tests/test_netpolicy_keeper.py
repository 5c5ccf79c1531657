"""The policy keeper's decisions: what it keeps when etcd holds something bad, when it
leaves the kernel alone, and the node labels it publishes in its lease."""

import asyncio
import json
from ipaddress import IPv4Address, IPv4Network, IPv6Network

import pytest

from pyflannel.flags import FlagError, parse_flags
from pyflannel.lease.model import Lease, LeaseAttrs
from pyflannel.policy.keeper import PolicyBook, PolicyKeeper, build_model, with_node_labels
from pyflannel.policy.nft import NftError
from pyflannel.policy.verdict import Flow, trace

BLUE = {"Name": "blue", "Selector": "tenant == 'blue'",
        "Ingress": [{"Action": "Allow", "Source": {"Selector": "tenant == 'blue'"}}]}


def raw(doc) -> bytes:
    return json.dumps(doc).encode()


def lease(n: int, **labels) -> Lease:
    attrs = LeaseAttrs(IPv4Address(f"198.18.0.{n}"), "host-gw",
                       labels=tuple(sorted(labels.items())))
    return Lease(IPv4Network(f"10.1.{n}.0/24"), attrs, 7, 1,
                 IPv6Network(f"fc00:10:1:{n}::/64"))


def test_a_bad_policy_keeps_its_last_good_version_and_is_reported_once():
    book = PolicyBook()
    assert book.update({"blue": raw(BLUE)}, {}) == []
    bad = raw(dict(BLUE, Ingress=[{"Action": "Alow"}]))
    said = book.update({"blue": bad}, {})
    assert said == ["policy 'blue': Ingress[0].Action: 'Alow' is not Allow, Deny, Log or "
                    "Pass; keeping its last good version"]
    assert book.policies["blue"].ingress[0].action == "Allow"
    assert book.update({"blue": bad}, {}) == []  # the same bad value: said once
    assert "policy/blue" in book.broken
    assert book.update({"blue": raw(BLUE)}, {}) == [] and not book.broken


def test_a_policy_that_never_parsed_is_left_out_and_a_deleted_one_goes():
    book = PolicyBook()
    said = book.update({"red": b"{not json"}, {"office": raw({"Nets": ["x"]})})
    assert [s.split(":")[0] for s in said] == ["policy 'red'", "network set 'office'"]
    assert said[0].endswith("it is left out") and not book.policies
    book.update({"blue": raw(BLUE)}, {})
    assert set(book.policies) == {"blue"} and not book.broken
    book.update({}, {})
    assert not book.policies


def test_node_labels_come_from_leases_and_this_node_from_its_flag():
    book = PolicyBook()
    book.update({"blue": raw(BLUE)}, {})
    warned = []
    leases = [lease(1, tenant="blue"), lease(2, tenant="blue"), lease(3, tenant="bad value!")]
    model = build_model(book, leases, (leases[0], {"tenant": "blue"}),
                        lambda key, msg: warned.append((key, msg)))
    assert trace(model, Flow.of("10.1.2.2", "10.1.1.2")).allowed
    assert not trace(model, Flow.of("10.1.3.2", "10.1.1.2")).allowed  # unlabelled: not blue
    assert warned and warned[0][0] == "10.1.3.0-24&fc00:10:1:3::-64"


def test_labels_are_published_in_the_lease_and_bad_ones_never_cost_the_lease():
    attrs = with_node_labels(LeaseAttrs(IPv4Address("198.18.0.1"), "udp"), {"tenant": "blue"})
    doc = json.loads(attrs.to_json())
    assert doc["Labels"] == {"tenant": "blue"}
    assert LeaseAttrs.from_json(attrs.to_json()) == attrs
    garbage = LeaseAttrs.from_json('{"PublicIP":"198.18.0.2","Labels":[1,2]}')
    assert garbage.labels == () and str(garbage.public_ip) == "198.18.0.2"
    plain = LeaseAttrs(IPv4Address("198.18.0.1"), "udp").to_json()
    assert "Labels" not in plain  # nothing new on the wire for nodes without labels


def test_the_node_labels_flag_is_checked_with_the_policy_rules():
    assert parse_flags(["-node-labels=tenant=blue,zone=a"]).node_labels == "tenant=blue,zone=a"
    with pytest.raises(FlagError, match="^flag -node-labels: 'blue' is not key=value$"):
        parse_flags(["-node-labels=blue"])


class FakeKeys:
    def __init__(self, policies):
        self.policies = policies

    async def list(self, prefix):
        return self.policies if prefix.endswith("/policies/") else {}


class FakeRegistry:
    def __init__(self, leases):
        self.leases = leases

    async def list_leases(self):
        return type("Listing", (), {"leases": self.leases})()


def keeper(policies, own, apply):
    k = PolicyKeeper(FakeRegistry([lease(1, tenant="blue"), lease(2)]), "/p", lambda: own,
                     {"tenant": "blue"}, apply)
    k.keys = FakeKeys(policies)
    return k


def test_the_keeper_applies_only_changes_and_leaves_the_kernel_alone_without_a_lease():
    applied = []

    async def apply(text):
        applied.append(text)

    async def go():
        k = keeper({"blue": raw(BLUE)}, None, apply)
        assert await k.rebuild() is False and applied == []  # no lease: kernel untouched
        k.own_lease = lambda: lease(1)
        assert await k.rebuild() and await k.rebuild()
        assert len(applied) == 1 and "goto ep0_in" in applied[0]
        k.keys = FakeKeys({"blue": raw(dict(BLUE, Ingress=[{"Action": "Deny"}]))})
        assert await k.rebuild() and len(applied) == 2

    asyncio.run(go())


def test_nft_refusing_keeps_the_previous_ruleset_and_says_so_once(caplog):
    async def refuse(text):
        raise NftError("nft refused the ruleset: Error: syntax error")

    async def go():
        k = keeper({"blue": raw(BLUE)}, lease(1), refuse)
        assert await k.rebuild() is False and await k.rebuild() is False
        assert k.applied == ""
        k2 = keeper({}, lease(1), refuse)
        assert await k2.rebuild() is True  # no policy: a node without nft is fine

    asyncio.run(go())
    assert sum("the previous ruleset stays" in r.message for r in caplog.records) == 1


def test_without_any_policy_lease_changes_cost_no_lease_listing():
    applied = []

    async def apply(text):
        applied.append(text)

    async def go():
        k = keeper({}, lease(1), apply)
        listed = []
        inner = k.registry.list_leases

        async def counting():
            listed.append(1)
            return await inner()

        k.registry.list_leases = counting
        for _ in range(5):
            assert await k.rebuild()
        assert len(listed) == 1 and len(applied) == 1  # the first: replace any old table
        k.keys = FakeKeys({"blue": raw(BLUE)})
        assert await k.rebuild() and len(listed) == 2 and len(applied) == 2

    asyncio.run(go())
