"""flannel's network config: the JSON document stored at ``<etcd-prefix>/config``.

Clusters already have this document in etcd, written for flanneld, so it is read with
flanneld's rules: keys match case-insensitively (as Go's encoding/json does), unknown keys
are ignored, a JSON ``null`` means "not given", and SubnetLen/SubnetMin/SubnetMax get
flannel's defaults.  Dual-stack configs (EnableIPv4, EnableIPv6, IPv6Network,
IPv6SubnetLen/Min/Max) follow flanneld v0.20.2's rules, which are the IPv4 rules with
IPv6 numbers: each enabled family becomes one :class:`SubnetPool`.  Anything invalid
raises :class:`ConfigError` with a one-line message naming the field, because this text
ends up in the daemon's log and in ``kubectl logs``.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from types import MappingProxyType
from typing import Any

__all__ = [
    "KNOWN_BACKENDS",
    "BgpPeer",
    "MAX_CONFIG_BYTES",
    "ConfigError",
    "NetworkConfig",
    "SubnetPool",
    "parse_config",
]

MAX_CONFIG_BYTES = 64 * 1024  # the config is a few hundred bytes; more is a mistake or abuse
KNOWN_BACKENDS = ("udp", "vxlan", "host-gw", "wireguard", "bgp", "gre", "ipip", "alloc",
                  "extension")
DEFAULT_BACKEND = "udp"


class ConfigError(ValueError):
    """The network config is unusable; the message is one line naming the field and rule."""


def _fail(message: str) -> ConfigError:
    return ConfigError(f"config: {message}")


def _show(value: Any, limit: int = 60) -> str:
    """Render a JSON value for an error message: one line, bounded length."""
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _json_type(value: Any) -> str:
    """Name a decoded value by its JSON type, which is what the config's author wrote."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _lookup(obj: Mapping[str, Any], name: str) -> Any:
    """Go encoding/json field matching: case-insensitive, the last matching key wins.

    Returns None when the key is missing; a null value is skipped, as Go treats it as a no-op.
    """
    wanted = name.lower()
    found = None
    for key, value in obj.items():
        if value is not None and key.lower() == wanted:
            found = value
    return found


# ---------------------------------------------------------------------------------------
# Backend options.  Canonical spellings are flannel's; each known backend lists the options
# it understands with their default and check.

_CANONICAL_OPTIONS = (
    "Type", "Port", "VNI", "GBP", "Learning", "DirectRouting", "MTU", "MacPrefix", "Framing",
    "ListenPort", "ListenPortV6", "PSK", "PersistentKeepaliveInterval", "Mode",
    "ASNumber", "NodeToNodeMesh", "Peers", "HoldTime", "KeepaliveTime", "GracefulRestartTime",
    "Communities",
    "Key", "Checksum", "PreStartupCommand", "PostStartupCommand", "SubnetAddCommand",
    "SubnetRemoveCommand", "CommandTimeout",
)
_CANONICAL_BY_LOWER = {name.lower(): name for name in _CANONICAL_OPTIONS}


@dataclass(frozen=True)
class _Option:
    name: str
    kind: type  # int, bool or str
    default: Any
    check: Callable[[Any], bool] | None = None  # is the value allowed?
    allowed: str = ""  # how the allowed range reads in an error message
    secret: bool = False  # never shown in an error message (a pre-shared key)


def _between(lo: int, hi: int) -> Callable[[int], bool]:
    return lambda v: lo <= v <= hi


def _is_wireguard_key(value: str) -> bool:
    """Empty, or base64 of 32 bytes (a WireGuard pre-shared key)."""
    if value == "":
        return True
    try:
        return len(base64.b64decode(value, validate=True)) == 32
    except ValueError:
        return False


