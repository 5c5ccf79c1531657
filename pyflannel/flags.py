"""flanneld's command-line flags and their FLANNELD_* environment variables.

pyflannel is a drop-in replacement, so it must accept exactly the invocations that existing
unit files, DaemonSet manifests and scripts already use with flanneld: Go ``flag`` syntax
(``-f=v``, ``--f=v``, ``-f v``, ``--f v``, bare booleans) plus one ``FLANNELD_<NAME>``
variable per flag, with the command line winning.

Everything about a flag lives in one row of :data:`FLAGS`; parsing, the environment and
:func:`usage` are all driven from that table, so adding a flag means adding a row (and a
field on :class:`Options`).
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any
from urllib.parse import urlsplit

__all__ = ["FLAGS", "FlagError", "FlagSpec", "Options", "env_var", "parse_flags", "usage"]


class FlagError(ValueError):
    """A bad command line or FLANNELD_* variable.

    The message is a single line naming the flag (or variable) and the problem, so the
    daemon can print it as-is before exiting.
    """


class _Problem(Exception):
    """Raised by converters and validators; the caller prefixes the flag or variable name."""


# Flag kinds.  Each decides how a raw string becomes a value and how the flag is scanned.
STR = "str"  # one string; last occurrence wins
INT = "int"  # decimal integer; last occurrence wins
BOOL = "bool"  # bare flag means true; never consumes the next argument
LIST = "list"  # one comma-separated value; last occurrence wins
REPEAT = "repeat"  # each occurrence adds one value; the env var holds a comma list
LEVEL = "level"  # -v: an int, but a bare -v means 1


@dataclass(frozen=True)
class FlagSpec:
    """One flanneld flag: how it is spelled, where it lands and how it is checked."""

    name: str  # canonical spelling without dashes, e.g. "ip-masq"
    field: str  # attribute on Options
    kind: str  # one of STR, INT, BOOL, LIST, REPEAT, LEVEL
    default: Any
    help: str
    validator: Callable[[Any], Any] | None = None  # gets the converted value, returns it
    aliases: tuple[str, ...] = ()
    env: bool = True  # settable through FLANNELD_<NAME>
    hidden: bool = False  # for tests and measurements: parsed, left out of -help


# ---------------------------------------------------------------------------------------
# Small helpers


def _show(text: str) -> str:
    """Quote a user-supplied string so an error message stays on one line."""
    return json.dumps(text)


def _plain(text: str) -> str:
    """Show a flag name or argument bare when harmless, quoted when it holds odd characters."""
    return text if text.isprintable() else _show(text)


_INT_RE = re.compile(r"[+-]?[0-9]+")
_DIGITS_RE = re.compile(r"[0-9]+")
# Go's strconv.ParseBool accepts exactly these spellings.
_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})
_FALSE = frozenset({"0", "f", "F", "FALSE", "false", "False"})


def _to_int(raw: str) -> int:
    # int() alone would also take " 5", "1_000" and non-ASCII digits, which Go refuses.
    if not _INT_RE.fullmatch(raw):
        raise _Problem(f"{_show(raw)} is not an integer")
    return int(raw)


def _to_bool(raw: str) -> bool:
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise _Problem(f"{_show(raw)} is not a boolean (use true or false)")


def _split_commas(raw: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in raw.split(",") if part.strip())


# ---------------------------------------------------------------------------------------
# Validators: take the converted value, return it (possibly normalised) or raise _Problem.


def _int_range(lo: int, hi: int | None = None, unit: str = "") -> Callable[[int], int]:
    suffix = f" {unit}" if unit else ""
    span = f"{lo}..{hi}{suffix}" if hi is not None else f"at least {lo}{suffix}"

    def check(value: int) -> int:
        if value < lo or (hi is not None and value > hi):
            raise _Problem(f"{value} is out of range ({span})")
        return value

    return check


def _each(check: Callable[[str], str]) -> Callable[[tuple[str, ...]], tuple[str, ...]]:
    def check_all(values: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(check(v) for v in values)

    return check_all


def _check_endpoint(url: str) -> str:
    # The etcd client wants scheme://host:port; a path or credentials in the URL would be
    # ignored or leaked into logs, so they are refused here rather than surprising later.
    if not url.isprintable() or " " in url:
        # urlsplit silently drops tabs and newlines; a URL containing them is a typo.
        raise _Problem(f"{_show(url)} contains whitespace or control characters")
    try:
        parts = urlsplit(url)
    except ValueError:
        raise _Problem(f"{_show(url)} is not a valid URL") from None
    if parts.scheme not in ("http", "https") or not url.startswith(parts.scheme + "://"):
        raise _Problem(f"{_show(url)} must start with http:// or https://")
    try:
        port = parts.port
    except ValueError:
        raise _Problem(f"{_show(url)} has an invalid port") from None
    if parts.username is not None or parts.password is not None:
        raise _Problem(f"{_show(url)} must not contain credentials (use -etcd-username)")
    if not parts.hostname or port is None or port == 0:
        raise _Problem(f"{_show(url)} must name host:port")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise _Problem(f"{_show(url)} must be just scheme://host:port")
    return url


def _check_endpoints(urls: tuple[str, ...]) -> tuple[str, ...]:
    if not urls:
        raise _Problem("no endpoints given")
    return tuple(_check_endpoint(u) for u in urls)


def _check_prefix(prefix: str) -> str:
    if not prefix.startswith("/"):
        raise _Problem(f"{_show(prefix)} must start with /")
    stripped = prefix.rstrip("/")
    if not stripped:
        # Every key is built as prefix + "/config" etc., so "/" would give "//config".
        raise _Problem(f"{_show(prefix)} must name a key below /, e.g. /coreos.com/network")
    return stripped


def _check_regex(pattern: str) -> str:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise _Problem(f"{_show(pattern)} is not a valid regular expression: {exc}") from None
    return pattern


def _check_nonempty(value: str) -> str:
    if not value:
        raise _Problem("empty value")
    return value


def _check_ipv4(value: str) -> str:
    if value == "":
        return value  # unset
    try:
        ipaddress.IPv4Address(value)
    except ValueError:
        raise _Problem(f"{_show(value)} is not an IPv4 address") from None
    return value


def _check_framing(value: str) -> str:
    if value not in ("", "auto", "flannel"):
        raise _Problem(f"{_show(value)} is not auto or flannel")
    return value


def _check_fastpath_mode(value: str) -> str:
    if value not in ("process", "thread"):
        raise _Problem(f"{_show(value)} is not process or thread")
    return value


def _check_ipv6(value: str) -> str:
    if value == "":
        return value  # unset
    try:
        addr = ipaddress.IPv6Address(value)
    except ValueError:
        addr = None
    if addr is None or addr.scope_id is not None:
        raise _Problem(f"{_show(value)} is not an IPv6 address")
    return value


def _check_node_labels(value: str) -> str:
    from pyflannel.policy.model import PolicyError, parse_label_flag

    try:
        parse_label_flag(value)
    except PolicyError as e:
        raise _Problem(str(e).removeprefix("-node-labels: ")) from None
    return value


def _check_ip(value: str) -> str:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise _Problem(f"{_show(value)} is not an IP address") from None
    return value


# ---------------------------------------------------------------------------------------
# The flag table.  Order here is the order in usage().

FLAGS: tuple[FlagSpec, ...] = (
    FlagSpec("etcd-endpoints", "etcd_endpoints", LIST, ("http://127.0.0.1:2379",),
             "comma-separated list of etcd endpoints (http:// or https://host:port)",
             _check_endpoints),
    FlagSpec("etcd-prefix", "etcd_prefix", STR, "/coreos.com/network",
             "etcd key prefix holding the network config and subnet leases", _check_prefix),
    FlagSpec("etcd-keyfile", "etcd_keyfile", STR, "", "TLS client key file for etcd"),
    FlagSpec("etcd-certfile", "etcd_certfile", STR, "", "TLS client certificate file for etcd"),
    FlagSpec("etcd-cafile", "etcd_cafile", STR, "", "CA file used to verify etcd's certificate"),
    FlagSpec("etcd-username", "etcd_username", STR, "", "username for etcd authentication"),
    FlagSpec("etcd-password", "etcd_password", STR, "", "password for etcd authentication"),
    FlagSpec("iface", "iface", REPEAT, (),
             "interface name or IP to use for inter-host traffic (repeatable; first match wins)",
             _each(_check_nonempty)),
    FlagSpec("iface-regex", "iface_regex", REPEAT, (),
             "regex matched against interface names and IPs (repeatable; first match wins)",
             _each(_check_regex)),
    FlagSpec("iface-can-reach", "iface_can_reach", STR, "",
             "pick the interface that routes to this IPv4 address", _check_ipv4),
    FlagSpec("public-ip", "public_ip", STR, "",
             "IPv4 address other hosts use to reach this one (empty: the interface's)",
             _check_ipv4),
    FlagSpec("public-ipv6", "public_ipv6", STR, "",
             "IPv6 address other hosts use to reach this one, for IPv6 networks (empty: the "
             "interface's)", _check_ipv6),
    FlagSpec("subnet-file", "subnet_file", STR, "/run/flannel/subnet.env",
             "file the leased subnet and MTU are written to"),
    FlagSpec("subnet-lease-renew-margin", "subnet_lease_renew_margin", INT, 60,
             "renew the subnet lease this many minutes before it expires",
             _int_range(1, 1439, "minutes")),
    FlagSpec("ip-masq", "ip_masq", BOOL, False,
             "set up IP masquerade for traffic leaving the flannel network"),
    FlagSpec("healthz-ip", "healthz_ip", STR, "0.0.0.0",
             "address the healthz server listens on", _check_ip),
    FlagSpec("healthz-port", "healthz_port", INT, 0,
             "port the healthz server listens on (0 disables it)", _int_range(0, 65535)),
    FlagSpec("iptables-resync", "iptables_resync", INT, 5,
             "seconds between checks that flannel's iptables rules are still in place",
             _int_range(1, unit="seconds")),
    FlagSpec("iptables-forward-rules", "iptables_forward_rules", BOOL, True,
             "add ACCEPT rules for the flannel network to the FORWARD chain"),
    FlagSpec("udp-framing", "udp_framing", STR, "",
             "pyflannel only: this node's udp framing, auto or flannel (default: the "
             "config's Backend.Framing)", _check_framing),
    FlagSpec("bgp-route-reflector-cluster-id", "bgp_route_reflector_cluster_id", STR, "",
             "pyflannel bgp backend: make this node a route reflector with this cluster ID "
             "(A.B.C.D)", _check_ipv4),
    FlagSpec("bgp-as-number", "bgp_as_number", INT, 0,
             "pyflannel bgp backend: this node's AS number (0: the config's Backend.ASNumber)",
             _int_range(0, 4_294_967_295)),
    FlagSpec("bgp-router-id", "bgp_router_id", STR, "",
             "pyflannel bgp backend: BGP router ID (A.B.C.D; default: the node's PublicIP, "
             "required on an IPv6-only node)", _check_ipv4),
    FlagSpec("node-labels", "node_labels", STR, "",
             "pyflannel network policy: this node's labels, key=value,... (published in "
             "the lease as Labels; docs/policy.md)", _check_node_labels),
    FlagSpec("docker-socket", "docker_socket", STR, "/var/run/docker.sock",
             "pyflannel network policy: dockerd's API socket, followed for this node's "
             "containers and their labels (empty: none)"),
    # Hidden: for tests and measurements only (docs/operations.md, "Hidden flags").
    FlagSpec("test-lease-ttl", "test_lease_ttl", INT, 0,
             "testing only: etcd lease TTL in seconds instead of 24 h (0: 24 h)",
             _int_range(0), hidden=True),
    FlagSpec("fastpath-mode", "fastpath_mode", STR, "process",
             "measurement only: run the udp fast path in a process or a thread",
             _check_fastpath_mode, hidden=True),
    FlagSpec("udp-gso", "udp_gso", BOOL, True,
             "measurement only: send with UDP segmentation offload", hidden=True),
    FlagSpec("udp-gro", "udp_gro", BOOL, True,
             "measurement only: receive with UDP receive offload", hidden=True),
    FlagSpec("udp-coalesce", "udp_coalesce", BOOL, True,
             "measurement only: join plain packets of one TCP flow before the TUN write",
             hidden=True),
    FlagSpec("v", "verbosity", LEVEL, 0, "log verbosity level (bare -v means 1)",
             _int_range(0), env=False),
    FlagSpec("version", "version", BOOL, False, "print the version and exit", env=False),
    FlagSpec("help", "help", BOOL, False, "print this help and exit", aliases=("h",), env=False),
)

_BY_NAME: dict[str, FlagSpec] = {
    name: spec for spec in FLAGS for name in (spec.name, *spec.aliases)
}


def env_var(spec: FlagSpec) -> str:
    """The FLANNELD_* variable that feeds ``spec`` (flanneld's naming, so old envs work)."""
    return "FLANNELD_" + spec.name.upper().replace("-", "_")


# ---------------------------------------------------------------------------------------
# Options


@dataclass(frozen=True, repr=False)
class Options:
    """The parsed flags; defaults are flanneld's."""

    etcd_endpoints: tuple[str, ...] = ("http://127.0.0.1:2379",)
    etcd_prefix: str = "/coreos.com/network"
    etcd_keyfile: str = ""
    etcd_certfile: str = ""
    etcd_cafile: str = ""
    etcd_username: str = ""
    etcd_password: str = ""
    iface: tuple[str, ...] = ()
    iface_regex: tuple[str, ...] = ()
    iface_can_reach: str = ""
    public_ip: str = ""
    public_ipv6: str = ""
    subnet_file: str = "/run/flannel/subnet.env"
    subnet_lease_renew_margin: int = 60
    ip_masq: bool = False
    healthz_ip: str = "0.0.0.0"
    healthz_port: int = 0
    iptables_resync: int = 5
    iptables_forward_rules: bool = True
    udp_framing: str = ""
    bgp_route_reflector_cluster_id: str = ""
    bgp_as_number: int = 0
    bgp_router_id: str = ""
    node_labels: str = ""
    docker_socket: str = "/var/run/docker.sock"
    test_lease_ttl: int = 0
    fastpath_mode: str = "process"
    udp_gso: bool = True
    udp_gro: bool = True
    udp_coalesce: bool = True
    verbosity: int = 0
    version: bool = False
    help: bool = False

    def redacted(self) -> dict[str, Any]:
        """All fields as a dict that is safe to log: the etcd password becomes "***"."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        if out["etcd_password"]:
            out["etcd_password"] = "***"
        return out

    def __repr__(self) -> str:
        # Options end up in startup logs and tracebacks; never let the password through.
        body = ", ".join(f"{k}={v!r}" for k, v in self.redacted().items())
        return f"Options({body})"


# ---------------------------------------------------------------------------------------
# Parsing


def _convert(spec: FlagSpec, raw: str, label: str, *, from_env: bool) -> Any:
    """Turn one raw string into a checked value, or raise FlagError prefixed with ``label``."""
    try:
        if spec.kind in (INT, LEVEL):
            value: Any = _to_int(raw)
        elif spec.kind == BOOL:
            value = _to_bool(raw)
        elif spec.kind == LIST or (spec.kind == REPEAT and from_env):
            value = _split_commas(raw)
        elif spec.kind == REPEAT:
            value = (raw,)
        else:
            value = raw
        if spec.validator is not None:
            value = spec.validator(value)
    except _Problem as exc:
        raise FlagError(f"{label}: {exc}") from None
    return value


def _from_env(environ: Mapping[str, str], skip: Mapping[str, Any]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for spec in FLAGS:
        if not spec.env or spec.field in skip:
            continue  # like flanneld, a flag set on the command line never reads its variable
        var = env_var(spec)
        raw = environ.get(var, "")
        if raw == "":
            continue  # flanneld treats an empty variable as unset
        values[spec.field] = _convert(spec, raw, var, from_env=True)
    return values


def parse_flags(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> Options:
    """Parse flanneld's arguments (without the program name) and FLANNELD_* variables.

    ``environ`` defaults to ``os.environ``; pass ``{}`` to ignore the environment.  The
    command line wins per flag; a repeatable flag given on the command line replaces the
    environment's list.  ``-h``/``-help`` stops parsing at once (like Go's flag package)
    and returns defaults with ``help=True``, so help works even next to a bad flag.
    """
    args = list(argv)
    given: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg == "--":
            if i < len(args):
                raise FlagError(f"unexpected argument: {_plain(args[i])}")
            break
        if len(arg) < 2 or not arg.startswith("-"):
            raise FlagError(f"unexpected argument: {_plain(arg)}")
        body = arg[2:] if arg.startswith("--") else arg[1:]
        name, has_value, value = body.partition("=")
        if not name or name.startswith("-"):
            raise FlagError(f"bad flag syntax: {_plain(arg)}")
        spec = _BY_NAME.get(name)
        if spec is None:
            raise FlagError(f"unknown flag: -{_plain(name)}")
        label = f"flag -{name}"
        if not has_value:
            if spec.kind == BOOL:
                value = "true"
            elif spec.kind == LEVEL:
                if i < len(args) and _DIGITS_RE.fullmatch(args[i]):
                    value = args[i]
                    i += 1
                else:
                    value = "1"
            elif i < len(args):
                value = args[i]
                i += 1
            else:
                raise FlagError(f"{label}: needs a value")
        converted = _convert(spec, value, label, from_env=False)
        if spec.field == "help" and converted:
            return Options(help=True)
        if spec.kind == REPEAT:
            given[spec.field] = given.get(spec.field, ()) + converted
        else:
            given[spec.field] = converted

    env = os.environ if environ is None else environ
    values = {spec.field: spec.default for spec in FLAGS}
    values.update(_from_env(env, given))
    values.update(given)
    if bool(values["etcd_username"]) != bool(values["etcd_password"]):
        # etcd authenticates a user with a password; one alone would reach the client library
        # as a traceback (aetcd refuses it) or be silently ignored
        raise FlagError("flags -etcd-username and -etcd-password go together: give both or neither")
    return Options(**values)


# ---------------------------------------------------------------------------------------
# Help


def _format_default(spec: FlagSpec) -> str:
    default = spec.default
    if isinstance(default, bool):
        return "true" if default else "false"
    if isinstance(default, tuple):
        return _show(",".join(default)) if default else "none"
    if isinstance(default, str):
        return _show(default)
    return str(default)


_METAVAR = {STR: "string", INT: "int", LIST: "list", REPEAT: "string", LEVEL: "int", BOOL: ""}


def usage(prog: str = "pyflanneld") -> str:
    """Help text for every flag (Go flag layout), so ``-help`` reads like flanneld's; the
    first line is the only usage line, naming ``prog``."""
    lines = [f"Usage: {prog} [flags]", ""]
    for spec in FLAGS:
        if spec.hidden:
            continue
        names = ", ".join(f"-{n}" for n in (*spec.aliases, spec.name))
        metavar = _METAVAR[spec.kind]
        lines.append(f"  {names} {metavar}".rstrip())
        env = f"; env {env_var(spec)}" if spec.env else ""
        lines.append(f"        {spec.help}")
        lines.append(f"        (default {_format_default(spec)}{env})")
    lines += [
        "",
        "Flags take -flag=value, --flag=value, -flag value or --flag value; boolean flags",
        "take only -flag or -flag=true|false.  The command line overrides FLANNELD_* variables;",
        "for repeatable flags the variable holds a comma-separated list.",
    ]
    return "\n".join(lines) + "\n"
