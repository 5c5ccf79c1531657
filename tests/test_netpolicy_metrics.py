"""What network policy shows to operators: Prometheus metrics (policies in force and broken,
rule hits by action from the per-rule nft counters, rebuilds) and ``pyflannel status``."""

import json

from prometheus_client.parser import text_string_to_metric_families

from pyflannel.daemon.snapshot import NodeSnapshot
from pyflannel.metrics import Metrics
from pyflannel.policy.keeper import PolicyKeeper
from pyflannel.status import render_policy

BLUE = {"Name": "blue", "Selector": "tenant == 'blue'",
        "Ingress": [{"Action": "Log"},
                    {"Action": "Allow", "Source": {"Selector": "tenant == 'blue'"}},
                    {"Action": "Deny", "Protocol": "TCP"}]}


def raw(doc) -> bytes:
    return json.dumps(doc).encode()


def nft_listing(counters: dict[str, int]) -> str:
    """What ``nft -j list table inet pyflannel`` prints: rules with a counter and comment
    (each rule twice: its IPv4 and IPv6 halves)."""
    rules = [{"rule": {"chain": "p0_in", "comment": comment,
                       "expr": [{"counter": {"packets": packets, "bytes": 100 * packets}},
                                {"accept": None}]}}
             for comment, packets in counters.items() for _ in range(2)]
    return json.dumps({"nftables": [{"metainfo": {}}, *rules]})


def keeper_with(policies: dict[str, bytes]) -> PolicyKeeper:
    k = PolicyKeeper(None, "/coreos.com/network/", lambda: None, {})
    k.book.update(policies, {})
    return k


def scrape(snap: NodeSnapshot) -> dict[str, dict[tuple, float]]:
    out: dict[str, dict[tuple, float]] = {}
    for fam in text_string_to_metric_families(Metrics(snap.for_metrics).render().decode()):
        for s in fam.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def test_rule_hits_are_counted_by_the_action_of_the_rule_from_its_counter_comment():
    k = keeper_with({"blue": raw(BLUE)})
    k.count_hits(nft_listing({"blue Ingress[0]": 5, "blue Ingress[1]": 3,
                              "blue Ingress[2]": 2, "no rule decided Ingress": 7,
                              "gone Ingress[0]": 99}))  # a comment of no current policy
    assert k.hits == {"Log": 10, "Allow": 6, "Deny": 4, "Pass": 0, "NoRuleDecided": 14}


def test_metrics_show_policies_in_force_broken_hits_and_rebuilds():
    k = keeper_with({"blue": raw(BLUE), "red": b"{not json"})
    k.book.update({"blue": raw(BLUE), "red": b"{not json"}, {"lab": b"[]"})
    k.rebuilds, k.last_rebuild_s = 3, 0.025
    k.count_hits(nft_listing({"blue Ingress[1]": 4}))
    m = scrape(NodeSnapshot(policy=k.status()))
    assert m["pyflannel_policies"][()] == 1
    assert m["pyflannel_policy_broken"] == {(("kind", "policy"),): 1,
                                            (("kind", "networkset"),): 1}
    assert m["pyflannel_policy_rule_hits_total"][(("action", "Allow"),)] == 8  # both halves
    assert m["pyflannel_policy_rule_hits_total"][(("action", "Deny"),)] == 0
    assert m["pyflannel_policy_rebuilds_total"][()] == 3
    assert m["pyflannel_policy_last_rebuild_seconds"][()] == 0.025


def test_a_node_without_a_policy_keeper_yet_has_no_policy_metrics():
    assert not any(name.startswith("pyflannel_polic") for name in scrape(NodeSnapshot()))


def test_status_lists_each_broken_policy_with_its_reason_from_the_state_file():
    k = keeper_with({"blue": raw(BLUE), "red": raw(dict(BLUE, Name="red", Order="x"))})
    doc = json.loads(json.dumps(NodeSnapshot(policy=k.status()).for_state_file()))
    text = render_policy(doc["policy"])
    lines = text.strip().splitlines()
    assert lines[0] == "Network policy: 1 in force, 1 broken"
    assert lines[1].startswith("  broken policy/red: policy 'red': Order")
    assert render_policy({}) == ""


def test_the_keeper_reads_the_counters_while_a_ruleset_is_applied(monkeypatch):
    import asyncio

    from pyflannel.policy import nft

    k = keeper_with({"blue": raw(BLUE)})
    reads = []

    async def listing() -> str:
        reads.append(1)
        return nft_listing({"blue Ingress[2]": 1})

    monkeypatch.setattr(nft, "list_json", listing)

    async def main() -> None:
        task = asyncio.create_task(k.read_hits_forever(every=0.01))
        await asyncio.sleep(0.05)
        assert reads == []  # nothing applied yet: nft is not asked
        k.applied = "table ..."
        for _ in range(100):
            if k.hits:
                break
            await asyncio.sleep(0.01)
        task.cancel()

    asyncio.run(main())
    assert k.hits["Deny"] == 2
