"""Backends: one module each behind the small interface in :mod:`.base`."""

from __future__ import annotations

from pyflannel.backend.base import Backend, BackendError
from pyflannel.config import NetworkConfig
from pyflannel.host.netlink import ExternalInterface


def make_backend(cfg: NetworkConfig, ext: ExternalInterface, udp_framing: str = "") -> Backend:
    """The backend the network config asks for."""
    if cfg.backend_type == "udp":
        from pyflannel.backend.udp import UdpBackend

        return UdpBackend(cfg, ext, framing=udp_framing)
    if cfg.backend_type == "vxlan":
        from pyflannel.backend.vxlan import VxlanBackend

        return VxlanBackend(cfg, ext)
    if cfg.backend_type == "host-gw":
        from pyflannel.backend.hostgw import HostGwBackend

        return HostGwBackend(cfg, ext)
    raise BackendError(f"backend {cfg.backend_type!r} is not supported by pyflannel "
                       "(supported: udp, vxlan, host-gw)")


__all__ = ["Backend", "BackendError", "make_backend"]
