"""``pyflannel policy apply|delete|list|get|trace``: network policy from the command line.

``apply`` checks with the daemon's own parser (pyflannel/policy/model.py) before etcd is
touched; ``trace`` evaluates a flow with the pure verdict (verdict.py) on what etcd holds
and, where this host runs a node, checks that the kernel holds the ruleset compiled from
exactly that model (the digest in the table's comment), so the printed verdict is the
kernel's for the direction this node enforces.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pyflannel.admin import run_etcd_command
from pyflannel.flags import FlagError, parse_flags
from pyflannel.lease.etcd import registry_for
from pyflannel.policy import nft
from pyflannel.policy.keeper import EtcdKeys, PolicyBook, build_model, ruleset_for
from pyflannel.policy.model import (
    PROTOCOLS,
    PolicyError,
    networksets_prefix,
    parse_network_set,
    parse_policy,
    policies_prefix,
)
from pyflannel.policy.verdict import Decision, Flow, trace

USAGE = """\
usage:
  pyflannel policy apply -f FILE [--networkset NAME] [flags]   store one policy or a list
                                   (checked first); with --networkset, FILE is a network set
  pyflannel policy delete NAME [--networkset] [flags]
  pyflannel policy list [flags]    policies, broken ones, this node's packets per rule
  pyflannel policy get NAME [flags]
  pyflannel policy trace --from ADDR --to ADDR [--protocol tcp|udp|icmp|N] [--port N] [flags]
flags: the daemon's etcd flags (-etcd-endpoints, -etcd-prefix, ...) and FLANNELD_* variables
"""
OWN_OPTS = {"-f": "file", "--from": "src", "--to": "dst", "--protocol": "protocol",
            "--port": "port", "--networkset": "networkset"}


class CliError(RuntimeError):
    """A refused command: one line, exit status 1."""


def _split(argv: Sequence[str]) -> tuple[list[str], dict[str, str], list[str]]:
    words, own, flags = [], {}, []
    it = iter(argv)
    for arg in it:
        name, eq, value = arg.partition("=")
        if name in OWN_OPTS:
            if name == "--networkset" and not eq and (words[:1] == ["delete"]):
                own["networkset"] = "1"
                continue
            own[OWN_OPTS[name]] = value if eq else next(it, "")
        elif arg.startswith("-") and len(arg) > 1:
            flags.append(arg)
            if not eq and arg.lstrip("-") not in ("v",) and _takes_value(arg):
                flags.append(next(it, ""))
        else:
            words.append(arg)
    return words, own, flags


def _takes_value(arg: str) -> bool:
    from pyflannel.admin import _takes_value as takes

    return takes(arg.lstrip("-"))


async def _put(reg: Any, key: str, value: bytes) -> None:
    await reg._call(lambda c: c.put(key.encode(), value))


async def _delete(reg: Any, key: str) -> bool:
    return bool(await reg._call(lambda c: c.delete(key.encode())))


def _read_file(path: str) -> Any:
    if not path:
        raise CliError("apply needs -f FILE")
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text()
        return json.loads(text)
    except (OSError, ValueError) as e:
        raise CliError(f"{path}: {str(e).splitlines()[0]}") from None


async def apply(reg: Any, prefix: str, own: dict[str, str]) -> str:
    doc = _read_file(own.get("file", ""))
    if "networkset" in own:
        name = own["networkset"]
        parse_network_set(doc, name)  # PolicyError: refused, etcd untouched
        await _put(reg, networksets_prefix(prefix) + name, json.dumps(doc).encode())
        return f"network set {name} stored"
    docs = doc if isinstance(doc, list) else [doc]
    checked = [parse_policy(d) for d in docs]  # all checked before any is stored
    for p in checked:
        await _put(reg, policies_prefix(prefix) + p.name, p.to_json().encode())
    return "stored " + ", ".join(p.name for p in checked)


async def _book(reg: Any, prefix: str) -> PolicyBook:
    keys = EtcdKeys(reg)
    book = PolicyBook()
    book.update(await keys.list(policies_prefix(prefix)),
                await keys.list(networksets_prefix(prefix)))
    return book


def _live_table() -> str:
    """This host's ``table inet pyflannel`` as nft prints it ('' when there is none)."""
    if shutil.which("nft") is None:
        return ""
    proc = subprocess.run(["nft", "list", "table", nft.FAMILY, nft.TABLE],
                          capture_output=True, text=True, timeout=10)
    return proc.stdout if proc.returncode == 0 else ""


def _live_counters() -> dict[str, tuple[int, int]]:
    if shutil.which("nft") is None:
        return {}
    proc = subprocess.run(["nft", "-j", "list", "table", nft.FAMILY, nft.TABLE],
                          capture_output=True, text=True, timeout=10)
    return nft.counters(proc.stdout) if proc.returncode == 0 else {}


async def list_policies(reg: Any, prefix: str) -> str:
    book = await _book(reg, prefix)
    hits = _live_counters()
    lines = []
    for p in sorted(book.policies.values(), key=lambda p: p.sort_key()):
        order = "-" if p.order is None else f"{p.order:g}"
        lines.append(f"{p.name}  order {order}  selector {p.selector}  "
                     f"types {','.join(sorted(p.types))}")
        for direction in ("Ingress", "Egress"):
            for i, r in enumerate(p.rules(direction)):
                packets, size = hits.get(f"{p.name[:100]} {direction}[{i}]", (0, 0))
                lines.append(f"  {direction}[{i}] {r.action:<5}  {packets} packets "
                             f"{size} bytes")
    for tag, reason in sorted(book.broken.items()):
        lines.append(f"BROKEN {tag}: {reason}")
    for s in book.network_sets.values():
        labels = ",".join(f"{k}={v}" for k, v in s.labels.items())
        lines.append(f"networkset {s.name}  labels {labels}  nets "
                     f"{', '.join(map(str, s.nets))}")
    return "\n".join(lines) or "no policies"


