"""README's first command: the demo builds a lab, pings every pair and leaves nothing."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.labtools import require_lab

pytestmark = pytest.mark.lab

ROOT = Path(__file__).resolve().parent.parent


def namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def demo(*args: str) -> list[str]:
    """Run the demo on two nodes; its ping lines, after checking it succeeded and left no
    namespace of its own lab behind (other tests' labs may come and go meanwhile)."""
    out = subprocess.run([sys.executable, "-m", "pyflannel", "demo", "--nodes", "2", *args],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "all pairs reachable" in out.stdout
    prefix = re.search(r"^== lab (\S+):", out.stdout, re.M).group(1)
    assert not {ns for ns in namespaces() if ns.startswith(prefix + "-")}
    return [line for line in out.stdout.splitlines() if line.startswith("== ping")]


def test_the_wireguard_demo_on_a_dual_stack_network_pings_every_pair_over_both_families():
    """Every namespace shares the host's /run: the lab keeps each node's key apart, or all
    nodes would hold one key and none would be the other's peer."""
    require_lab()
    host_key = Path("/run/flannel/wgkey")
    before = host_key.read_bytes() if host_key.exists() else None
    pings = demo("--backend", "wireguard", "--ipv6", "fc00:10:1::/48")
    assert len(pings) == 4 and all(line.endswith(": ok") for line in pings), pings
    assert sum(":" in line.split("docker0 ")[1] for line in pings) == 2  # two over IPv6
    assert (host_key.read_bytes() if host_key.exists() else None) == before  # untouched
