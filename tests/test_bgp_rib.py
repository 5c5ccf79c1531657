"""The RIB as a specification: what a node learns, refuses, selects, reflects and keeps.

Network 10.1.0.0/16 with /24 subnets and fc00:10:1::/48 with /64s; this node holds
10.1.1.0/24 and fc00:10:1:1::/64, has router ID 198.18.0.1 and AS 64512.
"""

from __future__ import annotations

import ipaddress

from hypothesis import given, settings
from hypothesis import strategies as st

from pyflannel.bgp.attributes import (
    AS_SEQUENCE,
    AsPathSegment,
    CodecOptions,
    MpReach,
    PathAttributes,
    community,
)
from pyflannel.bgp.messages import (
    GracefulRestart,
    GracefulRestartFamily,
    Update,
    decode,
    encode,
)
from pyflannel.bgp.rib import (
    AS_PATH_LOOP,
    BAD_NEXT_HOP,
    CLUSTER_LOOP,
    ORIGINATOR_LOOP,
    OUTSIDE_NETWORK,
    OWN_SUBNET,
    TREAT_AS_WITHDRAW,
    WRONG_LENGTH,
    ImportPolicy,
    LocalSpeaker,
    PeerInfo,
    Rib,
    out_changes,
    updates_for,
)

N = ipaddress.ip_network
A = ipaddress.ip_address
ME = A("198.18.0.1")
OWN4, OWN6 = N("10.1.1.0/24"), N("fc00:10:1:1::/64")
POLICY = ImportPolicy(((N("10.1.0.0/16"), 24), (N("fc00:10:1::/48"), 64)),
                      frozenset({OWN4, OWN6}))
MESH2 = PeerInfo("198.18.0.2", 64512, A("198.18.0.2"), A("198.18.0.2"))
MESH3 = PeerInfo("198.18.0.3", 64512, A("198.18.0.3"), A("198.18.0.3"))
TOR = PeerInfo("198.18.0.200", 64600, A("198.18.0.200"), A("198.18.0.200"))


def make_rib(cluster_id=None, policy=POLICY, peers=(MESH2, MESH3, TOR)) -> Rib:
    rib = Rib(LocalSpeaker(64512, ME, (ME, A("fd00::1")), cluster_id,
                           (community("64512:100"),)), policy)
    for peer in peers:
        rib.add_peer(peer)
    return rib


def ann(prefixes, next_hop="198.18.0.2", v6_next_hop="fd00::2", ebgp_from=None, wire=True,
        **attrs) -> Update:
    """An UPDATE as a peer would send it, passed through the real codec."""
    nets = [N(p) if isinstance(p, str) else p for p in prefixes]
    v4 = tuple(p for p in nets if p.version == 4)
    v6 = tuple(p for p in nets if p.version == 6)
    path = (AsPathSegment(AS_SEQUENCE, (ebgp_from,)),) if ebgp_from else ()
    base = dict(origin=0, as_path=path, next_hop=A(next_hop) if v4 else None,
                local_pref=None if ebgp_from else 100,
                mp_reach=MpReach(2, 1, (A(v6_next_hop),), v6) if v6 else None)
    msg = Update(attributes=PathAttributes(**{**base, **attrs}), nlri=v4)
    if not wire:
        return msg
    options = CodecOptions(ibgp=not ebgp_from)
    return decode(encode(msg, options), options)


def gone(prefixes) -> Update:
    return Update(withdrawn=tuple(N(p) for p in prefixes))


# --- import policy -------------------------------------------------------------------------


def test_a_node_subnet_from_a_mesh_peer_becomes_a_route():
    rib = make_rib()
    changes = rib.apply_update(MESH2.key, ann(["10.1.2.0/24", "fc00:10:1:2::/64"]))
    expected = {N("10.1.2.0/24"): frozenset({A("198.18.0.2")}),
                N("fc00:10:1:2::/64"): frozenset({A("fd00::2")})}
    assert changes == expected and rib.routes() == expected
    assert rib.apply_update(MESH2.key, gone(["10.1.2.0/24"])) == {N("10.1.2.0/24"): None}
    assert list(rib.routes()) == [N("fc00:10:1:2::/64")]


