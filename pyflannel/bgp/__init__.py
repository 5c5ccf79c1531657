"""A BGP-4 speaker for the bgp backend, in layers that can be tested one by one.

``errors.py`` (NOTIFICATION codes and the one exception decoding raises),
``attributes.py`` (prefixes and path attributes), ``messages.py`` (whole messages): pure codecs.
``fsm.py``: the RFC 4271 state machine, driven by events, returning actions; no I/O, no clock.
``rib.py``: Adj-RIB-In / Loc-RIB with the import policy, route reflection and graceful restart.
The session I/O (asyncio, TCP MD5) and the backend wiring sit on top and decide nothing of this.
"""
