"""The subnet file (``/run/flannel/subnet.env``) that hands our lease to Docker and CNI."""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass
from ipaddress import IPv4Interface, IPv4Network, IPv6Interface, IPv6Network, ip_interface
from pathlib import Path

from pyflannel.host.atomicfile import write_atomic


class SubnetFileError(ValueError):
    """The subnet file cannot be written there (one line for the operator)."""


@dataclass(frozen=True)
class SubnetEnv:
    """What subnet.env says, in flanneld's line order.

    IPv4 lines are left out when ``network``/``subnet`` are None (IPv6-only mode) and IPv6
    lines are written only when ``ipv6_network``/``ipv6_subnet`` are set (dual-stack).
    """

    network: IPv4Network | None
    subnet: IPv4Interface | None  # first host address with the subnet's prefix: 10.1.15.1/24
    mtu: int
    ipmasq: bool
    ipv6_network: IPv6Network | None = None
    ipv6_subnet: IPv6Interface | None = None  # likewise: fc00:10:1:5c::1/64

    def render(self) -> str:
        lines = []
        if self.network is not None:
            lines.append(f"FLANNEL_NETWORK={self.network}\n")
        if self.subnet is not None:
            lines.append(f"FLANNEL_SUBNET={self.subnet}\n")
        if self.ipv6_network is not None:
            lines.append(f"FLANNEL_IPV6_NETWORK={self.ipv6_network}\n")
        if self.ipv6_subnet is not None:
            lines.append(f"FLANNEL_IPV6_SUBNET={self.ipv6_subnet}\n")
        lines.append(f"FLANNEL_MTU={self.mtu}\n")
        lines.append(f"FLANNEL_IPMASQ={'true' if self.ipmasq else 'false'}\n")
        return "".join(lines)


def first_host(subnet: IPv4Network | IPv6Network) -> IPv4Interface | IPv6Interface:
    """The address flanneld writes for a leased subnet: its first host, with its prefix."""
    return ip_interface((subnet.network_address + 1, subnet.prefixlen))


def write_subnet_file(path: str | Path, env: SubnetEnv) -> None:
    """Atomically: readers see the old file or the new one, never half of one."""
    write_atomic(path, env.render())


def write_json_atomic(path: str | Path, doc: object) -> None:
    """A JSON document (the state file), replaced atomically like the subnet file."""
    import json

    write_atomic(path, json.dumps(doc, indent=1) + "\n")


def check_writable(path: str | Path) -> None:
    """Raise SubnetFileError unless the subnet file can be written at ``path``.

    Called before any lease, device or route exists, so an unusable path costs one line
    instead of a set-up that is torn down again. Creates missing directories (as the
    write would) and a temp file beside the target, which it removes again.
    """
    target = Path(os.path.realpath(path))
    if target.is_dir():
        raise SubnetFileError(f"subnet file {path} is a directory")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.check.", dir=target.parent)
    except OSError as e:
        raise SubnetFileError(
            f"cannot write subnet file {path}: {_why(e, target.parent)}") from None
    os.close(fd)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)


def _why(e: OSError, directory: Path) -> str:
    """Name the path that is in the way: a parent that is a file says more than ENOTDIR."""
    for parent in (directory, *directory.parents):
        if parent.exists() and not parent.is_dir():
            return f"{parent} is not a directory"
    return f"{e.strerror or e} ({directory})"


def read_env_file(path: str | Path) -> dict[str, str]:
    """KEY=VALUE lines; blank lines and comments skipped, optional quotes removed."""
    out: dict[str, str] = {}
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        out[key.strip()] = value
    return out


def previous_subnet(path: str | Path) -> IPv4Network | None:
    """The subnet this node held before (from an old subnet file), if readable."""
    return previous_subnets(path)[0]


def previous_ipv6_subnet(path: str | Path) -> IPv6Network | None:
    """The IPv6 subnet this node held before (FLANNEL_IPV6_SUBNET), if readable."""
    return previous_subnets(path)[1]


def previous_subnets(path: str | Path) -> tuple[IPv4Network | None, IPv6Network | None]:
    """Both subnets of an old subnet file, so a restart can ask for the same pair again.

    Each is None when its line is missing or unreadable; a bad line spoils only itself.
    """
    try:
        env = read_env_file(path)
    except (OSError, ValueError):
        return None, None
    v4: IPv4Network | None = None
    v6: IPv6Network | None = None
    with contextlib.suppress(ValueError):
        if value := env.get("FLANNEL_SUBNET", ""):
            v4 = IPv4Interface(value).network
    with contextlib.suppress(ValueError):
        if value := env.get("FLANNEL_IPV6_SUBNET", ""):
            v6 = IPv6Interface(value).network
    return v4, v6