def test_hostile_update_refuses_each_bad_row_and_keeps_the_others():
    rib = make_rib()
    rows = ["10.1.2.0/24",  # good
            "10.2.0.0/24",  # outside the Network
            "10.1.0.0/16",  # the aggregate
            "10.1.3.0/25",  # inside but not the subnet length
            "10.1.1.0/24",  # this node's own subnet
            "10.1.4.0/24",  # good
            "0.0.0.0/0",
            "fc00:10:1:1::/64",  # own IPv6 subnet
            "fc00:10:2::/64",  # outside the IPv6 Network
            "fc00:10:1:5::/64"]  # good
    rib.apply_update(TOR.key, ann(rows, next_hop="198.18.0.200", ebgp_from=64600))
    assert set(rib.routes()) == {N("10.1.2.0/24"), N("10.1.4.0/24"), N("fc00:10:1:5::/64")}
    assert rib.refused == {OUTSIDE_NETWORK: 3, WRONG_LENGTH: 2, OWN_SUBNET: 2}
    counters = rib.counters[TOR.key]
    assert counters.received == 10 and sum(counters.refused.values()) == 7


def test_a_thousand_prefixes_in_one_update_with_one_bad_row():
    policy = ImportPolicy(((N("10.0.0.0/8"), 24), (N("fc00:10::/32"), 64)),
                          frozenset({N("10.200.0.0/24")}))
    rib = make_rib(policy=policy)
    v4 = [N(f"10.{i // 256}.{i % 256}.0/24") for i in range(1000)]
    v4[500] = N("192.168.0.0/24")  # the hostile row
    v6 = [N(f"fc00:10:0:{i:x}::/64") for i in range(1000)]
    msg = ann(v4)
    assert len(encode(msg)) <= 4096
    changes = rib.apply_update(MESH2.key, msg)
    assert len(changes) == 999 and rib.refused == {OUTSIDE_NETWORK: 1}
    rib.apply_update(MESH2.key, ann(v6, wire=False))  # over 4096 octets: not sendable as one
    assert len(rib.routes()) == 1999


def test_malformed_update_withdraws_what_it_names_and_is_counted():
    rib = make_rib()
    rib.apply_update(MESH2.key, ann(["10.1.2.0/24", "10.1.3.0/24"]))
    bad = b"\xff" * 16 + bytes([0, 41, 2, 0, 0, 0, 14]) + bytes([0x40, 1, 1, 9]) \
        + bytes([0x40, 2, 0]) + bytes([0x40, 3, 4, 198, 18, 0, 2]) + bytes([24, 10, 1, 2])
    msg = decode(bad)
    assert msg.treat_as_withdraw
    assert rib.apply_update(MESH2.key, msg) == {N("10.1.2.0/24"): None}
    assert list(rib.routes()) == [N("10.1.3.0/24")]
    assert rib.refused == {TREAT_AS_WITHDRAW: 1}


def test_loops_and_bad_next_hops_are_refused():
    rr = make_rib(cluster_id=A("198.18.0.1"))
    cases = [
        (TOR, ann(["10.1.2.0/24"], next_hop="198.18.0.200", ebgp_from=64600,
                  as_path=(AsPathSegment(AS_SEQUENCE, (64600, 64512)),)), AS_PATH_LOOP),
        (MESH2, ann(["10.1.2.0/24"], originator_id=ME), ORIGINATOR_LOOP),
        (MESH2, ann(["10.1.2.0/24"], cluster_list=(A("10.9.9.9"), ME)), CLUSTER_LOOP),
        (MESH2, ann(["10.1.2.0/24"], next_hop="0.0.0.0"), BAD_NEXT_HOP),
        (MESH2, ann(["10.1.2.0/24"], next_hop="127.0.0.1"), BAD_NEXT_HOP),
        (MESH2, ann(["10.1.2.0/24"], next_hop="224.0.0.5"), BAD_NEXT_HOP),
        (MESH2, ann(["10.1.2.0/24"], next_hop="198.18.0.1"), BAD_NEXT_HOP),  # ourselves
        (MESH2, ann(["fc00:10:1:2::/64"], v6_next_hop="::"), BAD_NEXT_HOP),
    ]
    for peer, msg, reason in cases:
        rr.refused.clear()
        rr.apply_update(peer.key, msg)
        assert rr.refused == {reason: 1}, reason
        assert rr.routes() == {}


def test_a_refused_reannouncement_removes_the_earlier_route():
    rib = make_rib()
    rib.apply_update(MESH2.key, ann(["10.1.2.0/24"]))
    changes = rib.apply_update(MESH2.key, ann(["10.1.2.0/24"], next_hop="198.18.0.1"))
    assert changes == {N("10.1.2.0/24"): None} and rib.routes() == {}


# --- selection and ECMP --------------------------------------------------------------------


