"""An asyncio client for wirehub's chat and game endpoints, and the ``wirehub listen | send`` helpers.

The same semantics as ``/static/wirehub.js`` (docs/clients.md)::

    client = Client("ws://localhost:8080/ws/chat", token=get_token)   # str, or a (async) callable
    await client.connect()
    await client.join("lobby", lambda msg: print(msg["from"], msg["data"]))
    offset = await client.publish("lobby", {"text": "hi"})            # waits for the ack
    await client.close()

    game = Client("ws://localhost:8080/ws/game")
    board = await game.join_game("board", lambda change: print(change["version"], change["state"]))
    version = await board.update([{"op": "add", "path": "/3-4", "value": "me"}])

- Reconnects by itself after a drop, with exponential backoff and full jitter, honouring the
  close codes: 1001 and 4008 reconnect after the server's ``retry_ms`` hint, 4001 fetches a new
  token first, 4003 stops for good, 4029 backs off longer. A refused upgrade (HTTP 401) fetches a
  new token too; HTTP 403 stops.
- Rejoins every room with its last ``{offset, epoch}``; :attr:`Subscription.recovered` (and the
  ``on_joined`` callback) says whether the server replayed everything missed meanwhile. Messages
  reach ``on_message`` once, in order, including replayed ones (this client's own publishes are
  not given back when a recovery replays them).
- Requests (``publish``, ``presence``, ``history``, ...) made while disconnected wait for the next
  connection; every request has a timeout. A request sent on a connection that dropped before
  the reply fails with ``disconnected`` (a publish may or may not have happened).
- With a token callable and a token that expires (``welcome.expires_at``), sends
  ``refresh {token}`` ``refresh_margin`` seconds before the expiry.

Callbacks are plain functions called on the event loop, in order; a callback that returns a
coroutine has it scheduled as a task (it must not block the reading of the connection).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import json
import logging
import random
import re
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from tornado.httpclient import HTTPClientError, HTTPRequest
from tornado.websocket import WebSocketClientConnection, WebSocketClosedError, websocket_connect

from wirehub.protocol import SUBPROTOCOL, CloseCode

log = logging.getLogger("wirehub.client")

TokenSource = str | Callable[[], "str | Awaitable[str | None] | None"] | None
Callback = Callable[[Any], Any]

_RETRY_RE = re.compile(r"(?:^|;)\s*retry_ms=(\d+)")


class ClientError(Exception):
    """A failed request. ``code`` is a server error code (``forbidden``, ``not_joined``, ...) or
    one of the client's own: ``timeout``, ``disconnected``, ``closed``, ``stopped``."""

    def __init__(self, code: str, message: str, frame: dict[str, Any] | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.frame = frame


def backoff_delay(attempt: int, base: float, cap: float, rand: Callable[[], float] = random.random) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(cap, base * 2**attempt))."""
    return float(rand() * min(cap, base * 2.0 ** min(attempt, 30)))


def parse_retry_ms(reason: str | None) -> int | None:
    """The ``retry_ms=N`` hint of a close reason, or None."""
    m = _RETRY_RE.search(reason or "")
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class ClosePolicy:
    reconnect: bool
    delay: float  # seconds
    new_token: bool


def close_policy(code: int | None, reason: str | None, attempt: int, base: float, cap: float) -> ClosePolicy:
    """What to do after the server closed with ``code`` (None: the connection just dropped)."""
    hint = parse_retry_ms(reason)
    if code == CloseCode.FORBIDDEN:
        return ClosePolicy(False, 0.0, False)
    if code == CloseCode.TOKEN_EXPIRED:
        return ClosePolicy(True, backoff_delay(min(attempt, 1), base, cap), True)
    if code in (CloseCode.GOING_AWAY, CloseCode.SLOW_CONSUMER):
        return ClosePolicy(True, hint / 1000 if hint is not None else backoff_delay(attempt, base, cap), False)
    if code == CloseCode.RATE_LIMITED:
        return ClosePolicy(True, (hint or 0) / 1000 + backoff_delay(attempt + 3, base, cap), False)
    return ClosePolicy(True, backoff_delay(attempt, base, cap), False)


@dataclass(eq=False)
class Subscription:
    """A joined chat room and the position this client has reached in it."""

    client: Client
    room: str
    on_message: Callback
    on_joined: Callback | None = None
    on_presence: Callback | None = None
    offset: int | None = None
    epoch: str | None = None
    #: whether the last (re)join recovered every missed message (None before the first join)
    recovered: bool | None = None
    presence: list[dict[str, Any]] = field(default_factory=list)
    #: presence of big rooms (docs/clients.md): the room's totals ``{users, connections}`` (None while
    #: unknown or with presence off), the cursor of joined's list (None: it listed everyone), and the
    #: members known here by user id, kept up to date by presence.join / presence.leave / presence.diff
    count: dict[str, int] | None = None
    cursor: str | None = None
    members: dict[str, dict[str, Any]] = field(default_factory=dict)
    own: set[int] = field(default_factory=set)

    @property
    def position(self) -> dict[str, Any] | None:
        if self.offset is None or self.epoch is None:
            return None
        return {"offset": self.offset, "epoch": self.epoch}

    def _move(self, offset: Any, epoch: Any) -> None:
        """Take a position the server named: within an epoch it only moves forward (a message
        already handed to ``on_message`` is never asked for again); another epoch starts over."""
        new = offset if isinstance(offset, int) and not isinstance(offset, bool) else None
        if epoch != self.epoch:
            self.offset, self.epoch = new, epoch if isinstance(epoch, str) else None
            self.own = set()  # offsets of another epoch
        elif new is not None and (self.offset is None or new > self.offset):
            self.offset = new
            self.own = {o for o in self.own if o > new}

    async def publish(self, data: Any, timeout: float | None = None) -> int:
        return await self.client.publish(self.room, data, timeout=timeout)


def take_presence_snapshot(sub: Subscription, joined: dict[str, Any]) -> None:
    """The presence part of a ``joined`` reply: the first members, the count, the cursor."""
    sub.members = {m["user"]: dict(m) for m in sub.presence if isinstance(m, dict) and "user" in m}
    count = joined.get("count")
    sub.count = dict(count) if isinstance(count, dict) else None
    cursor = joined.get("cursor")
    sub.cursor = cursor if isinstance(cursor, str) else None


def apply_presence_event(sub: Subscription, frame: dict[str, Any]) -> None:
    """A presence.join / presence.leave / presence.diff applied to the member map and the count.

    A diff may repeat a join that ``joined`` already listed (same interval): applying is idempotent,
    and its ``count`` is the server's (authoritative); single events adjust the count by one user.
    """
    op, count = frame.get("op"), sub.count
    if op == "presence.diff":
        for user in frame.get("leaves") or ():
            sub.members.pop(user, None)
        for item in frame.get("joins") or ():
            sub.members[item["user"]] = {"connections": 1, **item}
        if isinstance(frame.get("count"), dict):
            sub.count = dict(frame["count"])
        return
    user = frame.get("user")
    if not isinstance(user, str):
        return
    if op == "presence.join":
        item = {"user": user, "connections": 1, **({"name": frame["name"]} if frame.get("name") else {})}
        if user not in sub.members and count is not None:
            count["users"] += 1
        sub.members[user] = item
    else:
        if count is not None:
            count["users"] = max(0, count["users"] - 1)
        sub.members.pop(user, None)


@dataclass(eq=False)
class GameRoom:
    """A joined game room: ``state`` and ``version`` follow the server, patch by patch.

    A ``patch`` whose ``from_version`` does not continue ``version`` (a gap), or that does not
    apply, triggers ``sync`` and a fresh ``state``; ``resyncs`` counts those.
    """

    client: Client
    room: str
    on_change: Callback | None = None
    state: Any = None
    version: int = 0
    resyncs: int = 0
    #: a state arrived (the first join happened)
    joined: bool = False
    _syncing: asyncio.Task[None] | None = None

    async def update(self, patch: list[dict[str, Any]], timeout: float | None = None) -> int:
        """Send a JSON Patch; returns the committed version (the ``patch`` event applies it)."""
        reply = await self.client.request({"op": "update", "room": self.room, "patch": patch}, timeout)
        return int(reply.get("version", 0))

    def sync(self) -> asyncio.Task[None]:
        if self._syncing is None or self._syncing.done():
            self._syncing = asyncio.ensure_future(self._sync())
        return self._syncing

    async def _sync(self) -> None:
        try:
            frame = await self.client.request({"op": "sync", "room": self.room})
        except ClientError as exc:
            self.client._emit("error", exc)
            return
        self._state(frame, resync=True)

    async def leave(self) -> None:
        await self.client.leave(self.room)

    def _state(self, frame: dict[str, Any], resync: bool) -> None:
        self.joined = True
        self.state = frame.get("state")
        self.version = int(frame.get("version", 0))
        if resync:
            self.resyncs += 1
        if self.on_change is not None:
            self.client._call(self.on_change, {"state": self.state, "version": self.version, "resync": resync})

    def _patch(self, frame: dict[str, Any]) -> None:
        import jsonpatch

        if self._syncing is not None and not self._syncing.done():
            return  # the state being fetched includes it
        version = int(frame.get("version", 0))
        if version <= self.version:
            return
        if int(frame.get("from_version", version)) != self.version + 1:
            self.sync()
            return
        try:
            self.state = jsonpatch.apply_patch(self.state, frame.get("patch") or [], in_place=False)
        except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException, TypeError, KeyError, IndexError):
            self.sync()
            return
        self.version = version
        if self.on_change is not None:
            self.client._call(self.on_change, {"state": self.state, "version": version, "by": frame.get("by"),
                                               "resync": False})


class Client:
    """One connection to one endpoint, kept alive. See the module docstring."""

    def __init__(
        self,
        url: str,
        token: TokenSource = None,
        *,
        token_transport: str = "header",
        backoff_min: float = 0.5,
        backoff_max: float = 30.0,
        ack_timeout: float = 10.0,
        connect_timeout: float = 10.0,
        refresh_margin: float = 30.0,
        ping_interval: float = 20.0,
        reconnect: bool = True,
    ) -> None:
        if token_transport not in ("header", "subprotocol", "query"):
            raise ValueError("token_transport must be 'header', 'subprotocol' or 'query'")
        self.url = url
        self.token_source = token
        self.token_transport = token_transport
        self.backoff_min, self.backoff_max = backoff_min, backoff_max
        self.ack_timeout = ack_timeout
        self.connect_timeout = connect_timeout
        self.refresh_margin = refresh_margin
        self.ping_interval = ping_interval
        self.auto_reconnect = reconnect
        #: idle | connecting | open | reconnecting | closed | stopped
        self.status = "idle"
        self.welcome: dict[str, Any] | None = None
        self.rooms: dict[str, Subscription] = {}
        self.games: dict[str, GameRoom] = {}
        #: connections opened so far
        self.connections = 0
        self.last_close: tuple[int | None, str | None] | None = None
        self._conn: WebSocketClientConnection | None = None
        self._ready = asyncio.Event()
        self._stopped = False
        self._stop_error: ClientError | None = None
        self._runner: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        #: per request id, run when its (non-error) reply arrives, before any later frame is handled
        self._reply_hooks: dict[str, Callable[[dict[str, Any]], None]] = {}
        self._next_id = 0
        self._attempt = 0
        self._token: str | None = token if isinstance(token, str) else None
        self._token_stale = callable(token)
        self._handlers: dict[str, list[Callback]] = {}
        self._status_changed = asyncio.Event()

    # -- events ----------------------------------------------------------------------------------------

    def on(self, name: str, fn: Callback) -> Callable[[], None]:
        """Subscribe to ``status``, ``welcome``, ``joined``, ``close``, ``presence``, ``gap``,
        ``left``, ``error``, ``refreshed``, ``frame``; returns an unsubscribe function."""
        self._handlers.setdefault(name, []).append(fn)
        return lambda: self._handlers.get(name, []).remove(fn) if fn in self._handlers.get(name, []) else None

    def _emit(self, name: str, arg: Any) -> None:
        for fn in list(self._handlers.get(name, ())):
            self._call(fn, arg)

    def _call(self, fn: Callback, arg: Any) -> None:
        try:
            result = fn(arg)
        except Exception:
            log.exception("a client callback failed")
            return
        if inspect.isawaitable(result):
            self._spawn(result)

    def _spawn(self, aw: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(aw)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("a client task failed", exc_info=task.exception())

    def _set_status(self, status: str) -> None:
        if status != self.status:
            self.status = status
            self._status_changed.set()
            self._status_changed = asyncio.Event()
            self._emit("status", status)

    # -- lifecycle -------------------------------------------------------------------------------------

    async def connect(self, timeout: float | None = None) -> None:
        """Start the client (if needed) and wait until it is connected with its rooms joined.

        Raises ClientError ``stopped`` when the server refused for good (4003, HTTP 403) and
        ``timeout`` after ``timeout`` seconds (the client keeps trying unless closed).
        """
        if self._stopped:
            raise self._stop_error or ClientError("closed", "the client was closed")
        if self._runner is None:
            self._runner = asyncio.ensure_future(self._run())
        try:
            await asyncio.wait_for(self._wait_ready(), timeout)
        except TimeoutError:
            raise ClientError("timeout", f"not connected within {timeout} s") from None

    async def _wait_ready(self) -> None:
        while not self._ready.is_set():
            if self._stopped:
                raise self._stop_error or ClientError("closed", "the client was closed")
            changed = self._status_changed
            ready = asyncio.ensure_future(self._ready.wait())
            status = asyncio.ensure_future(changed.wait())
            try:
                await asyncio.wait({ready, status}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                ready.cancel()
                status.cancel()

    async def close(self) -> None:
        """Close for good: no reconnect; waiting requests fail with ``closed``."""
        self._stopped = True
        self._ready.clear()
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close(1000)
        self._fail_pending("closed", "the client was closed")
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
            self._runner = None
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._set_status("closed")

    async def __aenter__(self) -> Client:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _get_token(self) -> str | None:
        source = self.token_source
        if not callable(source):
            return self._token
        if self._token_stale or not self._token:
            value = source()
            if inspect.isawaitable(value):
                value = await value
            self._token = value or None
            self._token_stale = False
        return self._token

    def _request_for(self, token: str | None) -> tuple[HTTPRequest, list[str]]:
        url, headers, protocols = self.url, {}, [SUBPROTOCOL]
        if token:
            if self.token_transport == "header":
                headers["Authorization"] = f"Bearer {token}"
            elif self.token_transport == "subprotocol":
                protocols.append(f"bearer.{token}")
            else:
                url += ("&" if "?" in url else "?") + "token=" + quote(token, safe="")
        request = HTTPRequest(url, headers=headers, connect_timeout=self.connect_timeout,
                              request_timeout=self.connect_timeout)
        return request, protocols

    async def _run(self) -> None:
        """Connect, read until the connection ends, decide, wait, repeat."""
        while not self._stopped:
            self._set_status("connecting" if self.connections == 0 and self._attempt == 0 else "reconnecting")
            code: int | None
            reason: str | None
            welcomed = False
            try:
                token = await self._get_token()
                request, protocols = self._request_for(token)
                conn = await websocket_connect(request, subprotocols=protocols,
                                               ping_interval=self.ping_interval or None,
                                               ping_timeout=(self.ping_interval or 0) * 0.75 or None)
            except HTTPClientError as exc:
                code, reason = _http_close(exc.code)
                log.info("upgrade refused: HTTP %s", exc.code)
            except (OSError, TimeoutError) as exc:
                code, reason = None, f"connect failed: {exc}"
            except Exception as exc:  # token callback failed, bad URL, ...
                code, reason = None, f"connect failed: {exc!r}"
                self._emit("error", ClientError("connect", str(exc)))
            else:
                self._conn = conn
                welcomed = await self._read(conn)
                code, reason = conn.close_code, conn.close_reason
                conn.close()  # idempotent; releases the connection object
                if self._conn is conn:
                    self._conn = None
            if self._stopped:
                return
            self._ready.clear()
            self.last_close = (code, reason)
            self._fail_pending("disconnected", f"connection closed ({code})")
            policy = close_policy(code, reason, self._attempt, self.backoff_min, self.backoff_max)
            if not welcomed and callable(self.token_source) and code in (None, 4401):
                policy = ClosePolicy(policy.reconnect, policy.delay, True)
            elif code == 4401:  # a fixed token (or none): the same request would be refused again
                policy = ClosePolicy(False, 0.0, False)
            reconnect = policy.reconnect and self.auto_reconnect
            self._emit("close", {"code": code, "reason": reason, "reconnect": reconnect, "delay": policy.delay})
            if not reconnect:
                forbidden = code in (CloseCode.FORBIDDEN, 4401)  # refused for good
                self._stopped = True
                if code == 4401:
                    self._stop_error = ClientError("unauthorized", "the upgrade was refused with HTTP 401: "
                                                   "no token, or an invalid one")
                else:
                    self._stop_error = ClientError("stopped" if forbidden else "closed",
                                                   f"closed by the server ({code} {reason})")
                self._set_status("stopped" if forbidden else "closed")
                return
            if policy.new_token:
                self._token_stale = True
            self._attempt += 1
            self._set_status("reconnecting")
            log.debug("reconnecting in %.3fs after %s %s", policy.delay, code, reason)
            await asyncio.sleep(policy.delay)

    async def _read(self, conn: WebSocketClientConnection) -> bool:
        """Read frames until the connection ends; True when a welcome came."""
        welcomed = False
        refresh: asyncio.TimerHandle | None = None
        try:
            while True:
                msg = await conn.read_message()
                if msg is None:
                    return welcomed
                try:
                    frame = json.loads(msg)
                except ValueError:
                    continue
                if not isinstance(frame, dict):
                    continue
                if frame.get("op") == "welcome" and not welcomed:
                    welcomed = True
                    self.welcome = frame
                    self.connections += 1
                    self._emit("welcome", frame)
                    refresh = self._schedule_refresh(conn, frame.get("expires_at"))
                    self._spawn(self._rejoin(conn))
                    continue
                self._on_frame(frame)
        finally:
            if refresh is not None:
                refresh.cancel()

    def _schedule_refresh(self, conn: WebSocketClientConnection, expires_at: Any) -> asyncio.TimerHandle | None:
        if not isinstance(expires_at, int | float) or not callable(self.token_source):
            return None
        left = expires_at - time.time()
        delay = max(1.0, min(left - self.refresh_margin, left * 0.8))
        return asyncio.get_running_loop().call_later(delay, lambda: self._spawn(self._refresh(conn)))

    async def _refresh(self, conn: WebSocketClientConnection) -> None:
        while self._conn is conn and not self._stopped:
            try:
                self._token_stale = True
                token = await self._get_token()
                if not token:
                    raise ClientError("token", "the token callable returned nothing")
                reply = await self.request({"op": "refresh", "token": token}, _internal=True)
            except ClientError as exc:
                if exc.code in ("disconnected", "closed"):
                    return
                self._emit("error", exc)
                await asyncio.sleep(5.0)  # the server closes with 4001 if it runs out meanwhile
                continue
            self._emit("refreshed", reply)
            expires_at = reply.get("expires_at")
            if not isinstance(expires_at, int | float):
                return
            left = expires_at - time.time()
            await asyncio.sleep(max(1.0, min(left - self.refresh_margin, left * 0.8)))

    async def _rejoin(self, conn: WebSocketClientConnection) -> None:
        async def one(sub: Subscription) -> None:
            try:
                await self._join(sub, rejoin=sub.recovered is not None)
            except ClientError as exc:
                if exc.code != "disconnected":
                    self.rooms.pop(sub.room, None)
                    self._emit("error", exc)

        async def one_game(game: GameRoom) -> None:
            try:
                reply = await self.request({"op": "join", "room": game.room}, _internal=True)
                game._state(reply, resync=game.joined)
            except ClientError as exc:
                if exc.code != "disconnected":
                    self.games.pop(game.room, None)
                    self._emit("error", exc)

        await asyncio.gather(*(one(sub) for sub in list(self.rooms.values())),
                             *(one_game(game) for game in list(self.games.values())))
        if self._conn is conn and not self._stopped:
            self._attempt = 0
            self._ready.set()
            self._set_status("open")

    def _on_frame(self, frame: dict[str, Any]) -> None:
        self._emit("frame", frame)
        req_id = frame.get("id")
        if req_id is not None:
            fut = self._pending.pop(str(req_id), None)
            if fut is not None:
                hook = self._reply_hooks.pop(str(req_id), None)
                if hook is not None and frame.get("op") != "error":
                    hook(frame)
                if not fut.done():
                    if frame.get("op") == "error":
                        fut.set_exception(ClientError(str(frame.get("code")), str(frame.get("message")), frame))
                    else:
                        fut.set_result(frame)
                return
        op = frame.get("op")
        room = frame.get("room")
        sub = self.rooms.get(room) if isinstance(room, str) else None
        if op == "message":
            if sub is not None:
                self._on_message(sub, frame)
        elif op in ("presence.join", "presence.leave", "presence.diff"):
            if sub is not None:
                apply_presence_event(sub, frame)
            if sub is not None and sub.on_presence is not None:
                self._call(sub.on_presence, frame)
            self._emit("presence", frame)
        elif op == "gap":
            if sub is not None:
                if isinstance(frame.get("offset"), int):
                    sub._move(frame["offset"], frame.get("epoch"))
                else:  # a server before gap carried an offset: the next message sets it
                    sub.offset, sub.epoch = None, frame.get("epoch")
            self._emit("gap", frame)
        elif op == "patch":
            game = self.games.get(room) if isinstance(room, str) else None
            if game is not None:
                game._patch(frame)
        elif op == "state":
            game = self.games.get(room) if isinstance(room, str) else None
            if game is not None:
                game._state(frame, resync=True)
        elif op == "left":
            # the server left a room for us (a refreshed token no longer allows it): no rejoin
            if isinstance(room, str):
                self.rooms.pop(room, None)
                self.games.pop(room, None)
            self._emit("left", frame)
        elif op == "error":
            self._emit("error", ClientError(str(frame.get("code")), str(frame.get("message")), frame))

    def _on_message(self, sub: Subscription, frame: dict[str, Any]) -> None:
        offset = frame.get("offset")
        if isinstance(offset, int):
            if sub.offset is not None and offset <= sub.offset:
                return  # replayed twice
            sub.offset = offset
            if offset in sub.own:
                sub.own.discard(offset)
                return  # our own publish, replayed by a recovery
            sub.own = {o for o in sub.own if o > offset}
        self._call(sub.on_message, frame)

    # -- requests --------------------------------------------------------------------------------------

    async def request(self, body: dict[str, Any], timeout: float | None = None, *,
                      _internal: bool = False,
                      _on_reply: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Send ``{op, ...}`` with a fresh id; return the reply with that id (ClientError on an
        ``error`` reply or a timeout). While disconnected it waits for the next connection.
        ``_on_reply(reply)`` runs as the reply is read, before the frames after it."""
        if self._stopped:
            raise self._stop_error or ClientError("closed", "the client was closed")
        if self._runner is None:
            self._runner = asyncio.ensure_future(self._run())
        limit = self.ack_timeout if timeout is None else timeout
        self._next_id += 1
        req_id = f"p{self._next_id}"
        try:
            async with asyncio.timeout(limit):
                if not _internal:
                    await self._wait_ready()
                conn = self._conn
                if conn is None:
                    raise ClientError("disconnected", "not connected")
                fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
                self._pending[req_id] = fut
                if _on_reply is not None:
                    self._reply_hooks[req_id] = _on_reply
                try:
                    await conn.write_message(json.dumps({**body, "id": req_id}))
                except WebSocketClosedError:
                    raise ClientError("disconnected", "the connection closed") from None
                return await fut
        except TimeoutError:
            raise ClientError("timeout", f"no reply to {body.get('op')} within {limit} s") from None
        finally:
            self._pending.pop(req_id, None)
            self._reply_hooks.pop(req_id, None)

    def _fail_pending(self, code: str, message: str) -> None:
        pending, self._pending = self._pending, {}
        self._reply_hooks.clear()
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(ClientError(code, message))
                fut.exception()  # retrieved here: the waiter may be gone

    # -- chat ------------------------------------------------------------------------------------------

    async def join(self, room: str, on_message: Callback, *, since: dict[str, Any] | None = None,
                   on_joined: Callback | None = None, on_presence: Callback | None = None) -> Subscription:
        """Join a chat room; ``on_message(frame)`` gets each ``message`` once, in order."""
        if room in self.rooms:
            raise ClientError("bad_request", f"already joined room {room!r}")
        sub = Subscription(self, room, on_message, on_joined, on_presence)
        if since is not None:
            sub.offset, sub.epoch = int(since["offset"]), str(since["epoch"])
        self.rooms[room] = sub
        try:
            if not self._ready.is_set():
                await self.connect(self.ack_timeout)
                if sub.recovered is not None:
                    return sub  # joined by the rejoin after the welcome
            try:
                await self._join(sub, rejoin=False)
            except ClientError as exc:
                if exc.code != "disconnected" or not self.auto_reconnect:
                    raise
                await self._await_rejoin(sub)  # the next connection joins every room in self.rooms
        except BaseException:
            if self.rooms.get(room) is sub:
                del self.rooms[room]
            raise
        return sub

    async def _await_rejoin(self, sub: Subscription) -> None:
        """Wait until the rejoin after a reconnect has joined ``sub`` (bounded by ack_timeout)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.ack_timeout
        joined = asyncio.Event()
        off = self.on("joined", lambda info: joined.set() if info["room"] == sub.room else None)
        try:
            while sub.recovered is None:
                if self._stopped:
                    raise self._stop_error or ClientError("closed", "the client was closed")
                if self.rooms.get(sub.room) is not sub:
                    raise ClientError("rejected", f"the rejoin of {sub.room!r} failed")
                if loop.time() > deadline:
                    raise ClientError("timeout", f"could not join {sub.room!r} within {self.ack_timeout} s")
                with contextlib.suppress(TimeoutError):  # wakes on the event; re-checks the rest twice a second
                    await asyncio.wait_for(joined.wait(), min(0.5, max(0.01, deadline - loop.time())))
        finally:
            off()

    async def _join(self, sub: Subscription, rejoin: bool) -> None:
        body: dict[str, Any] = {"op": "join", "room": sub.room}
        if sub.position is not None:
            body["since"] = sub.position
        reply = await self.request(body, _internal=True, _on_reply=lambda r: self._joined(sub, r))
        sub.recovered = bool(reply.get("recovered"))
        sub.presence = list(reply.get("presence") or [])
        take_presence_snapshot(sub, reply)
        info = {"room": sub.room, "offset": reply.get("offset"), "epoch": sub.epoch, "recovered": sub.recovered,
                "rejoin": rejoin, "presence": sub.presence}
        self._emit("joined", info)
        if sub.on_joined is not None:
            self._call(sub.on_joined, info)

    @staticmethod
    def _joined(sub: Subscription, reply: dict[str, Any]) -> None:
        """The position after ``joined``, taken as the reply is read: the live messages that follow
        it may be handed to ``on_message`` before the awaiting ``_join`` resumes."""
        if reply.get("recovered") and sub.offset is not None and sub.epoch == reply.get("epoch"):
            return  # the replay that follows moves it
        sub._move(reply.get("offset"), reply.get("epoch"))

    async def leave(self, room: str) -> None:
        """Leave a chat or game room (no rejoin after a reconnect)."""
        had = self.rooms.pop(room, None) is not None or self.games.pop(room, None) is not None
        if had and self._ready.is_set():
            with contextlib.suppress(ClientError):
                await self.request({"op": "leave", "room": room})

    async def publish(self, room: str, data: Any, timeout: float | None = None) -> int:
        """Publish to a joined room; returns the message's offset from the server's ack."""
        reply = await self.request({"op": "publish", "room": room, "data": data}, timeout)
        offset = reply.get("offset")
        sub = self.rooms.get(room)
        if sub is not None and isinstance(offset, int) and (sub.offset is None or offset > sub.offset):
            sub.own.add(offset)
        return int(offset) if isinstance(offset, int) else -1

    async def presence(self, room: str) -> list[dict[str, Any]]:
        """The first page of members (``presence_limit`` of them); :meth:`presence_page` pages on."""
        reply = await self.request({"op": "presence", "room": room})
        return list(reply.get("members") or [])

    async def presence_page(self, room: str, *, after: str | None = None,
                            limit: int | None = None) -> dict[str, Any]:
        """``{members, count, cursor?}``: the members after ``after`` (a ``cursor`` of an earlier page or
        of ``Subscription.cursor``); no ``cursor`` in the reply means this was the last page."""
        body: dict[str, Any] = {"op": "presence", "room": room}
        if after is not None:
            body["after"] = after
        if limit is not None:
            body["limit"] = limit
        reply = await self.request(body)
        sub = self.rooms.get(room)
        if sub is not None and isinstance(reply.get("count"), dict):
            sub.count = dict(reply["count"])
        return reply

    async def presence_count(self, room: str) -> dict[str, int]:
        """``{users, connections}`` of the room, without the member list."""
        reply = await self.request({"op": "presence", "room": room, "count_only": True})
        count = {"users": int(reply["count"]["users"]), "connections": int(reply["count"]["connections"])}
        sub = self.rooms.get(room)
        if sub is not None:
            sub.count = dict(count)
        return count

    async def history(self, room: str, *, limit: int | None = None,
                      since: dict[str, Any] | None = None) -> dict[str, Any]:
        """``{messages, offset, epoch, complete}``: the newest ``limit`` messages or those after ``since``."""
        body: dict[str, Any] = {"op": "history", "room": room}
        if limit is not None:
            body["limit"] = limit
        if since is not None:
            body["since"] = since
        return await self.request(body)


    # -- game -------------------------------------------------------------------------------------------

    async def join_game(self, room: str, on_change: Callback | None = None) -> GameRoom:
        """Join a game room (on a ``/ws/game`` connection). ``on_change({state, version, resync,
        by?})`` runs after each change; after a reconnect the room is joined again (a fresh state)."""
        if room in self.games:
            raise ClientError("bad_request", f"already joined room {room!r}")
        game = GameRoom(self, room, on_change)
        self.games[room] = game
        try:
            if not self._ready.is_set():
                await self.connect(self.ack_timeout)
                if game.joined:
                    return game  # joined by the rejoin after the welcome
            game._state(await self.request({"op": "join", "room": room}), resync=False)
        except BaseException:
            if self.games.get(room) is game:
                del self.games[room]
            raise
        return game


def _http_close(status: int) -> tuple[int | None, str]:
    """A refused upgrade as a close code for the policy: 403 stops, 429 backs off, else retry
    (``4401`` stands for a 401: fetch a new token)."""
    if status == 403:
        return CloseCode.FORBIDDEN, "HTTP 403"
    if status == 429:
        return CloseCode.RATE_LIMITED, "HTTP 429"
    if status == 401:
        return 4401, "HTTP 401"
    return None, f"HTTP {status}"


# -- CLI helpers: wirehub listen ROOM / wirehub send ROOM JSON --------------------------------------------------


def _print_line(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def _note(text: str) -> None:
    print(f"wirehub: {text}", file=sys.stderr, flush=True)


def _fail_fast(args: argparse.Namespace, **options: Any) -> Client:
    """A client for ``listen``/``send`` that gives up when the first connection fails (no server there),
    unless ``--retry``; once connected, it reconnects like any client."""
    client = Client(args.url, args.token or None, reconnect=bool(getattr(args, "retry", False)), **options)
    client.on("welcome", lambda _frame: setattr(client, "auto_reconnect", True))
    return client


def _connect_failure(client: Client, url: str) -> str | None:
    """Why no connection was ever made (no server, not a wirehub endpoint), or None."""
    if client.connections or client.last_close is None or client.last_close[0] in (CloseCode.FORBIDDEN, 4401):
        return None  # refused for good (403, 401): the client's own error says so
    reason = str(client.last_close[1] or "").removeprefix("connect failed: ")
    if "refused" in reason.lower():
        return f"connection refused: no wirehub server at {url}"
    return f"cannot connect to {url}: {reason}"


async def _listen(args: argparse.Namespace) -> int:
    client = _fail_fast(args, backoff_max=float(getattr(args, "backoff_max", 10.0) or 10.0))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    count = int(getattr(args, "count", 0) or 0)
    seen = 0
    broken_pipe = False

    def on_message(frame: dict[str, Any]) -> None:
        nonlocal seen, broken_pipe
        try:
            _print_line(frame)
        except BrokenPipeError:  # stdout's reader is gone (| head): stop, the CLI exits quietly
            broken_pipe = True
            stop.set()
            return
        seen += 1
        if count and seen >= count:
            stop.set()

    def on_joined(info: dict[str, Any]) -> None:
        what = "rejoined" if info["rejoin"] else "joined"
        _note(f"{what} {info['room']} (offset {info['offset']}, recovered {str(info['recovered']).lower()})")

    def on_close(c: dict[str, Any]) -> None:
        if client.connections or c["reconnect"]:  # else _connect_failure says it, once
            _note(f"{'disconnected' if client.connections else 'cannot connect'} ({c['code']} {c['reason'] or ''}); "
                  + (f"reconnecting in {c['delay']:.2f}s" if c["reconnect"] else "giving up"))

    client.on("close", on_close)
    client.on("status", lambda s: stop.set() if s in ("stopped", "closed") else None)
    try:
        joining = asyncio.ensure_future(client.join(args.room, on_message, on_joined=on_joined))
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait({joining, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if joining.done():
            joining.result()  # raises a refused join
            await stopping
        else:
            joining.cancel()
            with contextlib.suppress(asyncio.CancelledError, ClientError):
                await joining
        stopping.cancel()
        if broken_pipe:
            raise BrokenPipeError
        failure = _connect_failure(client, args.url)
        if failure:
            _note(failure)
            return 1
        if client.status == "stopped":
            _note(f"refused by the server: {client.last_close}")
            return 1
        return 0
    except ClientError as exc:
        _note(_connect_failure(client, args.url) or f"listen failed: {exc}")
        return 1
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await client.close()


def listen_main(args: argparse.Namespace) -> int:
    """``wirehub listen ROOM``: print the room's messages as JSON lines until interrupted.

    Status lines (joined, reconnecting) go to stderr. Exit 0 on SIGINT/SIGTERM or after ``--count``
    messages, 1 when refused or when no server answers the first connection (unless ``--retry``).
    """
    return asyncio.run(_listen(args))


async def _send(args: argparse.Namespace) -> int:
    try:
        data = json.loads(args.data)
    except ValueError:
        _note(f"not valid JSON: {args.data!r} (quote strings: '\"hi\"')")
        return 2
    timeout = float(getattr(args, "timeout", 10.0) or 10.0)
    client = _fail_fast(args, backoff_max=2.0, ack_timeout=timeout)
    try:
        await client.connect(timeout)
        await client.join(args.room, lambda _frame: None)
        offset = await client.publish(args.room, data)
        _print_line({"room": args.room, "offset": offset})
        return 0
    except ClientError as exc:
        _note(_connect_failure(client, args.url) or f"send failed: {exc}")
        return 1
    finally:
        await client.close()


def send_main(args: argparse.Namespace) -> int:
    """``wirehub send ROOM JSON``: publish one JSON value; prints ``{"room", "offset"}``.

    Exit 0 once acked, 1 on failure (refused, no server at the URL unless ``--retry``, timeout),
    2 when the data is not JSON.
    """
    return asyncio.run(_send(args))
