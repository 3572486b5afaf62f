"""The client's connection: :class:`Connection`, the base of :class:`wirehub.client.Client`.

One WebSocket to one endpoint, kept alive: it gets the token, connects, takes the welcome, reconnects
after a drop as :func:`~wirehub.client.policy.close_policy` says, refreshes an expiring token, matches
replies to requests and calls the event listeners. What the other frames mean for the joined rooms,
and joining them again after a reconnect, is the Client's part (``_dispatch``, ``_join_all``).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, Self
from urllib.parse import quote

from tornado.httpclient import HTTPClientError, HTTPRequest
from tornado.websocket import WebSocketClientConnection, WebSocketClosedError, websocket_connect

from wirehub.client.policy import Callback, ClientError, ClosePolicy, TokenSource, close_policy, http_close
from wirehub.protocol import SUBPROTOCOL, CloseCode

if TYPE_CHECKING:
    from wirehub.client.rooms import GameRoom, Subscription

log = logging.getLogger("wirehub.client")


class Connection:
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
        url_joins: bool = True,
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
        #: (re)join the rooms known at connect time in the upgrade URL (docs/protocol.md, "Joining in the
        #: upgrade URL"): one round trip less. Turned off by itself when a server ignores or refuses them.
        self.url_joins = url_joins
        #: idle | connecting | open | reconnecting | closed | stopped
        self.status = "idle"
        self.welcome: dict[str, Any] | None = None
        #: what the Client joined (kept here, so that the constructor is one): rejoined after each welcome
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
        #: the joins the current attempt's URL carries: room -> (request id, its reply), awaited after the welcome
        self._url_joined: dict[str, tuple[str, asyncio.Future[dict[str, Any]]]] = {}
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
        if conn is not None:
            await _released(conn)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._set_status("closed")

    async def __aenter__(self) -> Self:
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
        self._url_joined = {}
        for item in self._url_join_items() if self.url_joins else ():
            url += ("&" if "?" in url else "?") + "join=" + quote(json.dumps(item, separators=(",", ":")), safe="")
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
                connecting: asyncio.Future[WebSocketClientConnection] = websocket_connect(  # type: ignore[assignment]
                    request, subprotocols=protocols, ping_interval=self.ping_interval or None,
                    ping_timeout=(self.ping_interval or 0) * 0.75 or None)  # a Future, typed as Awaitable
                try:  # shielded: cancelling the future would leave the socket it opens to the GC
                    conn = await asyncio.shield(connecting)
                except asyncio.CancelledError:
                    connecting.add_done_callback(_close_if_opened)
                    raise
            except HTTPClientError as exc:
                code, reason = http_close(exc.code)
                log.info("upgrade refused: HTTP %s", exc.code)
                if exc.code == 400 and self._url_joined:
                    # such as more joins than the endpoint's max_rooms: the next attempts join with frames
                    log.warning("the server refused the joins in the URL; joining with frames from now on")
                    self.url_joins = False
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
                    if self._url_joined and frame.get("joins") != len(self._url_joined):
                        self._url_joins_ignored()
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

    def _url_join_items(self) -> list[dict[str, Any]]:
        """The joins to put in the next upgrade URL, each with its request id (see the Client's)."""
        return []

    def _expect_reply(self, room: str, req_id: str, on_reply: Callable[[dict[str, Any]], None] | None = None) -> None:
        """A reply to a request this side did not send (a join of the upgrade URL) is matched like one."""
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[req_id] = fut
        if on_reply is not None:
            self._reply_hooks[req_id] = on_reply
        self._url_joined[room] = (req_id, fut)

    def _url_joins_ignored(self) -> None:
        """A server that does not take joins in the URL (its welcome announces none): join with frames."""
        log.warning("the server ignored the joins in the URL; joining with frames from now on")
        self.url_joins = False
        for req_id, _ in self._url_joined.values():
            self._pending.pop(req_id, None)
            self._reply_hooks.pop(req_id, None)
        self._url_joined = {}

    async def _url_reply(self, joined: tuple[str, asyncio.Future[dict[str, Any]]]) -> dict[str, Any]:
        """The reply to a join of the upgrade URL (as :meth:`request` returns one); it may have arrived already."""
        req_id, fut = joined
        async with self._awaiting(req_id, "join", self.ack_timeout):
            return await fut

    @contextlib.asynccontextmanager
    async def _awaiting(self, req_id: str, op: Any, limit: float) -> AsyncIterator[None]:
        """The wait for the reply to ``req_id``: ``ClientError("timeout")`` after ``limit`` seconds, and the
        request's entries dropped however it ends."""
        try:
            async with asyncio.timeout(limit):
                yield
        except TimeoutError:
            raise ClientError("timeout", f"no reply to {op} within {limit} s") from None
        finally:
            self._pending.pop(req_id, None)
            self._reply_hooks.pop(req_id, None)

    async def _rejoin(self, conn: WebSocketClientConnection) -> None:
        await self._join_all()
        await self._leave_url_joins_left()
        if self._conn is conn and not self._stopped:
            self._attempt = 0
            self._ready.set()
            self._set_status("open")

    async def _leave_url_joins_left(self) -> None:
        """Rooms left after this connection's URL was made: their URL joins went through, so leave them (else
        the server keeps this connection a member that the client no longer reads)."""
        left, self._url_joined = self._url_joined, {}
        for room, joined in left.items():
            with contextlib.suppress(ClientError):
                if (await self._url_reply(joined)).get("op") == "joined":
                    await self.request({"op": "leave", "room": room}, _internal=True)

    async def _join_all(self) -> None:
        """Join again, on a new connection, what this client had joined (the Client's rooms)."""

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
        self._dispatch(frame)

    def _dispatch(self, frame: dict[str, Any]) -> None:
        """A frame that is not a reply to a request (the Client's rooms take them)."""

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
        async with self._awaiting(req_id, body.get("op"), limit):
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

    def _fail_pending(self, code: str, message: str) -> None:
        pending, self._pending = self._pending, {}
        self._reply_hooks.clear()
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(ClientError(code, message))
                fut.exception()  # retrieved here: the waiter may be gone


def _close_if_opened(connecting: asyncio.Future[WebSocketClientConnection]) -> None:
    """A connect that nobody waits for any more (the client was closed): close what it opened."""
    if not connecting.cancelled() and connecting.exception() is None:
        conn = connecting.result()
        conn.close(1000)
        if conn.stream is not None:
            conn.stream.close()


async def _released(conn: WebSocketClientConnection, grace: float = 1.0) -> None:
    """After ``close()``: give the close handshake ``grace`` seconds, then release the socket, so a
    closed client never leaves one to the garbage collector."""
    with contextlib.suppress(TimeoutError, OSError, WebSocketClosedError):
        async with asyncio.timeout(grace):
            while await conn.read_message() is not None:  # the end of the handshake reads as None
                pass
    if conn.stream is not None and not conn.stream.closed():
        conn.stream.close()