def test_equal_paths_from_two_peers_make_an_ecmp_route():
    rib = make_rib()
    rib.apply_update(MESH2.key, ann(["10.1.2.0/24"], next_hop="198.18.0.2"))
    changes = rib.apply_update(MESH3.key, ann(["10.1.2.0/24"], next_hop="198.18.0.3"))
    assert changes == {N("10.1.2.0/24"): frozenset({A("198.18.0.2"), A("198.18.0.3")})}
    assert rib.apply_update(MESH3.key, gone(["10.1.2.0/24"])) == {
        N("10.1.2.0/24"): frozenset({A("198.18.0.2")})}


def test_better_paths_win():
    rib = make_rib()
    rib.apply_update(MESH2.key, ann(["10.1.2.0/24"], local_pref=200))
    rib.apply_update(MESH3.key, ann(["10.1.2.0/24"], next_hop="198.18.0.3"))
    assert rib.routes()[N("10.1.2.0/24")] == {A("198.18.0.2")}  # higher LOCAL_PREF
    rib.apply_update(MESH2.key, ann(["10.1.2.0/24"], as_path=(
        AsPathSegment(AS_SEQUENCE, (64700,)),)))
    assert rib.routes()[N("10.1.2.0/24")] == {A("198.18.0.3")}  # shorter AS_PATH
    # eBGP beats iBGP when all else is equal.
    rib.apply_update(MESH3.key, gone(["10.1.2.0/24"]))
    rib.apply_update(MESH2.key, ann(["10.1.2.0/24"], as_path=(
        AsPathSegment(AS_SEQUENCE, (64600,)),)))
    rib.apply_update(TOR.key, ann(["10.1.2.0/24"], next_hop="198.18.0.200", ebgp_from=64600))
    assert rib.routes()[N("10.1.2.0/24")] == {A("198.18.0.200")}


def test_a_learned_copy_of_our_own_route_never_reaches_the_kernel():
    policy = ImportPolicy(POLICY.pools)  # even were our own subnet not refused
    rib = make_rib(policy=policy)
    rib.originate(OWN4)
    assert rib.apply_update(MESH2.key, ann([str(OWN4)])) == {}
    assert rib.routes() == {}


# --- export and route reflection -----------------------------------------------------------


def test_every_peer_gets_our_subnets_and_ebgp_peers_see_our_as():
    rib = make_rib()
    rib.originate(OWN4)
    rib.originate(OWN6)
    rib.apply_update(MESH2.key, ann(["10.1.2.0/24"]))
    mesh = rib.export(MESH3.key)
    assert set(mesh) == {OWN4, OWN6}  # a non-reflector passes on nothing it learned
    assert mesh[OWN4].next_hop == ME and mesh[OWN6].next_hop == A("fd00::1")
    assert mesh[OWN4].attributes == PathAttributes(
        origin=0, as_path=(), local_pref=100, communities=(community("64512:100"),))
    tor = rib.export(TOR.key)
    assert set(tor) == {OWN4, OWN6}
    assert tor[OWN4].attributes.as_path == (AsPathSegment(AS_SEQUENCE, (64512,)),)
    assert tor[OWN4].attributes.local_pref is None


def rr_rib():
    c1 = PeerInfo("c1", 64512, A("198.18.0.11"), A("198.18.0.11"), rr_client=True)
    c2 = PeerInfo("c2", 64512, A("198.18.0.12"), A("198.18.0.12"), rr_client=True)
    other_rr = PeerInfo("rr2", 64512, A("198.18.0.2"), A("198.18.0.2"))
    rib = make_rib(cluster_id=A("198.18.0.1"), peers=(c1, c2, other_rr, TOR))
    return rib


def test_reflector_sends_a_clients_route_to_every_other_ibgp_peer():
    rib = rr_rib()
    rib.apply_update("c1", ann(["10.1.11.0/24"], next_hop="198.18.0.11"))
    assert N("10.1.11.0/24") not in rib.export("c1")  # not back to where it came from
    for key in ("c2", "rr2"):
        export = rib.export(key)[N("10.1.11.0/24")]
        assert export.next_hop == A("198.18.0.11")  # next hop unchanged: the originating node
        assert export.attributes.originator_id == A("198.18.0.11")
        assert export.attributes.cluster_list == (A("198.18.0.1"),)
    assert rib.export(TOR.key) == {}  # never to eBGP