_BACKEND_OPTIONS: dict[str, tuple[_Option, ...]] = {
    "udp": (
        _Option("Port", int, 8285, _between(1, 65535), "1..65535"),
        _Option("Framing", str, "auto", lambda v: v in ("auto", "flannel"), '"auto" or "flannel"'),
    ),
    "vxlan": (
        _Option("VNI", int, 1, _between(0, 16_777_215), "0..16777215"),
        _Option("Port", int, 0, _between(0, 65535), "0..65535; 0 means the kernel's 8472"),
        _Option("GBP", bool, False),
        _Option("DirectRouting", bool, False),
        _Option("MTU", int, 0, lambda v: v == 0 or 68 <= v <= 65535, "0 or 68..65535"),
    ),
    "host-gw": (),
    # flanneld v0.20.2's wireguard options and defaults.
    "wireguard": (
        _Option("ListenPort", int, 51820, _between(1, 65535), "1..65535"),
        _Option("ListenPortV6", int, 51821, _between(1, 65535), "1..65535"),
        _Option("PSK", str, "", _is_wireguard_key, "empty or a base64 32-byte key",
                secret=True),
        _Option("PersistentKeepaliveInterval", int, 0, _between(0, 65535), "0..65535 seconds"),
        _Option("Mode", str, "separate", lambda v: v in ("separate", "auto", "ipv4", "ipv6"),
                '"separate", "auto", "ipv4" or "ipv6"'),
    ),
    # The bgp backend (issue 16): BGP's usual timers, Calico's default private AS.
    "bgp": (
        _Option("ASNumber", int, 64512, _between(1, 4_294_967_295), "1..4294967295"),
        _Option("NodeToNodeMesh", bool, True),
        _Option("HoldTime", int, 90, lambda v: v == 0 or 3 <= v <= 65535, "0 or 3..65535"),
        _Option("KeepaliveTime", int, 30, _between(1, 21845), "1..21845"),
        _Option("GracefulRestartTime", int, 120, _between(0, 4095), "0..4095 seconds"),
        _Option("ListenPort", int, 179, _between(1, 65535), "1..65535"),
    ),
    # Issue 19. gre: Key absent means no key on the wire (None), 0 is a key like any other.
    "gre": (
        _Option("Key", int, None, _between(0, 4_294_967_295), "0..4294967295"),
        _Option("Checksum", bool, False),
    ),
    "ipip": (_Option("DirectRouting", bool, False),),  # flanneld's ipip options
    "alloc": (),
    # flanneld v0.20.2's extension commands (each run with sh -c), and our timeout.
    "extension": (
        _Option("PreStartupCommand", str, "", None, "a string (a shell command)"),
        _Option("PostStartupCommand", str, "", None, "a string (a shell command)"),
        _Option("SubnetAddCommand", str, "", None, "a string (a shell command)"),
        _Option("SubnetRemoveCommand", str, "", None, "a string (a shell command)"),
        _Option("CommandTimeout", int, 30, _between(1, 3600), "1..3600 seconds"),
    ),
}


@dataclass(frozen=True)
class BgpPeer:
    """One configured BGP peer of the bgp backend; the password never appears in a repr."""

    peer_ip: IPv4Address | IPv6Address
    asn: int
    password: str = field(default="", repr=False)
    port: int = 179
    keep_original_next_hop: bool = False


_PEER_FIELDS = ("PeerIP", "ASNumber", "Password", "Port", "KeepOriginalNextHop")


def _parse_bgp_peer(i: int, value: Any) -> BgpPeer:
    where = f"Backend.Peers[{i}]"
    if not isinstance(value, dict):
        raise _fail(f"{where} must be a JSON object, got {_json_type(value)}")
    got = {f: _lookup(value, f) for f in _PEER_FIELDS}
    ip = got["PeerIP"]
    try:
        if not isinstance(ip, str) or "/" in ip:
            raise ValueError
        peer_ip = ipaddress.ip_address(ip)
    except ValueError:
        raise _fail(f"{where}.PeerIP must be an IPv4 or IPv6 address, got "
                    f"{_json_type(ip)} {_show(ip)}") from None
    if peer_ip.is_unspecified or peer_ip.is_multicast or peer_ip.is_loopback:
        raise _fail(f"{where}.PeerIP {_show(ip)} is not a unicast address of another host")
    if got["ASNumber"] is None:
        raise _fail(f"{where}.ASNumber is required")
    asn = _check_option(_Option(f"Peers[{i}].ASNumber", int, None,
                                _between(1, 4_294_967_295), "1..4294967295"), got["ASNumber"])
    password = got["Password"] if got["Password"] is not None else ""
    # TCP MD5 keys are at most 80 octets (TCP_MD5SIG_MAXKEYLEN); the value is never shown.
    if not isinstance(password, str) or len(password.encode()) > 80:
        raise _fail(f"{where}.Password must be a string of at most 80 bytes "
                    "(value not shown)")
    port = _check_option(_Option(f"Peers[{i}].Port", int, 179, _between(1, 65535),
                                 "1..65535"), got["Port"] if got["Port"] is not None else 179)
    keep = got["KeepOriginalNextHop"]
    keep = _check_option(_Option(f"Peers[{i}].KeepOriginalNextHop", bool, False),
                         keep if keep is not None else False)
    return BgpPeer(peer_ip, asn, password, port, keep)


