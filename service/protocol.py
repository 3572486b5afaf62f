"""Wire protocol v1: envelopes, the error-code table and the close-code table.

Everything the client can see is defined here, once. Log-only detail never goes into an error
``message`` or a close reason: use a fixed text from these tables.
"""

from __future__ import annotations

import json
from enum import IntEnum, StrEnum
from typing import Any

from wirehub import inbound
from wirehub.inbound import DEFAULT_MAX_JSON_DEPTH

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
    """Compact JSON: no spaces, no raw newlines (the hub's bus envelope relies on that).

    Strict JSON only: NaN and Infinity raise ValueError (a client's parser would refuse them).
    """
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def encode(obj: Any) -> bytes:
    return dumps(obj).encode()


def error_frame(code: ErrorCode, message: str, req_id: Any = None, **extra: Any) -> str:
    frame: dict[str, Any] = {"op": "error", "code": str(code), "message": message}
    if req_id is not None:
        frame["id"] = req_id
    frame.update(extra)
    return dumps(frame)


#: longest string request id, in characters
MAX_ID_LENGTH = 64
#: largest magnitude of an integer request id: every JSON parser holds it exactly
MAX_ID_INT = 2**53


def valid_id(req_id: Any) -> bool:
    """A request id the server echoes back: a string of at most 64 characters or an integer within +-2^53."""
    if isinstance(req_id, str):
        return len(req_id) <= MAX_ID_LENGTH
    return type(req_id) is int and -MAX_ID_INT <= req_id <= MAX_ID_INT


def parse_request(text: str | bytes, max_depth: int = DEFAULT_MAX_JSON_DEPTH) -> dict[str, Any]:
    """Parse a client frame into its envelope ``{"op": str, "id"?: ..., ...}``.

    Raises :class:`ProtocolError` with ``bad_request`` for binary frames, ``bad_json`` for text
    that the inbound decoder refuses (not JSON, nested deeper than ``max_depth``, NaN or
    Infinity), and ``bad_request`` for JSON that is not an object with a string ``op`` or whose
    ``id`` is not a valid request id (:func:`valid_id`; ``null`` counts as no id).
    """
    if isinstance(text, bytes):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "binary frames are not accepted; send JSON text")
    try:
        msg = inbound.loads(text, max_depth)
    except inbound.JsonRejected as exc:
        raise ProtocolError(ErrorCode.BAD_JSON, exc.explain("frame")) from None
    if not isinstance(msg, dict):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "frame must be a JSON object")
    req_id = msg.get("id")
    if req_id is not None and not valid_id(req_id):
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"field 'id' must be a string of at most {MAX_ID_LENGTH} "
                            "characters or an integer within +-2^53")
    op = msg.get("op")
    if not isinstance(op, str) or not op:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "field 'op' must be a non-empty string", req_id=req_id)
    return msg


def with_offset(frame: bytes, offset: int | None) -> bytes:
    """Splice ``"offset": N`` into an encoded JSON object frame without re-encoding it."""
    if offset is None:
        return frame
    return b'%s,"offset":%d}' % (frame[:-1], offset)
