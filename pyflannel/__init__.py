"""pyflannel: a pure-Python, drop-in re-implementation of flanneld."""

import os as _os

__version__ = "0.1.0"

# gRPC's C core prints its own lines (TLS handshake failures, reconnects) on stderr; our
# messages already say what went wrong, in one line. Set before anything imports grpc.
_os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
