"""flannel's network config: the JSON document stored at ``<etcd-prefix>/config``.

Clusters already have this document in etcd, written for flanneld, so it is read with
flanneld's rules: keys match case-insensitively (as Go's encoding/json does), unknown keys
are ignored, a JSON ``null`` means "not given", and SubnetLen/SubnetMin/SubnetMax get
flannel's defaults.  Anything invalid raises :class:`ConfigError` with a one-line message
naming the field, because this text ends up in the daemon's log and in ``kubectl logs``.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from types import MappingProxyType
from typing import Any

__all__ = ["KNOWN_BACKENDS", "MAX_CONFIG_BYTES", "ConfigError", "NetworkConfig", "parse_config"]

MAX_CONFIG_BYTES = 64 * 1024  # the config is a few hundred bytes; more is a mistake or abuse
KNOWN_BACKENDS = ("udp", "vxlan", "host-gw")
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
)
_CANONICAL_BY_LOWER = {name.lower(): name for name in _CANONICAL_OPTIONS}


@dataclass(frozen=True)
class _Option:
    name: str
    kind: type  # int, bool or str
    default: Any
    check: Callable[[Any], bool] | None = None  # is the value allowed?
    allowed: str = ""  # how the allowed range reads in an error message


def _between(lo: int, hi: int) -> Callable[[int], bool]:
    return lambda v: lo <= v <= hi


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
}


def _check_option(opt: _Option, value: Any) -> Any:
    where = f"Backend.{opt.name}"
    if opt.kind is str:
        if not isinstance(value, str) or (opt.check is not None and not opt.check(value)):
            raise _fail(f"{where} must be {opt.allowed}, got {_json_type(value)} {_show(value)}")
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
        options[opt.name] = _check_option(opt, options.get(opt.name, opt.default))
    return backend_type, options


# ---------------------------------------------------------------------------------------
# Addresses

_CIDR_RE = re.compile(r"[0-9]{1,3}(?:\.[0-9]{1,3}){3}/[0-9]{1,2}")
_ADDR_RE = re.compile(r"[0-9]{1,3}(?:\.[0-9]{1,3}){3}")


def _parse_network(value: Any) -> IPv4Network:
    if value is None:
        raise _fail("Network is required")
    if not isinstance(value, str):
        raise _fail(f"Network must be a string, got {_json_type(value)} {_show(value)}")
    # ipaddress alone would also take "10.0.0.0" (as /32) or netmask forms.
    if not _CIDR_RE.fullmatch(value):
        raise _fail(f"Network {_show(value)} is not an IPv4 CIDR like 10.1.0.0/16")
    try:
        iface = ipaddress.IPv4Interface(value)
    except ValueError:
        raise _fail(f"Network {_show(value)} is not an IPv4 CIDR like 10.1.0.0/16") from None
    if iface.ip != iface.network.network_address:
        raise _fail(f"Network {_show(value)} has host bits set")
    return iface.network


def _parse_subnet_len(value: Any, network: IPv4Network) -> int:
    prefix = network.prefixlen
    if prefix > 28:
        raise _fail(f"Network /{prefix} is too small (the minimum useful network is /28)")
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise _fail(f"SubnetLen must be an integer, got {_json_type(value)} {_show(value)}")
    if not value:  # absent or 0
        return 24 if prefix <= 22 else prefix + 2
    if value > 30:
        raise _fail(f"SubnetLen {_show(value)} must be at most 30")
    if value < prefix + 2:
        raise _fail(
            f"SubnetLen {_show(value)} must be at least the network prefix + 2 ({prefix + 2})"
            " so the network holds four subnets"
        )
    return value


def _parse_bound(name: str, value: Any, network: IPv4Network, subnet_len: int) -> IPv4Address:
    if not isinstance(value, str):
        raise _fail(f"{name} must be a string, got {_json_type(value)} {_show(value)}")
    try:
        if not _ADDR_RE.fullmatch(value):
            raise ValueError(value)
        addr = IPv4Address(value)
    except ValueError:
        raise _fail(f"{name} {_show(value)} is not an IPv4 address") from None
    if addr not in network:
        raise _fail(f"{name} {_show(value)} is outside Network {network}")
    if (int(addr) - int(network.network_address)) % (1 << (32 - subnet_len)):
        raise _fail(f"{name} {_show(value)} is not aligned to SubnetLen {subnet_len}")
    return addr


# ---------------------------------------------------------------------------------------
# The config


@dataclass(frozen=True)
class NetworkConfig:
    """A validated network config with flannel's defaults filled in."""

    network: IPv4Network
    subnet_len: int
    subnet_min: IPv4Address
    subnet_max: IPv4Address
    backend_type: str
    backend: Mapping[str, Any] = field(hash=False)
    raw: Mapping[str, Any] = field(hash=False, repr=False)

    @property
    def _subnet_size(self) -> int:
        return 1 << (32 - self.subnet_len)

    def subnet_count(self) -> int:
        """How many subnets can be leased, SubnetMin through SubnetMax inclusive."""
        return (int(self.subnet_max) - int(self.subnet_min)) // self._subnet_size + 1

    def contains_subnet(self, net: IPv4Network) -> bool:
        """Whether ``net`` is a subnet this config could lease (e.g. to vet a stored lease)."""
        return (
            isinstance(net, IPv4Network)
            and net.prefixlen == self.subnet_len
            and self.subnet_min <= net.network_address <= self.subnet_max
        )

    def nth_subnet(self, i: int) -> IPv4Network:
        """The i-th leasable subnet, 0-based from SubnetMin; IndexError outside the range."""
        if not 0 <= i < self.subnet_count():
            raise IndexError(f"subnet index {i} out of range (0..{self.subnet_count() - 1})")
        start = IPv4Address(int(self.subnet_min) + i * self._subnet_size)
        return IPv4Network((start, self.subnet_len))

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

    network = _parse_network(_lookup(doc, "Network"))
    subnet_len = _parse_subnet_len(_lookup(doc, "SubnetLen"), network)
    size = 1 << (32 - subnet_len)
    first = int(network.network_address)
    last = int(network.broadcast_address) - size + 1

    given_min = _lookup(doc, "SubnetMin")
    if given_min is None:
        subnet_min = IPv4Address(first + size)  # flannel never leases the first subnet
    else:
        subnet_min = _parse_bound("SubnetMin", given_min, network, subnet_len)
    given_max = _lookup(doc, "SubnetMax")
    if given_max is None:
        subnet_max = IPv4Address(last)
    else:
        subnet_max = _parse_bound("SubnetMax", given_max, network, subnet_len)
    if subnet_min > subnet_max:
        raise _fail(f"SubnetMin {subnet_min} must not be above SubnetMax {subnet_max}")

    backend_type, backend = _parse_backend(_lookup(doc, "Backend"))
    return NetworkConfig(
        network=network,
        subnet_len=subnet_len,
        subnet_min=subnet_min,
        subnet_max=subnet_max,
        backend_type=backend_type,
        backend=MappingProxyType(backend),
        raw=MappingProxyType(doc),
    )
