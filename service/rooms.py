"""Room rules and the chat-message publish path shared by the chat handler and the HTTP publish API.

One function, :func:`publish_message`, turns ``(room, data, sender)`` into the ``message`` frame
members receive: size check, ``wirehub_filter_message``, encode once, ``hub.publish`` with history.
Both the WebSocket ``publish`` op and ``POST /api/publish`` use it, so the two cannot drift; the op in
its two halves (:func:`prepare_message`, then :func:`start_publish` without waiting for the bus's answer)
when it pipelines.
Also here: recovery from history on join (:func:`recover`), history pages encoded without
re-decoding stored frames, and the per-session token bucket.
"""

from __future__ import annotations

import asyncio
import fnmatch
import json
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from wirehub.bus import History
from wirehub.eager import Continued
from wirehub.hub import split_envelope
from wirehub.plugins import DROP
from wirehub.protocol import ErrorCode, ProtocolError, encode, with_offset

if TYPE_CHECKING:
    from wirehub.hub import Hub
    from wirehub.plugins import PluginHost
    from wirehub.session import Session

#: Safe for every bus: the Redis and NATS buses encode room names themselves.
DEFAULT_ROOM_PATTERN = r"^[A-Za-z0-9_\-.:@]{1,128}$"
DEFAULT_MAX_MESSAGE_BYTES = 16384
#: hard cap whatever the configured pattern allows
MAX_ROOM_NAME = 1024
#: room names :meth:`RoomRules.room` keeps as matched (then it starts over)
ROOM_NAME_CACHE = 4096
#: the sender name of messages published through the HTTP API
SERVER_SENDER = "server"


@dataclass(frozen=True)
class RoomLimit:
    """A per-pattern override of the largest message (``data`` encoded as JSON, in bytes)."""

    pattern: str
    max_message_bytes: int = field(metadata={"min": 1})


class RoomRules:
    """Room-name syntax and message sizes of one chat endpoint (the publish API uses the first one's)."""

    def __init__(
        self,
        name_pattern: str = DEFAULT_ROOM_PATTERN,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        limits: Sequence[RoomLimit] = (),
    ) -> None:
        self.name_pattern = name_pattern
        self.name_re = re.compile(name_pattern)  # re.error is the caller's ConfigError
        self.max_message_bytes = max_message_bytes
        self.limits = tuple(limits)
        #: names that matched, each to one string object (at most :data:`ROOM_NAME_CACHE`): every join and
        #: publish of a big room names it again, and the pattern and the rules are fixed for this object's life
        self._valid: dict[str, str] = {}

    def room(self, request: dict[str, Any]) -> str:
        """The valid room name in ``request["room"]``, or ``error bad_request``. The same string object for
        the same name while it is cached (one string per room in every member's state, not one per request)."""
        room = request.get("room")
        if type(room) is str:
            known = self._valid.get(room)
            if known is not None:
                return known
        elif not isinstance(room, str):
            raise ProtocolError(ErrorCode.BAD_REQUEST, "field 'room' must be a string")
        if len(room) > MAX_ROOM_NAME or not self.name_re.fullmatch(room):
            raise ProtocolError(
                ErrorCode.BAD_REQUEST, f"invalid room name: it must match {self.name_pattern}"
            )
        valid = self._valid
        if len(valid) >= ROOM_NAME_CACHE:
            valid.clear()
        # not sys.intern: every op that names a room comes here before any check of membership or rights, and
        # on Python 3.12 an interned string is never freed (a client naming new rooms would grow the process)
        room = valid[room] = str(room)
        return room

    def owns(self, room: str) -> bool:
        """Whether ``room`` is a name this endpoint accepts (the hub's and the bus's rooms are every endpoint's: a
        game's are ``namespace/room``, which the default pattern refuses)."""
        return room in self._valid or (len(room) <= MAX_ROOM_NAME and self.name_re.fullmatch(room) is not None)

    def max_bytes(self, room: str) -> int:
        for limit in self.limits:
            if fnmatch.fnmatchcase(room, limit.pattern):
                return limit.max_message_bytes
        return self.max_message_bytes


