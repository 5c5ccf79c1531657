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
import socket
import struct

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
        self._rows: list[tuple[int, str | int, str | int, int]] = []
        self._labels: dict[str, int] = {}

    def label(self, name: str) -> None:
        self._labels[name] = len(self._rows)

    def op(self, code: int, k: int = 0, jt: str | int = 0, jf: str | int = 0) -> None:
        self._rows.append((code, jt, jf, k & 0xFFFFFFFF))

    def assemble(self) -> bytes:
        out = bytearray()
        for pc, (code, jt, jf, k) in enumerate(self._rows):
            out += _insn.pack(code, self._offset(pc, jt), self._offset(pc, jf), k)
        return bytes(out)

    def _offset(self, pc: int, target: str | int) -> int:
        if isinstance(target, int):
            return target
        return self._labels[target] - pc - 1


def wireguard_filter(shed_shift: int = 0) -> bytes:
    """The program for the WireGuard socket; ``shed_shift`` k > 0 passes one handshake
    message in 2^k at random (transport messages are never shed)."""
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
    p.label("handshake")
    if shed_shift:
        p.op(BPF_LD_W_RANDOM, SKF_AD_OFF + SKF_AD_RANDOM)
        p.op(BPF_ALU_AND_K, (1 << shed_shift) - 1)
        p.op(BPF_JEQ_K, 0, "accept", "drop")
    p.label("accept")
    p.op(BPF_RET_K, ACCEPT_ALL)
    p.label("drop")
    p.op(BPF_RET_K, 0)
    return p.assemble()


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
