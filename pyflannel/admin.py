"""``pyflannel config ...`` and ``pyflannel lease ...``: change the cluster safely.

Every change is checked with the daemon's own rules before etcd is touched, and written
atomically (a transaction), so a typo cannot reach the nodes.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Coroutine, Sequence
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network
from typing import Any

from pyflannel.config import ConfigError, NetworkConfig, parse_config
from pyflannel.flags import FLAGS, INT, LIST, REPEAT, STR, FlagError, Options, parse_flags
from pyflannel.lease.etcd import (
    EtcdAuthError,
    EtcdRegistry,
    EtcdTlsError,
    EtcdUnavailable,
    registry_for,
)
from pyflannel.lease.model import (
    NO_IPV4_SUBNET,
    NO_PUBLIC_IP,
    Lease,
    LeaseAttrs,
    lease_key_name,
    parse_lease_key,
    subnet_key,
)

USAGE = """\
usage:
  pyflannel config get [flags]                 print the network config
  pyflannel config set '<json>' [flags]        validate, then store the network config
  pyflannel config validate ['<json>'] [flags] check a config (given, or the stored one)
  pyflannel lease list [flags]                 the subnet table (as pyflannel status)
  pyflannel lease reserve <subnet> [<ipv6-subnet>] <public-ip> [<public-ipv6>] [flags]
                                               a lease without TTL for that host's daemon
                                               (one subnet per family the config enables;
                                               IPv6-only: <ipv6-subnet> <public-ipv6>)
  pyflannel lease release <subnet> [flags]     delete the lease or reservation holding
                                               that subnet (IPv4 or IPv6)
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


def describe_config(cfg: NetworkConfig) -> str:
    """``network 10.1.0.0/16, /24, IPv6 network fc00:10:1::/48, /64, backend vxlan``."""
    parts = [f"{'network' if pool.version == 4 else 'IPv6 network'} {pool.network}, "
             f"/{pool.subnet_len}" for pool in cfg.pools]
    return ", ".join([*parts, f"backend {cfg.backend_type}"])


async def config_set(reg: EtcdRegistry, text: str) -> str:
    cfg = parse_config(text)  # ConfigError: refused, etcd untouched
    await reg.put_config(text.encode())
    return f"stored {reg.prefix}/config: {describe_config(cfg)}"


def _reservation_words(cfg: NetworkConfig, words: Sequence[str]
                       ) -> tuple[IPv4Network, IPv6Network | None, IPv4Address,
                                  IPv6Address | None]:
    """Sort ``lease reserve``'s words by what they are (subnet or address, IPv4 or IPv6)
    and check that they are exactly what the config's families need."""
    subnets: dict[int, IPv4Network | IPv6Network] = {}
    addrs: dict[int, IPv4Address | IPv6Address] = {}
    for word in words:
        if "/" in word:
            net = _subnet(word)
            if net.version in subnets:
                raise AdminError(f"two IPv{net.version} subnets given ({subnets[net.version]}"
                                 f", {net})")
            subnets[net.version] = net
            continue
        try:
            addr = ip_address(word)
        except ValueError:
            raise AdminError(f"{word!r} is not an IPv4 or IPv6 address") from None
        if addr.version in addrs:
            raise AdminError(f"two IPv{addr.version} addresses given ({addrs[addr.version]}, "
                             f"{addr})")
        addrs[addr.version] = addr
    for pool in cfg.pools:
        v = pool.version
        net = subnets.get(v)
        if net is None:
            raise AdminError(f"the network config enables IPv{v}: give an IPv{v} subnet "
                             f"(/{pool.subnet_len} between {pool.subnet_min} and "
                             f"{pool.subnet_max})")
        if not pool.contains_subnet(net):
            raise AdminError(f"{net} is not a leasable /{pool.subnet_len} between "
                             f"{pool.subnet_min} and {pool.subnet_max}")
    for v in subnets:
        if v not in {pool.version for pool in cfg.pools}:
            raise AdminError(f"the network config does not enable IPv{v}: no IPv{v} subnet "
                             f"can be reserved")
    if cfg.enable_ipv4 and 4 not in addrs:
        raise AdminError("give the host's IPv4 address (its PublicIP)")
    if not cfg.enable_ipv4 and 6 not in addrs:
        raise AdminError("IPv6-only: give the host's IPv6 address (its PublicIPv6, which "
                         "its daemon is recognised by)")
    if not cfg.enable_ipv6 and 6 in addrs:
        raise AdminError("the network config does not enable IPv6: no PublicIPv6 to give")
    return (subnets.get(4, NO_IPV4_SUBNET), subnets.get(6),  # type: ignore[return-value]
            addrs.get(4, NO_PUBLIC_IP), addrs.get(6))  # type: ignore[return-value]


def _holder(lease: Lease) -> str:
    if lease.has_ipv4 or lease.attrs.public_ipv6 is None:
        return str(lease.attrs.public_ip)
    return str(lease.attrs.public_ipv6)


