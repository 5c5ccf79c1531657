"""The benchmark's quick mode runs end to end and leaves its table, JSON and chart
(matplotlib, the bench extra, is a CI dependency)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.labtools import require_lab

pytestmark = pytest.mark.lab

ROOT = Path(__file__).resolve().parent.parent


def test_quick_benchmark_runs_every_setup(tmp_path):
    require_lab()
    out = subprocess.run([sys.executable, "-m", "bench.run", "--quick", "--out", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stderr[-3000:]
    setups = {"underlay", "udp-flannel-nocoalesce", "udp-flannel", "udp-fast", "vxlan",
              "host-gw", "bgp", "gre", "ipip", "wireguard", "wireguard-go", "udp-fast-v6",
              "vxlan-v6", "host-gw-v6"}
    for setup in setups:
        assert setup in out.stdout
    (doc_path,) = tmp_path.glob("bench-*.json")
    doc = json.loads(doc_path.read_text())
    medians = {r["setup"]: r["medians"] for r in doc["results"]}
    assert set(medians) == setups
    for m in medians.values():
        assert m["tcp1_gbps"] > 0 and m["udp1400_pps"] > 0 and m["ping_p50_ms"] > 0
    (chart,) = tmp_path.glob("bench-*.png")
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
