"""The pure lease policy: flanneld's acquisition order, the pool, renewal, peer diffs."""

import random
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

import pytest

from pyflannel.config import parse_config
from pyflannel.lease.model import NO_IPV4_SUBNET, NO_PUBLIC_IP, Lease, LeaseAttrs
from pyflannel.lease.policy import (
    SubnetPoolExhausted,
    choose_subnet,
    diff_peers,
    random_free_subnet,
    renew_delay,
)

CFG = parse_config('{"Network": "10.1.0.0/16"}')
ME = IPv4Address("198.18.0.1")


def lease(subnet: str, ip: str = "198.18.0.9", lease_id: int = 7, rev: int = 1) -> Lease:
    return Lease(IPv4Network(subnet), LeaseAttrs(IPv4Address(ip), "udp"), lease_id, rev)


def test_a_key_that_already_names_us_is_taken_back_first():
    leases = [lease("10.1.7.0/24"), lease("10.1.9.0/24", ip=str(ME))]
    choice = choose_subnet(CFG, leases, ME, previous=IPv4Network("10.1.3.0/24"))
    assert choice.subnet == IPv4Network("10.1.9.0/24")
    assert choice.existing is not None


def test_a_reservation_for_us_wins_over_an_ordinary_lease():
    leases = [lease("10.1.9.0/24", ip=str(ME), rev=5),
              lease("10.1.4.0/24", ip=str(ME), lease_id=0, rev=2)]
    assert choose_subnet(CFG, leases, ME).subnet == IPv4Network("10.1.4.0/24")


def test_our_key_outside_the_current_config_is_not_reused():
    cfg = parse_config('{"Network": "10.1.0.0/16", "SubnetMin": "10.1.100.0"}')
    leases = [lease("10.1.9.0/24", ip=str(ME))]
    choice = choose_subnet(cfg, leases, ME, rng=random.Random(1))
    assert choice.existing is None
    assert choice.subnet != IPv4Network("10.1.9.0/24")


def test_then_the_subnet_from_the_old_subnet_file_if_free():
    prev = IPv4Network("10.1.3.0/24")
    assert choose_subnet(CFG, [lease("10.1.7.0/24")], ME, previous=prev).subnet == prev


def test_the_old_subnet_is_not_taken_from_another_node():
    prev = IPv4Network("10.1.3.0/24")
    choice = choose_subnet(CFG, [lease("10.1.3.0/24")], ME, previous=prev,
                           rng=random.Random(2))
    assert choice.subnet != prev


def test_else_a_random_free_subnet_within_min_and_max():
    seen = {choose_subnet(CFG, [], ME, rng=random.Random(i)).subnet for i in range(50)}
    assert len(seen) > 10
    for s in seen:
        assert IPv4Network("10.1.1.0/24").network_address <= s.network_address
        assert s.prefixlen == 24 and s != IPv4Network("10.1.0.0/24")


def test_a_crowded_pool_still_finds_the_last_free_subnet():
    taken = [lease(f"10.1.{i}.0/24") for i in range(1, 256) if i != 77]
    choice = choose_subnet(CFG, taken, ME, rng=random.Random(3))
    assert choice.subnet == IPv4Network("10.1.77.0/24")


def test_a_full_pool_is_a_clear_error():
    cfg = parse_config('{"Network": "10.1.0.0/16", "SubnetMin": "10.1.1.0",'
                       ' "SubnetMax": "10.1.4.0"}')
    taken = [lease(f"10.1.{i}.0/24") for i in range(1, 5)]
    with pytest.raises(SubnetPoolExhausted, match="all 4 subnets between 10.1.1.0 and 10.1.4.0"):
        choose_subnet(cfg, taken, ME)


def test_a_huge_pool_is_not_enumerated():
    cfg = parse_config('{"Network": "10.0.0.0/8", "SubnetLen": 30}')
    assert cfg.subnet_count() == 2**22 - 1
    choice = choose_subnet(cfg, [], ME, rng=random.Random(4))
    assert cfg.contains_subnet(choice.subnet)


def test_renewal_happens_margin_before_expiry_and_never_in_the_past():
    assert renew_delay(expires_at=1000.0, now=0.0, margin_s=100.0) == 900.0
    assert renew_delay(expires_at=1000.0, now=950.0, margin_s=100.0) == 0.0


def test_peer_diff_reports_additions_removals_and_changes():
    a, b, c = lease("10.1.1.0/24"), lease("10.1.2.0/24"), lease("10.1.3.0/24")
    moved = lease("10.1.2.0/24", ip="198.18.0.50")
    old = {a.key_name: a, b.key_name: b}
    new = {b.key_name: moved, c.key_name: c}
    d = diff_peers(old, new)
    assert d.added == (moved, c)
    assert d.removed == (a, b)
    assert not diff_peers(new, dict(new))


# -- dual-stack and IPv6-only ---------------------------------------------------------------

