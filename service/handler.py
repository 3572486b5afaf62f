"""The message-handler contract, the context a handler gets, and a base class for JSON op handlers."""

from __future__ import annotations

import json.encoder
import logging
import time
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from wirehub import inbound
from wirehub.auth import AuthError
from wirehub.protocol import PROTOCOL_VERSION, CloseCode, ErrorCode, ProtocolError, parse_request, valid_id
from wirehub.rooms import TokenBucket
from wirehub.session import OutFrame

if TYPE_CHECKING:
    from wirehub.auth import Authenticator
    from wirehub.bus import Backend
    from wirehub.config import Config, EndpointConfig
    from wirehub.hub import Hub
    from wirehub.logs import LogLimiter
    from wirehub.metrics import Metrics
    from wirehub.plugins import PluginHost
    from wirehub.session import Session

log = logging.getLogger("wirehub.handler")


@dataclass
class HandlerContext:
    """Everything a handler may use; handlers get it from their factory, never from globals."""

    config: Config
    endpoint: EndpointConfig
    hub: Hub
    backend: Backend
    hooks: PluginHost
    authenticator: Authenticator
    metrics: Metrics
    node: str
    #: the app's rate-limited logger: every log line a client can trigger goes through it
    logs: LogLimiter


@runtime_checkable
class Handler(Protocol):
    """Serves one endpoint path. All methods run on the event loop and may be async.

    The core calls ``on_open`` once the upgrade succeeded, ``on_message`` for each frame in order
    (the next frame is read only after it returns: a slow handler applies backpressure to that
    client only), and ``on_close`` once after the connection ended. An exception escaping
    ``on_message`` is reported (one rate-limited log line, ``wirehub_plugin_errors_total``) and
    answered with ``error internal``; the session stays open. One escaping ``on_open`` closes the
    session with 1011; one escaping ``on_close`` is reported. Either way the session is released.
    """

    async def on_open(self, session: Session) -> None: ...

    async def on_message(self, session: Session, data: str | bytes) -> None:
        """``data`` is ``str`` for a text frame, ``bytes`` for a binary one."""

    async def on_close(self, session: Session) -> None: ...


Op = Callable[["Session", dict[str, Any]], Awaitable[None]]

_OP_BUDGET = "ops"


@dataclass(eq=False, slots=True)
class _OpBudget:
    """A session's op token bucket (in ``session.state``) and its refusals in a row."""

    bucket: TokenBucket
    strikes: int = 0


#: longest ``join`` query value, in characters (a room of 256 and a ``since`` fit easily)
MAX_URL_JOIN_LENGTH = 1024
#: how many ``join`` values an upgrade URL may carry when the handler has no ``options.max_rooms``
DEFAULT_URL_JOINS = 100
_URL_JOIN_KEYS = frozenset(("room", "since", "id"))


class BadUrlJoin(ValueError):
    """A malformed ``join`` query parameter: the upgrade is refused with 400 and this reason."""


def url_joins(handler: object, arguments: dict[str, list[bytes]]) -> tuple[dict[str, Any], ...]:
    """The ``join`` requests an upgrade URL carries (docs/protocol.md, "Joining in the upgrade URL"), each
    as the ``join`` frame it stands for; empty when there are none or ``handler`` has no ``join`` op (the
    parameter is then left to the application). Raises :class:`BadUrlJoin` for a malformed one: the whole
    upgrade is refused, before authentication, as a client bug that retrying cannot fix."""
    values = arguments.get("join")
    if not values or not isinstance(handler, OpHandler) or "join" not in handler.ops:
        return ()
    limit = handler.url_join_limit()
    if len(values) > limit:
        raise BadUrlJoin(f"at most {limit} join parameters")
    return tuple(_url_join(value) for value in values)


def _url_join(raw: bytes) -> dict[str, Any]:
    try:
        value = raw.decode()
    except UnicodeDecodeError:
        raise BadUrlJoin("join: not UTF-8") from None
    if not value or len(value) > MAX_URL_JOIN_LENGTH:
        raise BadUrlJoin(f"join: a room name or a JSON object of 1 to {MAX_URL_JOIN_LENGTH} characters")
    if not value.startswith("{"):
        return {"op": "join", "room": value}  # a plain room name; its syntax is the join's to check
    try:
        obj = inbound.loads(value, 3)
    except inbound.JsonRejected as exc:
        raise BadUrlJoin(exc.explain("join")) from None
    if not isinstance(obj, dict) or not obj.keys() <= _URL_JOIN_KEYS:
        raise BadUrlJoin("join: a JSON object takes only the fields room, since and id")
    room, since, req_id = obj.get("room"), obj.get("since"), obj.get("id")
    if not isinstance(room, str) or not room:
        raise BadUrlJoin("join: field 'room' must be a non-empty string")
    if since is not None and not _is_position(since):
        raise BadUrlJoin("join: field 'since' must be {\"offset\": integer >= 0, \"epoch\": string}")
    if not valid_id(req_id) and req_id is not None:
        raise BadUrlJoin("join: field 'id' must be a string of at most 64 characters or an integer")
    return {"op": "join", **obj}


