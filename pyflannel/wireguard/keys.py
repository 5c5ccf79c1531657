"""X25519 keys as WireGuard writes them (base64 of 32 bytes) and the node's key file.

The key file keeps a node's public key stable across restarts, so its lease's
``BackendData.PublicKey`` and its peers' configuration stay valid. It is created with mode
0600 from the first byte on (never readable by others, even briefly) and replaced only by
an atomic link, so a crash cannot leave a half-written key behind.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from .constants import KEY_LEN

log = logging.getLogger(__name__)

DEFAULT_KEY_FILE = "/run/flannel/wgkey"
KEY_FILE_ENV = "WIREGUARD_KEY_FILE"


class InvalidKeyError(ValueError):
    """A key that is not 32 bytes of base64."""


class KeyFileError(RuntimeError):
    """The key file exists but cannot be read or does not hold a private key (one line)."""


def decode_key(text: str | bytes) -> bytes:
    """Decode a WireGuard base64 key (44 characters, 32 bytes); raise InvalidKeyError if not one."""
    if isinstance(text, bytes):
        try:
            text = text.decode("ascii")
        except UnicodeDecodeError:
            raise InvalidKeyError("key is not ASCII base64") from None
    text = text.strip()
    if len(text) != 44 or not text.endswith("="):
        raise InvalidKeyError("key must be 44 base64 characters (32 bytes)")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidKeyError("key is not valid base64") from None
    if len(raw) != KEY_LEN or base64.b64encode(raw).decode() != text:
        raise InvalidKeyError("key must be 44 base64 characters (32 bytes)")
    return raw


def encode_key(raw: bytes) -> str:
    """Base64 of a 32-byte key, as `wg` and flannel's lease JSON write it."""
    if len(raw) != KEY_LEN:
        raise InvalidKeyError("key must be 32 bytes")
    return base64.b64encode(raw).decode("ascii")


def short_key(raw: bytes) -> str:
    """The first 8 base64 characters of a public key: enough to tell peers apart in status."""
    return encode_key(raw)[:8] + "…"


class PrivateKey:
    """A static X25519 private key; its repr names the public key only, never the secret."""

    __slots__ = ("_key", "public")

    def __init__(self, key: X25519PrivateKey) -> None:
        self._key = key
        self.public: bytes = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    @classmethod
    def generate(cls) -> PrivateKey:
        """A fresh random key."""
        return cls(X25519PrivateKey.generate())

    @classmethod
    def from_bytes(cls, raw: bytes) -> PrivateKey:
        """From 32 raw bytes (clamping is X25519's business, as with `wg`)."""
        if len(raw) != KEY_LEN:
            raise InvalidKeyError("private key must be 32 bytes")
        return cls(X25519PrivateKey.from_private_bytes(raw))

    @classmethod
    def from_base64(cls, text: str | bytes) -> PrivateKey:
        """From the base64 form `wg genkey` prints."""
        return cls.from_bytes(decode_key(text))

    @property
    def x25519(self) -> X25519PrivateKey:
        """The `cryptography` key object, for DH."""
        return self._key

    def to_base64(self) -> str:
        """The secret in `wg genkey` form; only for writing the key file or `wg set`."""
        raw = self._key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        return encode_key(raw)

    @property
    def public_base64(self) -> str:
        """The public key as the lease's BackendData.PublicKey carries it."""
        return encode_key(self.public)

    def __repr__(self) -> str:
        return f"PrivateKey(public={short_key(self.public)})"

    __str__ = __repr__

    def __reduce__(self) -> None:  # type: ignore[override]
        raise TypeError("PrivateKey is not picklable (it would copy the secret)")


# Any clamped scalar is a multiple of the cofactor 8 and smaller than the prime orders, so
# DH with it gives the all-zero output (which X25519 refuses) exactly for the low-order
# points; the scalar is a probe, not a secret.
_PROBE = X25519PrivateKey.from_private_bytes(bytes(range(1, KEY_LEN + 1)))


def check_public_key(raw: bytes, own: bytes | None = None) -> bytes:
    """The one rule for a usable peer public key: 32 bytes, not a low-order point (no
    shared secret can come of it, and it would let anyone pass for that peer), and not
    ``own``, this node's key. Raises InvalidKeyError saying which; returns ``raw``."""
    if len(raw) != KEY_LEN:
        raise InvalidKeyError("key must be 32 bytes")
    try:
        _PROBE.exchange(X25519PublicKey.from_public_bytes(raw))
    except ValueError:
        raise InvalidKeyError("key is a low-order point") from None
    if own is not None and raw == own:
        raise InvalidKeyError("key is this node's own public key")
    return raw


def public_from_base64(text: str | bytes, own: bytes | None = None) -> bytes:
    """A peer's public key from a lease, as 32 raw bytes, if :func:`check_public_key`
    finds it usable (else InvalidKeyError)."""
    return check_public_key(decode_key(text), own)


def key_file_path() -> Path:
    """Where the key lives: $WIREGUARD_KEY_FILE, else /run/flannel/wgkey (flannel's choice)."""
    return Path(os.environ.get(KEY_FILE_ENV) or DEFAULT_KEY_FILE)


def load_or_create_key(path: str | os.PathLike[str] | None = None) -> PrivateKey:
    """Read the node's private key, creating the file (0600, atomically) if it is absent."""
    target = Path(path) if path is not None else key_file_path()
    try:
        return _read_key_file(target)
    except FileNotFoundError:
        pass
    key = PrivateKey.generate()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{os.urandom(4).hex()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        try:
            os.fchmod(fd, 0o600)  # the umask may have taken bits away, never added any
            os.write(fd, key.to_base64().encode("ascii") + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, target)  # atomic and never clobbers a key another process wrote
        except FileExistsError:
            return _read_key_file(target)
    finally:
        tmp.unlink(missing_ok=True)
    return key


def read_key_file(path: str | os.PathLike[str]) -> PrivateKey:
    """Read an existing key file, never creating one: for the fast-path process, which
    must use the very key whose public half the backend published."""
    try:
        return _read_key_file(Path(path))
    except FileNotFoundError:
        raise KeyFileError(f"WireGuard key file {path} is missing") from None


def _read_key_file(path: Path) -> PrivateKey:
    try:
        mode = path.stat().st_mode
        data = path.read_bytes()
    except FileNotFoundError:
        raise
    except OSError as e:
        raise KeyFileError(f"cannot read WireGuard key file {path}: {e.strerror}") from None
    if mode & 0o077:
        log.warning("WireGuard key file %s is readable by others (mode %o); chmod 600 it",
                    path, mode & 0o777)
    try:
        return PrivateKey.from_base64(data)
    except (InvalidKeyError, ValueError):
        raise KeyFileError(
            f"WireGuard key file {path} is malformed: expected one base64 private key "
            "(44 characters, as `wg genkey` writes)"
        ) from None

