"""Subnet leases as flanneld stores them in etcd.

A lease is the key ``<prefix>/subnets/<a.b.c.d>-<len>`` holding JSON such as
``{"PublicIP":"192.0.2.1","PublicIPv6":null,"BackendType":"udp"}``. pyflannel nodes and
flanneld nodes share one cluster, so the key layout and the JSON shape are the contract.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from typing import Any

SUBNET_KEY_RE = re.compile(r"^(\d{1,3}(?:\.\d{1,3}){3})-(\d{1,2})$")


class LeaseFormatError(ValueError):
    """A lease key or value written by some node that this daemon cannot use."""


def subnets_prefix(etcd_prefix: str) -> str:
    """The directory under which every node's lease lives (with a trailing slash)."""
    return etcd_prefix.rstrip("/") + "/subnets/"


def config_key(etcd_prefix: str) -> str:
    return etcd_prefix.rstrip("/") + "/config"


def subnet_key(etcd_prefix: str, subnet: IPv4Network) -> str:
    """``/coreos.com/network/subnets/10.1.15.0-24`` for 10.1.15.0/24."""
    return f"{subnets_prefix(etcd_prefix)}{subnet.network_address}-{subnet.prefixlen}"


def parse_subnet_key(key: str) -> IPv4Network:
    """The subnet named by the last path element of a lease key."""
    name = key.rsplit("/", 1)[-1]
    m = SUBNET_KEY_RE.match(name)
    if not m:
        raise LeaseFormatError(f"lease key {key!r} does not name a subnet (want a.b.c.d-len)")
    try:
        return IPv4Network(f"{m.group(1)}/{m.group(2)}")
    except ValueError as e:
        raise LeaseFormatError(f"lease key {key!r}: {e}") from None


@dataclass(frozen=True)
class LeaseAttrs:
    """What a node publishes about itself: where to send its subnet's traffic, and how."""

    public_ip: IPv4Address
    backend_type: str = ""
    backend_data: Any = None
    public_ipv6: str | None = None

    def to_json(self) -> str:
        """Serialise in flanneld's field order and spelling (Go's encoding/json output)."""
        doc: dict[str, Any] = {"PublicIP": str(self.public_ip), "PublicIPv6": self.public_ipv6}
        if self.backend_type:
            doc["BackendType"] = self.backend_type
        if self.backend_data is not None:
            doc["BackendData"] = self.backend_data
        return json.dumps(doc, separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: bytes | str) -> LeaseAttrs:
        """Parse a lease value; unknown fields (other nodes' extensions) are ignored."""
        try:
            doc = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise LeaseFormatError(f"lease value is not JSON: {e}") from None
        if not isinstance(doc, dict):
            raise LeaseFormatError("lease value is not a JSON object")
        fields = {k.lower(): v for k, v in doc.items()}
        pub = fields.get("publicip")
        if not isinstance(pub, str):
            raise LeaseFormatError("lease value has no PublicIP string")
        try:
            public_ip = IPv4Address(pub)
        except ValueError:
            raise LeaseFormatError(f"lease PublicIP {pub!r} is not an IPv4 address") from None
        btype = fields.get("backendtype") or ""
        if not isinstance(btype, str):
            raise LeaseFormatError("lease BackendType is not a string")
        v6 = fields.get("publicipv6")
        return cls(
            public_ip=public_ip,
            backend_type=btype,
            backend_data=fields.get("backenddata"),
            public_ipv6=v6 if isinstance(v6, str) else None,
        )

    @property
    def effective_backend(self) -> str:
        """flanneld's udp leases may carry no BackendType; they mean udp."""
        return self.backend_type or "udp"


@dataclass(frozen=True)
class Lease:
    """One node's claim on a subnet, as read from etcd."""

    subnet: IPv4Network
    attrs: LeaseAttrs
    lease_id: int = 0  # the etcd lease the key hangs on; 0 = no TTL (a reservation)
    mod_revision: int = 0

    @property
    def reserved(self) -> bool:
        return self.lease_id == 0
