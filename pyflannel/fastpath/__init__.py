"""The packet fast path: a tight loop between the TUN device and the UDP socket.

It runs in its own process (see docs/architecture.md) and knows nothing of etcd: the control
plane hands it a peer table and reads its counters, through :mod:`.handle`.
"""