async def lease_reserve(reg: EtcdRegistry, words: Sequence[str]) -> str:
    raw = await reg.get_config()
    if raw is None:
        raise AdminError(f"no network config at {reg.prefix}/config: set it first")
    cfg = parse_config(raw)
    subnet, ipv6_subnet, public_ip, public_ipv6 = _reservation_words(cfg, words)
    name = lease_key_name(subnet, ipv6_subnet)
    wanted = {s for s in (subnet, ipv6_subnet) if s is not None and s != NO_IPV4_SUBNET}
    listing = await reg.list_leases()
    existing = None
    for lease in listing.leases:
        held = {s for s in (lease.subnet, lease.ipv6_subnet) if s is not None} & wanted
        if lease.key_name == name:
            existing = lease
        elif held:
            raise AdminError(f"{', '.join(map(str, sorted(held, key=str)))} is held by "
                             f"{_holder(lease)} (key {lease.key_name}); release it first")
    for r in listing.rejected:
        if set(r.subnets) & wanted and r.key_name != name:
            raise AdminError(f"key {r.key} holds {', '.join(map(str, r.subnets))} (unusable "
                             f"value); release it first")
    me = public_ip if cfg.enable_ipv4 else public_ipv6
    if existing is not None and me not in (existing.attrs.public_ip,
                                           existing.attrs.public_ipv6):
        raise AdminError(f"{name} is held by {_holder(existing)}; release it first")
    attrs = existing.attrs if existing is not None else LeaseAttrs(public_ip,
                                                                    public_ipv6=public_ipv6)
    await reg.put_lease(subnet, attrs, lease_id=0, ipv6_subnet=ipv6_subnet)
    shown = " and ".join(str(s) for s in (subnet, ipv6_subnet)
                         if s is not None and s != NO_IPV4_SUBNET)
    host = " / ".join(str(a) for a in (public_ip, public_ipv6)
                      if a is not None and a != NO_PUBLIC_IP)
    return (f"reserved {shown} for {host} ({subnet_key(reg.prefix, subnet, ipv6_subnet)}, "
            "no TTL)")


def _subnet(text: str) -> IPv4Network | IPv6Network:
    try:
        return ip_network(text)
    except ValueError as e:
        why = "host bits set" if "host bits" in str(e) else "not an IPv4 or IPv6 CIDR"
        raise AdminError(f"{text!r} is not a subnet ({why})") from None


async def lease_release(reg: EtcdRegistry, subnet_text: str) -> str:
    """Delete the key holding ``subnet_text`` (of either family): with dual-stack and
    IPv6-only keys a subnet alone does not spell the key."""
    subnet = _subnet(subnet_text)
    listing = await reg.list_leases()
    names = [lease.key_name for lease in listing.leases
             if subnet in (lease.subnet, lease.ipv6_subnet)]
    names += [r.key_name for r in listing.rejected if r.key_name and subnet in r.subnets]
    released = []
    for name in names:
        if await reg.delete_lease(*parse_lease_key(name)):
            released.append(name)
    if not released:
        raise AdminError(f"no lease for {subnet}")
    return f"released {subnet} (key {', '.join(released)})"


async def _dispatch(group: str, words: list[str], opts: Options) -> str:
    if group == "config" and words[:1] == ["validate"] and len(words) == 2:
        return f"valid: {describe_config(parse_config(words[1]))}"
    reg = registry_for(opts)
    try:
        match group, words:
            case "config", ["get"]:
                return await config_get(reg)
            case "config", ["set", text]:
                return await config_set(reg, text)
            case "config", ["validate"]:
                return f"valid: {describe_config(parse_config(await config_get(reg)))}"
            case "lease", ["reserve", *rest] if 2 <= len(rest) <= 4:
                return await lease_reserve(reg, rest)
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
    if group == "lease" and words == ["list"]:
        from pyflannel import status

        return status.run(opts, as_json=as_json)
    return run_etcd_command(group, _dispatch(group, words, opts), (AdminError, ConfigError))


ETCD_ANSWER_SECONDS = 30


def run_etcd_command(name: str, command: Coroutine[Any, Any, str],
                     user_errors: tuple[type[Exception], ...]) -> int:
    """Run one etcd-backed CLI command: its answer on stdout and exit 0, or one line on stderr
    and exit 1 for a bad input (``user_errors``, ValueError), an etcd failure or a silent etcd."""
    try:
        print(asyncio.run(asyncio.wait_for(command, ETCD_ANSWER_SECONDS)))
        return 0
    except (*user_errors, EtcdUnavailable, EtcdAuthError, EtcdTlsError, ValueError) as e:
        print(f"pyflannel {name}: {e}", file=sys.stderr)
        return 1
    except TimeoutError:
        print(f"pyflannel {name}: etcd did not answer within {ETCD_ANSWER_SECONDS}s",
              file=sys.stderr)
        return 1