def _is_position(since: Any) -> bool:
    if not isinstance(since, dict) or since.keys() != {"offset", "epoch"}:
        return False
    offset = since["offset"]
    return type(offset) is int and offset >= 0 and isinstance(since["epoch"], str)


#: how ``dumps`` (ensure_ascii off) writes a string, quotes included
_json_string = json.encoder.encode_basestring
_WELCOME_HEAD = b'{"op":"welcome","v":%d,"session":"' % PROTOCOL_VERSION


class OpHandler:
    """Base of the JSON handlers (chat, game): a welcome on open and one method per op.

    Subclasses add ops to :attr:`ops` (``{"join": self.op_join}``) in ``__init__``. Every request
    is ``{"op": ..., "id"?: ...}``; replies carry the same ``id``. ``ping`` and ``refresh`` are
    common to all of them.
    """

    def __init__(self, context: HandlerContext) -> None:
        self.context = context
        self.ops: dict[str, Op] = {"ping": self.op_ping, "refresh": self.op_refresh}
        #: the joins of a session's upgrade URL (:func:`url_joins`), given by the core before ``on_open``, which
        #: takes them (not in ``session.state``: that dict would be made for every session just to be looked in)
        self._url_joins: weakref.WeakKeyDictionary[Session, tuple[dict[str, Any], ...]] = weakref.WeakKeyDictionary()

    def welcome(self, session: Session) -> dict[str, Any]:
        frame: dict[str, Any] = {
            "op": "welcome",
            "v": PROTOCOL_VERSION,
            "session": session.id,
            "user": session.identity.user,
            "node": session.node,
        }
        if session.identity.name:
            frame["name"] = session.identity.name
        if session.identity.expires_at is not None:
            frame["expires_at"] = session.identity.expires_at
        return frame

    async def on_open(self, session: Session) -> None:
        joins = self._url_joins.get(session) if self._url_joins else None
        self._welcome(session, len(joins) if joins else 0)

    def give_url_joins(self, session: Session, joins: tuple[dict[str, Any], ...]) -> None:
        """Called by the core before :meth:`on_open`: the joins the welcome announces and
        :meth:`run_url_joins` handles."""
        self._url_joins[session] = joins

    async def run_url_joins(self, session: Session) -> None:
        """Called by the core once the open hooks ran (``on_open``, then every ``wirehub_session_opened``):
        the upgrade URL's joins, handled as join frames sent first would be, in order. Frames that arrive
        meanwhile wait: the first frame is read once this returned."""
        for request in (self._url_joins.pop(session, None) if self._url_joins else None) or ():
            if session.closed:
                break
            await self.handle(session, request)

    def _welcome(self, session: Session, joins: int) -> None:
        """The welcome; ``joins``: how many joins of the upgrade URL it announces (their replies follow it;
        a client that sees no ``joins`` talks to a server that ignored them, and joins with frames)."""
        identity = session.identity
        if type(self).welcome is not OpHandler.welcome or identity.expires_at is not None:
            frame = self.welcome(session)
            if joins:
                frame["joins"] = joins
            session.send(frame)
            return
        # The usual welcome (no expiry, this class's fields) spliced from pre-encoded parts: the same bytes
        # as dumps(self.welcome(session)) (tests/test_welcome.py), without a dict and a JSON encoder
        # per connection.
        user = _json_string(identity.user).encode()
        payload = _WELCOME_HEAD + session.id_bytes + b'","user":' + user + b',"node":' + \
            _json_string(session.node).encode()
        if identity.name:
            payload += b',"name":' + (user if identity.name == identity.user else _json_string(identity.name).encode())
        if joins:
            payload += b',"joins":%d' % joins
        session.send_frame(OutFrame(payload + b"}"))

    async def on_message(self, session: Session, data: str | bytes) -> None:
        try:
            request = parse_request(data, self.context.config.server.max_json_depth)
        except ProtocolError as exc:
            if self.admit(session, exc.req_id):  # invalid frames cost a request too
                session.send_error(exc.code, exc.message, exc.req_id, **exc.extra)
            return
        await self.handle(session, request)

    async def handle(self, session: Session, request: dict[str, Any]) -> None:
        """One parsed request (a frame's, or a join of the upgrade URL): rate, dispatch, and the error reply."""
        req_id = request.get("id")
        try:
            name = request["op"]
            if not self.own_rate_limit(name) and not self.admit(session, req_id):
                return
            op = self.ops.get(name)
            if op is None:
                raise ProtocolError(ErrorCode.UNKNOWN_OP, f"unknown op {name!r}; valid: {', '.join(sorted(self.ops))}")
            await op(session, request)
        except ProtocolError as exc:
            session.send_error(exc.code, exc.message, exc.req_id if exc.req_id is not None else req_id, **exc.extra)
        except Exception as exc:
            # translated here, not by a wrapper coroutine around every op (one per request: a join's dispatch)
            answer = self.op_error(exc)
            if answer is not None:
                session.send_error(answer.code, answer.message, req_id, **answer.extra)
                return
            self.context.logs.exception(log, "%s: op failed for %r", type(self).__name__, session)
            session.send_error(ErrorCode.INTERNAL, "internal error", req_id)

    def op_error(self, exc: Exception) -> ProtocolError | None:
        """The ``error`` reply for an exception an op raised that is not a :class:`ProtocolError` (a
        subclass maps its backend's failures, e.g. chat: the bus down is ``unavailable``); None: it is a
        bug, reported and answered ``internal``."""
        return None

    async def on_close(self, session: Session) -> None:
        return None

    def url_join_limit(self) -> int:
        """Most ``join`` parameters one upgrade URL may carry: the handler's ``options.max_rooms`` when it
        has one (chat), else :data:`DEFAULT_URL_JOINS`. More would be refused one by one after the upgrade."""
        limit = getattr(getattr(self, "options", None), "max_rooms", None)
        return limit if type(limit) is int and limit > 0 else DEFAULT_URL_JOINS

    def own_rate_limit(self, op: str) -> bool:
        """True for an op with a per-session rate limit of its own (chat ``publish``): it is charged to
        that one, not to the op rate. Every other request, whatever its op, goes through :meth:`admit`."""
        return False

    def admit(self, session: Session, req_id: Any) -> bool:
        """The per-session op rate (``server.op_rate``, ``op_burst``): False after answering
        ``error rate_limited``; after ``op_rate_close_after`` refusals in a row the session is
        closed with 4029. A flood of cheap requests (history, presence, join/leave) costs the
        replica at most ``op_rate`` handled requests a second per session."""
        server = self.context.config.server
        if not server.op_rate:
            return True
        state = session.handler_state()
        budget = state.get(_OP_BUDGET)
        if not isinstance(budget, _OpBudget):
            # Most sessions send one request or a few (a member of a big room: its join), so the first
            # takes a token without a bucket: only its time is kept. The second makes the bucket as it
            # would stand had it been made then (the same tokens; about 200 bytes less per member).
            if budget is None:
                state[_OP_BUDGET] = time.monotonic()
                return True
            first = budget if isinstance(budget, float) else None
            bucket = TokenBucket(server.op_rate, server.op_burst, taken=0 if first is None else 1, since=first)
            budget = state[_OP_BUDGET] = _OpBudget(bucket)
        if budget.bucket.take():
            budget.strikes = 0
            return True
        budget.strikes += 1
        session.send_error(
            ErrorCode.RATE_LIMITED, "too many requests; slow down", req_id, retry_ms=budget.bucket.wait_ms()
        )
        if server.op_rate_close_after and budget.strikes >= server.op_rate_close_after:
            session.close(CloseCode.RATE_LIMITED, retry_ms=int(server.op_burst / server.op_rate * 1000))
        return False

    def reply(self, session: Session, request: dict[str, Any], op: str, **fields: Any) -> None:
        frame: dict[str, Any] = {"op": op}
        if request.get("id") is not None:
            frame["id"] = request["id"]
        frame.update(fields)
        session.send(frame)

    async def op_ping(self, session: Session, request: dict[str, Any]) -> None:
        self.reply(session, request, "pong", ts=time.time())

    async def op_refresh(self, session: Session, request: dict[str, Any]) -> None:
        token = request.get("token")
        if not isinstance(token, str) or not token:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "refresh needs a string field 'token'")
        try:
            identity = await self.context.authenticator.refresh(session.identity, token)
        except AuthError as exc:
            self.context.metrics.auth_failures.labels(exc.reason).inc()
            raise ProtocolError(ErrorCode.FORBIDDEN, f"refresh refused: {exc.reason}", reason=exc.reason) from None
        if identity.user != session.identity.user:
            raise ProtocolError(ErrorCode.FORBIDDEN, "refresh refused: the token is for another user", reason="bad_sub")
        session.set_identity(identity)
        self.reply(session, request, "refreshed", expires_at=identity.expires_at)
        await self.after_refresh(session)

    async def after_refresh(self, session: Session) -> None:
        """The identity changed (its rooms may have): subclasses re-check what the session holds."""


def require_str(request: dict[str, Any], name: str, *, max_len: int = 256) -> str:
    value = request.get(name)
    if not isinstance(value, str) or not value or len(value) > max_len:
        raise ProtocolError(
            ErrorCode.BAD_REQUEST, f"field {name!r} must be a non-empty string of at most {max_len} characters"
        )
    return value
