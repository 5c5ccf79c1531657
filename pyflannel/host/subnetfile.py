"""The subnet file (``/run/flannel/subnet.env``) that hands our lease to Docker and CNI."""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass
from ipaddress import IPv4Interface, IPv4Network
from pathlib import Path


@dataclass(frozen=True)
class SubnetEnv:
    network: IPv4Network
    subnet: IPv4Interface  # first host address with the subnet's prefix: 10.1.15.1/24
    mtu: int
    ipmasq: bool

    def render(self) -> str:
        return (
            f"FLANNEL_NETWORK={self.network}\n"
            f"FLANNEL_SUBNET={self.subnet}\n"
            f"FLANNEL_MTU={self.mtu}\n"
            f"FLANNEL_IPMASQ={'true' if self.ipmasq else 'false'}\n"
        )


def write_subnet_file(path: str | Path, env: SubnetEnv) -> None:
    """Atomically: readers see the old file or the new one, never half of one."""
    _write_atomic(Path(path), env.render())


def write_json_atomic(path: str | Path, doc: object) -> None:
    import json

    _write_atomic(Path(path), json.dumps(doc, indent=1) + "\n")


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


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
    try:
        value = read_env_file(path).get("FLANNEL_SUBNET", "")
        return IPv4Interface(value).network if value else None
    except (OSError, ValueError):
        return None
