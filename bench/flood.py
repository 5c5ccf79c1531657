"""A bounded handshake flood for the lab: what one hostile host on the underlay can send.

    python -m bench.flood --target 198.18.0.1 --port 51820 --key <base64> --kind mac1 \
        --rate 100000 --seconds 3

``--kind mac1``: 148-byte initiations with a correct mac1 for the target's public key (all
mac1 needs, and it is in the lease), random otherwise, so each must be checked and
answered; ``--kind random``: 148 random bytes. The sender stops by itself after
``--seconds`` or ``--count`` datagrams, whichever comes first (or on SIGTERM), and
refuses any target outside the lab's underlay (198.18.0.0/15, ULA fc00::/7): it is a
test tool, never a weapon. Prints one JSON line: datagrams sent, seconds, rate.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from pyflannel.lab import Lab, LabNode
from pyflannel.wireguard.constants import HEADER_INITIATION, INIT_LEN, INIT_MAC1, LABEL_MAC1
from pyflannel.wireguard.crypto import blake2s_hash
from pyflannel.wireguard.keys import decode_key
from pyflannel.wireguard.noise import seal_macs

T = TypeVar("T")

LAB_NETWORKS = (ipaddress.ip_network("198.18.0.0/15"), ipaddress.ip_network("fc00::/7"))
PORT_WIREGUARD = 51820  # flannel's and wireguard-go's in the lab
MAX_SECONDS = 30.0
MAX_COUNT = 5_000_000
POOL = 512  # distinct messages, sent round robin
TICK = 0.005  # pacing: the rate is held per 5 ms


def lab_target(address: str) -> str:
    """The address, if it is a lab underlay address; ValueError otherwise."""
    ip = ipaddress.ip_address(address)
    if not any(ip in net for net in LAB_NETWORKS):
        raise ValueError(f"{address} is not a lab underlay address (198.18.0.0/15, fc00::/7)")
    return address


def mac1_initiations(public_key: bytes, n: int) -> list[bytes]:
    """``n`` initiations, random but for the header and a correct mac1 for ``public_key``."""
    mac1_key = blake2s_hash(LABEL_MAC1, public_key)
    out = []
    for _ in range(n):
        msg = bytearray(HEADER_INITIATION + os.urandom(INIT_MAC1 - len(HEADER_INITIATION))
                        + bytes(INIT_LEN - INIT_MAC1))
        seal_macs(msg, mac1_key, None)
        out.append(bytes(msg))
    return out


def random_datagrams(n: int) -> list[bytes]:
    return [os.urandom(INIT_LEN) for _ in range(n)]


_stopped: list[int] = []  # a signal number once asked to stop early


def _stop(signum: int, _frame: object) -> None:
    _stopped.append(signum)


def flood(target: str, port: int, pool: list[bytes], rate: float, seconds: float,
          count: int) -> dict:
    """Send round robin from ``pool`` at ``rate`` a second until the time or the count
    is reached (both capped); returns what was sent."""
    lab_target(target)
    seconds, count = min(seconds, MAX_SECONDS), min(count, MAX_COUNT)
    family = socket.AF_INET6 if ":" in target else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.setblocking(False)
    dst = (target, port)
    send = sock.sendto
    per_tick = max(1, int(rate * TICK))
    sent = failed = 0
    k = len(pool)
    start = time.monotonic()
    end = start + seconds
    now = start
    while now < end and sent < count and not _stopped:
        due = min(count, int((now - start) * rate) + per_tick)
        while sent < due:
            try:
                send(pool[sent % k], dst)
            except OSError:  # a full send buffer, an ICMP error: the datagram is lost
                failed += 1
            sent += 1
        now = time.monotonic()
        ahead = (sent / rate) - (now - start)
        if ahead > 0:
            time.sleep(ahead)
            now = time.monotonic()
    took = time.monotonic() - start
    sock.close()
    return {"sent": sent - failed, "seconds": round(took, 3),
            "rate": round((sent - failed) / took if took else 0)}


# --- measuring a path while a flood runs (bench rows and the lab test) -----------------

_REPO = Path(__file__).resolve().parent.parent
_LOSS = re.compile(r"([\d.]+)% packet loss")
_RTT = re.compile(r"time=([\d.]+) ms")
START_S = 0.5  # the flood's own start-up (interpreter, message pool) before measuring


@dataclass
class Flood:
    """One bounded flood from ``ns`` at ``target``:``port`` (``key`` for kind mac1)."""

    kind: str
    target: str
    port: int
    key: str | None = None
    rate: float = 100_000
    seconds: float = 4.0

    def start(self, lab: Lab, ns: str) -> subprocess.Popen:
        argv = [sys.executable, "-m", "bench.flood", "--target", lab_target(self.target),
                "--port", str(self.port), "--kind", self.kind, "--rate", str(self.rate),
                "--seconds", str(self.seconds), "--count", str(int(self.rate * self.seconds))]
        if self.key:
            argv += ["--key", self.key]
        proc = lab.popen(ns, argv, stdout=subprocess.PIPE, cwd=_REPO)
        time.sleep(START_S)
        return proc

    def during(self, lab: Lab, ns: str, work: Callable[[], T]) -> tuple[T, dict]:
        """Run ``work`` while the flood runs, then stop it (it would stop by itself at
        its time or count); (the work's result, what the flood sent)."""
        proc = self.start(lab, ns)
        try:
            result = work()
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)  # ours, by its pid: it reports and exits
            try:
                out, _ = proc.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, _ = proc.communicate()
        lines = (out or b"").decode().strip().splitlines()
        return result, json.loads(lines[-1]) if lines else {}


def ping_loss(lab: Lab, client: LabNode, dst: str, src: str, seconds: float,
              interval: float = 0.02) -> tuple[float, float]:
    """(loss %, p50 ms of the answered) of pings every ``interval`` for ``seconds``."""
    count = max(1, int(seconds / interval))
    out = lab.run(client.ns, ["ping", "-n", "-c", str(count), "-i", str(interval), "-W", "1",
                              "-I", src, dst], timeout=seconds * 3 + 10, text=True, check=False)
    loss = _LOSS.search(out.stdout)
    rtts = sorted(float(x) for x in _RTT.findall(out.stdout))
    return (float(loss.group(1)) if loss else 100.0,
            statistics.median(rtts) if rtts else float("nan"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.flood", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", required=True)
    ap.add_argument("--port", type=int, default=PORT_WIREGUARD)
    ap.add_argument("--key", help="the target's public key (base64), for --kind mac1")
    ap.add_argument("--kind", choices=("mac1", "random"), default="mac1")
    ap.add_argument("--rate", type=float, default=100_000)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--count", type=int, default=1_000_000)
    args = ap.parse_args(argv)
    try:
        lab_target(args.target)
    except ValueError as e:
        print(f"flood: {e}", file=sys.stderr)
        return 2
    if args.kind == "mac1":
        if not args.key:
            print("flood: --kind mac1 needs --key", file=sys.stderr)
            return 2
        pool = mac1_initiations(decode_key(args.key), POOL)
    else:
        pool = random_datagrams(POOL)
    signal.signal(signal.SIGTERM, _stop)
    print(json.dumps(flood(args.target, args.port, pool, args.rate, args.seconds,
                           args.count)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