def test_reflector_sends_a_non_clients_route_to_clients_only():
    rib = rr_rib()
    rib.apply_update("rr2", ann(["10.1.21.0/24"], next_hop="198.18.0.21",
                                originator_id=A("198.18.0.21"),
                                cluster_list=(A("198.18.0.2"),)))
    assert N("10.1.21.0/24") not in rib.export("rr2")
    for key in ("c1", "c2"):
        attrs = rib.export(key)[N("10.1.21.0/24")].attributes
        assert attrs.originator_id == A("198.18.0.21")  # kept, not overwritten
        assert attrs.cluster_list == (A("198.18.0.1"), A("198.18.0.2"))


def test_reflector_does_not_send_a_route_back_to_its_originator():
    rib = rr_rib()
    rib.apply_update("rr2", ann(["10.1.12.0/24"], next_hop="198.18.0.12",
                                originator_id=A("198.18.0.12"),
                                cluster_list=(A("198.18.0.2"),)))
    assert N("10.1.12.0/24") in rib.export("c1")
    assert N("10.1.12.0/24") not in rib.export("c2")


def test_keep_original_next_hop_a_reflector_tells_that_ebgp_peer_each_nodes_route():
    """Calico's keepOriginalNextHop: a router peering only with the reflectors learns every
    node's subnet with that node as next hop, as an eBGP route from our AS."""
    keep = PeerInfo("tor2", 64600, A("198.18.0.201"), A("198.18.0.201"), keep_next_hop=True)
    rib = make_rib(cluster_id=A("198.18.0.1"), peers=(
        PeerInfo("c1", 64512, A("198.18.0.11"), A("198.18.0.11"), rr_client=True), TOR, keep))
    rib.originate(OWN4)
    rib.apply_update("c1", ann(["10.1.11.0/24"], next_hop="198.18.0.11"))
    rib.apply_update(TOR.key, ann(["10.1.99.0/24"], next_hop="198.18.0.200", ebgp_from=64600))
    export = rib.export("tor2")
    assert set(export) == {OWN4, N("10.1.11.0/24")}  # not the other eBGP peer's route
    passed = export[N("10.1.11.0/24")]
    assert passed.next_hop == A("198.18.0.11")  # the originating node, not the reflector
    assert passed.attributes.as_path == (AsPathSegment(AS_SEQUENCE, (64512,)),)
    assert passed.attributes.local_pref is None
    assert (passed.attributes.originator_id, passed.attributes.cluster_list) == (None, ())
    assert N("10.1.11.0/24") not in rib.export(TOR.key)  # without it: only our own subnet


def test_keep_original_next_hop_on_a_node_that_reflects_nothing_passes_nothing_on():
    keep = PeerInfo("tor2", 64600, A("198.18.0.201"), A("198.18.0.201"), keep_next_hop=True)
    rib = make_rib(peers=(MESH2, keep))
    rib.originate(OWN4)
    rib.apply_update(MESH2.key, ann(["10.1.2.0/24"]))
    assert set(rib.export("tor2")) == {OWN4}  # nodes are not transit routers


def test_exports_pack_into_updates_that_decode_to_the_same_routes():
    rib = rr_rib()
    rib.originate(OWN4)
    rib.originate(OWN6)
    rib.apply_update("c1", ann(["10.1.11.0/24", "fc00:10:1:11::/64"], next_hop="198.18.0.11",
                               v6_next_hop="fd00::11"))
    exports = rib.export("c2")
    seen = {}
    for msg in updates_for(exports):
        back = decode(encode(msg))
        for prefix in back.announcements():
            hop = back.attributes.next_hop if prefix.version == 4 \
                else back.attributes.mp_reach.next_hop[0]
            seen[prefix] = hop
    assert seen == {p: e.next_hop for p, e in exports.items()}


def test_out_changes_sends_only_the_difference():
    rib = rr_rib()
    rib.originate(OWN4)
    sent = rib.export("c2")
    rib.apply_update("c1", ann(["10.1.11.0/24"], next_hop="198.18.0.11"))
    changed, withdrawn = out_changes(sent, rib.export("c2"))
    assert list(changed) == [N("10.1.11.0/24")] and withdrawn == []
    sent = rib.export("c2")
    rib.apply_update("c1", gone(["10.1.11.0/24"]))
    rib.withdraw_local(OWN4)
    assert out_changes(sent, rib.export("c2")) == ({}, [OWN4, N("10.1.11.0/24")])


# --- graceful restart ----------------------------------------------------------------------


