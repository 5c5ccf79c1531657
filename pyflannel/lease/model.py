"""Subnet leases as flanneld stores them in etcd.

A lease is the key ``<prefix>/subnets/<key name>`` holding JSON such as
``{"PublicIP":"192.0.2.1","PublicIPv6":null,"BackendType":"udp"}``. pyflannel nodes and
flanneld nodes share one cluster, so the key layout and the JSON shape are the contract.

Key names (flanneld v0.20.2's MakeSubnetKey):

* IPv4 only: ``10.1.45.0-24``;
* dual-stack: ``10.1.45.0-24&fc00:10:1:4f::-64``;
* IPv6 only: ``0.0.0.0-0&fc00:10:1:4f::-64`` (the IPv4 part is the "no subnet" 0.0.0.0/0).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any

# IPv4-only key names, the only layout parse_subnet_key accepts.
SUBNET_KEY_RE = re.compile(r"^(\d{1,3}(?:\.\d{1,3}){3})-(\d{1,2})$")
# Any layout flanneld writes: an IPv4 part, optionally "&" and an IPv6 part (lower-case hex,
# as Go prints addresses and as flanneld's own key regexp requires).
LEASE_KEY_RE = re.compile(r"^(\d{1,3}(?:\.\d{1,3}){3})-(\d{1,2})(?:&([0-9a-f:]+)-(\d{1,3}))?$")

# The IPv4 subnet of an IPv6-only lease: flanneld writes its zero IP4Net as 0.0.0.0-0.
NO_IPV4_SUBNET = IPv4Network("0.0.0.0/0")
# The PublicIP of a node without an IPv4 address (IPv6-only mode).
NO_PUBLIC_IP = IPv4Address("0.0.0.0")


class LeaseFormatError(ValueError):
    """A lease key or value written by some node that this daemon cannot use."""


def subnets_prefix(etcd_prefix: str) -> str:
    """The directory under which every node's lease lives (with a trailing slash)."""
    return etcd_prefix.rstrip("/") + "/subnets/"


def config_key(etcd_prefix: str) -> str:
    return etcd_prefix.rstrip("/") + "/config"


def lease_key_name(subnet: IPv4Network, ipv6_subnet: IPv6Network | None = None) -> str:
    """The last path element of a lease key: ``10.1.45.0-24&fc00:10:1:4f::-64``.

    Pass NO_IPV4_SUBNET as ``subnet`` for an IPv6-only lease.
    """
    name = f"{subnet.network_address}-{subnet.prefixlen}"
    if ipv6_subnet is not None:
        name += f"&{ipv6_subnet.network_address}-{ipv6_subnet.prefixlen}"
    return name


def subnet_key(
    etcd_prefix: str, subnet: IPv4Network, ipv6_subnet: IPv6Network | None = None
) -> str:
    """``/coreos.com/network/subnets/10.1.15.0-24`` for 10.1.15.0/24 (plus ``&<v6>-<len>``
    when the lease has an IPv6 subnet)."""
    return subnets_prefix(etcd_prefix) + lease_key_name(subnet, ipv6_subnet)


def parse_lease_key(key: str) -> tuple[IPv4Network, IPv6Network | None]:
    """Both subnets named by a lease key, in any of flanneld's three layouts.

    An IPv6-only key gives NO_IPV4_SUBNET as its IPv4 subnet.  Only the canonical spelling
    is accepted, so ``lease_key_name`` of the result is the key's own last element: a key is
    always re-written or deleted under the name it was read from.
    """
    name = key.rsplit("/", 1)[-1]
    m = LEASE_KEY_RE.match(name)
    if not m:
        raise LeaseFormatError(
            f"lease key {key!r} does not name a subnet (want a.b.c.d-len or a.b.c.d-len&v6-len)"
        )
    try:
        subnet = IPv4Network(f"{m.group(1)}/{m.group(2)}")
        ipv6 = IPv6Network(f"{m.group(3)}/{m.group(4)}") if m.group(3) is not None else None
    except ValueError as e:
        raise LeaseFormatError(f"lease key {key!r}: {e}") from None
    if ipv6 is None and subnet == NO_IPV4_SUBNET:
        raise LeaseFormatError(f"lease key {key!r} names no subnet (0.0.0.0-0 without IPv6)")
    if lease_key_name(subnet, ipv6) != name:
        raise LeaseFormatError(
            f"lease key {key!r} is not in canonical form ({lease_key_name(subnet, ipv6)!r})"
        )
    return subnet, ipv6


