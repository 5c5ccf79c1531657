"""The udp backend's forwarding loop: flannel's framing and vnet1 over the shared transport.

Runs alone in its own process so that nothing in the control plane (gRPC, JSON, logging) can
take the interpreter from it. The cost that matters is system calls per packet: the send
half is :mod:`.udp_send`, the receive half :mod:`.udp_receive`; this module joins them under
one peer table (:class:`Forwarder`) and is the process's entry point.

TUN and UDP I/O, batching, the control socket and the loop are :mod:`.transport`'s; the
WireGuard framing over the same transport is :mod:`.wg`.
"""

from __future__ import annotations

import argparse
import ipaddress
import signal
import socket
import struct
import sys

from pyflannel.fastpath import counters
from pyflannel.fastpath.transport import (  # noqa: F401 - tune_socket: the backends' import
    Transport,
    die_with_parent,
    tune_socket,
)
from pyflannel.fastpath.udp_receive import PeerSource, UdpReceive
from pyflannel.fastpath.udp_send import UdpSend


class Forwarder(UdpSend, UdpReceive):
    """Moves packets between ``tun_fd`` and ``sock`` by the peer table it is given.

    ``vnet``: the TUN was opened with IFF_VNET_HDR and offloads (reads and writes carry a
    virtio-net header). ``gso``/``gro``: use UDP segmentation/receive offload.
    """

    def __init__(self, tun_fd: int, sock: socket.socket, ctl: socket.socket,
                 mem: counters.mmap.mmap | None, *, vnet: bool = False, gso: bool = True,
                 gro: bool = True, datagram_size: int = 1472, vnet1: bool = True,
                 coalesce: bool = True) -> None:
        super().__init__(tun_fd, sock, ctl, mem, vnet=vnet, gso=gso, gro=gro,
                         datagram_size=datagram_size)
        # vnet1: send and accept the fast framing where a peer advertises it (never in
        # flannel-framing mode, whose TUN may still carry virtio-net headers to coalesce)
        self.vnet1 = vnet and vnet1
        self.coalesce = vnet and coalesce
        self.peers = {}  # IPv4 key -> (addr, vnet1?)
        self.peers6 = {}  # IPv6 key -> (addr, vnet1?)
        # ip -> what it may send us: the keys of every subnet routed to it, per family,
        # vnet1 if any of its routes says so, its counters
        self.sources: dict[str, PeerSource] = {}
        self.shift, self.shift6 = 8, 64
        self.local_key = self.local_key6 = -1

    # -- control -----------------------------------------------------------------------

    def apply(self, msg: dict) -> list | None:
        """Install a new table atomically (whole dicts are swapped, never edited); returns
        the rows refused, [index, why], counting ``peers`` then ``peers6``.

        Several subnets may name one address (a stale lease, a typo in a reservation): each
        subnet is sent by its own route, but what an address may send us is the union of
        its routes, so a second route can never downgrade the first (its vnet1 framing,
        the subnets its inner sources may lie in, its counters).
        """
        if msg.get("op") in ("stop", "stats"):
            return super().apply(msg)
        generation = int(msg.get("generation") or self.generation + 1)
        shift = 32 - int(msg["subnet_len"])
        shift6 = 128 - int(msg.get("subnet6_len") or 128)
        if not (0 <= shift <= 32 and 0 <= shift6 <= 128):
            raise ValueError("subnet length out of range")
        rows4, rows6 = list(msg["peers"]), list(msg.get("peers6") or ())
        refused: list = []
        peers = self._table(rows4, shift, 32, 0, refused)
        peers6 = self._table(rows6, shift6, 128, len(rows4), refused)
        keys: dict[str, tuple[set[int], set[int]]] = {}
        fast_any: dict[str, bool] = {}
        for family, table in enumerate((peers, peers6)):
            for key, ((ip, _port), fast) in table.items():
                keys.setdefault(ip, (set(), set()))[family].add(key)
                fast_any[ip] = fast_any.get(ip, False) or fast
        local, local6 = msg.get("local_net"), msg.get("local_net6")
        local_key = int(local) >> shift if local is not None else -1
        local_key6 = int(local6) >> shift6 if local6 is not None else -1
        # ICMP errors come from the overlay network's own address (10.1.0.0): never a
        # local address, which the kernel would drop as a martian source.
        icmp_src = struct.pack("!I", int(msg.get("icmp_src") or 0))
        icmp_src6 = msg.get("icmp_src6")
        icmp_src6 = int(icmp_src6).to_bytes(16, "big") if icmp_src6 is not None else None
        # Per-peer counters survive table changes: [tx_p, tx_b, rx_p, rx_b, last_rx, drops];
        # a departed address loses them, and its half-joined train.
        stats = {ip: self.peer_stats.get(ip) or [0, 0, 0, 0, 0.0, 0] for ip in keys}
        for gone in self.sources.keys() - keys.keys():
            self._reasm.forget(gone)
        self.shift, self.local_key, self.icmp_src = shift, local_key, icmp_src
        self.shift6, self.local_key6 = shift6, local_key6
        self.icmp_src6 = icmp_src6
        self.peer_stats = stats
        self.sources = {ip: PeerSource(frozenset(k4), frozenset(k6), fast_any[ip], stats[ip])
                        for ip, (k4, k6) in keys.items()}
        self.peers, self.peers6 = peers, peers6
        self.generation = generation
        return refused

    def _table(self, rows: list, shift: int, bits: int, first: int,
               refused: list) -> dict[int, tuple[tuple[str, int], bool]]:
        """One family's peer table: subnet key -> ((address, port), vnet1?). A row that is
        not [subnet, address, port, vnet1?] is left out and added to ``refused`` as
        [``first`` + its index, why]."""
        table = {}
        for i, row in enumerate(rows):
            try:
                net, ip, port, *rest = row
                net, port = int(net), int(port)
                if not 0 <= net < 1 << bits or not 0 < port < 65536:
                    raise ValueError("subnet or port out of range")
                addr = str(ipaddress.ip_address(ip))
            except (ValueError, TypeError) as e:
                refused.append([first + i, f"{type(e).__name__}: {e}"[:200]])
                continue
            table[net >> shift] = ((addr, port), bool(rest and rest[0]) and self.vnet1)
        return table