def encode_data(data: Any) -> bytes:
    """``data`` as compact JSON; NaN and Infinity (which json.loads accepts) are refused."""
    try:
        return json.dumps(data, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
    except ValueError:
        raise ProtocolError(
            ErrorCode.BAD_REQUEST, "field 'data' must be JSON without NaN or Infinity"
        ) from None


def _checked(rules: RoomRules, room: str, data: Any) -> bytes:
    encoded = encode_data(data)
    limit = rules.max_bytes(room)
    if len(encoded) > limit:
        raise ProtocolError(
            ErrorCode.TOO_LARGE,
            f"message data is {len(encoded)} bytes; room {room!r} allows {limit}",
            max_bytes=limit,
        )
    return encoded


def message_frame(room: str, sender: str, encoded_data: bytes, ts: float) -> bytes:
    """The ``message`` frame without its offset (the hub splices that in per delivery)."""
    head = encode({"op": "message", "room": room, "from": sender, "ts": ts})
    return b'%s,"data":%s}' % (head[:-1], encoded_data)


async def publish_message(
    hub: Hub,
    hooks: PluginHost,
    rules: RoomRules,
    room: str,
    data: Any,
    *,
    sender: str,
    session: Session | None,
    echo: bool = False,
    idempotency_key: str | None = None,
    idempotency_window: float = 0.0,
) -> int:
    """Publish ``data`` to ``room`` as a ``message`` from ``sender``; returns its history offset.

    ``session`` is the publisher (``None`` for the HTTP API); it does not get its own message
    unless ``echo``. With ``idempotency_key``, a publish to ``room`` that reuses the key of one
    made within ``idempotency_window`` seconds (on any replica) delivers nothing and returns the
    first one's offset. Raises ProtocolError (``too_large``, ``rejected``, ``bad_request``),
    BusUnavailable (the message was then not published) and PublishOutcomeUnknown (it may have been).

    The two halves, :func:`prepare_message` and :func:`start_publish`, are for a caller that does not
    wait for the bus's answer before its next publish (the chat op, on a bus with ``ordered_handoff``).
    """
    message = await prepare_message(hooks, rules, room, data, sender=sender, session=session, echo=echo,
                                    idempotency_key=idempotency_key, idempotency_window=idempotency_window)
    return await publish_prepared(hub, message)


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A message checked and filtered, ready for :func:`start_publish`."""

    room: str
    frame: bytes
    #: the session that does not get it (None: everyone)
    origin: Session | None
    #: the metric's label: ``client`` (a session's publish) or ``api``
    source: str
    dedupe_key: str | None
    dedupe_window: float


async def prepare_message(
    hooks: PluginHost,
    rules: RoomRules,
    room: str,
    data: Any,
    *,
    sender: str,
    session: Session | None,
    echo: bool = False,
    idempotency_key: str | None = None,
    idempotency_window: float = 0.0,
) -> Outgoing:
    """The part of :func:`publish_message` that may suspend before the bus: the size check and
    ``wirehub_filter_message`` (a hook may be async); raises its ProtocolErrors."""
    encoded = _checked(rules, room, data)
    filtered = await hooks.filter_message(session, room, data)
    if filtered is DROP:
        raise ProtocolError(ErrorCode.REJECTED, "the message was rejected by a filter")
    if filtered is not data:
        encoded = _checked(rules, room, filtered)  # a rewrite must obey the same limit
    frame = message_frame(room, sender, encoded, round(time.time(), 3))
    return Outgoing(room, frame, None if echo else session, "client" if session is not None else "api",
                    idempotency_key, idempotency_window)


def start_publish(hub: Hub, message: Outgoing) -> asyncio.Future[int]:
    """Hand ``message`` to the bus NOW, in this call, and return its answer to come (the offset, or the
    exception :func:`publish_message` would raise).

    ``Hub.publish`` runs in this call until its first real suspension (as the WebSocket core runs a frame's
    handler): on a bus with ``ordered_handoff`` (:class:`wirehub.bus.Bus`) the message then has its place in
    the room's order, before the caller's next publish is started. The rest runs in a task of its own; it is
    counted in ``hub.publishing`` until the bus answered, as any publish.
    """
    loop = asyncio.get_running_loop()
    coro = publish_prepared(hub, message)
    try:
        first = coro.send(None)
    except StopIteration as stop:  # the bus answered at once (memory)
        done: asyncio.Future[int] = loop.create_future()
        done.set_result(stop.value)
        return done
    except Exception as exc:  # refused at once (the bus is down): the caller reads it from the future
        failed: asyncio.Future[int] = loop.create_future()
        failed.set_exception(exc)
        return failed
    return loop.create_task(Continued(coro, first))


async def publish_prepared(hub: Hub, message: Outgoing) -> int:
    """Publish a prepared message and wait for the bus's answer: :func:`publish_message`'s second half."""
    offset = await hub.publish(message.room, message.frame, origin=message.origin, history=True,
                               dedupe_key=message.dedupe_key, dedupe_window=message.dedupe_window)
    if offset is None:  # a bus that ignores history=True breaks its contract
        raise RuntimeError(f"bus {type(hub.bus).__name__} returned no offset for a history publish")
    hub.metrics.published_tally(message.source).n += 1
    return offset


#: an idempotency key: 1 to 128 printable ASCII characters (it becomes part of broker keys and headers)
_IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,128}")


def parse_idempotency_key(value: Any, field_name: str = "idempotency_key") -> str | None:
    """``None`` when absent; a valid key; or ``bad_request``."""
    if value is None:
        return None
    if not isinstance(value, str) or not _IDEMPOTENCY_KEY.fullmatch(value):
        raise ProtocolError(
            ErrorCode.BAD_REQUEST, f"{field_name} must be 1 to 128 printable ASCII characters without spaces"
        )
    return value


# -- positions, recovery and history pages ------------------------------------------------------------


@dataclass(frozen=True)
class Since:
    """A client's stored position ``{offset, epoch}``; ``usable`` is False for garbage."""

    offset: int
    epoch: str

    @property
    def usable(self) -> bool:
        return self.offset >= 0 and bool(self.epoch)


def parse_since(value: Any) -> Since | None:
    """``None`` when absent. Anything but an object is ``bad_request``; an object whose fields are
    garbage is a position that cannot be recovered (never an error: clients store these)."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "field 'since' must be an object {offset, epoch}")
    offset, epoch = value.get("offset"), value.get("epoch")
    if isinstance(offset, bool) or not isinstance(offset, int) or not isinstance(epoch, str):
        return Since(-1, "")
    return Since(offset, epoch)


@dataclass(frozen=True)
class Recovery:
    top: int
    epoch: str
    messages: list[tuple[int, bytes]]
    recovered: bool


async def recover(history: History, room: str, since: Since | None, limit: int, batch: int = 500) -> Recovery:
    """The messages after ``since`` (at most ``limit``), or ``recovered=False`` when history cannot
    cover the gap: trimmed, another epoch, a garbage position, or more than ``limit`` missed."""
    if since is None or not since.usable:
        top, epoch = await history.position(room)
        return Recovery(top, epoch, [], False)
    messages: list[tuple[int, bytes]] = []
    after = since.offset
    while True:
        want = max(1, min(batch, limit + 1 - len(messages)))
        page = await history.read(room, after, want)
        if page.epoch != since.epoch or not page.complete:
            return Recovery(page.top, page.epoch, [], False)
        messages.extend(page.messages)
        if len(messages) > limit:
            return Recovery(page.top, page.epoch, [], False)
        if len(page.messages) < want:
            return Recovery(page.top, page.epoch, messages, True)
        after = page.messages[-1][0]


def stored_frames(messages: Sequence[tuple[int, bytes]]) -> list[bytes]:
    """History entries (bus envelopes) as the ``message`` frames members got, offsets spliced in."""
    frames = []
    for offset, payload in messages:
        try:
            frames.append(with_offset(split_envelope(payload)[2], offset))
        except ValueError:
            continue  # a malformed entry; the hub drops it too
    return frames


def fit(frames: list[bytes], budget: int, *, newest: bool) -> list[bytes]:
    """The longest run of ``frames`` (the newest or the oldest end) whose bytes stay within ``budget``.

    A reply larger than the session's send queue would close it with 4008 however fast it reads.
    """
    total, kept = 0, 0
    for frame in reversed(frames) if newest else frames:
        total += len(frame) + 1
        if total > budget:
            break
        kept += 1
    return frames[len(frames) - kept :] if newest else frames[:kept]


def history_frame(head: dict[str, Any], frames: Sequence[bytes]) -> bytes:
    """``head`` plus ``"messages": [...]`` spliced from already encoded frames (no re-decode)."""
    return b'%s,"messages":[%s]}' % (encode(head)[:-1], b",".join(frames))


# -- rate limiting ------------------------------------------------------------------------------------------


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: int, *, taken: int = 0, since: float | None = None) -> None:
        """``taken`` tokens already taken at ``since`` (a ``time.monotonic()``; default now): the bucket as it
        stands had it been made then."""
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst - taken)
        self.stamp = time.monotonic() if since is None else since

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def wait_ms(self) -> int:
        """Milliseconds until the next token."""
        return max(1, int((1.0 - self.tokens) / self.rate * 1000) + 1)
