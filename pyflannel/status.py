"""``pyflannel status``: the cluster's subnet table, read straight from etcd.

Dual-stack leases show both subnets (and both public addresses); the IPv6 columns appear
only when some lease has an IPv6 subnet, so an IPv4 cluster's table is as it always was.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Iterable
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pyflannel.flags import Options
from pyflannel.host.subnetfile import previous_subnets
from pyflannel.lease.etcd import EtcdAuthError, EtcdUnavailable, registry_for
from pyflannel.lease.manager import describe
from pyflannel.lease.model import NO_IPV4_SUBNET, lease_key_name

if TYPE_CHECKING:
    from pyflannel.lease.model import Lease


def _local_addresses() -> set[IPv4Address | IPv6Address]:
    """This host's IPv4 and IPv6 addresses (each family empty where it cannot be read).

    pyroute2's synchronous API runs an event loop of its own, so it must never be called
    from inside a running one: call this before ``asyncio.run`` or in a worker thread.
    """
    found: set[IPv4Address | IPv6Address] = set()
    try:
        from pyflannel.host import netlink

        found.update(netlink.local_ipv4_addresses())
    except Exception:  # noqa: BLE001 - status must work even where netlink is not allowed
        pass
    found.update(local_ipv6_addresses())
    return found


def local_ipv6_addresses(path: str = "/proc/net/if_inet6") -> set[IPv6Address]:
    """This host's (network namespace's) IPv6 addresses, from the kernel's table: an
    IPv6-only node is recognised by its PublicIPv6."""
    found: set[IPv6Address] = set()
    try:
        text = Path(path).read_text()
    except OSError:
        return found
    for line in text.splitlines():
        fields = line.split()
        if fields and len(fields[0]) == 32:
            try:
                found.add(IPv6Address(int(fields[0], 16)))
            except ValueError:
                continue
    return found


STATE_FRESH_S = 10.0


def _state(opts: Options) -> dict | None:
    """The state file of the daemon on this host (None when no daemon runs here, or its
    file is stale)."""
    path = Path(opts.subnet_file).with_name("pyflannel-state.json")
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or time.time() - float(doc.get("time", 0)) > STATE_FRESH_S:
        return None
    return doc


def local_view(opts: Options) -> dict[str, dict] | None:
    """Per-peer counters of the daemon on this host, from its state file (None when no
    daemon runs here, or its file is stale)."""
    peers = (_state(opts) or {}).get("peers")
    return peers if isinstance(peers, dict) else None


def local_ignored(opts: Options) -> dict[str, str]:
    """The peer leases the daemon on this host leaves out of its data path, with why."""
    ignored = (_state(opts) or {}).get("ignored")
    return {str(k): str(v) for k, v in ignored.items()} if isinstance(ignored, dict) else {}


def repeated_keys(leases: Iterable[Lease]) -> dict[str, list[str]]:
    """Leases publishing a WireGuard public key another lease publishes too (a cloned
    node), by key name: the subnets of the others."""
    by_key: dict[str, list[Lease]] = {}
    for lease in leases:
        keys = {data.get("PublicKey") for data in (lease.attrs.backend_data,
                                                    lease.attrs.backend_v6_data)
                if isinstance(data, dict) and isinstance(data.get("PublicKey"), str)}
        for key in keys:
            by_key.setdefault(key, []).append(lease)
    out: dict[str, list[str]] = {}
    for same in by_key.values():
        for lease in same if len(same) > 1 else ():
            out.setdefault(lease.key_name, []).extend(
                describe(other) for other in same if other is not lease)
    return out



def this_host(leases: Iterable[Lease], local: set[IPv4Address | IPv6Address],
              own: str | None) -> set[str]:
    """The lease keys (key names) to mark as this host's.

    The leases naming one of our addresses (PublicIP, or PublicIPv6) decide; the subnet
    file's key (``own``, which may be stale or not where we look) only picks among them
    when several do, and is used alone only when none does (say a -public-ip behind NAT).
    """
    ours = {lease.key_name for lease in leases
            if lease.attrs.public_ip in local or lease.attrs.public_ipv6 in local}
    if own is not None and (own in ours or not ours):
        return {own}
    return ours


def subnet_file_key(path: str) -> str | None:
    """The key name the subnet file's subnets make (``10.1.5.0-24&fc00:..-64``), if any."""
    v4, v6 = previous_subnets(path)
    if v4 is None and v6 is None:
        return None
    return lease_key_name(v4 or NO_IPV4_SUBNET, v6)


def _sort_key(lease: Lease) -> tuple[int, int]:
    v6 = lease.ipv6_subnet
    return int(lease.subnet.network_address), int(v6.network_address) if v6 else -1