def _parse_bgp_lists(options: dict[str, Any]) -> None:
    """Peers and Communities: lists, each row checked and named by its index."""
    peers = options.get("Peers", [])
    if not isinstance(peers, list):
        raise _fail(f"Backend.Peers must be an array, got {_json_type(peers)}")
    parsed = tuple(_parse_bgp_peer(i, row) for i, row in enumerate(peers))
    seen: set = set()
    for i, peer in enumerate(parsed):
        if peer.peer_ip in seen:
            raise _fail(f"Backend.Peers[{i}].PeerIP {peer.peer_ip} is listed twice")
        seen.add(peer.peer_ip)
    options["Peers"] = parsed
    communities = options.get("Communities", [])
    if not isinstance(communities, list):
        raise _fail(f"Backend.Communities must be an array, got {_json_type(communities)}")
    for i, text in enumerate(communities):
        m = re.fullmatch(r"([0-9]{1,5}):([0-9]{1,5})", text) if isinstance(text, str) else None
        if m is None or int(m.group(1)) > 65535 or int(m.group(2)) > 65535:
            raise _fail(f"Backend.Communities[{i}] must be \"ASN:VALUE\" (each 0..65535), got "
                        f"{_json_type(text)} {_show(text)}")
    options["Communities"] = tuple(communities)
    if options["HoldTime"] and options["KeepaliveTime"] > options["HoldTime"] // 3:
        raise _fail(f"Backend.KeepaliveTime {options['KeepaliveTime']} must be at most a third "
                    f"of Backend.HoldTime {options['HoldTime']}")


def _check_option(opt: _Option, value: Any) -> Any:
    where = f"Backend.{opt.name}"
    if opt.kind is str:
        if not isinstance(value, str) or (opt.check is not None and not opt.check(value)):
            shown = "(value not shown)" if opt.secret else _show(value)
            raise _fail(f"{where} must be {opt.allowed}, got {_json_type(value)} {shown}")
        return value
    if opt.kind is bool:
        if not isinstance(value, bool):
            raise _fail(f"{where} must be true or false, got {_json_type(value)} {_show(value)}")
        return value
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(f"{where} must be an integer, got {_json_type(value)} {_show(value)}")
    if opt.check is not None and not opt.check(value):
        raise _fail(f"{where} {_show(value)} is out of range ({opt.allowed})")
    return value


def _parse_backend(value: Any) -> tuple[str, dict[str, Any]]:
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise _fail(f"Backend must be a JSON object, got {_json_type(value)}")
    options: dict[str, Any] = {}
    for key, item in value.items():
        canonical = _CANONICAL_BY_LOWER.get(key.lower())
        if canonical is None:
            options[key] = item  # unknown: kept verbatim for whoever wants it
        elif item is None:
            continue  # null is a no-op in Go: an earlier value or the default stands
        else:
            options[canonical] = item

    backend_type = options.get("Type", "")
    if not isinstance(backend_type, str):
        raise _fail(f"Backend.Type must be a string, got {_json_type(backend_type)}")
    backend_type = backend_type or DEFAULT_BACKEND
    if backend_type not in _BACKEND_OPTIONS:
        raise _fail(
            f"Backend.Type {_show(backend_type)} is unknown (known: {', '.join(KNOWN_BACKENDS)})"
        )
    options["Type"] = backend_type
    for opt in _BACKEND_OPTIONS[backend_type]:
        value = options.get(opt.name, opt.default)
        options[opt.name] = None if value is None else _check_option(opt, value)
    if backend_type == "bgp":
        _parse_bgp_lists(options)
    return backend_type, options


# ---------------------------------------------------------------------------------------
# Address families.  IPv4 and IPv6 follow the same rules with different numbers, so one
# table per family drives one set of parsers, and one SubnetPool class serves both.

IPNetwork = IPv4Network | IPv6Network
IPAddress = IPv4Address | IPv6Address