def _protocol(text: str) -> int:
    if text.upper() in PROTOCOLS:
        return PROTOCOLS[text.upper()]
    if text.isdigit() and 1 <= int(text) <= 255:
        return int(text)
    raise CliError(f"--protocol {text!r} is not tcp, udp, icmp, icmpv6 or 1-255")


def _decision(d: Decision, node: str | None) -> str:
    where = f"on {node}" if node else "no node"
    chosen = f"policies {', '.join(d.selecting)}" if d.selecting else "no policy"
    return (f"{d.direction.lower():<7} ({where}): {chosen}; "
            f"{'ALLOW' if d.allowed else 'DENY'}: {d.reason}")


async def trace_flow(reg: Any, prefix: str, own: dict[str, str]) -> str:
    if not own.get("src") or not own.get("dst"):
        raise CliError("trace needs --from ADDR and --to ADDR")
    protocol = _protocol(own.get("protocol", "icmp" if ":" not in own["src"] else "icmpv6"))
    port = own.get("port")
    if port is not None and not (port.isdigit() and 0 <= int(port) <= 65535):
        raise CliError(f"--port {port!r} is not 0-65535")
    try:
        flow = Flow.of(own["src"], own["dst"], protocol, int(port) if port else None)
    except ValueError as e:
        raise CliError(str(e)) from None
    book = await _book(reg, prefix)
    leases = (await reg.list_leases()).leases
    model = build_model(book, leases)
    t = trace(model, flow)
    src_ep, dst_ep = model.workload_of(flow.src), model.workload_of(flow.dst)

    def labels(value: Any) -> str:
        if value is None:
            return "(unlabelled)"
        return ",".join(f"{k}={v}" for k, v in sorted(value.items())) or "(no labels)"

    lines = [f"from {flow.src}  {labels(t.src_labels)}",
             f"to   {flow.dst}  {labels(t.dst_labels)}",
             _decision(t.egress, src_ep.node if src_ep else None),
             _decision(t.ingress, dst_ep.node if dst_ep else None),
             f"verdict: {'ALLOW' if t.allowed else 'DENY'}"]
    for name, reason in sorted(book.broken.items()):
        lines.append(f"note: {name} is broken and left out or kept at its last good "
                     f"version: {reason}")
    lines.append(_kernel_line(book, leases, _live_table(), src_ep, dst_ep, t))
    return "\n".join(lines)


def _kernel_line(book: PolicyBook, leases: Sequence[Any], live: str, src_ep: Any,
                 dst_ep: Any, t: Any) -> str:
    """What this host's kernel does with the flow, if this host runs a node."""
    marker = next((ln.strip() for ln in live.splitlines()
                   if ln.strip().startswith('comment "pyflannel ')), "")
    if not marker:
        return "kernel: no pyflannel ruleset on this host (run trace on a node to compare)"
    key, _, digest = marker.removeprefix('comment "pyflannel ').rstrip('"').partition(" ")
    lease = next((le for le in leases if le.key_name == key), None)
    if lease is None:
        return f"kernel: this host's ruleset is for {key}, which holds no lease now"
    compiled = ruleset_for(build_model(book, leases, (lease, dict(lease.attrs.labels))),
                           lease)
    if compiled.digest != digest:
        return (f"kernel: this node ({key}) holds a different ruleset ({digest}, the model "
                f"gives {compiled.digest}): it has not caught up, or its labels differ")
    enforced = [d for d, ep in (("egress", src_ep), ("ingress", dst_ep))
                if ep is not None and ep.node == key]
    if not enforced:
        return (f"kernel: this node ({key}) holds this model's ruleset ({digest}) but "
                "enforces neither end of this flow")
    verdicts = {"egress": t.egress, "ingress": t.ingress}
    said = ", ".join(f"{d} {'ALLOW' if verdicts[d].allowed else 'DENY'}" for d in enforced)
    return f"kernel: this node ({key}) holds this model's ruleset ({digest}): {said}"


async def _dispatch(words: list[str], own: dict[str, str], opts: Any) -> str:
    reg = registry_for(opts)
    prefix = opts.etcd_prefix
    try:
        match words:
            case ["apply"]:
                return await apply(reg, prefix, own)
            case ["delete", name]:
                where = networksets_prefix if own.get("networkset") else policies_prefix
                if not await _delete(reg, where(prefix) + name):
                    raise CliError(f"no {name} in etcd")
                return f"deleted {name}"
            case ["list"]:
                return await list_policies(reg, prefix)
            case ["get", name]:
                got = await reg._call(
                    lambda c: c.get((policies_prefix(prefix) + name).encode()))
                if got is None:
                    raise CliError(f"no policy {name}")
                return json.dumps(json.loads(bytes(got.value)), indent=2)
            case ["trace"]:
                return await trace_flow(reg, prefix, own)
        raise CliError(f"unknown command: policy {' '.join(words)}\n{USAGE}".rstrip())
    finally:
        await reg.close()


def main(argv: Sequence[str]) -> int:
    words, own, flag_args = _split(argv)
    if not words or words[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0 if words else 2
    try:
        opts = parse_flags(flag_args)
    except FlagError as e:
        print(f"pyflannel policy: {e}", file=sys.stderr)
        return 2
    return run_etcd_command("policy", _dispatch(words, own, opts), (CliError, PolicyError))
