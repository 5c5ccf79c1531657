"""Transport data messages and the sliding replay window."""

from __future__ import annotations

import os

import pytest
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from pyflannel.wireguard.constants import DATA_MIN_LEN, DATA_PAYLOAD, MSG_TRANSPORT
from pyflannel.wireguard.transport import (
    InvalidTag,
    Keypair,
    ReplayWindow,
    is_transport,
    padded_length,
    parse_receiver,
)


def _pair(limit: int | None = None) -> tuple[Keypair, Keypair]:
    k1, k2 = os.urandom(32), os.urandom(32)
    extra = {} if limit is None else {"reject_after_messages": limit}
    return (Keypair(k1, k2, 0x11, 0x22, True, 0.0, **extra),
            Keypair(k2, k1, 0x22, 0x11, False, 0.0, **extra))


def test_padding() -> None:
    assert [padded_length(n) for n in (0, 1, 15, 16, 17, 1420)] == [0, 16, 16, 16, 32, 1424]
    assert padded_length(1419, mtu=1420) == 1420  # never padded past the MTU
    assert padded_length(1400, mtu=1420) == 1408


def test_message_layout_and_round_trip() -> None:
    tx, rx = _pair()
    packet = os.urandom(100)
    msg = bytes(tx.seal(packet))
    assert msg[0] == MSG_TRANSPORT and msg[1:4] == b"\0\0\0" and is_transport(msg)
    assert parse_receiver(msg) == 0x22  # the receiver's index
    assert int.from_bytes(msg[8:16], "little") == 0
    assert len(msg) == DATA_PAYLOAD + 112 + 16
    plain = rx.open(msg)
    assert plain == packet + bytes(12)  # zero padding to 16
    # an independent decryption with the documented nonce
    key = os.urandom(32)
    one = Keypair(key, key, 1, 2, True, 0.0)
    one.send_counter = 0x0102030405
    m = bytes(one.seal(b"abc"))
    nonce = bytes(4) + (0x0102030405).to_bytes(8, "little")
    assert ChaCha20Poly1305(key).decrypt(nonce, m[DATA_PAYLOAD:], None) == b"abc" + bytes(13)


def test_keepalive_is_an_empty_payload() -> None:
    tx, rx = _pair()
    msg = bytes(tx.seal(b""))
    assert len(msg) == DATA_MIN_LEN == 32
    assert rx.open(msg) == b""


def test_seal_into_matches_seal_and_open_into() -> None:
    tx, rx = _pair()
    packet = os.urandom(1419)
    buf = bytearray(2048)
    buf[DATA_PAYLOAD:DATA_PAYLOAD + len(packet)] = packet
    n = tx.seal_into(memoryview(buf), len(packet))
    assert n == DATA_PAYLOAD + 1424 + 16
    out = bytearray(2048)
    got = rx.open_into(memoryview(bytes(buf[:n])), memoryview(out))
    assert got == 1424 and bytes(out[:1419]) == packet and out[1419:1424] == bytes(5)
    assert rx.open_into(memoryview(bytes(buf[:n])), memoryview(out)) == -1  # replay


def test_counters_increase_and_replays_are_refused() -> None:
    tx, rx = _pair()
    msgs = [bytes(tx.seal(b"x" * i)) for i in range(5)]
    assert [int.from_bytes(m[8:16], "little") for m in msgs] == list(range(5))
    for m in reversed(msgs):  # out of order inside the window is fine
        assert rx.open(m) is not None
    for m in msgs:
        assert rx.open(m) is None


def test_forgery_raises_and_does_not_move_the_window() -> None:
    tx, rx = _pair()
    msg = bytearray(tx.seal(b"hello"))
    forged = bytearray(msg)
    forged[8:16] = (10_000).to_bytes(8, "little")  # a counter far ahead
    with pytest.raises(InvalidTag):
        rx.open(bytes(forged))
    assert rx.replay.greatest == -1
    assert rx.open(bytes(msg)) == b"hello" + bytes(11)


def test_replay_window_rfc6479() -> None:
    w = ReplayWindow(bits=2048)
    assert w.window == 2048 - 64
    assert all(w.accept(i) for i in range(100))
    assert not w.accept(50)
    assert w.accept(5000)
    assert not w.accept(5000)
    assert w.accept(5000 - w.window + 1)  # the oldest still inside the window
    assert not w.accept(5000 - w.window)  # too old
    assert not w.check(5000 - w.window)
    assert w.accept(4999) and not w.check(4999)
    assert w.accept(1_000_000)  # a long jump clears the ring
    assert w.accept(1_000_000 - 100)


def test_replay_window_limit() -> None:
    w = ReplayWindow(bits=128, limit=10)
    assert w.accept(9)
    assert not w.accept(10) and not w.check(10)


def test_replay_window_against_a_set_model() -> None:
    import random

    rng = random.Random(7)
    w = ReplayWindow(bits=1024)
    seen: set[int] = set()
    greatest = -1
    for _ in range(20_000):
        n = max(0, greatest + rng.randint(-1100, 40))
        fresh = n not in seen and (n > greatest or greatest - n < w.window)
        assert w.accept(n) == fresh, n
        if fresh:
            seen.add(n)
            greatest = max(greatest, n)


def test_window_size_must_be_power_of_two_blocks() -> None:
    with pytest.raises(ValueError):
        ReplayWindow(bits=64 * 3)


@pytest.mark.parametrize("have_into", [True, False])
def test_same_bytes_with_and_without_encrypt_into(monkeypatch: pytest.MonkeyPatch,
                                                  have_into: bool) -> None:
    import pyflannel.wireguard.transport as transport

    k1, k2 = bytes(range(32)), bytes(range(32, 64))
    expected = bytes(Keypair(k1, k2, 1, 2, True, 0.0).seal(b"abc" * 10))
    monkeypatch.setattr(transport, "_HAVE_INTO", have_into)
    tx, rx = Keypair(k1, k2, 1, 2, True, 0.0), Keypair(k2, k1, 2, 1, False, 0.0)
    assert bytes(tx.seal(b"abc" * 10)) == expected
    buf = bytearray(200)
    buf[DATA_PAYLOAD:DATA_PAYLOAD + 30] = b"abc" * 10
    n = tx.seal_into(memoryview(buf), 30)
    out = bytearray(100)
    assert rx.open_into(memoryview(bytes(buf[:n])), memoryview(out)) == 32
    assert bytes(out[:30]) == b"abc" * 10
    assert rx.open(expected) == b"abc" * 10 + bytes(2)