def test_stale_routes_stay_until_end_of_rib_for_their_family():
    rib = make_rib()
    rib.apply_update(MESH2.key, ann(["10.1.2.0/24", "10.1.3.0/24", "fc00:10:1:2::/64"]))
    before = rib.routes()
    rib.mark_stale(MESH2.key)
    assert rib.routes() == before and rib.stale_count(MESH2.key) == 3  # still forwarding
    assert rib.peer_reestablished(MESH2.key, GracefulRestart(120, families=(
        GracefulRestartFamily(1, 1, True), GracefulRestartFamily(2, 1, True)))) == {}
    rib.apply_update(MESH2.key, ann(["10.1.2.0/24"]))  # announced again: fresh
    assert rib.stale_count(MESH2.key) == 2
    assert rib.end_of_rib(MESH2.key, (1, 1)) == {N("10.1.3.0/24"): None}
    assert rib.stale_count(MESH2.key) == 1  # IPv6 waits for its own End-of-RIB
    assert rib.end_of_rib(MESH2.key, (2, 1)) == {N("fc00:10:1:2::/64"): None}
    assert set(rib.routes()) == {N("10.1.2.0/24")}


def test_restart_time_running_out_sweeps_every_stale_route():
    rib = make_rib()
    rib.apply_update(MESH2.key, ann(["10.1.2.0/24", "fc00:10:1:2::/64"]))
    rib.apply_update(MESH3.key, ann(["10.1.3.0/24"], next_hop="198.18.0.3"))
    rib.mark_stale(MESH2.key)
    assert rib.sweep_stale(MESH2.key) == {N("10.1.2.0/24"): None, N("fc00:10:1:2::/64"): None}
    assert set(rib.routes()) == {N("10.1.3.0/24")}


def test_a_peer_back_without_forwarding_state_loses_those_stale_routes_at_once():
    rib = make_rib()
    rib.apply_update(MESH2.key, ann(["10.1.2.0/24", "fc00:10:1:2::/64"]))
    rib.mark_stale(MESH2.key)
    changes = rib.peer_reestablished(MESH2.key, GracefulRestart(120, families=(
        GracefulRestartFamily(1, 1, True), GracefulRestartFamily(2, 1, False))))
    assert changes == {N("fc00:10:1:2::/64"): None}
    rib.mark_stale(MESH2.key)
    assert rib.peer_reestablished(MESH2.key, None) == {N("10.1.2.0/24"): None}


def test_a_session_lost_without_graceful_restart_drops_its_routes():
    rib = make_rib()
    rib.apply_update(MESH2.key, ann(["10.1.2.0/24"]))
    assert rib.drop_routes(MESH2.key) == {N("10.1.2.0/24"): None}
    rib.apply_update(MESH2.key, ann(["10.1.2.0/24"]))
    assert rib.remove_peer(MESH2.key) == {N("10.1.2.0/24"): None} and rib.routes() == {}


# --- any sequence keeps the kernel's view consistent -------------------------------------

subnets = st.sampled_from([f"10.1.{i}.0/24" for i in range(1, 6)] + ["10.9.0.0/24",
                                                                     "fc00:10:1:2::/64"])
steps = st.tuples(st.sampled_from([MESH2, MESH3, TOR]),
                  st.sampled_from(["announce", "withdraw", "stale", "eor", "sweep", "drop"]),
                  st.lists(subnets, max_size=4), st.sampled_from([100, 200]))


@settings(max_examples=200)
@given(st.lists(steps, max_size=30))
def test_applying_the_changes_one_by_one_gives_the_routes(sequence):
    rib = make_rib()
    mirror: dict = {}  # what a kernel fed only the changes would hold
    for peer, op, prefixes, pref in sequence:
        if op == "announce":
            ebgp = 64600 if peer is TOR else None
            changes = rib.apply_update(peer.key, ann(prefixes, next_hop=str(peer.address),
                                                     ebgp_from=ebgp,
                                                     **({} if ebgp else {"local_pref": pref})))
        elif op == "withdraw":
            changes = rib.apply_update(peer.key, Update(withdrawn=tuple(
                N(p) for p in prefixes if N(p).version == 4)))
        elif op == "stale":
            rib.mark_stale(peer.key)
            changes = {}
        elif op == "eor":
            changes = rib.end_of_rib(peer.key, (1, 1))
        elif op == "sweep":
            changes = rib.sweep_stale(peer.key)
        else:
            changes = rib.drop_routes(peer.key)
        for prefix, hops in changes.items():
            if hops is None:
                mirror.pop(prefix, None)
            else:
                mirror[prefix] = hops
        assert mirror == rib.routes()
        assert all(POLICY.refuse(p) is None for p in mirror)
