"""Keys in WireGuard's base64 form, the key file (0600, atomic, reused) and no key leaks."""

from __future__ import annotations

import base64
import os
import pickle
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from pyflannel.wireguard.keys import (
    DEFAULT_KEY_FILE,
    InvalidKeyError,
    KeyFileError,
    PrivateKey,
    decode_key,
    encode_key,
    key_file_path,
    load_or_create_key,
    public_from_base64,
    short_key,
)
from tests.conftest import _need


def test_base64_round_trip() -> None:
    raw = bytes(range(32))
    text = encode_key(raw)
    assert len(text) == 44 and decode_key(text) == raw
    assert decode_key(text.encode() + b"\n") == raw


@pytest.mark.parametrize("bad", [
    "", "abc", base64.b64encode(bytes(31)).decode(), base64.b64encode(bytes(33)).decode(),
    "!" * 43 + "=", base64.b64encode(bytes(32)).decode()[:-1] + "A",
    base64.b64encode(bytes(32)).decode()[:-2] + "B=",  # non-canonical trailing bits
    b"\xff" * 44,
])
def test_decode_rejects_what_is_not_a_key(bad: str | bytes) -> None:
    with pytest.raises(InvalidKeyError):
        decode_key(bad)


def test_repr_and_str_never_show_the_private_key() -> None:
    key = PrivateKey.generate()
    secret = key.to_base64()
    for text in (repr(key), str(key), f"{key}", repr([key])):
        assert secret not in text and secret[:8] not in text
    assert short_key(key.public) in repr(key)
    with pytest.raises(TypeError):
        pickle.dumps(key)


def test_public_key_validation() -> None:
    key = PrivateKey.generate()
    assert public_from_base64(key.public_base64) == key.public
    with pytest.raises(InvalidKeyError):
        public_from_base64("not a key")


def test_key_file_created_0600_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "run" / "flannel" / "wgkey"
    old_umask = os.umask(0)  # even with a permissive umask, the file is never group/other
    try:
        first = load_or_create_key(path)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert PrivateKey.from_base64(path.read_text()).public == first.public
    second = load_or_create_key(path)
    assert second.public == first.public  # a restart keeps the node's public key
    assert sorted(p.name for p in path.parent.iterdir()) == ["wgkey"]  # no temp files left


def test_key_file_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WIREGUARD_KEY_FILE", raising=False)
    assert key_file_path() == Path(DEFAULT_KEY_FILE)
    path = tmp_path / "custom-key"
    monkeypatch.setenv("WIREGUARD_KEY_FILE", str(path))
    assert key_file_path() == path
    key = load_or_create_key()
    assert path.exists() and load_or_create_key().public == key.public


def test_existing_wg_genkey_file_is_used(tmp_path: Path) -> None:
    key = PrivateKey.generate()
    path = tmp_path / "wgkey"
    path.write_text(key.to_base64())  # as flanneld or `wg genkey > file` leaves it
    assert load_or_create_key(path).public == key.public


@pytest.mark.parametrize("content", [b"", b"garbage\n", b"A" * 44, b"\x00" * 32])
def test_malformed_key_file_is_one_clear_line(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "wgkey"
    path.write_bytes(content)
    with pytest.raises(KeyFileError) as info:
        load_or_create_key(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and "malformed" in message
    assert path.read_bytes() == content  # never overwritten


def test_unreadable_key_file_is_one_clear_line(tmp_path: Path) -> None:
    path = tmp_path / "wgkey"
    path.mkdir()  # a directory where the key should be: unreadable as a file, even for root
    with pytest.raises(KeyFileError) as info:
        load_or_create_key(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_public_key_agrees_with_wg_pubkey() -> None:
    _need(None if shutil.which("wg") else "wg not installed (apt-get install wireguard-tools)")
    key = PrivateKey.generate()
    out = subprocess.run(["wg", "pubkey"], input=key.to_base64() + "\n", capture_output=True,
                         text=True, check=True, timeout=10).stdout.strip()
    assert out == key.public_base64


def test_loose_key_file_mode_is_warned_about(tmp_path: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:
    key = PrivateKey.generate()
    path = tmp_path / "wgkey"
    path.write_text(key.to_base64())
    path.chmod(0o644)
    with caplog.at_level("WARNING"):
        assert load_or_create_key(path).public == key.public
    assert "readable by others" in caplog.text and key.to_base64() not in caplog.text
