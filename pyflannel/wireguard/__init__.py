"""WireGuard in pure Python: Noise_IKpsk2 handshakes, transport data, timers, cookies.

``device.Device`` is the whole protocol without I/O; ``transport.Keypair`` is the
per-datagram hot path; ``keys`` handles base64 keys and the node's key file.
"""
