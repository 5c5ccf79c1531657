"""Transport data messages (type 4): the per-datagram hot path, and the replay window.

A message is ``04 00 00 00 | receiver index (LE32) | counter (LE64) | AEAD(payload)``,
with the payload zero-padded to a multiple of 16 and the AEAD nonce being four zero bytes
followed by the same counter. A keepalive is a message with an empty payload.

Everything per datagram is precomputed per keypair: the two ChaCha20Poly1305 objects and
the 8-byte message prefix. :meth:`Keypair.seal_into` encrypts in place inside a buffer the
caller owns (no allocation but the nonce); :meth:`Keypair.seal_parts` seals padded packets (a
super-packet's segments) as consecutive messages in such a buffer;
:meth:`Keypair.seal` and :meth:`Keypair.open` are the allocating forms.

Every send counter comes from :meth:`Keypair.take_counters`, the one place that refuses
to pass REJECT_AFTER_MESSAGES: a nonce is never reused, and never past the limit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from .constants import (
    DATA_COUNTER,
    DATA_MIN_LEN,
    DATA_PAYLOAD,
    DATA_RECEIVER,
    DATA_TYPE,
    HEADER_TRANSPORT,
    INDEX_LEN,
    PAD_MULTIPLE,
    REJECT_AFTER_MESSAGES,
    REPLAY_WINDOW_BITS,
    TAG_LEN,
)

__all__ = [
    "CounterExhausted",
    "InvalidTag",
    "Keypair",
    "ReplayWindow",
    "padded_length",
    "parse_receiver",
]

_NONCE_PAD = b"\0\0\0\0"
_PAD_MASK = ~(PAD_MULTIPLE - 1)
# encrypt_into/decrypt_into arrived in later `cryptography` releases; without them the
# same results come from encrypt/decrypt and a copy.
_HAVE_INTO = hasattr(ChaCha20Poly1305, "encrypt_into")
_BLOCK_BITS = 64


def padded_length(length: int, mtu: int | None = None) -> int:
    """The payload length after padding to 16, never past the MTU (as the kernel pads)."""
    padded = (length + PAD_MULTIPLE - 1) & _PAD_MASK
    if mtu is not None and padded > mtu >= length:
        return mtu
    return padded


def parse_receiver(msg: bytes | memoryview) -> int:
    """The receiver index of a transport message: which keypair to try."""
    return int.from_bytes(msg[DATA_RECEIVER:DATA_COUNTER], "little")


class ReplayWindow:
    """RFC 6479 sliding window: a ring of 64-bit blocks, so advancing clears whole blocks.

    With ``bits`` = 8192 a counter up to 8128 behind the greatest one seen is still accepted
    once; anything older, or seen before, is refused.
    """

    __slots__ = ("_blocks", "_greatest", "_mask", "_nblocks", "window", "limit")

    def __init__(self, bits: int = REPLAY_WINDOW_BITS, limit: int = REJECT_AFTER_MESSAGES) -> None:
        nblocks = bits // _BLOCK_BITS
        if nblocks < 2 or nblocks & (nblocks - 1):
            raise ValueError("replay window must be a power-of-two number of 64-bit blocks")
        self._nblocks = nblocks
        self._mask = nblocks - 1
        self._blocks = [0] * nblocks
        self._greatest = -1
        self.window = (nblocks - 1) * _BLOCK_BITS
        self.limit = limit

    def check(self, counter: int) -> bool:
        """Could this counter be fresh? (Cheap test before spending a decryption on it.)"""
        if counter >= self.limit:
            return False
        greatest = self._greatest
        if counter > greatest:
            return True
        if greatest - counter >= self.window:
            return False
        return not self._blocks[(counter >> 6) & self._mask] >> (counter & 63) & 1

    def accept(self, counter: int) -> bool:
        """Record an authenticated counter; False if it is a replay or too old."""
        if counter >= self.limit:
            return False
        blocks = self._blocks
        greatest = self._greatest
        if counter > greatest:
            top = counter >> 6
            old_top = greatest >> 6
            if top != old_top:  # entering new blocks: clear them (once per 64 counters)
                if top - old_top >= self._nblocks:
                    blocks[:] = [0] * self._nblocks
                else:
                    mask = self._mask
                    for i in range(old_top + 1, top + 1):
                        blocks[i & mask] = 0
            self._greatest = counter
        elif greatest - counter >= self.window:
            return False
        idx = (counter >> 6) & self._mask
        bit = 1 << (counter & 63)
        block = blocks[idx]
        if block & bit:
            return False
        blocks[idx] = block | bit
        return True

    @property
    def greatest(self) -> int:
        """The greatest counter accepted so far (-1 before any)."""
        return self._greatest


class CounterExhausted(Exception):
    """The session has sent REJECT_AFTER_MESSAGES messages: it may not send another."""


class Keypair:
    """One session's keys in one direction pair, with counters and the replay window.

    ``created`` is the monotonic time of the handshake; the session layer decides from it
    and from :meth:`counters_left` when the keys are too old to use.
    """

    __slots__ = (
        "_send", "_recv", "local_index", "remote_index", "initiator", "created",
        "send_counter", "send_limit", "replay", "prefix", "peer", "rekey_at", "expires_at",
    )

    def __init__(
        self, send_key: bytes, recv_key: bytes, local_index: int, remote_index: int,
        initiator: bool, created: float, *, window_bits: int = REPLAY_WINDOW_BITS,
        reject_after_messages: int = REJECT_AFTER_MESSAGES, peer: object = None,
    ) -> None:
        self._send = ChaCha20Poly1305(send_key)
        self._recv = ChaCha20Poly1305(recv_key)
        self.local_index = local_index
        self.remote_index = remote_index
        self.initiator = initiator
        self.created = created
        self.send_counter = 0
        self.send_limit = reject_after_messages
        self.replay = ReplayWindow(window_bits, reject_after_messages)
        self.prefix = HEADER_TRANSPORT + remote_index.to_bytes(INDEX_LEN, "little")
        self.peer = peer
        # set by the session layer from its limits: when to rekey, when to stop using it
        self.rekey_at = float("inf")
        self.expires_at = float("inf")

    def __repr__(self) -> str:
        return (f"Keypair(local={self.local_index:#010x}, remote={self.remote_index:#010x}, "
                f"initiator={self.initiator}, sent={self.send_counter})")

    # --- send ---------------------------------------------------------------------------

    def counters_left(self) -> int:
        """How many more messages this session may send."""
        return self.send_limit - self.send_counter

    def take_counters(self, k: int = 1) -> int:
        """The first of ``k`` consecutive send counters, or -1 if taking them would pass
        REJECT_AFTER_MESSAGES (then none is taken). Every counter is taken here."""
        n = self.send_counter
        if n + k > self.send_limit:
            return -1
        self.send_counter = n + k
        return n

    def seal(self, payload: bytes | bytearray | memoryview, mtu: int | None = None) -> bytearray:
        """Encrypt one inner packet (or b"" for a keepalive) into a whole type-4 message.

        Raises CounterExhausted when the session may send no more.
        """
        counter = self.take_counters()
        if counter < 0:
            raise CounterExhausted(repr(self))
        length = len(payload)
        padded = padded_length(length, mtu)
        out = bytearray(DATA_MIN_LEN + padded)
        self.seal_parts(out, 0, counter, (b"".join((payload, bytes(padded - length))),), 0)
        return out

    def seal_parts(self, buf: bytearray, off: int, counter: int,
                   parts: Sequence[bytes | bytearray], stride: int) -> None:
        """Seal each of ``parts`` (padded packets, e.g. the segments of one super-packet)
        as one message, with consecutive counters from ``counter`` (taken by
        :meth:`take_counters`), at ``buf[off:]``, ``buf[off + stride:]`` and so on."""
        prefix, encrypt = self.prefix, self._send.encrypt
        for plain in parts:
            ctr = counter.to_bytes(8, "little")
            p = off + DATA_PAYLOAD
            buf[off:p] = prefix + ctr
            # encrypt (not encrypt_into) from bytes: faster in `cryptography` than in
            # place through memoryviews
            buf[p:p + len(plain) + TAG_LEN] = encrypt(_NONCE_PAD + ctr, plain, None)
            counter += 1
            off += stride

    def seal_into(self, buf: memoryview, length: int, mtu: int | None = None) -> int:
        """Encrypt in place: the packet sits at ``buf[16:16+length]``; return the message size.

        ``buf`` must have room for the padding and the 16-byte tag after the packet. The
        header and counter are written to ``buf[0:16]``; nothing is allocated but the nonce.
        Raises CounterExhausted when the session may send no more.
        """
        n = self.take_counters()
        if n < 0:
            raise CounterExhausted(repr(self))
        padded = padded_length(length, mtu)
        end = DATA_PAYLOAD + padded
        if padded != length:
            buf[DATA_PAYLOAD + length : end] = bytes(padded - length)
        ctr = n.to_bytes(8, "little")
        buf[0:DATA_COUNTER] = self.prefix
        buf[DATA_COUNTER:DATA_PAYLOAD] = ctr
        if _HAVE_INTO:
            self._send.encrypt_into(_NONCE_PAD + ctr, buf[DATA_PAYLOAD:end], None,
                                    buf[DATA_PAYLOAD : end + TAG_LEN])
        else:
            buf[DATA_PAYLOAD : end + TAG_LEN] = self._send.encrypt(
                _NONCE_PAD + ctr, bytes(buf[DATA_PAYLOAD:end]), None)
        return end + TAG_LEN

    # --- receive ------------------------------------------------------------------------

    def open(self, msg: bytes | memoryview) -> bytes | None:
        """Decrypt a type-4 message addressed to this keypair; None if replayed or too old.

        Raises InvalidTag for a forgery. The replay window is updated only after the tag
        verified, so a forged counter cannot move it. Returns the padded payload (b"" for a
        keepalive).
        """
        ctr = msg[DATA_COUNTER:DATA_PAYLOAD]
        counter = int.from_bytes(ctr, "little")
        replay = self.replay
        greatest = replay._greatest
        if counter >= replay.limit or (counter <= greatest
                                       and greatest - counter >= replay.window):
            return None  # hopeless before decrypting; duplicates are caught after
        plain = self._recv.decrypt(_NONCE_PAD + ctr, msg[DATA_PAYLOAD:], None)
        if not replay.accept(counter):
            return None
        return plain

    def opener(self) -> tuple[Callable[..., bytes], Callable[[int], bool]]:
        """(decrypt, accept) for a caller that inlines :meth:`open` in its own loop."""
        return self._recv.decrypt, self.replay.accept

    def open_into(self, msg: memoryview, out: memoryview) -> int:
        """Like :meth:`open`, writing the payload into ``out``; -1 for a replay.

        Raises InvalidTag when the message is forged.
        """
        ctr = msg[DATA_COUNTER:DATA_PAYLOAD]
        counter = int.from_bytes(ctr, "little")
        replay = self.replay
        if not replay.check(counter):
            return -1
        n = len(msg) - DATA_MIN_LEN
        if _HAVE_INTO:
            self._recv.decrypt_into(_NONCE_PAD + bytes(ctr), msg[DATA_PAYLOAD:], None, out[:n])
        else:
            out[:n] = self._recv.decrypt(_NONCE_PAD + bytes(ctr), bytes(msg[DATA_PAYLOAD:]), None)
        if not replay.accept(counter):
            return -1
        return n


def is_transport(msg: bytes | memoryview) -> bool:
    """A quick type test for dispatch: type byte 4, reserved bytes zero, long enough."""
    return len(msg) >= DATA_MIN_LEN and msg[DATA_TYPE:DATA_RECEIVER] == HEADER_TRANSPORT
