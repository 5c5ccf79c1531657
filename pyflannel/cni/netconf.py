"""Pure: the plugin's network config and the node's subnet.env in, the delegate's config out.

The rules follow what flannel's CNI plugin does, so the same conflist gives the same pods:

* the delegate is ``bridge`` unless ``delegate.type`` says otherwise; a bridge is ``cni0``
  and a gateway unless the delegate says otherwise;
* ``mtu`` is ``FLANNEL_MTU`` and ``ipMasq`` is ``not FLANNEL_IPMASQ`` (whoever does not
  masquerade in the daemon does it on the bridge), unless the delegate sets them;
* the delegate's IPAM is the config's ``ipam`` (``host-local`` by default) with one range
  per family from ``FLANNEL_SUBNET``/``FLANNEL_IPV6_SUBNET`` and, after the config's own
  routes, a route to each flannel network (via the subnet's gateway, see _network_routes);
* ``name`` and ``cniVersion`` come from the outer config.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network, ip_interface
from typing import Any

from pyflannel.cni.errors import (
    INCOMPATIBLE_VERSION,
    INVALID_NETWORK_CONFIG,
    CniError,
)

SUPPORTED_VERSIONS = ("0.3.1", "0.4.0", "1.0.0")
DEFAULT_SUBNET_FILE = "/run/flannel/subnet.env"
DEFAULT_DATA_DIR = "/var/lib/cni/flannel"
DEFAULT_BRIDGE = "cni0"
_TRUE = {"1", "t", "T", "TRUE", "true", "True"}  # the spellings flannel's ParseBool takes
_FALSE = {"0", "f", "F", "FALSE", "false", "False"}


class SubnetEnvError(CniError):
    """subnet.env holds something a pod config cannot be made from."""

    def __init__(self, msg: str) -> None:
        super().__init__(INVALID_NETWORK_CONFIG, msg)


@dataclass(frozen=True)
class FlannelEnv:
    """The parts of subnet.env a pod needs; each subnet in network form (10.1.15.0/24)."""

    network: IPv4Network | None
    subnet: IPv4Network | None
    ipv6_network: IPv6Network | None
    ipv6_subnet: IPv6Network | None
    mtu: int
    ipmasq: bool


@dataclass(frozen=True)
class PluginConf:
    """The outer network config the runtime gave us (one entry of a conflist)."""

    cni_version: str
    name: str
    subnet_file: str
    data_dir: str
    delegate: dict[str, Any]
    ipam: dict[str, Any]
    prev_result: dict[str, Any] | None


def parse_flannel_env(values: Mapping[str, str], where: str = "subnet.env") -> FlannelEnv:
    """subnet.env's KEY=VALUE pairs -> FlannelEnv; SubnetEnvError names the bad key."""

    def net(key: str, version: int) -> Any:
        raw = values.get(key)
        if raw is None or raw == "":
            return None
        try:
            value = ip_interface(raw).network
        except ValueError:
            raise SubnetEnvError(f"{where}: {key}={raw} is not a CIDR") from None
        if value.version != version:
            raise SubnetEnvError(f"{where}: {key}={raw} is not an IPv{version} network")
        return value

    network, subnet = net("FLANNEL_NETWORK", 4), net("FLANNEL_SUBNET", 4)
    network6, subnet6 = net("FLANNEL_IPV6_NETWORK", 6), net("FLANNEL_IPV6_SUBNET", 6)
    if subnet is None and subnet6 is None:
        raise SubnetEnvError(f"{where} has neither FLANNEL_SUBNET nor FLANNEL_IPV6_SUBNET")
    if network is None and network6 is None:
        raise SubnetEnvError(f"{where} has neither FLANNEL_NETWORK nor FLANNEL_IPV6_NETWORK")
    for sub, whole, key in ((subnet, network, "FLANNEL_SUBNET"),
                            (subnet6, network6, "FLANNEL_IPV6_SUBNET")):
        if sub is not None and whole is not None and not sub.subnet_of(whole):
            raise SubnetEnvError(f"{where}: {key}={sub} is outside the network {whole}")
    return FlannelEnv(network, subnet, network6, subnet6, _mtu(values, where),
                      _ipmasq(values, where))


def _mtu(values: Mapping[str, str], where: str) -> int:
    raw = values.get("FLANNEL_MTU")
    if raw is None:
        raise SubnetEnvError(f"{where} is missing FLANNEL_MTU")
    if not raw.isdigit() or not 68 <= int(raw) <= 65535:
        raise SubnetEnvError(f"{where}: FLANNEL_MTU={raw} is not an MTU (68-65535)")
    return int(raw)