def main(argv: list[str] | None = None) -> int:
    """Entry point of the fast-path process; the fds are inherited from the daemon."""
    ap = argparse.ArgumentParser(prog="pyflannel-fastpath")
    for name in ("tun-fd", "udp-fd", "ctl-fd", "counters-fd"):
        ap.add_argument(f"--{name}", type=int, required=True)
    ap.add_argument("--vnet", action="store_true")
    ap.add_argument("--datagram-size", type=int, default=1472)
    ap.add_argument("--no-gso", action="store_true")
    ap.add_argument("--no-gro", action="store_true")
    ap.add_argument("--no-vnet1", action="store_true", help="flannel's framing only")
    ap.add_argument("--no-coalesce", action="store_true",
                    help="write plain packets to the TUN one by one")
    ap.add_argument("--framing", choices=("udp", "wireguard", "gre", "ipip"), default="udp")
    ap.add_argument("--gre-key", type=int, help="the GRE key (RFC 2890), if any")
    ap.add_argument("--gre-checksum", action="store_true", help="send GRE checksums")
    ap.add_argument("--wg-key-file", help="the node's WireGuard private key (read here, "
                    "so the secret never crosses the command line or the control socket)")
    ap.add_argument("--wg-mtu", type=int, default=1420)
    ap.add_argument("--wg-public-key", help="the public key the backend published: the "
                    "key file must still hold its private half")
    args = ap.parse_args(argv)
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the daemon decides when we stop
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    sock = socket.socket(fileno=args.udp_fd)
    ctl = socket.socket(fileno=args.ctl_fd)
    options = {"vnet": args.vnet, "gso": not args.no_gso, "gro": not args.no_gro,
               "datagram_size": args.datagram_size}
    fwd: Transport
    if args.framing == "wireguard":
        from pyflannel.fastpath.wg import WgForwarder
        from pyflannel.wireguard.keys import KeyFileError, key_file_path, read_key_file

        try:
            key = read_key_file(args.wg_key_file or key_file_path())
        except KeyFileError as e:
            print(f"pyflannel-fastpath: {e}", file=sys.stderr, flush=True)
            return 1
        if args.wg_public_key and key.public_base64 != args.wg_public_key:
            print(f"pyflannel-fastpath: WireGuard key file {args.wg_key_file} changed "
                  "since the backend read it; not starting", file=sys.stderr, flush=True)
            return 1
        fwd = WgForwarder(args.tun_fd, sock, ctl, counters.attach(args.counters_fd),
                          private_key=key, mtu=args.wg_mtu, **options)
    elif args.framing in ("gre", "ipip"):
        from pyflannel.fastpath.rawip import IPPROTO_GRE, IPPROTO_IPIP, RawIpForwarder

        fwd = RawIpForwarder(args.tun_fd, sock, ctl, counters.attach(args.counters_fd),
                             protocol=IPPROTO_GRE if args.framing == "gre" else IPPROTO_IPIP,
                             key=args.gre_key, csum=args.gre_checksum, **options)
    else:
        fwd = Forwarder(args.tun_fd, sock, ctl, counters.attach(args.counters_fd),
                        vnet1=not args.no_vnet1, coalesce=not args.no_coalesce, **options)
    fwd.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
