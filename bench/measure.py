"""The measurements: iperf3 (TCP, UDP at a fixed packet rate), ping, CPU time."""

from __future__ import annotations

import json
import re
import statistics
import time
from collections.abc import Callable

from pyflannel.lab import Lab, LabNode

_RTT = re.compile(r"time=([0-9.]+) ms")


def _server(lab: Lab, node: LabNode, bind: str):
    proc = lab.popen(node.ns, ["iperf3", "-s", "-1", "-B", bind])
    time.sleep(0.3)
    return proc


def iperf_tcp(lab: Lab, client: LabNode, server: LabNode, dst: str, src: str, seconds: float,
              streams: int) -> float:
    """Goodput in Gbit/s, as the receiver counts it."""
    srv = _server(lab, server, dst)
    out = lab.run(client.ns, ["iperf3", "-c", dst, "-B", src, "-t", f"{seconds:g}",
                              "-P", str(streams), "-J"], timeout=seconds + 30, text=True)
    srv.wait(10)
    return json.loads(out.stdout)["end"]["sum_received"]["bits_per_second"] / 1e9


def iperf_udp(lab: Lab, client: LabNode, server: LabNode, dst: str, src: str, seconds: float,
              size: int, pps: int) -> tuple[float, float]:
    """(packets/s delivered, loss %) for ``pps`` offered packets/s of ``size``-byte payloads."""
    srv = _server(lab, server, dst)
    out = lab.run(client.ns, ["iperf3", "-c", dst, "-B", src, "-u", "-l", str(size),
                              "-b", str(pps * size * 8), "-t", f"{seconds:g}", "-J"],
                  timeout=seconds + 30, text=True)
    srv.wait(10)
    s = json.loads(out.stdout)["end"]["sum"]
    delivered = (s["packets"] - s["lost_packets"]) / s["seconds"]
    return delivered, s["lost_percent"]


def ping_latency(lab: Lab, client: LabNode, dst: str, src: str, count: int) -> tuple[float, float]:
    """(p50, p99) round-trip time in ms on an otherwise idle path."""
    out = lab.run(client.ns, ["ping", "-n", "-c", str(count), "-i", "0.01", "-I", src, dst],
                  timeout=count * 0.05 + 20, text=True, check=False)
    rtts = sorted(float(x) for x in _RTT.findall(out.stdout))
    if not rtts:
        return float("nan"), float("nan")
    p99 = rtts[min(len(rtts) - 1, int(round(0.99 * (len(rtts) - 1))))]
    return statistics.median(rtts), p99


def _cpu_ticks(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        for task in _process_tree(pid):
            try:
                with open(f"/proc/{task}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])
            except (OSError, IndexError, ValueError):
                pass
    return total


def _process_tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            with open(f"/proc/{p}/task/{p}/children") as f:
                todo += [int(x) for x in f.read().split()]
        except OSError:
            pass
    return out


def cpu_percent_during(pids: list[int], work: Callable[[], float]) -> tuple[float, float]:
    """Run ``work``; return its result and the CPU the processes used meanwhile, in % of
    one core."""
    import os

    hz = os.sysconf("SC_CLK_TCK")
    before, t0 = _cpu_ticks(pids), time.monotonic()
    result = work()
    ticks, dt = _cpu_ticks(pids) - before, time.monotonic() - t0
    return result, 100.0 * ticks / hz / dt


def idle_fraction(seconds: float) -> float:
    """How idle the whole machine was over ``seconds`` (to flag disturbed runs)."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            parts = [int(x) for x in f.readline().split()[1:]]
        return parts[3] + parts[4], sum(parts)

    i0, t0 = sample()
    time.sleep(seconds)
    i1, t1 = sample()
    return (i1 - i0) / max(1, t1 - t0)
