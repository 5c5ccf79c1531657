"""The wireguard backend's operator surface: status columns and protocol metrics."""

from __future__ import annotations

import time

from prometheus_client.parser import text_string_to_metric_families

from pyflannel.daemon.snapshot import NodeSnapshot
from pyflannel.metrics import Metrics
from pyflannel.status import render_table

KEY_A = "KqXTRBS18BQQUQWR/h86beAeAsrtbn0Ive79VpUBGls="
KEY_B = "AqXTRBS18BQQUQWR/h86beAeAsrtbn0Ive79VpUBGls="


def row(subnet: str, key: str, counters: dict | None, this_node: bool = False) -> dict:
    return {"key": subnet.replace("/", "-"), "subnet": subnet, "ipv6_subnet": None,
            "public_ip": "198.18.0.2", "public_ipv6": None, "backend": "wireguard",
            "backend_data": {"PublicKey": key}, "backend_v6_data": None,
            "expires_in_s": 86000, "this_node": this_node, "counters": counters}


def test_status_shows_a_short_key_the_handshake_age_and_the_transfer_per_peer():
    peer = {"tx_packets": 5, "tx_bytes": 500, "rx_packets": 3, "rx_bytes": 300,
            "rx_dropped": 0, "last_rx_age_s": 1.2, "latest_handshake": time.time() - 75,
            "wire_rx_bytes": 2_500_000, "wire_tx_bytes": 1200}
    text = render_table([row("10.1.2.0/24", KEY_A, peer),
                         row("10.1.3.0/24", KEY_B, None, this_node=True),
                         row("10.1.4.0/24", KEY_B, {**peer, "latest_handshake": None})])
    header, first, me, never = text.splitlines()
    assert "PUBLIC KEY" in header and "HANDSHAKE" in header and "TRANSFER" in header
    assert "KqXTRBS1…" in first and "1m15s ago" in first and "300B" in first
    assert "2.5MB rx, 1.2kB tx" in first  # as `wg show` prints its transfer line
    assert "AqXTRBS1…" in me and "<- this host" in me
    assert "never" in never
    assert KEY_A not in text  # only the short form


def test_other_backends_get_no_wireguard_columns():
    r = row("10.1.2.0/24", KEY_A, None)
    r["backend"], r["backend_data"] = "vxlan", {"VNI": 1, "VtepMAC": "aa:bb:cc:dd:ee:ff"}
    assert "PUBLIC KEY" not in render_table([r])


def samples(snap: NodeSnapshot) -> dict[tuple, float]:
    body = Metrics(snap.for_metrics).render().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(body) for s in f.samples}


def test_metrics_count_handshakes_failures_replays_and_unauthenticated_datagrams():
    at = time.time() - 10
    got = samples(NodeSnapshot(
        backend="wireguard", subnet="10.1.3.0/24",
        counters={"wg_handshakes_completed": 3, "drop_replay": 2, "drop_bad_auth": 4,
                  "drop_unknown_peer": 1, "wg_handshakes_abandoned": 1},
        peer_counters={"10.1.2.0/24": {"latest_handshake": at, "public_key": "KqXTRBS1…",
                                       "tx_packets": 1, "tx_bytes": 2, "rx_packets": 3,
                                       "rx_bytes": 4}}))
    assert got[("pyflannel_wireguard_handshakes_total", ())] == 3
    assert got[("pyflannel_wireguard_replayed_datagrams_total", ())] == 2
    fail = "pyflannel_wireguard_handshake_failures_total"
    assert got[(fail, (("reason", "unknown_peer"),))] == 1
    assert got[(fail, (("reason", "abandoned"),))] == 1
    unauth = "pyflannel_wireguard_unauthenticated_datagrams_total"
    assert got[(unauth, (("reason", "bad_auth"),))] == 4
    last = "pyflannel_wireguard_last_handshake_timestamp_seconds"
    assert got[(last, (("peer", "10.1.2.0/24"), ("public_key", "KqXTRBS1…")))] == at


def test_metrics_count_cookie_replies_sent_and_those_the_global_limit_held_back():
    got = samples(NodeSnapshot(backend="wireguard", subnet="10.1.3.0/24", counters={
        "wg_cookie_replies_sent": 20, "wg_cookie_replies_limited": 380}))
    assert got[("pyflannel_wireguard_cookie_replies_sent_total", ())] == 20
    assert got[("pyflannel_wireguard_cookie_replies_limited_total", ())] == 380


def test_no_wireguard_metrics_on_other_backends():
    got = samples(NodeSnapshot(backend="vxlan", subnet="10.1.3.0/24"))
    assert not any(name.startswith("pyflannel_wireguard") for name, _l in got)
