"""The policy model compiled to one nftables ruleset: its shape (pure), and applied in a
network namespace: whole or not at all, and fast enough for a thousand endpoints."""

import json
import os
import secrets
import subprocess
import time
from ipaddress import ip_address, ip_network

import pytest

from pyflannel.policy.model import parse_network_set, parse_policy
from pyflannel.policy.nft import EMPTY, NftError, apply_sync, compile_ruleset, counters
from pyflannel.policy.verdict import Endpoint, PolicyModel
from tests.labtools import require_lab
from tests.test_netpolicy_model import ISOLATE, N1, N2, N3


def test_the_ruleset_replaces_the_whole_table_in_one_file():
    text = compile_ruleset(PolicyModel([parse_policy(d) for d in ISOLATE], [N1, N2, N3]),
                           [N1]).text
    first = text.splitlines()[:3]
    assert first == ["table inet pyflannel", "delete table inet pyflannel",
                     "table inet pyflannel {"]
    assert "ct state established,related accept" in text
    assert "goto ep0_in" in text and "goto ep0_out" in text
    assert text.count("counter drop") == 2  # no rule decided, each direction


def test_an_endpoint_no_policy_selects_gets_no_dispatch():
    text = compile_ruleset(PolicyModel([parse_policy(ISOLATE[1])], [N1, N3]), [N1]).text
    assert "goto" not in text and "counter drop" not in text


def test_rule_selectors_are_shared_sets_and_impossible_families_are_left_out():
    docs = [dict(ISOLATE[0], Ingress=ISOLATE[0]["Ingress"] + [
        {"Action": "Allow", "Source": {"Nets": ["203.0.113.0/24"]}},
        {"Action": "Deny", "Source": {"Selector": "tenant == 'green'"}}])]
    c = compile_ruleset(PolicyModel([parse_policy(d) for d in docs], [N1, N2, N3]), [N1])
    assert c.sets == 2  # tenant == 'blue' for IPv4 and IPv6, shared by Ingress and Egress
    assert "ip6 saddr { 203" not in c.text and "meta nfproto ipv6 ip6 saddr {" not in c.text
    assert "green" not in c.text  # a selector that matches nothing can never match


def test_counters_sum_both_families_of_a_rule():
    def rule(packets, size):
        return {"rule": {"comment": "blue Ingress[0]",
                         "expr": [{"counter": {"packets": packets, "bytes": size}}]}}

    listing = json.dumps({"nftables": [rule(2, 168), rule(1, 104),
                                       {"rule": {"expr": [{"accept": None}]}}]})
    assert counters(listing) == {"blue Ingress[0]": (3, 272)}
    assert counters("garbage") == {}


# -- in a namespace ---------------------------------------------------------------------


@pytest.fixture
def netns():
    require_lab()
    name = f"pfnft{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def _listing(ns: str) -> str:
    return subprocess.run(["ip", "netns", "exec", ns, "nft", "-j", "list", "table", "inet",
                           "pyflannel"], capture_output=True, text=True, check=True).stdout


def test_a_refused_ruleset_leaves_the_previous_one_whole(netns):
    good = compile_ruleset(PolicyModel([parse_policy(d) for d in ISOLATE], [N1, N2, N3]), [N1])
    apply_sync(good.text, netns)
    before = _listing(netns)
    broken = good.text.replace("counter drop", "counter dorp", 1)
    with pytest.raises(NftError, match="^nft refused the ruleset: ") as e:
        apply_sync(broken, netns)
    assert "\n" not in str(e.value)
    assert _listing(netns) == before
    apply_sync(EMPTY, netns)
    assert "chain" not in _listing(netns)


def big_model(endpoints: int = 1000, policies: int = 200) -> tuple[list[str], list[Endpoint],
                                                                  list]:
    """A cluster of ``endpoints`` nodes in 50 tenants, one isolation policy per tenant and
    the rest allowing one port from another tenant (as JSON, as etcd holds them), plus a
    few network sets."""
    tenants = 50
    nodes = []
    for i in range(endpoints):
        net = ip_network(f"10.{64 + i // 256}.{i % 256}.0/24")
        net6 = ip_network(f"fc00:10:{i:x}::/64")
        nodes.append(Endpoint(f"n{i}", (net, net6), {"tenant": f"t{i % tenants}"},
                              node=f"n{i}", host_addresses=frozenset(
                                  {ip_address(net.network_address + 1),
                                   ip_address(net6.network_address + 1)})))
    docs = [{"Name": f"iso-{t}", "Order": 100, "Selector": f"tenant == 't{t}'",
             "Types": ["Ingress", "Egress"],
             "Ingress": [{"Action": "Allow", "Source": {"Selector": f"tenant == 't{t}'"}}],
             "Egress": [{"Action": "Allow", "Destination": {"Selector": f"tenant == 't{t}'"}}]}
            for t in range(tenants)]
    docs += [{"Name": f"port-{k}", "Order": 50, "Selector": f"tenant == 't{k % tenants}'",
              "Ingress": [{"Action": "Allow", "Protocol": "TCP",
                           "Source": {"Selector": f"tenant in {{'t{(k + 1) % tenants}', 'x'}}"},
                           "Destination": {"Ports": [8000 + k, "9000:9099"]}}]}
             for k in range(policies - tenants)]
    sets = [parse_network_set({"Labels": {"tenant": f"t{k}"}, "Nets": [f"203.0.{k}.0/24"]},
                              f"office-{k}") for k in range(20)]
    return [json.dumps(d) for d in docs], nodes, sets


def test_a_thousand_endpoints_and_two_hundred_policies_rebuild_in_under_a_second(netns):
    """Worst case for one node: it holds an endpoint of every tenant (50 local endpoints,
    as containers will be), so every policy and every selector set is compiled; timed from
    the policies' JSON to the kernel holding the ruleset."""
    docs, nodes, sets = big_model()
    started = time.perf_counter()
    model = PolicyModel([parse_policy(d) for d in docs], nodes, sets)
    compiled = compile_ruleset(model, nodes[:50])
    compiled_at = time.perf_counter()
    apply_sync(compiled.text, netns)
    done = time.perf_counter()
    print(f"compile {1000 * (compiled_at - started):.0f} ms, nft -f "
          f"{1000 * (done - compiled_at):.0f} ms, {compiled.rules} rules, {compiled.sets} sets, "
          f"{compiled.elements} elements")
    assert done - started < 1.0


def test_nft_refusing_a_ruleset_before_reading_it_all_is_an_nft_error_under_uvloop(
        tmp_path, monkeypatch):
    """The daemon runs on uvloop, where feeding a pipe that nft closed early raised
    RuntimeError and the policy task failed and restarted for ever; the ruleset now waits
    in a file nft reads from."""
    import uvloop

    from pyflannel.policy import nft

    fake = tmp_path / "nft"
    fake.write_text("#!/bin/sh\necho 'Error: syntax error at line 1' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")

    async def apply_a_large_ruleset() -> str:
        with pytest.raises(NftError) as e:
            await nft.apply("table inet pyflannel {}\n" * 200_000)  # 4.6 MB, far past a pipe
        return str(e.value)

    assert uvloop.run(apply_a_large_ruleset()) == (
        "nft refused the ruleset: Error: syntax error at line 1")