def parse_subnet_key(key: str) -> IPv4Network:
    """The subnet named by an IPv4-only lease key (``10.1.15.0-24``).

    Dual-stack and IPv6-only keys raise LeaseFormatError here, as they did before dual-stack
    support: a caller that only knows IPv4 would otherwise re-write such a lease under the
    wrong key.  Use :func:`parse_lease_key` for every layout.
    """
    name = key.rsplit("/", 1)[-1]
    m = SUBNET_KEY_RE.match(name)
    if not m:
        raise LeaseFormatError(f"lease key {key!r} does not name a subnet (want a.b.c.d-len)")
    try:
        return IPv4Network(f"{m.group(1)}/{m.group(2)}")
    except ValueError as e:
        raise LeaseFormatError(f"lease key {key!r}: {e}") from None


def _parse_public_ipv6(value: Any) -> IPv6Address | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise LeaseFormatError("lease PublicIPv6 is not a string")
    try:
        addr = IPv6Address(value)
    except ValueError:
        addr = None
    if addr is None or addr.scope_id is not None:
        raise LeaseFormatError(f"lease PublicIPv6 {value[:60]!r} is not an IPv6 address")
    return addr


def _labels(value: Any) -> tuple[tuple[str, str], ...]:
    """A lease's Labels as sorted pairs; anything but an object of strings counts as no
    labels (a bad Labels field must never cost the node its routes)."""
    if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        return ()
    return tuple(sorted(value.items()))


@dataclass(frozen=True)
class LeaseAttrs:
    """What a node publishes about itself: where to send its subnets' traffic, and how.

    ``backend_data`` describes the IPv4 side (e.g. the VTEP MAC of ``flannel.1``) and
    ``backend_v6_data`` the IPv6 side (``flannel-v6.1``); host-gw publishes neither.
    A ``public_ipv6`` given as a string is stored as an IPv6Address.
    """

    public_ip: IPv4Address
    backend_type: str = ""
    backend_data: Any = None
    public_ipv6: IPv6Address | None = None
    backend_v6_data: Any = None
    # pyflannel's node labels for network policy, sorted (key, value) pairs; flanneld's
    # decoder (encoding/json into a struct) ignores the unknown "Labels" field.
    labels: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.public_ipv6, str):
            object.__setattr__(self, "public_ipv6", IPv6Address(self.public_ipv6))

    def to_json(self) -> str:
        """Serialise in flanneld's field order and spelling (Go's encoding/json output).

        PublicIPv6 is a pointer without omitempty in flanneld, so it is always written
        (``null`` when unset); the backend fields are omitted when empty.
        """
        doc: dict[str, Any] = {
            "PublicIP": str(self.public_ip),
            "PublicIPv6": None if self.public_ipv6 is None else str(self.public_ipv6),
        }
        if self.backend_type:
            doc["BackendType"] = self.backend_type
        if self.backend_data is not None:
            doc["BackendData"] = self.backend_data
        if self.backend_v6_data is not None:
            doc["BackendV6Data"] = self.backend_v6_data
        if self.labels:
            doc["Labels"] = dict(self.labels)
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
        return cls(
            public_ip=public_ip,
            backend_type=btype,
            backend_data=fields.get("backenddata"),
            public_ipv6=_parse_public_ipv6(fields.get("publicipv6")),
            backend_v6_data=fields.get("backendv6data"),
            labels=_labels(fields.get("labels")),
        )

    @property
    def effective_backend(self) -> str:
        """flanneld's udp leases may carry no BackendType; they mean udp."""
        return self.backend_type or "udp"


@dataclass(frozen=True)
class Lease:
    """One node's claim on a subnet (and, dual-stack, an IPv6 subnet), as read from etcd.

    An IPv6-only lease has ``subnet == NO_IPV4_SUBNET``; all of those share that subnet, so
    tables of leases are keyed by :attr:`key_name`, which is unique per key.
    """

    subnet: IPv4Network
    attrs: LeaseAttrs
    lease_id: int = 0  # the etcd lease the key hangs on; 0 = no TTL (a reservation)
    mod_revision: int = 0
    ipv6_subnet: IPv6Network | None = None

    @property
    def reserved(self) -> bool:
        return self.lease_id == 0

    @property
    def has_ipv4(self) -> bool:
        """False for an IPv6-only lease (its IPv4 subnet is the placeholder 0.0.0.0/0)."""
        return self.subnet != NO_IPV4_SUBNET

    @property
    def has_ipv6(self) -> bool:
        return self.ipv6_subnet is not None

    @property
    def key_name(self) -> str:
        """The last element of this lease's etcd key: its identity for both families."""
        return lease_key_name(self.subnet, self.ipv6_subnet)

    def key(self, etcd_prefix: str) -> str:
        """The full etcd key this lease lives under."""
        return subnet_key(etcd_prefix, self.subnet, self.ipv6_subnet)

    @classmethod
    def from_kv(cls, key: str, value: bytes | str, lease_id: int = 0,
                mod_revision: int = 0) -> Lease:
        """A lease from an etcd key and value in any of the three key layouts."""
        subnet, ipv6_subnet = parse_lease_key(key)
        return cls(subnet, LeaseAttrs.from_json(value), lease_id, mod_revision, ipv6_subnet)
