"""Backends: one module each behind the small interface in :mod:`.base`."""

from __future__ import annotations

from pyflannel.backend.base import Backend, BackendError
from pyflannel.config import NetworkConfig
from pyflannel.flags import Options
from pyflannel.host.netlink import ExternalInterface


def make_backend(cfg: NetworkConfig, ext: ExternalInterface,
                 opts: Options | None = None) -> Backend:
    """The backend the network config asks for (``opts``: this node's flags)."""
    opts = opts or Options()
    if cfg.backend_type == "udp":
        from pyflannel.backend.udp import UdpBackend

        return UdpBackend(cfg, ext, framing=opts.udp_framing, mode=opts.fastpath_mode,
                          gso=opts.udp_gso, gro=opts.udp_gro, coalesce=opts.udp_coalesce)
    if cfg.backend_type == "vxlan":
        from pyflannel.backend.vxlan import VxlanBackend

        return VxlanBackend(cfg, ext)
    if cfg.backend_type == "host-gw":
        from pyflannel.backend.hostgw import HostGwBackend

        return HostGwBackend(cfg, ext)
    if cfg.backend_type == "wireguard":
        from pyflannel.backend.wireguard import WireguardBackend

        return WireguardBackend(cfg, ext, mode=opts.fastpath_mode, gso=opts.udp_gso,
                                gro=opts.udp_gro)
    if cfg.backend_type == "bgp":
        from pyflannel.backend.bgp import BgpBackend

        return BgpBackend(cfg, ext, opts)
    if cfg.backend_type in ("gre", "ipip"):
        from pyflannel.backend.tunnel import GreBackend, IpipBackend

        kind = GreBackend if cfg.backend_type == "gre" else IpipBackend
        return kind(cfg, ext, mode=opts.fastpath_mode)
    if cfg.backend_type == "alloc":
        from pyflannel.backend.alloc import AllocBackend

        return AllocBackend(cfg, ext)
    if cfg.backend_type == "extension":
        from pyflannel.backend.extension import ExtensionBackend

        return ExtensionBackend(cfg, ext)
    raise BackendError(f"backend {cfg.backend_type!r} is not supported by pyflannel "
                       "(supported: udp, vxlan, host-gw, wireguard, bgp, gre, ipip, alloc, "
                       "extension)")


__all__ = ["Backend", "BackendError", "make_backend"]
