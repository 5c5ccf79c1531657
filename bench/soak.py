"""An opt-in soak run: traffic and lease churn for a while, watching memory and loss.

    python -m bench.soak --minutes 10

Three nodes on the udp backend (vnet1 framing) ping each other continuously; every minute
a 10-second TCP transfer runs; every two minutes one daemon is SIGKILLed and restarted;
every three minutes a running node's lease key is deleted (it takes it back). Memory
(RSS of each daemon and its fast path) is sampled every 10 s. Reports JSON: memory at the
start (after one minute of warm-up) and at the end, growth in %, and ping loss outside the
moments a daemon was deliberately down.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from bench.measure import _process_tree, iperf_tcp
from pyflannel.lab import Lab

CONFIG = '{"Network": "10.1.0.0/16", "Backend": {"Type": "udp"}}'


def rss_kib(pid: int) -> int:
    total = 0
    for task in _process_tree(pid):
        try:
            text = Path(f"/proc/{task}/status").read_text()
            total += int(re.search(r"VmRSS:\s+(\d+)", text).group(1))
        except (OSError, AttributeError):
            pass
    return total


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10)
    args = ap.parse_args(argv)
    duration = args.minutes * 60
    samples: list[dict] = []
    events: list[str] = []
    with Lab(3) as lab:
        lab.etcdctl("put", "/coreos.com/network/config", CONFIG)
        for n in lab.nodes:
            lab.start_daemon(n)
        gw = {}
        for n in lab.nodes:
            sub = lab.wait_subnet_file(n)["FLANNEL_SUBNET"]
            lab.add_docker0(n, sub)
            gw[n.name] = sub.split("/")[0]
        a, b, c = lab.nodes
        pingers = {
            f"{x.name}->{y.name}": lab.popen(
                x.ns, ["ping", "-n", "-q", "-i", "0.2", "-W", "1", "-w", str(int(duration)),
                       "-I", gw[x.name], gw[y.name]], stdout=subprocess.PIPE)
            for x, y in ((a, b), (b, a), (a, c), (c, a))  # b-c pairs cross the churned node
        }
        start = time.monotonic()
        next_tcp, next_kill, next_del, next_sample = 60.0, 120.0, 180.0, 0.0
        while (elapsed := time.monotonic() - start) < duration - 15:
            if elapsed >= next_sample:
                samples.append({"t": round(elapsed), **{n.name: rss_kib(n.process.pid)
                                                          for n in lab.nodes if n.process}})
                next_sample += 10
            if elapsed >= next_tcp:
                gbps = iperf_tcp(lab, a, b, gw["n2"], gw["n1"], 10, 1)
                events.append(f"{elapsed:.0f}s tcp n1->n2 {gbps:.2f} Gbit/s")
                next_tcp += 60
            if elapsed >= next_kill:
                lab.stop_daemon(c, sig=signal.SIGKILL)
                lab.start_daemon(c)
                events.append(f"{elapsed:.0f}s n3 killed and restarted")
                next_kill += 120
            if elapsed >= next_del:
                key = "/coreos.com/network/subnets/" + gw["n2"].rsplit(".", 1)[0] + ".0-24"
                lab.etcdctl("del", key)
                events.append(f"{elapsed:.0f}s n2's lease key deleted")
                next_del += 180
            time.sleep(1)
        results = {}
        for name, p in pingers.items():
            out = p.communicate(timeout=60)[0].decode()
            m = re.search(r"(\d+) packets transmitted, (\d+) received", out)
            results[name] = {"sent": int(m.group(1)), "received": int(m.group(2))} if m else out
    warm = next((s for s in samples if s["t"] >= 60), samples[0])
    last = samples[-1]
    growth = {k: round(100 * (last[k] - warm[k]) / warm[k], 1)
              for k in ("n1", "n2") if warm.get(k) and last.get(k)}
    print(json.dumps({"minutes": args.minutes, "rss_kib_after_warmup": warm, "rss_kib_end": last,
                      "rss_growth_pct": growth, "pings": results, "events": events},
                     indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
