"""WireGuard in pure Python: Noise_IKpsk2 handshakes, transport data, timers, cookies.

Modules, from the bottom up:

* ``constants``: protocol strings, message layouts (named offsets), limits, ``Limits``.
* ``crypto``: HASH, MAC, HMAC, KDF1-3, AEAD, XAEAD (HChaCha20 in Python), DH, TAI64N.
* ``keys``: base64 keys, ``PrivateKey`` (its repr shows no secret), the 0600 key file.
* ``noise``: the handshake as pure functions, mac1/mac2, cookie replies.
* ``transport``: ``Keypair`` (seal/open of type-4 messages) and ``ReplayWindow``.
* ``peer``: ``PeerConfig`` (a row of the peer table), ``Peer`` (sessions, timers, counters),
  the inner-packet checks and the per-source handshake limiter.
* ``device``: ``Device``, the whole protocol without I/O, driven by a clock.

What a fast path calls, per datagram or per batch::

    dev = Device(load_or_create_key(), psk=..., mtu=1420)
    dev.set_peers({public_key: PeerConfig(("10.1.2.0/24",), ("198.18.0.2", 51820))})
    dev.receive_many(datagrams)      # or dev.receive(data, src) for one
    dev.send(packet)                 # routed by destination; or dev.send_to(peer, packet)
    kp = dev.sender(peer)            # batch send: kp.seal_into(buf, n) per packet, then
    dev.sent(peer, kp, nbytes)       # once per batch
    dev.tick()                       # when dev.next_deadline() is due
    to_tun, to_net = dev.drain()     # [(inner packet, peer)], [(datagram, endpoint)]
    dev.drops, dev.stats, dev.status()
"""
