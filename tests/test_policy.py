"""The pure lease policy: flanneld's acquisition order, the pool, renewal, peer diffs."""

import random
from ipaddress import IPv4Address, IPv4Network

import pytest

from pyflannel.config import parse_config
from pyflannel.lease.model import Lease, LeaseAttrs
from pyflannel.lease.policy import (
    SubnetPoolExhausted,
    choose_subnet,
    diff_peers,
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
    old = {a.subnet: a, b.subnet: b}
    new = {b.subnet: moved, c.subnet: c}
    d = diff_peers(old, new)
    assert d.added == (moved, c)
    assert d.removed == (a, b)
    assert not diff_peers(new, dict(new))
