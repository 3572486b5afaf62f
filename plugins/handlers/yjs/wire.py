"""The y-websocket wire format (lib0 encoding) and wirehub's bus frames for Yjs documents.

This is framing only: every CRDT operation (state vectors, diffs, merges) is pycrdt's. The
message types and their layout are those of ``y-websocket`` and ``y-protocols``:

- ``[0 messageSync][0 step1][varBytes stateVector]``, ``[0][1 step2][varBytes update]``,
  ``[0][2 update][varBytes update]``;
- ``[1 messageAwareness][varBytes awarenessUpdate]``, where an awareness update is
  ``[varUint n]`` then ``n`` times ``[varUint clientID][varUint clock][varString stateJSON]``;
- ``[2 messageAuth][0 permissionDenied][varString reason]``;
- ``[3 messageQueryAwareness]``.

Numbers are lib0 ``varUint`` (7 bits per byte, little end first); ``varBytes``/``varString``
are a ``varUint`` length and the bytes (UTF-8 for strings).
"""

from __future__ import annotations

from dataclasses import dataclass

MESSAGE_SYNC = 0
MESSAGE_AWARENESS = 1
MESSAGE_AUTH = 2
MESSAGE_QUERY_AWARENESS = 3

SYNC_STEP1 = 0
SYNC_STEP2 = 1
SYNC_UPDATE = 2

AUTH_PERMISSION_DENIED = 0

#: an update that changes nothing (no structs, no deletions)
EMPTY_UPDATE = b"\x00\x00"

#: bus frame kinds (the first byte; never ``{``, so the hub does not splice an offset in)
BUS_UPDATE = b"u"
BUS_AWARENESS = b"a"
BUS_QUERY = b"q"
BUS_HEARTBEAT = b"h"


class WireError(ValueError):
    """A message that does not follow the format."""


def var_uint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(0x80 | (n & 0x7F))
        n >>= 7
    out.append(n)
    return bytes(out)


def var_bytes(data: bytes) -> bytes:
    return var_uint(len(data)) + data


class Reader:
    """Reads lib0-encoded values from ``data``; every read past the end raises WireError."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def uint(self) -> int:
        n, shift = 0, 0
        data, pos = self.data, self.pos
        while True:
            if pos >= len(data):
                raise WireError("truncated number")
            byte = data[pos]
            pos += 1
            n |= (byte & 0x7F) << shift
            if byte < 0x80:
                break
            shift += 7
            if shift > 63:
                raise WireError("number too large")
        self.pos = pos
        return n

    def blob(self) -> bytes:
        n = self.uint()
        end = self.pos + n
        if end > len(self.data):
            raise WireError("truncated bytes")
        out = self.data[self.pos:end]
        self.pos = end
        return out

    def string(self) -> str:
        try:
            return self.blob().decode("utf-8")
        except UnicodeDecodeError:
            raise WireError("invalid UTF-8") from None

    def rest(self) -> bytes:
        out = self.data[self.pos:]
        self.pos = len(self.data)
        return out


# -- client messages ---------------------------------------------------------------------------------


def sync_step1(state_vector: bytes) -> bytes:
    return bytes((MESSAGE_SYNC, SYNC_STEP1)) + var_bytes(state_vector)


def sync_step2(update: bytes) -> bytes:
    return bytes((MESSAGE_SYNC, SYNC_STEP2)) + var_bytes(update)


def sync_update(update: bytes) -> bytes:
    return bytes((MESSAGE_SYNC, SYNC_UPDATE)) + var_bytes(update)


def awareness_message(update: bytes) -> bytes:
    return bytes((MESSAGE_AWARENESS,)) + var_bytes(update)


def permission_denied(reason: str) -> bytes:
    return bytes((MESSAGE_AUTH, AUTH_PERMISSION_DENIED)) + var_bytes(reason.encode())


QUERY_AWARENESS = bytes((MESSAGE_QUERY_AWARENESS,))


@dataclass(frozen=True)
class AwarenessEntry:
    client: int
    clock: int
    state: str  # the JSON text; "null" when the client is gone


def decode_awareness(update: bytes) -> list[AwarenessEntry]:
    r = Reader(update)
    n = r.uint()
    if n > 10_000:
        raise WireError("too many awareness entries")
    out = [AwarenessEntry(r.uint(), r.uint(), r.string()) for _ in range(n)]
    if r.pos != len(update):
        raise WireError("trailing bytes after the awareness entries")
    return out


def encode_awareness(entries: list[AwarenessEntry]) -> bytes:
    parts = [var_uint(len(entries))]
    for e in entries:
        parts += [var_uint(e.client), var_uint(e.clock), var_bytes(e.state.encode())]
    return b"".join(parts)


# -- bus frames: kind, origin node, origin session, body ---------------------------------------------------


def bus_frame(kind: bytes, node: str, session: str, body: bytes = b"") -> bytes:
    return kind + var_bytes(node.encode()) + var_bytes(session.encode()) + body


@dataclass(frozen=True)
class BusFrame:
    kind: bytes
    node: str
    session: str
    body: bytes


def parse_bus_frame(frame: bytes) -> BusFrame:
    r = Reader(frame)
    r.pos = 1
    node, session = r.string(), r.string()
    return BusFrame(frame[:1], node, session, r.rest())
