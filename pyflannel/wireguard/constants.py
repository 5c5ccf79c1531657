"""WireGuard protocol constants and message layouts (the whitepaper's numbers, in one place).

Every field of every message has a named offset here, so the code that builds and parses
messages never carries a bare index such as ``buf[24]``.
"""

from __future__ import annotations

from dataclasses import dataclass

CONSTRUCTION = b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s"
IDENTIFIER = b"WireGuard v1 zx2c4 Jason@zx2c4.com"
LABEL_MAC1 = b"mac1----"
LABEL_COOKIE = b"cookie--"

KEY_LEN = 32  # X25519 keys, chaining keys, hashes, symmetric keys
HASH_LEN = 32
MAC_LEN = 16  # keyed BLAKE2s-128: mac1, mac2, cookies
TAG_LEN = 16  # Poly1305
TAI64N_LEN = 12
COOKIE_LEN = 16
XNONCE_LEN = 24  # XChaCha20-Poly1305 nonce of cookie replies
COUNTER_LEN = 8
PAD_MULTIPLE = 16  # transport payloads are zero-padded to a multiple of this

# Message types: the first byte; the next three bytes are reserved zeros, so the first
# four bytes read as one little-endian u32 equal to the type.
MSG_INITIATION = 1
MSG_RESPONSE = 2
MSG_COOKIE_REPLY = 3
MSG_TRANSPORT = 4
TYPE_LEN = 4
TYPE_OFFSET = 0  # the message type byte
RESERVED = slice(1, TYPE_LEN)  # three reserved bytes, zero
HEADER_INITIATION = bytes((MSG_INITIATION, 0, 0, 0))
HEADER_RESPONSE = bytes((MSG_RESPONSE, 0, 0, 0))
HEADER_COOKIE_REPLY = bytes((MSG_COOKIE_REPLY, 0, 0, 0))
HEADER_TRANSPORT = bytes((MSG_TRANSPORT, 0, 0, 0))

# Handshake initiation (148 bytes).
INIT_TYPE = 0
INIT_SENDER = 4
INIT_EPHEMERAL = 8
INIT_STATIC = INIT_EPHEMERAL + KEY_LEN  # 40: AEAD(static public key), 32 + 16
INIT_TIMESTAMP = INIT_STATIC + KEY_LEN + TAG_LEN  # 88: AEAD(TAI64N), 12 + 16
INIT_MAC1 = INIT_TIMESTAMP + TAI64N_LEN + TAG_LEN  # 116
INIT_MAC2 = INIT_MAC1 + MAC_LEN  # 132
INIT_LEN = INIT_MAC2 + MAC_LEN  # 148

# Handshake response (92 bytes).
RESP_TYPE = 0
RESP_SENDER = 4
RESP_RECEIVER = 8
RESP_EPHEMERAL = 12
RESP_EMPTY = RESP_EPHEMERAL + KEY_LEN  # 44: AEAD(empty), the tag alone
RESP_MAC1 = RESP_EMPTY + TAG_LEN  # 60
RESP_MAC2 = RESP_MAC1 + MAC_LEN  # 76
RESP_LEN = RESP_MAC2 + MAC_LEN  # 92

# Cookie reply (64 bytes).
COOKIE_TYPE = 0
COOKIE_RECEIVER = 4
COOKIE_NONCE = 8
COOKIE_ENCRYPTED = COOKIE_NONCE + XNONCE_LEN  # 32: XAEAD(cookie), 16 + 16
COOKIE_REPLY_LEN = COOKIE_ENCRYPTED + COOKIE_LEN + TAG_LEN  # 64

# Transport data (32 bytes at least: a keepalive is the header and a bare tag).
DATA_TYPE = 0
DATA_RECEIVER = 4
DATA_COUNTER = 8
DATA_PAYLOAD = DATA_COUNTER + COUNTER_LEN  # 16
DATA_MIN_LEN = DATA_PAYLOAD + TAG_LEN  # 32
INDEX_LEN = 4

# The largest datagram we accept: a 64 KiB UDP payload.
MAX_DATAGRAM = 65535

# Limits on messages and time (seconds), from the whitepaper section 6.
REKEY_AFTER_MESSAGES = 1 << 60
REJECT_AFTER_MESSAGES = (1 << 64) - (1 << 13) - 1
REKEY_AFTER_TIME = 120.0
REJECT_AFTER_TIME = 180.0
REKEY_ATTEMPT_TIME = 90.0
REKEY_TIMEOUT = 5.0
KEEPALIVE_TIMEOUT = 10.0
COOKIE_REFRESH_TIME = 120.0  # the responder's cookie secret changes, and cookies expire
REKEY_TIMEOUT_JITTER_MAX = 0.333
INITIATIONS_PER_SECOND = 50  # flood protection: initiations consumed per peer per second
ZERO_KEYS_AFTER = REJECT_AFTER_TIME * 3
MAX_STAGED_PACKETS = 128  # packets held for a peer while its handshake is in flight

# The sliding replay window (bits). The kernel uses 8192, which is why the message limit
# above stops 2^13 short of 2^64.
REPLAY_WINDOW_BITS = 8192

# TAI64 labels count from 2^62; the offset of 10 s is TAI-UTC in 1972, as wireguard-go uses.
TAI64_BASE = (1 << 62) + 10
# Nanoseconds are rounded down to 2^24 ns (~16.8 ms) so the timestamp does not leak a
# fine clock to an observer who can decrypt it (same as wireguard-go's whitening).
TAI64N_WHITEN_MASK = (1 << 24) - 1


@dataclass(frozen=True, slots=True)
class Limits:
    """The protocol's time and message limits; tests shorten them, production uses defaults."""

    rekey_after_messages: int = REKEY_AFTER_MESSAGES
    reject_after_messages: int = REJECT_AFTER_MESSAGES
    rekey_after_time: float = REKEY_AFTER_TIME
    reject_after_time: float = REJECT_AFTER_TIME
    rekey_attempt_time: float = REKEY_ATTEMPT_TIME
    rekey_timeout: float = REKEY_TIMEOUT
    keepalive_timeout: float = KEEPALIVE_TIMEOUT
    cookie_refresh_time: float = COOKIE_REFRESH_TIME
    jitter_max: float = REKEY_TIMEOUT_JITTER_MAX
    initiations_per_second: float = INITIATIONS_PER_SECOND
    zero_keys_after: float = ZERO_KEYS_AFTER
    max_staged_packets: int = MAX_STAGED_PACKETS

    @property
    def max_handshake_attempts(self) -> int:
        """How many initiations are sent before giving up (90 s / 5 s = 18 by default)."""
        return max(1, int(self.rekey_attempt_time / self.rekey_timeout))

    @property
    def receive_rekey_age(self) -> float:
        """An initiator that only receives rekeys when its keys are this old (165 s)."""
        return self.reject_after_time - self.keepalive_timeout - self.rekey_timeout

    @property
    def new_handshake_after(self) -> float:
        """Data sent and nothing heard for this long means the session is dead (15 s)."""
        return self.keepalive_timeout + self.rekey_timeout


DEFAULT_LIMITS = Limits()