@dataclass(frozen=True)
class _Family:
    version: int
    prefix: str  # "" for IPv4, "IPv6" for IPv6: field names are prefix + "Network" etc.
    network_cls: type[IPv4Network] | type[IPv6Network]
    address_cls: type[IPv4Address] | type[IPv6Address]
    cidr_re: re.Pattern[str]  # ipaddress alone would take "10.0.0.0" (as /32) or netmasks
    addr_re: re.Pattern[str]
    example: str
    smallest_network: int  # the longest prefix that still holds four /max_subnet_len
    max_subnet_len: int  # a tunnel/bridge address and a host on each node
    default_subnet_len: int  # used when the network is at least four times that big
    too_small: str  # message; formatted with prefix= and smallest=
    required: str  # message when the network is missing

    bits: int

    def name(self, field_name: str) -> str:
        return self.prefix + field_name


_IPV4 = _Family(
    version=4, prefix="", network_cls=IPv4Network, address_cls=IPv4Address,
    cidr_re=re.compile(r"[0-9]{1,3}(?:\.[0-9]{1,3}){3}/[0-9]{1,2}"),
    addr_re=re.compile(r"[0-9]{1,3}(?:\.[0-9]{1,3}){3}"),
    example="10.1.0.0/16", smallest_network=28, max_subnet_len=30, default_subnet_len=24,
    too_small="Network /{prefix} is too small (the minimum useful network is /{smallest})",
    required="Network is required", bits=32,
)
# IPv6 keeps flanneld's wording for the two rules an operator is most likely to search for.
_IPV6 = _Family(
    version=6, prefix="IPv6", network_cls=IPv6Network, address_cls=IPv6Address,
    cidr_re=re.compile(r"[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*/[0-9]{1,3}"),
    addr_re=re.compile(r"[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*"),
    example="fc00:10:1::/48", smallest_network=124, max_subnet_len=126, default_subnet_len=64,
    too_small="IPv6Network is too small: /{prefix} (the minimum useful network is /{smallest})",
    required="IPv6Network is required when EnableIPv6 is true", bits=128,
)


@dataclass(frozen=True)
class SubnetPool:
    """The subnets one address family can lease: SubnetMin through SubnetMax, inclusive.

    One class for both families, so the lease policy treats IPv4 and IPv6 alike.
    """

    network: IPNetwork
    subnet_len: int
    subnet_min: IPAddress
    subnet_max: IPAddress

    @property
    def version(self) -> int:
        return self.network.version

    @property
    def subnet_size(self) -> int:
        """Addresses per subnet."""
        return 1 << (self.network.max_prefixlen - self.subnet_len)

    def subnet_count(self) -> int:
        """How many subnets can be leased, SubnetMin through SubnetMax inclusive."""
        return (int(self.subnet_max) - int(self.subnet_min)) // self.subnet_size + 1

    def contains_subnet(self, net: object) -> bool:
        """Whether ``net`` is a subnet this pool could lease (e.g. to vet a stored lease)."""
        return (
            isinstance(net, type(self.network))
            and net.prefixlen == self.subnet_len
            and self.subnet_min <= net.network_address <= self.subnet_max  # type: ignore[operator]
        )

    def nth_subnet(self, i: int) -> IPNetwork:
        """The i-th leasable subnet, 0-based from SubnetMin; IndexError outside the range."""
        count = self.subnet_count()
        if not 0 <= i < count:
            raise IndexError(f"subnet index {i} out of range (0..{count - 1})")
        start = int(self.subnet_min) + i * self.subnet_size
        return type(self.network)((start, self.subnet_len))


def _parse_network(value: Any, fam: _Family) -> IPNetwork:
    name = fam.name("Network")
    if value is None:
        raise _fail(fam.required)
    if not isinstance(value, str):
        raise _fail(f"{name} must be a string, got {_json_type(value)} {_show(value)}")
    bad = f"{name} {_show(value)} is not an IPv{fam.version} CIDR like {fam.example}"
    if not fam.cidr_re.fullmatch(value):
        raise _fail(bad)
    try:
        iface = ipaddress.ip_interface(value)
    except ValueError:
        raise _fail(bad) from None
    if iface.version != fam.version:
        raise _fail(bad)
    if iface.ip != iface.network.network_address:
        raise _fail(f"{name} {_show(value)} has host bits set")
    return iface.network