async def gather(opts: Options, local: set[IPv4Address | IPv6Address] | None = None,
                 ) -> list[dict[str, Any]]:
    """One row per lease, sorted by subnet; ``expires_in_s`` is None for reservations.

    ``subnet`` is None for an IPv6-only lease, ``ipv6_subnet``/``public_ipv6`` None
    without IPv6; ``key`` is the lease's key name. ``local``: this host's addresses, when
    the caller already has them.
    """
    if local is None:
        local = await asyncio.to_thread(_local_addresses)
    reg = registry_for(opts)
    try:
        listing = await reg.list_leases()
        mine = this_host(listing.leases, local, subnet_file_key(opts.subnet_file))
        view = local_view(opts)
        ignored = local_ignored(opts)
        repeated = repeated_keys(listing.leases)
        rows = []
        for lease in sorted(listing.leases, key=_sort_key):
            ttl = None if lease.reserved else await reg.lease_ttl(lease.lease_id)
            v6, pub6 = lease.ipv6_subnet, lease.attrs.public_ipv6
            rows.append({
                "key": lease.key_name,
                "subnet": str(lease.subnet) if lease.has_ipv4 else None,
                "ipv6_subnet": str(v6) if v6 is not None else None,
                "public_ip": str(lease.attrs.public_ip),
                "public_ipv6": str(pub6) if pub6 is not None else None,
                "backend": lease.attrs.effective_backend,
                "backend_data": lease.attrs.backend_data,
                "backend_v6_data": lease.attrs.backend_v6_data,
                "expires_in_s": ttl if ttl is None else max(ttl, 0),
                "this_node": lease.key_name in mine,
                "counters": _counters(view, lease),
                "ignored": ignored.get(lease.key_name),
                "same_key_as": repeated.get(lease.key_name, []),
            })
        for key, reason in listing.malformed:
            name = key.rsplit("/", 1)[-1]
            rows.append({"key": name, "subnet": name, "ipv6_subnet": None, "public_ip": None,
                         "public_ipv6": None, "backend": None, "backend_data": None,
                         "backend_v6_data": None, "expires_in_s": None, "this_node": False,
                         "error": reason})
        return rows
    finally:
        await reg.close()


def _counters(view: dict[str, dict] | None, lease: Lease) -> dict | None:
    """The local daemon's counters for a peer: by key name, or by its IPv4 subnet, or (an
    IPv6-only lease) by its IPv6 subnet, as the backends name their peers."""
    if view is None:
        return None
    got = view.get(lease.key_name)
    if got is None and lease.has_ipv4:
        got = view.get(str(lease.subnet))
    if got is None and lease.ipv6_subnet is not None:
        got = view.get(str(lease.ipv6_subnet))
    return got


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


def _mac(data: Any) -> str:
    return str(data["VtepMAC"]) if isinstance(data, dict) and "VtepMAC" in data else "-"


def _short_key(r: dict[str, Any]) -> str:
    """A wireguard lease's public key, shortened as `wg show` users read it (8 characters)."""
    for data in (r.get("backend_data"), r.get("backend_v6_data")):
        if isinstance(data, dict) and isinstance(data.get("PublicKey"), str):
            return data["PublicKey"][:8] + "…"
    return "-"


def _transfer(c: dict | None) -> str:
    """What crossed the wire with a WireGuard peer (encrypted, with its headers), as the
    `transfer:` line of `wg show`: received, then sent."""
    if not c or not isinstance(c.get("wire_rx_bytes"), int):
        return "-"
    return f"{_human(c['wire_rx_bytes'])}B rx, {_human(c.get('wire_tx_bytes') or 0)}B tx"


def _handshake(c: dict | None, now: float) -> str:
    """The age of the last WireGuard handshake with a peer, as `wg show` prints it."""
    if not c:
        return "-"
    at = c.get("latest_handshake")
    if not isinstance(at, int | float):
        return "never"
    return format_duration(max(0, int(now - at))) + " ago"


