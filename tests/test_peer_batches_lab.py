"""A thousand host-gw peers come and go at once on a real node, with a real etcd: each burst
is applied as one batch, in about a second, and a peer that joins meanwhile is not kept
waiting behind it. (Before, each of the thousand watch events reconciled the whole route
table: minutes of a core for either burst, and two log lines a peer.)"""

from __future__ import annotations

import pytest

from bench.control_load import mass_change, start_mass_node
from pyflannel.lab import Lab
from tests.labtools import require_lab

pytestmark = pytest.mark.lab

PEERS = 1000


def test_a_thousand_host_gw_peers_added_and_range_deleted_take_seconds_not_minutes():
    require_lab()
    with Lab(1) as lab:
        node = start_mass_node(lab)
        got = mass_change(lab, node, PEERS, timeout=30)
        log = node.log_file.read_text()
    assert got["add_s"] < 5, got
    assert got["remove_s"] < 5, got
    assert got["new_peer_s"] < 3, got
    assert f"peers changed in one batch: {PEERS} removed" in log
    assert "peer removed:" not in log
    assert got["log_lines_per_removed_peer"] < 0.01, got
