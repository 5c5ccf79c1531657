"""README's first command: the demo builds a lab, pings every pair and leaves nothing."""

from __future__ import annotations

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


def test_the_dual_stack_demo_pings_every_pair_over_both_families_and_cleans_up():
    require_lab()
    before = namespaces()
    out = subprocess.run([sys.executable, "-m", "pyflannel", "demo", "--nodes", "2",
                          "--ipv6", "fc00:10:1::/48"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    pings = [line for line in out.stdout.splitlines() if line.startswith("== ping")]
    assert len(pings) == 4 and all(line.endswith(": ok") for line in pings), pings
    assert sum(":" in line.split("docker0 ")[1] for line in pings) == 2  # two over IPv6
    assert "IPV6 SUBNET" in out.stdout and "all pairs reachable" in out.stdout
    assert namespaces() == before