def _parse_subnet_len(value: Any, network: IPNetwork, fam: _Family) -> int:
    name = fam.name("SubnetLen")
    prefix = network.prefixlen
    if prefix > fam.smallest_network:
        raise _fail(fam.too_small.format(prefix=prefix, smallest=fam.smallest_network))
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise _fail(f"{name} must be an integer, got {_json_type(value)} {_show(value)}")
    if not value:  # absent or 0
        if prefix <= fam.default_subnet_len - 2:
            return fam.default_subnet_len
        return prefix + 2
    if value > fam.max_subnet_len:
        raise _fail(f"{name} {_show(value)} must be at most {fam.max_subnet_len}")
    if value < prefix + 2:
        raise _fail(
            f"{name} {_show(value)} must be at least the network prefix + 2 ({prefix + 2})"
            " so the network holds four subnets"
        )
    return value


def _parse_bound(
    field_name: str, value: Any, network: IPNetwork, subnet_len: int, fam: _Family
) -> IPAddress:
    name = fam.name(field_name)
    if not isinstance(value, str):
        raise _fail(f"{name} must be a string, got {_json_type(value)} {_show(value)}")
    try:
        if not fam.addr_re.fullmatch(value):
            raise ValueError(value)
        addr = fam.address_cls(value)
    except ValueError:
        raise _fail(f"{name} {_show(value)} is not an IPv{fam.version} address") from None
    if addr not in network:
        raise _fail(f"{name} {_show(value)} is outside {fam.name('Network')} {network}")
    if (int(addr) - int(network.network_address)) % (1 << (fam.bits - subnet_len)):
        raise _fail(
            f"{name} {_show(value)} is not aligned to {fam.name('SubnetLen')} {subnet_len}"
        )
    return addr


def _parse_pool(doc: Mapping[str, Any], fam: _Family) -> SubnetPool:
    """One family's Network, SubnetLen, SubnetMin and SubnetMax with flannel's defaults."""
    network = _parse_network(_lookup(doc, fam.name("Network")), fam)
    subnet_len = _parse_subnet_len(_lookup(doc, fam.name("SubnetLen")), network, fam)
    size = 1 << (fam.bits - subnet_len)
    addr = fam.address_cls

    given_min = _lookup(doc, fam.name("SubnetMin"))
    if given_min is None:
        # flannel never leases the first subnet: its first address is the network's own.
        subnet_min = addr(int(network.network_address) + size)
    else:
        subnet_min = _parse_bound("SubnetMin", given_min, network, subnet_len, fam)
    given_max = _lookup(doc, fam.name("SubnetMax"))
    if given_max is None:
        subnet_max = addr(int(network.broadcast_address) - size + 1)
    else:
        subnet_max = _parse_bound("SubnetMax", given_max, network, subnet_len, fam)
    if subnet_min > subnet_max:  # type: ignore[operator]
        raise _fail(
            f"{fam.name('SubnetMin')} {subnet_min} must not be above "
            f"{fam.name('SubnetMax')} {subnet_max}"
        )
    return SubnetPool(network, subnet_len, subnet_min, subnet_max)


