"""``pyflannel config ...`` and ``pyflannel lease ...``: change the cluster safely.

Every change is checked with the daemon's own rules before etcd is touched, and written
atomically (a transaction), so a typo cannot reach the nodes.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence
from ipaddress import IPv4Address, IPv4Network

from pyflannel.config import ConfigError, parse_config
from pyflannel.flags import FLAGS, INT, LIST, REPEAT, STR, FlagError, Options, parse_flags
from pyflannel.lease.etcd import (
    EtcdAuthError,
    EtcdRegistry,
    EtcdTlsError,
    EtcdUnavailable,
    registry_for,
)
from pyflannel.lease.model import LeaseAttrs, subnet_key

USAGE = """\
usage:
  pyflannel config get [flags]                 print the network config
  pyflannel config set '<json>' [flags]        validate, then store the network config
  pyflannel config validate ['<json>'] [flags] check a config (given, or the stored one)
  pyflannel lease list [flags]                 the subnet table (as pyflannel status)
  pyflannel lease reserve <subnet> <public-ip> [flags]
                                               a lease without TTL for that host's daemon
  pyflannel lease release <subnet> [flags]     delete a lease or reservation
flags: the daemon's etcd flags (-etcd-endpoints, -etcd-prefix, ...) and FLANNELD_* variables
"""


class AdminError(RuntimeError):
    """A refused command: one line, exit status 1."""


def _split(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Positional words and flags (anything starting with '-', with its value if separate)."""
    words, flags = [], []
    it = iter(argv)
    for arg in it:
        if arg.startswith("-") and len(arg) > 1 and not _looks_like_json(arg):
            flags.append(arg)
            if "=" not in arg and _takes_value(arg.lstrip("-")):
                flags.append(next(it, ""))
        else:
            words.append(arg)
    return words, flags


def _takes_value(name: str) -> bool:
    """Whether ``-name`` consumes the next argument (flags.py's table decides)."""
    spec = next((f for f in FLAGS if name in (f.name, *f.aliases)), None)
    return spec is not None and spec.kind in (STR, INT, LIST, REPEAT)


def _looks_like_json(arg: str) -> bool:
    return arg.lstrip().startswith(("{", "["))


async def config_get(reg: EtcdRegistry) -> str:
    raw = await reg.get_config()
    if raw is None:
        raise AdminError(f"no network config at {reg.prefix}/config")
    return raw.decode(errors="replace")


async def config_set(reg: EtcdRegistry, text: str) -> str:
    cfg = parse_config(text)  # ConfigError: refused, etcd untouched
    await reg.put_config(text.encode())
    return (f"stored {reg.prefix}/config: network {cfg.network}, /{cfg.subnet_len} subnets, "
            f"backend {cfg.backend_type}")


async def lease_reserve(reg: EtcdRegistry, subnet_text: str, ip_text: str) -> str:
    raw = await reg.get_config()
    if raw is None:
        raise AdminError(f"no network config at {reg.prefix}/config: set it first")
    cfg = parse_config(raw)
    subnet = _subnet(subnet_text)
    try:
        public_ip = IPv4Address(ip_text)
    except ValueError:
        raise AdminError(f"{ip_text!r} is not an IPv4 address") from None
    if not cfg.contains_subnet(subnet):
        raise AdminError(f"{subnet} is not a leasable /{cfg.subnet_len} between "
                         f"{cfg.subnet_min} and {cfg.subnet_max}")
    existing = await reg.get_lease(subnet)
    if existing is not None and existing.attrs.public_ip != public_ip:
        raise AdminError(f"{subnet} is held by {existing.attrs.public_ip}; release it first")
    attrs = existing.attrs if existing is not None else LeaseAttrs(public_ip)
    await reg.put_lease(subnet, attrs, lease_id=0)
    return f"reserved {subnet} for {public_ip} ({subnet_key(reg.prefix, subnet)}, no TTL)"


def _subnet(text: str) -> IPv4Network:
    try:
        return IPv4Network(text)
    except ValueError as e:
        why = "host bits set" if "host bits" in str(e) else "not an IPv4 CIDR"
        raise AdminError(f"{text!r} is not a subnet ({why})") from None


async def lease_release(reg: EtcdRegistry, subnet_text: str) -> str:
    subnet = _subnet(subnet_text)
    if not await reg.delete_lease(subnet):
        raise AdminError(f"no lease for {subnet}")
    return f"released {subnet}"


async def _dispatch(group: str, words: list[str], opts: Options) -> str:
    if group == "config" and words[:1] == ["validate"] and len(words) == 2:
        cfg = parse_config(words[1])
        return f"valid: network {cfg.network}, /{cfg.subnet_len}, backend {cfg.backend_type}"
    reg = registry_for(opts)
    try:
        match group, words:
            case "config", ["get"]:
                return await config_get(reg)
            case "config", ["set", text]:
                return await config_set(reg, text)
            case "config", ["validate"]:
                cfg = parse_config(await config_get(reg))
                return (f"valid: network {cfg.network}, /{cfg.subnet_len}, "
                        f"backend {cfg.backend_type}")
            case "lease", ["reserve", subnet, ip]:
                return await lease_reserve(reg, subnet, ip)
            case "lease", ["release", subnet]:
                return await lease_release(reg, subnet)
        raise AdminError(f"unknown command: {group} {' '.join(words)}\n{USAGE}".rstrip())
    finally:
        await reg.close()


def main(group: str, argv: Sequence[str]) -> int:
    words, flag_args = _split(argv)
    if not words or words[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0 if words else 2
    as_json = any(f in ("--json", "-json") for f in flag_args)
    flag_args = [f for f in flag_args if f not in ("--json", "-json")]
    try:
        opts = parse_flags(flag_args)
    except FlagError as e:
        print(f"pyflannel {group}: {e}", file=sys.stderr)
        return 2
    if opts.etcd_password:
        from pyflannel.host.cmdline import scrub

        scrub(opts.etcd_password)
    if group == "lease" and words == ["list"]:
        from pyflannel import status

        return status.run(opts, as_json=as_json)
    try:
        print(asyncio.run(asyncio.wait_for(_dispatch(group, words, opts), 30)))
        return 0
    except (AdminError, ConfigError, EtcdUnavailable, EtcdAuthError, EtcdTlsError,
            ValueError) as e:
        print(f"pyflannel {group}: {e}", file=sys.stderr)
        return 1
    except TimeoutError:
        print(f"pyflannel {group}: etcd did not answer within 30s", file=sys.stderr)
        return 1
