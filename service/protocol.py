"""Wire protocol v1: envelopes, the error-code table and the close-code table.

Everything the client can see is defined here, once. Log-only detail never goes into an error
``message`` or a close reason: use a fixed text from these tables.
"""

from __future__ import annotations

import json
from enum import IntEnum, StrEnum
from typing import Any

PROTOCOL_VERSION = 1
SUBPROTOCOL = "wirehub.v1"


class ErrorCode(StrEnum):
    """Codes of ``error {id, code, message}`` frames (docs/protocol.md, "Error codes")."""

    BAD_JSON = "bad_json"
    BAD_REQUEST = "bad_request"
    UNKNOWN_OP = "unknown_op"
    FORBIDDEN = "forbidden"
    NOT_JOINED = "not_joined"
    TOO_LARGE = "too_large"
    RATE_LIMITED = "rate_limited"
    CONFLICT = "conflict"
    REJECTED = "rejected"
    UNAVAILABLE = "unavailable"
    TIMEOUT = "timeout"  # the bus did not confirm a publish in time: it may have been delivered
    INTERNAL = "internal"


class CloseCode(IntEnum):
    """WebSocket close codes that wirehub sends (docs/protocol.md, "Close codes")."""

    NORMAL = 1000
    GOING_AWAY = 1001  # server drains: reconnect after the retry_ms in the reason
    PROTOCOL_ERROR = 1002
    POLICY = 1008
    TOO_BIG = 1009
    INTERNAL = 1011
    TRY_AGAIN_LATER = 1013  # the backend is unavailable: reconnect after retry_ms (yjs endpoint)
    TOKEN_EXPIRED = 4001  # reconnect with a new token
    FORBIDDEN = 4003  # do not reconnect
    SLOW_CONSUMER = 4008  # reconnect after retry_ms
    RATE_LIMITED = 4029  # reconnect later, after retry_ms
    BAD_DOCUMENT_MESSAGE = 4400  # yjs: a malformed message or document name; y-websocket stops (44xx)
    DOCUMENT_FORBIDDEN = 4403  # yjs: no read access to the document; y-websocket stops (44xx)
    DOCUMENT_TOO_LARGE = 4413  # yjs: the update would take the document over its size limit


#: Default client-visible reason of each close code.
CLOSE_REASONS: dict[int, str] = {
    CloseCode.NORMAL: "normal closure",
    CloseCode.GOING_AWAY: "server going away",
    CloseCode.PROTOCOL_ERROR: "protocol error",
    CloseCode.POLICY: "policy violation",
    CloseCode.TOO_BIG: "message too big",
    CloseCode.INTERNAL: "internal error",
    CloseCode.TRY_AGAIN_LATER: "try again later",
    CloseCode.TOKEN_EXPIRED: "token expired",
    CloseCode.FORBIDDEN: "forbidden",
    CloseCode.SLOW_CONSUMER: "slow consumer",
    CloseCode.RATE_LIMITED: "rate limited",
    CloseCode.BAD_DOCUMENT_MESSAGE: "bad message",
    CloseCode.DOCUMENT_FORBIDDEN: "document forbidden",
    CloseCode.DOCUMENT_TOO_LARGE: "document too large",
}


def close_reason(code: int, retry_ms: int | None = None) -> str:
    """The close reason text for ``code``; with ``retry_ms``, the reconnect hint clients parse."""
    text = CLOSE_REASONS.get(code, "")
    if retry_ms is not None:
        text = f"{text}; retry_ms={retry_ms}"
    return text


class ProtocolError(Exception):
    """A client request that gets an ``error`` frame; the connection stays open."""

    def __init__(self, code: ErrorCode, message: str, req_id: Any = None, **extra: Any) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.req_id = req_id
        self.extra = extra


def dumps(obj: Any) -> str:
    """Compact JSON: no spaces, no raw newlines (the hub's bus envelope relies on that)."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def encode(obj: Any) -> bytes:
    return dumps(obj).encode()


def error_frame(code: ErrorCode, message: str, req_id: Any = None, **extra: Any) -> str:
    frame: dict[str, Any] = {"op": "error", "code": str(code), "message": message}
    if req_id is not None:
        frame["id"] = req_id
    frame.update(extra)
    return dumps(frame)


def parse_request(text: str | bytes) -> dict[str, Any]:
    """Parse a client frame into its envelope ``{"op": str, "id"?: ..., ...}``.

    Raises :class:`ProtocolError` with ``bad_request`` for binary frames, ``bad_json`` for text
    that is not JSON, and ``bad_request`` for JSON that is not an object with a string ``op``.
    """
    if isinstance(text, bytes):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "binary frames are not accepted; send JSON text")
    try:
        msg = json.loads(text)
    except ValueError:
        raise ProtocolError(ErrorCode.BAD_JSON, "frame is not valid JSON") from None
    if not isinstance(msg, dict):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "frame must be a JSON object")
    op = msg.get("op")
    if not isinstance(op, str) or not op:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "field 'op' must be a non-empty string", req_id=msg.get("id"))
    return msg


def with_offset(frame: bytes, offset: int | None) -> bytes:
    """Splice ``"offset": N`` into an encoded JSON object frame without re-encoding it."""
    if offset is None:
        return frame
    return b'%s,"offset":%d}' % (frame[:-1], offset)
