"""NOTIFICATION codes (RFC 4271 section 4.5, RFC 4486, RFC 6608) and the codec's one exception.

Decoding raises only :class:`BgpError`, which already says which NOTIFICATION to send, so the
session layer never has to map exceptions to codes: one rule, one place.
"""

from __future__ import annotations

# Error codes.
MESSAGE_HEADER_ERROR = 1
OPEN_MESSAGE_ERROR = 2
UPDATE_MESSAGE_ERROR = 3
HOLD_TIMER_EXPIRED = 4
FSM_ERROR = 5
CEASE = 6

# Message Header Error subcodes.
CONNECTION_NOT_SYNCHRONIZED = 1
BAD_MESSAGE_LENGTH = 2
BAD_MESSAGE_TYPE = 3

# OPEN Message Error subcodes.
UNSUPPORTED_VERSION = 1
BAD_PEER_AS = 2
BAD_BGP_IDENTIFIER = 3
UNSUPPORTED_OPTIONAL_PARAMETER = 4
UNACCEPTABLE_HOLD_TIME = 6

# UPDATE Message Error subcodes.
MALFORMED_ATTRIBUTE_LIST = 1
UNRECOGNIZED_WELL_KNOWN_ATTRIBUTE = 2
MISSING_WELL_KNOWN_ATTRIBUTE = 3
ATTRIBUTE_FLAGS_ERROR = 4
ATTRIBUTE_LENGTH_ERROR = 5
INVALID_ORIGIN = 6
INVALID_NEXT_HOP = 8
OPTIONAL_ATTRIBUTE_ERROR = 9
INVALID_NETWORK_FIELD = 10
MALFORMED_AS_PATH = 11

# FSM Error subcodes (RFC 6608): an unexpected message in this state.
FSM_UNEXPECTED_IN_OPENSENT = 1
FSM_UNEXPECTED_IN_OPENCONFIRM = 2
FSM_UNEXPECTED_IN_ESTABLISHED = 3

# Cease subcodes (RFC 4486).
CEASE_ADMIN_SHUTDOWN = 2
CEASE_PEER_DECONFIGURED = 3
CEASE_ADMIN_RESET = 4
CEASE_CONNECTION_REJECTED = 5
CEASE_CONNECTION_COLLISION = 7

CODE_NAMES = {
    MESSAGE_HEADER_ERROR: "message header error",
    OPEN_MESSAGE_ERROR: "OPEN message error",
    UPDATE_MESSAGE_ERROR: "UPDATE message error",
    HOLD_TIMER_EXPIRED: "hold timer expired",
    FSM_ERROR: "finite state machine error",
    CEASE: "cease",
}


class BgpError(Exception):
    """A protocol error: the NOTIFICATION (code, subcode, data) to send before closing."""

    def __init__(self, code: int, subcode: int, data: bytes = b"", reason: str = "") -> None:
        self.code, self.subcode, self.data = code, subcode, bytes(data)
        self.reason = reason or CODE_NAMES.get(code, f"error {code}")
        super().__init__(f"{self.reason} ({code}/{subcode})")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BgpError) and (self.code, self.subcode, self.data) == (
            other.code, other.subcode, other.data)

    def __hash__(self) -> int:
        return hash((self.code, self.subcode, self.data))


def describe(code: int, subcode: int) -> str:
    """One-line text for a NOTIFICATION, for logs and `status` ("cease (6/2)")."""
    return f"{CODE_NAMES.get(code, f'error {code}')} ({code}/{subcode})"
