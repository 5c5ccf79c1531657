"""A classic BPF filter for the WireGuard socket: wrong shapes never reach Python.

The kernel runs the program on every datagram before it is queued on the socket. A UDP
socket's filter sees the UDP header first (the payload starts at offset 8, and the length
it loads includes the header: measured, IPv4 and IPv6 alike), and a GRO train as one
datagram of the train's whole length. It lets through only what WireGuard can use:

* the first four bytes are a message type 1-4 followed by three zero reserved bytes;
* type 1 (initiation) is 148 bytes, type 2 (response) 92, type 3 (cookie reply) 64;
* type 4 (transport) is at least 32 bytes (a keepalive is exactly 32; wireguard-go pads
  the plaintext, not the datagram, to 16, so no other rule on its length holds, and a GRO
  train of transport messages is one longer datagram).

Under a handshake flood the fast path adds a second rule, shedding: only one in 2^k
handshake messages (types 1-3) passes, chosen by the kernel's random number, while
transport messages always pass. Python then sees a bounded share of the flood, and the
socket queue stays free for the sessions' data.

Programs are built as bytes with ``struct`` (no dependency) and replaced atomically with
SO_ATTACH_FILTER; the kernel counts what they refuse in the socket's drop counter
(:func:`socket_drops`).
"""

from __future__ import annotations

import ctypes
import ipaddress
import socket
import struct
from collections.abc import Iterable

from pyflannel.wireguard.constants import (
    COOKIE_REPLY_LEN,
    DATA_MIN_LEN,
    INIT_LEN,
    MSG_COOKIE_REPLY,
    MSG_INITIATION,
    MSG_RESPONSE,
    MSG_TRANSPORT,
    RESP_LEN,
)

SO_ATTACH_FILTER = 26
SO_MEMINFO = 55
SK_MEMINFO_DROPS = 8  # index of the drop counter in SO_MEMINFO's array of u32
SK_MEMINFO_VARS = 9
MAX_SHED_SHIFT = 16  # at most one handshake in 65536 passes

# Classic BPF opcodes (linux/filter.h).
BPF_LD_W_ABS = 0x20  # A = ntohl(packet[k:k+4])
BPF_LD_W_LEN = 0x80  # A = packet length
BPF_LD_W_RANDOM = 0x20  # with k = SKF_AD_OFF + SKF_AD_RANDOM: A = a random u32
BPF_ALU_AND_K = 0x54  # A &= k
BPF_JEQ_K = 0x15  # jump jt if A == k, else jf
BPF_JGE_K = 0x35  # jump jt if A >= k, else jf
BPF_RET_K = 0x06  # accept k bytes (0: drop)
BPF_LDB_ABS = 0x30  # A = packet[k]
BPF_JA = 0x05  # jump k
SKF_NET_OFF = -0x100000  # loads from here read the IP header
IPV4_SRC = 12
IPV6_SRC = 8
# source addresses spared by shedding (2 instructions per IPv4 address, 9 per IPv6; the
# kernel takes 4096 in all)
MAX_EXEMPT_V4 = 1000
MAX_EXEMPT_V6 = 200
SKF_AD_OFF = -0x1000
SKF_AD_RANDOM = 56
ACCEPT_ALL = 0xFFFFFFFF  # never trim a datagram
UDP_HEADER_LEN = 8  # before the payload, in what the filter sees

_insn = struct.Struct("=HBBI")  # struct sock_filter: code, jt, jf, k


def _type_word(kind: int) -> int:
    """The first four bytes of a message of this type, as the big-endian load reads them."""
    return kind << 24


class Program:
    """A list of instructions with forward jumps to labels, assembled to bytes."""

    def __init__(self) -> None:
        self._rows: list[tuple[int, str | int, str | int, int | str]] = []
        self._labels: dict[str, int] = {}

    def label(self, name: str) -> None:
        self._labels[name] = len(self._rows)

    def op(self, code: int, k: int | str = 0, jt: str | int = 0, jf: str | int = 0) -> None:
        """One instruction; ``k`` names a label for BPF_JA, ``jt``/``jf`` for the rest."""
        self._rows.append((code, jt, jf, k))

    def assemble(self) -> bytes:
        out = bytearray()
        for pc, (code, jt, jf, k) in enumerate(self._rows):
            k = self._offset(pc, k) if isinstance(k, str) else k & 0xFFFFFFFF
            # struct raises for a conditional jump beyond 255 instructions
            out += _insn.pack(code, self._offset(pc, jt), self._offset(pc, jf), k)
        return bytes(out)

    def _offset(self, pc: int, target: str | int) -> int:
        if isinstance(target, int):
            return target
        offset = self._labels[target] - pc - 1
        if offset < 0:
            raise ValueError(f"jump back to {target!r}: classic BPF only jumps forward")
        return offset