def _ipmasq(values: Mapping[str, str], where: str) -> bool:
    raw = values.get("FLANNEL_IPMASQ")
    if raw is None:
        raise SubnetEnvError(f"{where} is missing FLANNEL_IPMASQ")
    if raw not in _TRUE | _FALSE:
        raise SubnetEnvError(f"{where}: FLANNEL_IPMASQ={raw} is not true or false")
    return raw in _TRUE


def parse_plugin_conf(raw: bytes) -> PluginConf:
    """The config on stdin -> PluginConf; CniError (7, or 1 for the version) if unusable."""
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise CniError(INVALID_NETWORK_CONFIG, f"network config is not JSON: {e}") from None
    if not isinstance(doc, dict):
        raise CniError(INVALID_NETWORK_CONFIG, "network config is not a JSON object")
    version = doc.get("cniVersion")
    if not isinstance(version, str) or not version:
        raise CniError(INVALID_NETWORK_CONFIG, "network config has no cniVersion")
    check_version(version)
    name = doc.get("name")
    if not isinstance(name, str) or not name:
        raise CniError(INVALID_NETWORK_CONFIG, "network config has no name")
    return PluginConf(
        cni_version=version,
        name=name,
        subnet_file=_string(doc, "subnetFile", DEFAULT_SUBNET_FILE),
        data_dir=_string(doc, "dataDir", DEFAULT_DATA_DIR),
        delegate=_object(doc, "delegate"),
        ipam=_object(doc, "ipam"),
        prev_result=_object(doc, "prevResult") if "prevResult" in doc else None,
    )


def check_version(version: str) -> None:
    if version not in SUPPORTED_VERSIONS:
        raise CniError(INCOMPATIBLE_VERSION,
                       f"CNI version {version} is not supported "
                       f"(pyflannel-cni supports {', '.join(SUPPORTED_VERSIONS)})")


def _string(doc: Mapping[str, Any], key: str, default: str) -> str:
    value = doc.get(key, default)
    if not isinstance(value, str) or not value:
        raise CniError(INVALID_NETWORK_CONFIG, f"network config: {key} must be a path")
    return value


def _object(doc: Mapping[str, Any], key: str) -> dict[str, Any]:
    value = doc.get(key, {})
    if not isinstance(value, dict):
        raise CniError(INVALID_NETWORK_CONFIG, f"network config: {key} must be a JSON object")
    return copy.deepcopy(value)


def build_delegate(conf: PluginConf, env: FlannelEnv) -> dict[str, Any]:
    """The config the delegate plugin gets on ADD (saved, and given again on DEL)."""
    delegate = copy.deepcopy(conf.delegate)
    delegate["name"] = conf.name
    delegate["cniVersion"] = conf.cni_version
    delegate.setdefault("type", "bridge")
    if not isinstance(delegate["type"], str) or not delegate["type"]:
        raise CniError(INVALID_NETWORK_CONFIG, "network config: delegate.type must be a name")
    if delegate["type"] == "flannel":  # it would call this plugin again, for ever
        raise CniError(INVALID_NETWORK_CONFIG, "network config: delegate.type cannot be flannel")
    delegate.setdefault("ipMasq", not env.ipmasq)
    delegate.setdefault("mtu", env.mtu)
    if delegate["type"] == "bridge":
        delegate.setdefault("bridge", DEFAULT_BRIDGE)
        delegate.setdefault("isGateway", True)
    delegate["ipam"] = _ipam(conf.ipam, env)
    return delegate


def _ipam(base: dict[str, Any], env: FlannelEnv) -> dict[str, Any]:
    ipam = copy.deepcopy(base)
    ipam.setdefault("type", "host-local")
    ipam["ranges"] = [[{"subnet": str(sub)}] for sub in (env.subnet, env.ipv6_subnet)
                      if sub is not None]
    routes = ipam.get("routes", [])
    if not isinstance(routes, list) or not all(isinstance(r, dict) for r in routes):
        raise CniError(INVALID_NETWORK_CONFIG,
                       "network config: ipam.routes must be a list of objects")
    ipam["routes"] = routes + _network_routes(env)
    return ipam


def _network_routes(env: FlannelEnv) -> list[dict[str, str]]:
    """A route to each flannel network via the range's gateway (host-local's default, the
    subnet's first address). flannel leaves ``gw`` out, which puts the same route in the
    pod, but the bridge plugin of containernetworking-plugins before 1.3.0 then fails
    CHECK on every healthy pod (containernetworking/plugins#886)."""
    return [{"dst": str(net), "gw": str(sub.network_address + 1)}
            for net, sub in ((env.network, env.subnet), (env.ipv6_network, env.ipv6_subnet))
            if net is not None and sub is not None]

