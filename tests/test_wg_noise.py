"""The handshake functions on their own: Noise_IKpsk2, mac1/mac2, cookie replies."""

from __future__ import annotations

import os

import pytest

from pyflannel.wireguard.constants import (
    COOKIE_REPLY_LEN,
    INIT_LEN,
    INIT_MAC1,
    INIT_MAC2,
    RESP_LEN,
    RESP_MAC2,
)
from pyflannel.wireguard.crypto import tai64n
from pyflannel.wireguard.keys import PrivateKey
from pyflannel.wireguard.noise import (
    CookieChecker,
    HandshakeError,
    LocalIdentity,
    PeerIdentity,
    address_bytes,
    check_mac1,
    check_mac2,
    consume_initiation,
    consume_response,
    create_initiation,
    create_response,
    open_cookie_reply,
    seal_macs,
)


def _sides(psk_i: bytes | None = None, psk_r: bytes | None = None):
    ki, kr = PrivateKey.generate(), PrivateKey.generate()
    li, lr = LocalIdentity(ki), LocalIdentity(kr)
    return li, lr, PeerIdentity.derive(li, kr.public, psk_i), PeerIdentity.derive(lr, ki.public,
                                                                                 psk_r)


def _handshake(psk_i: bytes | None = None, psk_r: bytes | None = None):
    li, lr, r_at_i, i_at_r = _sides(psk_i, psk_r)
    stamp = tai64n()
    init, state = create_initiation(li, r_at_i, 0xAABBCCDD, stamp)
    seal_macs(init, r_at_i.mac1_key, None)
    assert len(init) == INIT_LEN and check_mac1(bytes(init), lr.mac1_key)
    got = consume_initiation(lr, bytes(init), lambda k: i_at_r if k == i_at_r.public else None)
    assert got.timestamp == stamp and got.sender_index == 0xAABBCCDD
    assert got.peer is i_at_r
    resp, keys_r = create_response(lr, got, 0x01020304)
    seal_macs(resp, i_at_r.mac1_key, None)
    assert len(resp) == RESP_LEN and check_mac1(bytes(resp), li.mac1_key)
    keys_i = consume_response(li, r_at_i, state, bytes(resp))
    return keys_i, keys_r


def test_both_sides_derive_the_same_transport_keys() -> None:
    keys_i, keys_r = _handshake()
    assert keys_i.send == keys_r.recv and keys_i.recv == keys_r.send
    assert keys_i.send != keys_i.recv
    assert keys_i.initiator and not keys_r.initiator
    assert (keys_i.local_index, keys_i.remote_index) == (0xAABBCCDD, 0x01020304)
    assert (keys_r.local_index, keys_r.remote_index) == (0x01020304, 0xAABBCCDD)


def test_every_handshake_has_fresh_keys() -> None:
    a, _ = _handshake()
    b, _ = _handshake()
    assert a.send != b.send


def test_psk_is_mixed_in_and_must_match() -> None:
    psk = os.urandom(32)
    keys_i, keys_r = _handshake(psk, psk)
    assert keys_i.send == keys_r.recv
    with pytest.raises(HandshakeError) as info:
        _handshake(psk, None)
    assert info.value.reason == "bad_auth"


def test_unknown_static_key_is_refused_before_the_second_dh() -> None:
    li, lr, r_at_i, _ = _sides()
    init, _ = create_initiation(li, r_at_i, 1, tai64n())
    with pytest.raises(HandshakeError) as info:
        consume_initiation(lr, bytes(init), lambda k: None)
    assert info.value.reason == "unknown_peer"


def test_initiation_for_someone_else_fails_authentication() -> None:
    li, _, r_at_i, _ = _sides()
    other = LocalIdentity(PrivateKey.generate())
    init, _ = create_initiation(li, r_at_i, 1, tai64n())
    assert not check_mac1(bytes(init), other.mac1_key)
    with pytest.raises(HandshakeError) as info:
        consume_initiation(other, bytes(init), lambda k: None)
    assert info.value.reason == "bad_auth"


def test_tampered_fields_are_detected() -> None:
    li, lr, r_at_i, i_at_r = _sides()
    for offset in (8, 40, 100):
        init, _ = create_initiation(li, r_at_i, 1, tai64n())
        init[offset] ^= 1
        with pytest.raises(HandshakeError):
            consume_initiation(lr, bytes(init), lambda k: i_at_r)


def test_mac1_and_mac2() -> None:
    li, lr, r_at_i, _ = _sides()
    init, _ = create_initiation(li, r_at_i, 1, tai64n())
    mac1 = seal_macs(init, r_at_i.mac1_key, None)
    assert bytes(init[INIT_MAC1:INIT_MAC2]) == mac1
    assert bytes(init[INIT_MAC2:]) == bytes(16)  # no cookie: mac2 is zeros
    init[0 + 20] ^= 1
    assert not check_mac1(bytes(init), lr.mac1_key)
    cookie = os.urandom(16)
    init2, _ = create_initiation(li, r_at_i, 2, tai64n())
    seal_macs(init2, r_at_i.mac1_key, cookie)
    assert check_mac1(bytes(init2), lr.mac1_key)
    assert check_mac2(bytes(init2), cookie)
    assert not check_mac2(bytes(init2), os.urandom(16))


def test_cookie_reply_round_trip() -> None:
    li, lr, r_at_i, _ = _sides()
    init, _ = create_initiation(li, r_at_i, 0x55, tai64n())
    mac1 = seal_macs(init, r_at_i.mac1_key, None)
    checker = CookieChecker(lr, refresh=120.0)
    source = address_bytes("198.18.0.1", 51820)
    reply = checker.make_reply(bytes(init), 0x55, source, now=0.0)
    assert len(reply) == COOKIE_REPLY_LEN and reply[0] == 3
    assert int.from_bytes(reply[4:8], "little") == 0x55
    cookie = open_cookie_reply(reply, r_at_i.cookie_key, mac1)
    assert cookie == checker.cookie_for(source, now=1.0)
    # bound to the source address and port
    assert cookie != checker.cookie_for(address_bytes("198.18.0.1", 51821), now=1.0)
    # the reply only opens with the mac1 it answers
    with pytest.raises(HandshakeError) as info:
        open_cookie_reply(reply, r_at_i.cookie_key, os.urandom(16))
    assert info.value.reason == "bad_cookie"
    # the secret rotates every refresh period, so old cookies stop working
    assert checker.cookie_for(source, now=121.0) != cookie
    resp = bytearray(RESP_LEN)
    seal_macs(resp, r_at_i.mac1_key, cookie)
    assert check_mac2(bytes(resp), cookie) and resp[RESP_MAC2:] != bytes(16)


def test_ipv6_cookie_source() -> None:
    assert len(address_bytes("fd00::1", 51821)) == 18
    assert address_bytes("10.0.0.1", 258)[-2:] == b"\x01\x02"


def test_low_order_peer_key_is_refused() -> None:
    local = LocalIdentity(PrivateKey.generate())
    with pytest.raises(ValueError):
        PeerIdentity.derive(local, bytes(32))
