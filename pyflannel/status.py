"""``pyflannel status``: the cluster's subnet table, read straight from etcd."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Iterable
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pyflannel.flags import Options
from pyflannel.host.subnetfile import previous_subnet
from pyflannel.lease.etcd import EtcdAuthError, EtcdUnavailable, registry_for

if TYPE_CHECKING:
    from pyflannel.lease.model import Lease


def _local_addresses() -> set[IPv4Address]:
    """This host's IPv4 addresses (empty where netlink is not allowed).

    pyroute2's synchronous API runs an event loop of its own, so it must never be called
    from inside a running one: call this before ``asyncio.run`` or in a worker thread.
    """
    try:
        from pyflannel.host import netlink

        return netlink.local_ipv4_addresses()
    except Exception:  # noqa: BLE001 - status must work even where netlink is not allowed
        return set()


STATE_FRESH_S = 10.0


def local_view(opts: Options) -> dict[str, dict] | None:
    """Per-peer counters of the daemon on this host, from its state file (None when no
    daemon runs here, or its file is stale)."""
    path = Path(opts.subnet_file).with_name("pyflannel-state.json")
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or time.time() - float(doc.get("time", 0)) > STATE_FRESH_S:
        return None
    peers = doc.get("peers")
    return peers if isinstance(peers, dict) else None


def this_host(leases: Iterable[Lease], local: set[IPv4Address],
              own: IPv4Network | None) -> set[IPv4Network]:
    """The subnets to mark as this host's.

    The leases naming one of our addresses decide; the subnet file (which may be stale,
    or not where we look) only picks among them when several do, and is used alone only
    when none does (say a -public-ip behind NAT).
    """
    ours = {lease.subnet for lease in leases if lease.attrs.public_ip in local}
    if own is not None and (own in ours or not ours):
        return {own}
    return ours


async def gather(opts: Options, local: set[IPv4Address] | None = None) -> list[dict[str, Any]]:
    """One row per lease, sorted by subnet; ``expires_in_s`` is None for reservations.

    ``local``: this host's addresses, when the caller already has them.
    """
    if local is None:
        local = await asyncio.to_thread(_local_addresses)
    reg = registry_for(opts)
    try:
        listing = await reg.list_leases()
        mine = this_host(listing.leases, local, previous_subnet(opts.subnet_file))
        view = local_view(opts)
        rows = []
        for lease in sorted(listing.leases, key=lambda x: int(x.subnet.network_address)):
            ttl = None if lease.reserved else await reg.lease_ttl(lease.lease_id)
            rows.append({
                "subnet": str(lease.subnet),
                "public_ip": str(lease.attrs.public_ip),
                "backend": lease.attrs.effective_backend,
                "backend_data": lease.attrs.backend_data,
                "expires_in_s": ttl if ttl is None else max(ttl, 0),
                "this_node": lease.subnet in mine,
                "counters": view.get(str(lease.subnet)) if view is not None else None,
            })
        for key, reason in listing.malformed:
            rows.append({"subnet": key.rsplit("/", 1)[-1], "public_ip": None,
                         "backend": None, "backend_data": None, "expires_in_s": None,
                         "this_node": False, "error": reason})
        return rows
    finally:
        await reg.close()


def format_duration(seconds: int | None) -> str:
    if seconds is None:
        return "reserved"
    h, rest = divmod(int(seconds), 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def _human(n: float) -> str:
    for unit in ("", "k", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.0f}{unit}" if unit == "" else f"{n:.1f}{unit}"
        n /= 1000
    return f"{n:.1f}P"


def render_table(rows: list[dict[str, Any]]) -> str:
    header = ("SUBNET", "PUBLIC IP", "BACKEND", "VTEP MAC", "LEASE LEFT", "TX PKTS", "TX BYTES",
              "RX PKTS", "RX BYTES", "DROPS", "LAST RX", "")
    lines = [header]
    for r in rows:
        if "error" in r:
            lines.append((r["subnet"], "-", "-", "-", "-", "", "", "", "", "", "",
                          f"malformed: {r['error']}"))
            continue
        data = r.get("backend_data")
        mac = data.get("VtepMAC", "-") if isinstance(data, dict) and "VtepMAC" in data else "-"
        c = r.get("counters")
        if c:
            age = c.get("last_rx_age_s")
            traffic = (_human(c["tx_packets"]), _human(c["tx_bytes"]) + "B",
                       _human(c["rx_packets"]), _human(c["rx_bytes"]) + "B",
                       _human(c["rx_dropped"]), "never" if age is None else f"{age:.1f}s ago")
        else:
            traffic = ("-",) * 6
        lines.append((r["subnet"], r["public_ip"], r["backend"], mac,
                      format_duration(r["expires_in_s"]), *traffic,
                      "<- this host" if r["this_node"] else ""))
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    out = ["  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
           for line in lines]
    if not rows:
        out.append("(no leases)")
    return "\n".join(out)


def run(opts: Options, as_json: bool = False, watch: float = 0.0) -> int:
    if watch:
        try:
            while True:
                code = run_once(opts, as_json, clear=True)
                if code:
                    return code
                time.sleep(watch)
        except KeyboardInterrupt:
            return 0
    return run_once(opts, as_json)


def run_once(opts: Options, as_json: bool = False, clear: bool = False) -> int:
    local = _local_addresses()  # before the loop: pyroute2's sync API runs its own
    try:
        rows = asyncio.run(asyncio.wait_for(gather(opts, local), 30))
    except (EtcdUnavailable, EtcdAuthError, ValueError) as e:
        print(f"pyflannel status: {e}", file=sys.stderr)
        return 1
    except TimeoutError:
        print("pyflannel status: etcd did not answer within 30s", file=sys.stderr)
        return 1
    text = json.dumps(rows, indent=2) if as_json else render_table(rows)
    if clear:  # --watch: redraw in place
        text = "\x1b[H\x1b[2J" + time.strftime("%H:%M:%S ") + "pyflannel status\n" + text
    print(text, flush=True)
    return 0