DUAL = parse_config('{"Network": "10.1.0.0/16", "EnableIPv6": true,'
                    ' "IPv6Network": "fc00:10:1::/48"}')
V6ONLY = parse_config('{"EnableIPv4": false, "EnableIPv6": true,'
                      ' "IPv6Network": "fc00:10:1::/48"}')
ME6 = IPv6Address("fd00:198::1")


def lease2(v4: str | None, v6: str | None, ip: str = "198.18.0.9", ip6: str | None = None,
           lease_id: int = 7, rev: int = 1) -> Lease:
    """A lease in any key layout: v4 None is an IPv6-only key (0.0.0.0-0&...)."""
    subnet = IPv4Network(v4) if v4 else NO_IPV4_SUBNET
    attrs = LeaseAttrs(IPv4Address(ip), "vxlan", public_ipv6=ip6)
    return Lease(subnet, attrs, lease_id, rev, IPv6Network(v6) if v6 else None)


def test_dual_stack_restart_takes_back_both_subnets_of_its_key():
    mine = lease2("10.1.9.0/24", "fc00:10:1:9::/64", ip=str(ME), ip6=str(ME6))
    choice = choose_subnet(DUAL, [lease2("10.1.7.0/24", "fc00:10:1:7::/64"), mine], ME,
                           public_ipv6=ME6)
    assert choice.existing == mine
    assert (choice.subnet, choice.ipv6_subnet) == (mine.subnet, mine.ipv6_subnet)
    assert choice.key_name == "10.1.9.0-24&fc00:10:1:9::-64"


def test_dual_stack_prefers_each_previous_subnet_on_its_own():
    prev4, prev6 = IPv4Network("10.1.3.0/24"), IPv6Network("fc00:10:1:3::/64")
    both = choose_subnet(DUAL, [], ME, prev4, public_ipv6=ME6, previous_ipv6=prev6)
    assert (both.subnet, both.ipv6_subnet) == (prev4, prev6)
    # The IPv4 subnet went to another node meanwhile; the IPv6 one is still ours to take.
    other = lease2("10.1.3.0/24", "fc00:10:1:77::/64")
    split = choose_subnet(DUAL, [other], ME, prev4, rng=random.Random(5), public_ipv6=ME6,
                          previous_ipv6=prev6)
    assert split.subnet != prev4 and DUAL.contains_subnet(split.subnet)
    assert split.ipv6_subnet == prev6
    # And the other way round.
    other = lease2("10.1.77.0/24", "fc00:10:1:3::/64")
    split = choose_subnet(DUAL, [other], ME, prev4, rng=random.Random(6), public_ipv6=ME6,
                          previous_ipv6=prev6)
    assert split.subnet == prev4
    assert split.ipv6_subnet != prev6 and DUAL.contains_subnet(split.ipv6_subnet)


def test_dual_stack_random_subnets_come_from_each_family_s_pool():
    seen = [choose_subnet(DUAL, [], ME, rng=random.Random(i), public_ipv6=ME6)
            for i in range(30)]
    assert all(DUAL.ipv4.contains_subnet(c.subnet) for c in seen)
    assert all(DUAL.ipv6.contains_subnet(c.ipv6_subnet) for c in seen)
    assert len({c.ipv6_subnet for c in seen}) > 10
    assert all(c.ipv6_subnet != IPv6Network("fc00:10:1::/64") for c in seen)  # never the first


def test_ipv6_only_takes_a_key_with_the_no_ipv4_placeholder():
    choice = choose_subnet(V6ONLY, [], NO_PUBLIC_IP, rng=random.Random(1), public_ipv6=ME6)
    assert choice.subnet == NO_IPV4_SUBNET
    assert choice.key_name.startswith("0.0.0.0-0&fc00:10:1:")


def test_ipv6_only_matches_its_own_lease_by_public_ipv6_not_by_public_ip_0000():
    """flanneld v0.20.2 compares PublicIP (0.0.0.0 on every IPv6-only node) and so hands a
    peer's lease to a second node; the match here is on PublicIPv6."""
    peer = lease2(None, "fc00:10:1:5::/64", ip="0.0.0.0", ip6="fd00:198::2")
    mine = lease2(None, "fc00:10:1:6::/64", ip="0.0.0.0", ip6=str(ME6), rev=2)
    choice = choose_subnet(V6ONLY, [peer], NO_PUBLIC_IP, rng=random.Random(2),
                           public_ipv6=ME6)
    assert choice.existing is None and choice.ipv6_subnet != peer.ipv6_subnet
    choice = choose_subnet(V6ONLY, [peer, mine], NO_PUBLIC_IP, public_ipv6=ME6)
    assert choice.existing == mine


def test_ipv6_only_without_a_public_ipv6_never_adopts_a_lease():
    peer = lease2(None, "fc00:10:1:5::/64", ip="0.0.0.0", ip6=None)
    choice = choose_subnet(V6ONLY, [peer], NO_PUBLIC_IP, rng=random.Random(3))
    assert choice.existing is None and choice.ipv6_subnet != peer.ipv6_subnet