def wireguard_filter(shed_shift: int = 0, exempt: Iterable[str] = ()) -> bytes:
    """The program for the WireGuard socket; ``shed_shift`` k > 0 passes one handshake
    message in 2^k at random (transport messages are never shed), except those from the
    ``exempt`` source addresses (the peers' endpoints: their rekeys go on during a flood
    that does not use their addresses)."""
    if not 0 <= shed_shift <= MAX_SHED_SHIFT:
        raise ValueError(f"shed_shift must be 0-{MAX_SHED_SHIFT}")
    p = Program()
    # shorter than 4 bytes: the load fails and the kernel drops
    p.op(BPF_LD_W_ABS, UDP_HEADER_LEN)
    p.op(BPF_JEQ_K, _type_word(MSG_TRANSPORT), "transport")
    p.op(BPF_JEQ_K, _type_word(MSG_INITIATION), "initiation")
    p.op(BPF_JEQ_K, _type_word(MSG_RESPONSE), "response")
    p.op(BPF_JEQ_K, _type_word(MSG_COOKIE_REPLY), "cookie", "drop")
    p.label("transport")
    p.op(BPF_LD_W_LEN)
    p.op(BPF_JGE_K, UDP_HEADER_LEN + DATA_MIN_LEN, "accept", "drop")
    for name, length in (("initiation", INIT_LEN), ("response", RESP_LEN),
                         ("cookie", COOKIE_REPLY_LEN)):
        p.label(name)
        p.op(BPF_LD_W_LEN)
        p.op(BPF_JEQ_K, UDP_HEADER_LEN + length, "handshake", "drop")
    p.label("accept")
    p.op(BPF_RET_K, ACCEPT_ALL)
    p.label("drop")
    p.op(BPF_RET_K, 0)
    # last, so that the jumps above stay short however long the list of exemptions
    p.label("handshake")
    if shed_shift:
        _exempt_sources(p, exempt)
        p.op(BPF_LD_W_RANDOM, SKF_AD_OFF + SKF_AD_RANDOM)
        p.op(BPF_ALU_AND_K, (1 << shed_shift) - 1)
        p.op(BPF_JEQ_K, 0, 0, 1)
    p.op(BPF_RET_K, ACCEPT_ALL)
    p.op(BPF_RET_K, 0)
    return p.assemble()


def _exempt_sources(p: Program, exempt: Iterable[str]) -> None:
    """Accept when the IP source address is one of ``exempt``, else fall through.

    The network header is read at SKF_NET_OFF; its version nibble picks the list (an IPv6
    socket may carry IPv4). At most MAX_EXEMPT_V4 and MAX_EXEMPT_V6 are listed; each
    match is followed by its own accepting return, so every jump stays short.
    """
    v4, v6 = [], []
    for text in exempt:
        ip = ipaddress.ip_address(text)
        if ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        (v4 if ip.version == 4 else v6).append(ip.packed)
    v4, v6 = sorted(set(v4))[:MAX_EXEMPT_V4], sorted(set(v6))[:MAX_EXEMPT_V6]
    if not v4 and not v6:
        return
    p.op(BPF_LDB_ABS, SKF_NET_OFF)
    p.op(BPF_ALU_AND_K, 0xF0)
    p.op(BPF_JEQ_K, 0x40, 1, 0)
    p.op(BPF_JA, "v6")  # JA's offset has 32 bits, the conditional jumps' only 8
    if v4:
        p.op(BPF_LD_W_ABS, SKF_NET_OFF + IPV4_SRC)
        for address in v4:
            p.op(BPF_JEQ_K, int.from_bytes(address, "big"), 0, 1)
            p.op(BPF_RET_K, ACCEPT_ALL)
    p.op(BPF_JA, "shed")
    p.label("v6")
    for i, address in enumerate(v6):
        nxt = f"v6-{i + 1}"
        for w, word in enumerate(struct.unpack("!4I", address)):
            p.op(BPF_LD_W_ABS, SKF_NET_OFF + IPV6_SRC + 4 * w)
            p.op(BPF_JEQ_K, word, 0, nxt)
        p.op(BPF_RET_K, ACCEPT_ALL)
        p.label(nxt)
    p.label("shed")


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def attach(sock: socket.socket, program: bytes) -> None:
    """Replace the socket's filter with ``program`` (atomically: no datagram goes
    unfiltered in between)."""
    code = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // _insn.size, ctypes.addressof(code))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, bytes(fprog))


def socket_drops(sock: socket.socket) -> int:
    """Datagrams the kernel dropped for this socket: refused by its filter, or arriving
    with its receive queue full (a 32-bit counter that wraps)."""
    try:
        info = sock.getsockopt(socket.SOL_SOCKET, SO_MEMINFO, 4 * SK_MEMINFO_VARS)
    except OSError:
        return 0
    return struct.unpack_from("=I", info, 4 * SK_MEMINFO_DROPS)[0]


class Shedding:
    """How many handshake messages the kernel lets through: a pure controller.

    Fed the number of handshake messages that reached us and the time, it answers with a
    new shift for :func:`wireguard_filter` when one is due: as soon as more than ``rate``
    a second arrive within a window, the share that passes is cut by four; after a window
    with less than a quarter of that, it is doubled again. Legitimate handshakes are a
    few a second per peer, so only a flood moves it.
    """

    __slots__ = ("rate", "window", "shift", "_start", "_count")

    def __init__(self, rate: float = 1000.0, window: float = 0.1) -> None:
        self.rate = rate
        self.window = window
        self.shift = 0
        self._start = float("-inf")
        self._count = 0

    def seen(self, count: int, now: float) -> int | None:
        """``count`` more handshake messages reached us: the new shift, or None."""
        new = self.tick(now)
        self._count += count
        if self._count > self.rate * self.window and self.shift < MAX_SHED_SHIFT:
            self.shift = min(MAX_SHED_SHIFT, self.shift + 2)
            self._start, self._count = now, 0
            return self.shift
        return new

    def tick(self, now: float) -> int | None:
        """Close the window when its time is up: the new shift, or None."""
        if now - self._start < self.window:
            return None
        quiet = self._count < self.rate * self.window / 4
        self._start, self._count = now, 0
        if quiet and self.shift:
            self.shift -= 1
            return self.shift
        return None