def render_table(rows: list[dict[str, Any]]) -> str:
    """The status table; IPv6 columns only when some lease has an IPv6 subnet, WireGuard
    columns (short public key, age of the last handshake, wire transfer) only when some
    lease is wireguard."""
    v6 = any(r.get("ipv6_subnet") for r in rows)
    wg = any(r.get("backend") == "wireguard" for r in rows)
    now = time.time()
    header = ("SUBNET", *(("IPV6 SUBNET",) if v6 else ()), "PUBLIC IP",
              *(("PUBLIC IPV6",) if v6 else ()), "BACKEND", "VTEP MAC",
              *(("VTEP MAC V6",) if v6 else ()),
              *(("PUBLIC KEY", "HANDSHAKE", "TRANSFER") if wg else ()),
              "LEASE LEFT", "TX PKTS", "TX BYTES",
              "RX PKTS", "RX BYTES", "DROPS", "LAST RX", "")
    lines = [header]
    for r in rows:
        if "error" in r:
            lines.append((r["subnet"], *(("-",) if v6 else ()), "-",
                          *(("-",) if v6 else ()), "-", "-", *(("-",) if v6 else ()),
                          *(("-", "-", "-") if wg else ()),
                          "-", "", "", "", "", "", "", f"malformed: {r['error']}"))
            continue
        mac = _mac(r.get("backend_data"))
        c = r.get("counters")
        if c:
            age = c.get("last_rx_age_s")
            traffic = (_human(c["tx_packets"]), _human(c["tx_bytes"]) + "B",
                       _human(c["rx_packets"]), _human(c["rx_bytes"]) + "B",
                       _human(c["rx_dropped"]), "never" if age is None else f"{age:.1f}s ago")
        else:
            traffic = ("-",) * 6
        ipv6 = (r.get("ipv6_subnet") or "-",) if v6 else ()
        pub6 = (r.get("public_ipv6") or "-",) if v6 else ()
        mac6 = (_mac(r.get("backend_v6_data")),) if v6 else ()
        wgcols = ((_short_key(r), "-" if r["this_node"] else _handshake(c, now),
                   "-" if r["this_node"] else _transfer(c)) if wg else ())
        lines.append((r["subnet"] or "-", *ipv6, r["public_ip"], *pub6, r["backend"], mac,
                      *mac6, *wgcols, format_duration(r["expires_in_s"]), *traffic,
                      _note(r)))
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    out = ["  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
           for line in lines]
    if not rows:
        out.append("(no leases)")
    return "\n".join(out)


def _note(r: dict[str, Any]) -> str:
    """The last column: this host, a lease this host's daemon leaves out, a repeated key."""
    notes = ["<- this host"] if r["this_node"] else []
    if r.get("ignored"):
        notes.append(f"<- ignored here: {r['ignored']}")
    if r.get("same_key_as"):
        notes.append(f"<- same WireGuard key as {', '.join(r['same_key_as'])}")
    return " ".join(notes)


def bgp_rows(opts: Options) -> list[dict[str, Any]]:
    """The bgp backend's sessions on this host, one row each (``bgp_peer`` tells them from
    lease rows in ``--json``); passwords are never in the state file."""
    sessions = (_state(opts) or {}).get("bgp")
    return [{"bgp_peer": s.get("peer"), **s} for s in sessions
            if isinstance(s, dict)] if isinstance(sessions, list) else []


def render_bgp(rows: list[dict[str, Any]]) -> str:
    """The BGP section: peer, AS, kind, state and for how long, prefixes, last error."""
    if not rows:
        return ""
    lines = [("PEER", "AS", "KIND", "STATE", "FOR", "RECEIVED", "ACCEPTED", "SENT",
              "LAST ERROR")]
    for r in rows:
        error = r.get("last_error") or "-"
        if r.get("hint"):
            error += f" ({r['hint']})"
        lines.append((str(r.get("peer")), str(r.get("asn")), str(r.get("kind")),
                      str(r.get("state")), format_duration(int(r.get("state_for_s") or 0)),
                      str(r.get("received")), str(r.get("accepted")), str(r.get("sent")),
                      error))
    widths = [max(len(row[i]) for row in lines) for i in range(len(lines[0]) - 1)]
    return "\nBGP sessions\n" + "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) + "  " + row[-1]
        for row in lines)


def policy_status(opts: Options) -> dict[str, Any]:
    """The policy keeper's view on this host ({} without a daemon or policy)."""
    policy = (_state(opts) or {}).get("policy")
    return policy if isinstance(policy, dict) else {}


def render_policy(policy: dict[str, Any]) -> str:
    """One line of policy counts, then each broken policy or network set with its reason."""
    broken = policy.get("broken")
    broken = broken if isinstance(broken, dict) else {}
    if not policy.get("policies") and not broken:
        return ""
    lines = [f"\nNetwork policy: {policy.get('policies', 0)} in force, {len(broken)} broken"]
    lines += [f"  broken {tag}: {reason}" for tag, reason in sorted(broken.items())]
    return "\n".join(lines)


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
    bgp = bgp_rows(opts)
    text = json.dumps(rows + bgp, indent=2) if as_json else render_table(rows) + render_bgp(bgp)
    if not as_json:
        text += render_policy(policy_status(opts))
    if clear:  # --watch: redraw in place
        text = "\x1b[H\x1b[2J" + time.strftime("%H:%M:%S ") + "pyflannel status\n" + text
    print(text, flush=True)
    return 0