def _parse_enable(doc: Mapping[str, Any], name: str, default: bool) -> bool:
    value = _lookup(doc, name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _fail(f"{name} must be true or false, got {_json_type(value)} {_show(value)}")
    return value


# ---------------------------------------------------------------------------------------
# The config


@dataclass(frozen=True)
class NetworkConfig:
    """A validated network config with flannel's defaults filled in.

    ``ipv4`` is None when EnableIPv4 is false (IPv6 only); ``ipv6`` is None unless
    EnableIPv6 is true.  The IPv4 attributes (network, subnet_len, subnet_min, subnet_max,
    subnet_count, nth_subnet) are the IPv4 pool's, kept because most of the code is IPv4.
    """

    ipv4: SubnetPool | None
    ipv6: SubnetPool | None
    backend_type: str
    backend: Mapping[str, Any] = field(hash=False)
    raw: Mapping[str, Any] = field(hash=False, repr=False)

    @property
    def enable_ipv4(self) -> bool:
        return self.ipv4 is not None

    @property
    def enable_ipv6(self) -> bool:
        return self.ipv6 is not None

    @property
    def pools(self) -> tuple[SubnetPool, ...]:
        """The enabled families' pools, IPv4 first."""
        return tuple(p for p in (self.ipv4, self.ipv6) if p is not None)

    # IPv4 (None when IPv6 only)
    @property
    def network(self) -> IPv4Network | None:
        return self.ipv4.network if self.ipv4 else None  # type: ignore[return-value]

    @property
    def subnet_len(self) -> int | None:
        return self.ipv4.subnet_len if self.ipv4 else None

    @property
    def subnet_min(self) -> IPv4Address | None:
        return self.ipv4.subnet_min if self.ipv4 else None  # type: ignore[return-value]

    @property
    def subnet_max(self) -> IPv4Address | None:
        return self.ipv4.subnet_max if self.ipv4 else None  # type: ignore[return-value]

    # IPv6 (None unless EnableIPv6)
    @property
    def ipv6_network(self) -> IPv6Network | None:
        return self.ipv6.network if self.ipv6 else None  # type: ignore[return-value]

    @property
    def ipv6_subnet_len(self) -> int | None:
        return self.ipv6.subnet_len if self.ipv6 else None

    @property
    def ipv6_subnet_min(self) -> IPv6Address | None:
        return self.ipv6.subnet_min if self.ipv6 else None  # type: ignore[return-value]

    @property
    def ipv6_subnet_max(self) -> IPv6Address | None:
        return self.ipv6.subnet_max if self.ipv6 else None  # type: ignore[return-value]

    def subnet_count(self) -> int:
        """How many IPv4 subnets can be leased (0 when IPv6 only)."""
        return self.ipv4.subnet_count() if self.ipv4 else 0

    def contains_subnet(self, net: object) -> bool:
        """Whether ``net`` (of either family) is a subnet this config could lease."""
        pool = self.ipv6 if isinstance(net, IPv6Network) else self.ipv4
        return pool is not None and pool.contains_subnet(net)

    def nth_subnet(self, i: int) -> IPv4Network:
        """The i-th leasable IPv4 subnet, 0-based from SubnetMin; IndexError outside it."""
        if self.ipv4 is None:
            raise IndexError("no IPv4 subnets: EnableIPv4 is false")
        return self.ipv4.nth_subnet(i)  # type: ignore[return-value]

    def backend_option(self, name: str, default: Any = None) -> Any:
        """Look up a Backend option ignoring case, as flannel's JSON decoding does."""
        wanted = name.lower()
        for key, value in self.backend.items():
            if key.lower() == wanted:
                return value
        return default


def _decode(data: str | bytes) -> Any:
    if isinstance(data, bytes | bytearray):
        if len(data) > MAX_CONFIG_BYTES:
            raise _fail(f"{len(data)} bytes is over the {MAX_CONFIG_BYTES}-byte limit")
        try:
            text = bytes(data).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _fail(f"not valid UTF-8 (byte {exc.start})") from None
    elif isinstance(data, str):
        size = len(data.encode("utf-8", "surrogatepass"))
        if size > MAX_CONFIG_BYTES:
            raise _fail(f"{size} bytes is over the {MAX_CONFIG_BYTES}-byte limit")
        text = data
    else:
        raise TypeError(f"config data must be str or bytes, not {type(data).__name__}")

    def reject_constant(name: str) -> Any:
        raise ValueError(f"{name} is not valid JSON")

    try:
        return json.loads(text, parse_constant=reject_constant)
    except json.JSONDecodeError as exc:
        raise _fail(f"invalid JSON: {exc}") from None
    except RecursionError:
        raise _fail("invalid JSON: nested too deeply") from None
    except ValueError as exc:  # NaN/Infinity, or an integer with thousands of digits
        raise _fail(f"invalid JSON: {str(exc).splitlines()[0]}") from None


def parse_config(data: str | bytes) -> NetworkConfig:
    """Parse and validate the network config JSON with flannel's rules and defaults."""
    doc = _decode(data)
    if not isinstance(doc, dict):
        raise _fail(f"top level must be a JSON object, got {_json_type(doc)}")

    enable_ipv4 = _parse_enable(doc, "EnableIPv4", True)
    enable_ipv6 = _parse_enable(doc, "EnableIPv6", False)
    if not enable_ipv4 and not enable_ipv6:
        raise _fail("EnableIPv4 and EnableIPv6 are both false: no address family to lease")
    # A disabled family's fields are not looked at, as in flanneld.
    ipv4 = _parse_pool(doc, _IPV4) if enable_ipv4 else None
    ipv6 = _parse_pool(doc, _IPV6) if enable_ipv6 else None

    backend_type, backend = _parse_backend(_lookup(doc, "Backend"))
    return NetworkConfig(
        ipv4=ipv4,
        ipv6=ipv6,
        backend_type=backend_type,
        backend=MappingProxyType(backend),
        raw=MappingProxyType(doc),
    )
