"""``POST /api/publish``: a backend service publishes ``{room, data}`` into a chat room over HTTP.

``Authorization: Bearer <key>`` with a key from ``api.keys``; without any configured key the API
is off (503). Members get a ``message`` from ``"server"``, published by the very function the
chat handler uses (:func:`wirehub.rooms.publish_message`), after ``wirehub_filter_message`` with
``session=None``. Every answer is JSON; errors are ``{error, reason}``.

Outcomes (docs/protocol.md, "Publish API"): 200 published (also for a retry whose idempotency key
was already used within ``api.idempotency_window``: the original offset, nothing delivered again);
503 ``unavailable`` only when nothing was published (API off, bus down before the send, replica
stopping); 504 ``timeout`` when the bus took the message but did not confirm it: it may have been
delivered, and a retry with the same ``Idempotency-Key`` is delivered at most once. Every request
is counted in ``app.api_requests`` until answered, and the drain waits for them before closing
the bus.
"""

from __future__ import annotations

import hmac
from typing import TYPE_CHECKING, Any

import tornado.web

from wirehub.bus import BusUnavailable, PublishOutcomeUnknown
from wirehub.http import JsonHandler
from wirehub.inbound import JsonRejected
from wirehub.inbound import loads as decode_json
from wirehub.protocol import ErrorCode, ProtocolError
from wirehub.rooms import SERVER_SENDER, RoomRules, parse_idempotency_key, publish_message

if TYPE_CHECKING:
    from wirehub.app import Wirehub

#: HTTP status of each ProtocolError code publish_message may raise
_STATUS = {ErrorCode.BAD_REQUEST: 400, ErrorCode.TOO_LARGE: 413, ErrorCode.REJECTED: 422}


def room_rules(app: Wirehub) -> RoomRules:
    """The room rules of the first endpoint whose handler has them (the chat handler), else defaults."""
    for handler in app.handlers.values():
        rules = getattr(handler, "room_rules", None)
        if isinstance(rules, RoomRules):
            return rules
    return RoomRules()


@tornado.web.stream_request_body
class PublishHandler(JsonHandler):
    """Streams the body so that an oversized one is counted and discarded, never buffered."""

    def initialize(self, app: Wirehub | None = None) -> None:
        super().initialize(app)
        self._body = bytearray()
        self._size = 0

    def data_received(self, chunk: bytes) -> None:
        assert self.app is not None
        self._size += len(chunk)
        if self._size <= self.app.config.api.max_body:
            self._body += chunk

    def _key_ok(self) -> bool:
        assert self.app is not None
        scheme, _, key = self.request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            return False
        given = key.strip().encode()
        # Compare with every key, so the time taken does not tell which one nearly matched.
        matches = [hmac.compare_digest(given, k.encode()) for k in self.app.config.api.keys]
        return any(matches)

    def _fail(self, status: int, error: str, reason: str) -> None:
        self.write_json(status, {"error": error, "reason": reason})

    async def post(self) -> None:
        app = self.app
        assert app is not None
        if app.stopping:  # the bus is about to close: refuse before anything is published
            self.set_header("Retry-After", "1")
            self.set_header("Connection", "close")
            return self._fail(503, "unavailable", "the replica is stopping; retry on another replica")
        with app.api_requests.track():
            await self._publish(app)

    async def _publish(self, app: Wirehub) -> None:
        if not app.config.api.keys:
            return self._fail(503, "unavailable", "the publish API is off: no api.keys are configured")
        if not self._key_ok():
            self.set_header("WWW-Authenticate", 'Bearer realm="wirehub"')
            return self._fail(401, "unauthorized", "missing or invalid bearer key")
        if self._size > app.config.api.max_body:
            limit = app.config.api.max_body
            return self._fail(413, "too_large", f"the body is over api.max_body ({limit} bytes)")
        try:
            body: Any = decode_json(self._body, app.config.server.max_json_depth)
        except JsonRejected as exc:
            return self._fail(400, "bad_request", exc.explain("the body"))
        if not isinstance(body, dict):
            return self._fail(400, "bad_request", "the body must be a JSON object {room, data}")
        if "data" not in body:
            return self._fail(400, "bad_request", "the body needs a field 'data' (any JSON value)")
        try:
            rules = room_rules(app)
            room = rules.room(body)
            key = self._idempotency_key(body)
            offset = await publish_message(
                app.hub, app.hooks, rules, room, body["data"], sender=SERVER_SENDER, session=None,
                idempotency_key=key, idempotency_window=app.config.api.idempotency_window,
            )
        except ProtocolError as exc:
            return self._fail(_STATUS.get(exc.code, 500), str(exc.code), exc.message)
        except PublishOutcomeUnknown:
            return self._fail(504, "timeout", "the message bus did not confirm the publish in time; it may have "
                              "been delivered: retry with the same Idempotency-Key")
        except BusUnavailable:
            self.set_header("Retry-After", "1")
            return self._fail(503, "unavailable", "the message bus is unavailable; retry later")
        self.write_json(200, {"room": room, "offset": offset})

    def _idempotency_key(self, body: dict[str, Any]) -> str | None:
        """The ``Idempotency-Key`` header or the body's ``idempotency_key`` (equal when both are given)."""
        header = parse_idempotency_key(self.request.headers.get("Idempotency-Key"), "Idempotency-Key")
        field = parse_idempotency_key(body.get("idempotency_key"))
        if header is not None and field is not None and header != field:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "Idempotency-Key and idempotency_key differ")
        return header if header is not None else field
