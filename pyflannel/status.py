"""``pyflannel status``: the cluster's subnet table, read straight from etcd."""

from __future__ import annotations

import asyncio
import json
import sys
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from pyflannel.flags import Options
from pyflannel.host.subnetfile import previous_subnet
from pyflannel.lease.etcd import EtcdAuthError, EtcdRegistry, EtcdUnavailable


def _local_addresses() -> set[IPv4Address]:
    try:
        from pyflannel.host import netlink

        return netlink.local_ipv4_addresses()
    except Exception:  # noqa: BLE001 - status must work even where netlink is not allowed
        return set()


async def gather(opts: Options) -> list[dict[str, Any]]:
    """One row per lease, sorted by subnet; ``expires_in_s`` is None for reservations."""
    reg = EtcdRegistry(opts.etcd_endpoints, opts.etcd_prefix,
                       username=opts.etcd_username, password=opts.etcd_password)
    try:
        listing = await reg.list_leases()
        own: IPv4Network | None = previous_subnet(opts.subnet_file)
        local = _local_addresses() if own is None else set()
        rows = []
        for lease in sorted(listing.leases, key=lambda x: int(x.subnet.network_address)):
            ttl = None if lease.reserved else await reg.lease_ttl(lease.lease_id)
            rows.append({
                "subnet": str(lease.subnet),
                "public_ip": str(lease.attrs.public_ip),
                "backend": lease.attrs.effective_backend,
                "backend_data": lease.attrs.backend_data,
                "expires_in_s": ttl if ttl is None else max(ttl, 0),
                "this_node": lease.subnet == own if own is not None
                else lease.attrs.public_ip in local,
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


def render_table(rows: list[dict[str, Any]]) -> str:
    header = ("SUBNET", "PUBLIC IP", "BACKEND", "LEASE LEFT", "")
    lines = [header]
    for r in rows:
        if "error" in r:
            lines.append((r["subnet"], "-", "-", "-", f"malformed: {r['error']}"))
            continue
        lines.append((r["subnet"], r["public_ip"], r["backend"],
                      format_duration(r["expires_in_s"]), "<- this host" if r["this_node"]
                      else ""))
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    out = ["  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
           for line in lines]
    if not rows:
        out.append("(no leases)")
    return "\n".join(out)


def run(opts: Options, as_json: bool = False) -> int:
    try:
        rows = asyncio.run(asyncio.wait_for(gather(opts), 30))
    except (EtcdUnavailable, EtcdAuthError, ValueError) as e:
        print(f"pyflannel status: {e}", file=sys.stderr)
        return 1
    except TimeoutError:
        print("pyflannel status: etcd did not answer within 30s", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps(rows, indent=2))
    else:
        print(render_table(rows))
    return 0