def test_our_key_with_other_families_than_the_config_is_stale_and_its_subnet_reused():
    """IPv6 turned on: our IPv4-only key is deleted (as flanneld does) and its subnet,
    from the subnet file, goes into the new dual-stack key."""
    old = lease2("10.1.9.0/24", None, ip=str(ME))
    choice = choose_subnet(DUAL, [old], ME, IPv4Network("10.1.9.0/24"),
                           rng=random.Random(4), public_ipv6=ME6)
    assert choice.existing is None and choice.stale == (old,)
    assert choice.subnet == IPv4Network("10.1.9.0/24")
    assert DUAL.ipv6.contains_subnet(choice.ipv6_subnet)
    # A dual-stack key of ours in an IPv4-only cluster is stale the same way.
    dual_old = lease2("10.1.9.0/24", "fc00:10:1:9::/64", ip=str(ME))
    choice = choose_subnet(CFG, [dual_old], ME, IPv4Network("10.1.9.0/24"))
    assert choice.stale == (dual_old,) and choice.subnet == IPv4Network("10.1.9.0/24")
    assert choice.ipv6_subnet is None


def test_a_reservation_of_ours_that_does_not_fit_is_left_to_the_operator():
    reserved = lease2("10.1.9.0/24", None, ip=str(ME), lease_id=0)
    choice = choose_subnet(DUAL, [reserved], ME, rng=random.Random(5), public_ipv6=ME6)
    assert choice.stale == () and choice.existing is None
    assert choice.subnet != reserved.subnet


def test_ipv6_subnets_of_other_keys_and_of_rejected_keys_count_as_taken():
    cfg = parse_config('{"Network": "10.1.0.0/16", "EnableIPv6": true,'
                       ' "IPv6Network": "fc00:10:1::/62", "IPv6SubnetLen": 64}')
    assert cfg.ipv6.subnet_count() == 3
    held = [lease2("10.1.1.0/24", "fc00:10:1:1::/64"), lease2(None, "fc00:10:1:2::/64")]
    for seed in range(20):
        choice = choose_subnet(cfg, held, ME, public_ipv6=ME6, rng=random.Random(seed))
        assert choice.ipv6_subnet == IPv6Network("fc00:10:1:3::/64")
    choice = choose_subnet(cfg, held[1:], ME, occupied=[IPv6Network("fc00:10:1:3::/64")],
                           public_ipv6=ME6)
    assert choice.ipv6_subnet == IPv6Network("fc00:10:1:1::/64")


def test_a_full_ipv6_pool_names_the_family():
    cfg = parse_config('{"Network": "10.1.0.0/16", "EnableIPv6": true,'
                       ' "IPv6Network": "fc00:10:1::/62", "IPv6SubnetLen": 64}')
    held = [lease2("10.1.1.0/24", "fc00:10:1:1::/64"), lease2(None, "fc00:10:1:2::/64")]
    with pytest.raises(SubnetPoolExhausted, match=r"all 3 subnets between fc00:10:1:1:: and "
                       r"fc00:10:1:3:: are leased \(IPv6 pool, IPv6Network fc00:10:1::/62\)"):
        choose_subnet(cfg, held, ME, occupied=[IPv6Network("fc00:10:1:3::/64")],
                      public_ipv6=ME6)
    with pytest.raises(SubnetPoolExhausted, match=r"\(IPv4 pool, Network 10.1.0.0/22\)"):
        choose_subnet(parse_config('{"Network": "10.1.0.0/22"}'),
                      [lease2(f"10.1.{i}.0/24", None) for i in (1, 2, 3)], ME)


def test_random_free_subnet_takes_a_pool_of_either_family_and_never_lists_a_huge_one():
    cfg = parse_config('{"EnableIPv4": false, "EnableIPv6": true,'
                       ' "IPv6Network": "fc00::/32"}')
    assert cfg.ipv6.subnet_count() == 2**32 - 1
    got = random_free_subnet(cfg.ipv6, set(), random.Random(7))
    assert isinstance(got, IPv6Network) and cfg.ipv6.contains_subnet(got)
    got = random_free_subnet(CFG.ipv4, {IPv4Network("10.1.1.0/24")}, random.Random(8))
    assert isinstance(got, IPv4Network) and got != IPv4Network("10.1.1.0/24")


def test_peer_tables_keyed_by_key_name_tell_ipv6_only_leases_apart():
    a = lease2(None, "fc00:10:1:5::/64", ip="0.0.0.0", ip6="fd00:198::5")
    b = lease2(None, "fc00:10:1:6::/64", ip="0.0.0.0", ip6="fd00:198::6")
    assert a.subnet == b.subnet  # both 0.0.0.0/0
    d = diff_peers({}, {a.key_name: a, b.key_name: b})
    assert d.added == (a, b) and not d.removed
