"""CNI errors as the spec defines them: a code, a one-line message, optional details.

The plugin prints one of these as JSON on stdout and exits non-zero; the runtime shows
``msg`` to the operator and may retry on ``TRY_AGAIN_LATER``.
"""

from __future__ import annotations

import json

# Codes 1-99 are the spec's own (CNI spec, "Error": well-known error codes).
INCOMPATIBLE_VERSION = 1
UNSUPPORTED_FIELD = 2
UNKNOWN_CONTAINER = 3
INVALID_ENVIRONMENT = 4
IO_FAILURE = 5
DECODING_FAILURE = 6
INVALID_NETWORK_CONFIG = 7
TRY_AGAIN_LATER = 11
INTERNAL = 999  # what the reference library reports for an error without a code

FALLBACK_VERSION = "1.0.0"  # for errors raised before the config's version is known


class CniError(Exception):
    """A failure the runtime must see as CNI error JSON."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details

    def to_json(self, cni_version: str | None) -> str:
        doc: dict[str, object] = {
            "cniVersion": cni_version or FALLBACK_VERSION, "code": self.code, "msg": self.msg}
        if self.details:
            doc["details"] = self.details
        return json.dumps(doc)

