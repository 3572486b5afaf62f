"""The Redis backend: bus (pub/sub), history (Streams), presence and state store on one Redis.

``bus: {plugin: redis, redis: {url: redis://... | rediss://..., key_prefix: wirehub, ...}}``;
needs ``pip install 'wirehub[redis]'`` (redis-py, imported only when the backend is built).

Modes (:mod:`wirehub.builtins.bus.redis_options`): ``standalone`` (one primary at ``url``),
``sentinel`` (this module: the connection pool asks Sentinel for the master, so a reconnect after a
failover lands on the promoted replica) and ``cluster`` (:mod:`wirehub.builtins.bus.redis_cluster`).
The Lua scripts are in :mod:`wirehub.builtins.bus.redis_scripts`; in the failover modes they give a
room a new epoch when its primary's replication id changed (a promoted replica may lack the last writes).

Order and history: a history publish is ONE Lua script that increments the room's counter,
XADDs the message to the room's stream with the counter as its entry id (``<offset>-0``) and
PUBLISHes ``b"<offset> " + payload`` on the room's channel. Redis runs scripts one at a time, so
the order of the stream is the order in which every subscriber (each replica's subscriber
connection) receives the channel: history order == delivery order on every replica. A publish
without history is a plain PUBLISH, ordered by the same single Redis thread.

Offsets are the per-room counter: 1, 2, 3, ... The room's meta hash holds ``top`` and ``epoch``;
it is created by the room's first history publish, never by a read (a read or ``position`` of a
room without one answers ``top`` 0 and creates no key). Its epoch is ``<base>.<window>`` (see
``next_epoch``), the same one a read of the still empty room reported; it is lost with the hash: a
Redis restart without persistence or a flush (a new base), or the whole room expiring
(``history_ttl`` without a message; its next hash is in a later window) gives the room a new epoch,
and the stream is dropped with the old one. Trimming keeps at most
``history_size`` entries (exact MAXLEN) and drops entries older than ``history_ttl`` (checked by
each publish and read against the Redis server clock).

Presence: see :mod:`wirehub.builtins.bus.redis_presence` (entries written at join, deleted at leave; one
heartbeat round trip per replica per ``presence_interval``; a dead replica's entries removed by
one live replica within ``presence_ttl`` + ``presence_interval``). State: a hash ``{v, d}`` per room,
compare-and-set in one Lua script.

Failures: see :mod:`wirehub.builtins.bus._broker` (watchdog through the broker: a PUBLISH on this replica's
heartbeat channel must come back through its own subscriber connection within
``heartbeat_timeout``). ``publish`` raises BusUnavailable while the bus is down and when Redis
does not answer within ``op_timeout``; nothing is buffered. A publish that timed out may still
have been executed by a Redis that was slow rather than dead: it raises PublishOutcomeUnknown
(the publish API answers 504 ``timeout``), and a retry with the same idempotency key is
delivered at most once: the publish script checks and sets the key ``<prefix>:i:{room}:<key>``
(``SET ... PX window``) in the same script as the append, so a duplicate stores and sends nothing
and returns the original offset.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import uuid
from collections.abc import Mapping
from typing import Any

from wirehub import (
    Backend,
    BusFactory,
    BusHandler,
    BusUnavailable,
    ConfigError,
    HistoryPage,
    PublishOutcomeUnknown,
    StateConflict,
    hookimpl,
)
from wirehub.builtins.bus._broker import Supervised, cancel_and_wait, encode_room, safe_close
from wirehub.builtins.bus.redis_batch import Batcher, Command, send_on_pool
from wirehub.builtins.bus.redis_options import RedisOptions, connection_kwargs, parse_options, startup_error
from wirehub.builtins.bus.redis_presence import RedisPresence
from wirehub.builtins.bus.redis_pubsub import PublishBatcher, read_pubsub
from wirehub.builtins.bus.redis_scripts import POSITION, READ, SCRIPTS

log = logging.getLogger("wirehub.bus.redis")

INSTALL_HINT = "pip install 'wirehub[redis]'"


def _import_redis(key: str = "bus.redis") -> Any:
    try:
        import redis.asyncio as aioredis
    except ImportError as exc:  # pragma: no cover - exercised without the extra
        raise ConfigError(key, f"the redis bus needs redis-py: {INSTALL_HINT} ({exc})") from None
    return aioredis


class Sockets:
    """The connections a bus's clients opened and that are not closed yet.

    redis-py may return from a close with the socket still open: a TLS connection it closes without
    waiting (a PubSub's, a connect cancelled during the handshake commands) or whose wait timed out is
    still sending its close_notify and waiting for the server's, and after a failed close a cluster
    client never closes its startup nodes. Left like that when the event loop stops, the socket is
    garbage collected open (a ResourceWarning). :meth:`abort_all` (at the end of every teardown)
    disconnects and aborts whatever is still open, so no socket of the bus outlives its teardown."""

    def __init__(self) -> None:
        #: open stream -> its connection (removed when the transport reports the connection lost)
        self.open: dict[asyncio.StreamWriter, Any] = {}
        self._classes: dict[type, type] = {}
        self._drained: asyncio.Future[None] | None = None

    def track(self, cls: type) -> type:
        """A subclass of the redis-py connection class ``cls`` whose connections are tracked here."""
        tracked = self._classes.get(cls)
        if tracked is None:
            sockets = self

            async def _connect(conn: Any) -> None:
                await cls._connect(conn)  # type: ignore[attr-defined]
                sockets.add(conn)

            tracked = self._classes[cls] = type(f"Tracked{cls.__name__}", (cls,), {"_connect": _connect})
        return tracked

    def add(self, conn: Any) -> None:
        writer: asyncio.StreamWriter = conn._writer
        protocol = writer.transport.get_protocol()
        lost = protocol.connection_lost

        def connection_lost(exc: Exception | None) -> None:
            self.open.pop(writer, None)
            if not self.open and self._drained is not None and not self._drained.done():
                self._drained.set_result(None)
            lost(exc)

        protocol.connection_lost = connection_lost  # type: ignore[method-assign]
        self.open[writer] = conn

    async def abort_all(self, timeout: float = 1.0) -> None:
        """Abort every connection still open and wait (bounded) until each is closed."""
        if not self.open:
            return
        self._drained = drained = asyncio.get_running_loop().create_future()
        try:
            for writer, conn in list(self.open.items()):
                if conn._writer is writer:  # never closed: redis-py forgets it too (no reuse without AUTH)
                    with contextlib.suppress(Exception):
                        await conn.disconnect(nowait=True)
                writer.transport.abort()  # a closed transport ignores it
            if self.open:
                await asyncio.wait_for(drained, timeout)
        except TimeoutError:
            log.warning("%d redis connection(s) still open %gs after being aborted", len(self.open), timeout)
            self.open.clear()
        finally:
            self._drained = None


class RedisBus(Supervised):
    """The bus; also holds the connection that history, presence and state use."""

    log = log

    def __init__(self, opts: RedisOptions, key: str = "bus.redis") -> None:
        super().__init__(heartbeat_interval=opts.heartbeat_interval, heartbeat_timeout=opts.heartbeat_timeout,
                         max_backoff=opts.max_backoff, op_timeout=opts.op_timeout,
                         connect_timeout=opts.connect_timeout,
                         refresh_interval=opts.presence_interval or opts.presence_ttl / 3)
        self.opts = opts
        self.config_key = key
        self._redis = _import_redis(key)
        import redis.exceptions as rexc

        self.errors: tuple[type[BaseException], ...] = (rexc.ConnectionError, rexc.TimeoutError, OSError)
        self.prefix = opts.key_prefix
        self.client: Any = None
        self._pubsub: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._hb_channel = f"{self.prefix}:hb:{uuid.uuid4().hex}".encode()
        self._hb_waiters: dict[bytes, asyncio.Future[None]] = {}
        self._sub_waiters: dict[bytes, list[asyncio.Future[None]]] = {}
        self._channel_rooms: dict[bytes, str] = {}
        self.presence: RedisPresence | None = None
        self.scripts: dict[str, Any] = {}
        #: presence and history reads of one loop iteration, as one pipeline (see redis_batch)
        self.batch = Batcher(self)
        #: what the publish script sends the room's channel with, and its failover flag (see redis_scripts)
        self.publish_command = "PUBLISH"
        self.failover_flag = "1" if opts.failover else "0"
        self._sentinel: Any = None
        #: every connection of the bus's clients until it is closed (see Sockets)
        self.sockets = Sockets()
        # a cluster pipeline would span slots: there each publish stays one call (see redis_pubsub)
        self._publish_batch = PublishBatcher(self) if opts.mode != "cluster" else None

    # -- naming --------------------------------------------------------------------------------------

    def key(self, kind: str, room: str) -> str:
        return f"{self.prefix}:{kind}:{{{encode_room(room)}}}"

    def channel(self, room: str) -> bytes:
        return f"{self.prefix}:c:{encode_room(room)}".encode()

    def epoch_key(self, room: str) -> str:
        """The epoch base key the room's scripts use (one per deployment; per slot in a cluster)."""
        return f"{self.prefix}:epoch"

    def node_index_key(self, node: str) -> str:
        """The set of a replica's presence entries (see redis_presence)."""
        return f"{self.prefix}:pn:{node}"

    # -- connection ----------------------------------------------------------------------------------

    def client_kwargs(self) -> dict[str, Any]:
        """Connection keywords of every command and subscriber connection (TLS and credentials too)."""
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        return {
            "socket_timeout": self.opts.op_timeout + 1,
            "socket_connect_timeout": self.opts.connect_timeout,
            "retry": Retry(NoBackoff(), 0),  # a retried publish could run twice: never retry
            "health_check_interval": 0,
            "client_name": "wirehub",
            **connection_kwargs(self.opts),
        }

    def _make_client(self) -> Any:
        kwargs = self.client_kwargs()
        opts = self.opts
        if opts.mode == "sentinel":
            from redis.asyncio import BlockingConnectionPool
            from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool

            class BlockingSentinelPool(SentinelConnectionPool, BlockingConnectionPool):
                """A busy pool makes callers wait (op_timeout applies), as in standalone mode; the default
                sentinel pool fails at max_connections with an error that would mark the bus down."""

            sentinel_kwargs = {k: v for k, v in kwargs.items() if k not in ("username", "password", "client_name")}
            if opts.sentinel.username is not None:
                sentinel_kwargs["username"] = opts.sentinel.username
            if opts.sentinel.password is not None:
                sentinel_kwargs["password"] = opts.sentinel.password
            nodes = [(host, int(port)) for host, _, port in (n.rpartition(":") for n in opts.sentinel.nodes)]
            # the pool asks the sentinels for the master on every new connection: after a failover the
            # reconnect (see _broker) lands on the promoted replica
            self._sentinel = Sentinel(nodes, sentinel_kwargs=sentinel_kwargs, **kwargs)
            for s in self._sentinel.sentinels:
                self.track_pool(s.connection_pool)
            client = self._sentinel.master_for(opts.sentinel.master_name, connection_pool_class=BlockingSentinelPool,
                                               max_connections=opts.max_connections, timeout=opts.op_timeout + 1)
            self.track_pool(client.connection_pool)
            return client
        # a busy pool makes callers wait (op_timeout applies), instead of failing like a broken connection
        pool = self._redis.BlockingConnectionPool.from_url(opts.url, max_connections=opts.max_connections,
                                                           timeout=opts.op_timeout + 1, **kwargs)
        self.track_pool(pool)
        return self._redis.Redis.from_pool(pool)

    def track_pool(self, pool: Any) -> None:
        """The pool's connections are tracked by ``self.sockets`` (set before it makes any)."""
        pool.connection_class = self.sockets.track(pool.connection_class)

    async def start(self, handler: BusHandler) -> None:
        try:
            await super().start(handler)
        except BusUnavailable as exc:
            hint = startup_error(exc, self.opts, self.config_key)
            if hint is None:
                raise
            self.log.error("cannot start the redis bus: %s", hint)
            raise BusUnavailable(hint) from exc

    async def _open(self) -> None:
        loop = asyncio.get_running_loop()
        client = self.client = self._make_client()
        self.scripts = {name: client.register_script(src) for name, src in SCRIPTS.items()}
        await asyncio.wait_for(client.ping(), self.connect_timeout)
        # the epoch base (see next_epoch): made here so that no client request is the one to make it
        await asyncio.wait_for(client.set(f"{self.prefix}:epoch", uuid.uuid4().hex[:12], nx=True), self.op_timeout)
        pubsub = self._pubsub = client.pubsub()
        self._channel_rooms = {self.channel(room): room for room in self._rooms}
        channels = [self._hb_channel, *self._channel_rooms]
        waiters = []
        for ch in channels:
            fut: asyncio.Future[None] = loop.create_future()
            self._sub_waiters.setdefault(ch, []).append(fut)
            waiters.append(fut)
        await asyncio.wait_for(pubsub.subscribe(*channels), self.op_timeout)
        self._reader = asyncio.ensure_future(self._read(pubsub))
        await asyncio.wait_for(asyncio.gather(*waiters), self.op_timeout)

    async def _teardown(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            await cancel_and_wait(log, [reader])
        for waiters in [*self._sub_waiters.values(), [*self._hb_waiters.values()]]:
            for fut in waiters:
                if not fut.done():
                    fut.set_exception(BusUnavailable("the connection was closed"))
                    fut.exception()  # retrieved: nobody may be waiting any more
        self._sub_waiters.clear()
        self._hb_waiters.clear()
        pubsub, self._pubsub = self._pubsub, None
        client, self.client = self.client, None
        if pubsub is not None:
            await safe_close(log, "redis subscriber")(pubsub.aclose())
        if client is not None:
            await safe_close(log, "redis client")(client.aclose())
        sentinel, self._sentinel = self._sentinel, None
        for s in sentinel.sentinels if sentinel is not None else ():
            await safe_close(log, "redis sentinel client")(s.aclose())
        await self.sockets.abort_all()

    async def _read(self, pubsub: Any) -> None:
        try:
            # Blocks (no timeout) and drains every reply that arrived per wakeup (redis_pubsub). A hung
            # connection is still found by the supervisor's heartbeat (a publish on the heartbeat
            # channel), which cancels us.
            await read_pubsub(pubsub, self._on_channel_message, self._on_pubsub)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._fail(f"subscriber connection: {type(exc).__name__}: {exc}")

    def _on_channel_message(self, ch: bytes, data: bytes) -> None:
        # Once per bus message, from the subscriber connection's data_received: the room lookup first (the
        # heartbeat's channel is never a room's), and straight to the handler while the bus is live.
        room = self._channel_rooms.get(ch)
        if room is None:
            if ch == self._hb_channel:
                fut = self._hb_waiters.pop(data, None)
                if fut is not None and not fut.done():
                    fut.set_result(None)
            return
        head, _, payload = data.partition(b" ")
        offset = None if head == b"-" else int(head)
        handler = self._handler
        if self._live and handler is not None:
            # what _deliver does when live: a channel is in _channel_rooms only while its room is in _rooms
            # (subscribe, unsubscribe and _open change both together)
            handler.on_bus_message(room, payload, offset)
        else:
            self._deliver(room, payload, offset)

    def _on_pubsub(self, msg: Mapping[str, Any]) -> None:
        kind, ch = msg.get("type"), msg.get("channel")
        if kind == "message":
            self._on_channel_message(ch, msg["data"])  # type: ignore[arg-type]
        elif kind == "subscribe":
            for fut in self._sub_waiters.pop(ch, []):  # type: ignore[arg-type]
                if not fut.done():
                    fut.set_result(None)

    async def _roundtrip(self) -> None:
        client = self.client
        if client is None:
            raise ConnectionError("not connected")
        token = uuid.uuid4().hex.encode()
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._hb_waiters[token] = fut
        try:
            await client.publish(self._hb_channel, token)
            await fut
        finally:
            self._hb_waiters.pop(token, None)

    async def send_batch(self, commands: list[Command]) -> list[Any]:
        """One pipeline of raw commands (see redis_batch); raw replies, a failed command's as its error."""
        return await send_on_pool(self.client.connection_pool, commands)

    async def _refresh(self) -> None:
        if self.presence is not None:
            await self.presence.upkeep()

    async def close(self) -> None:
        if self.presence is not None:
            await self.presence.close()
        await super().close()
        await self.batch.close()
        if self._publish_batch is not None:
            await self._publish_batch.close()

    # -- Bus -------------------------------------------------------------------------------------------

    @property
    def ordered_handoff(self) -> bool:
        """Through the publish batcher a room's publishes reach Redis in the order they were started
        (:mod:`wirehub.builtins.bus.redis_pubsub`); without it (cluster mode) each is one call on a pooled
        connection, and two of them may reach Redis in either order."""
        return self._publish_batch is not None

    async def publish(self, room: str, payload: bytes, *, history: bool = False, dedupe_key: str | None = None,
                      dedupe_window: float = 0.0) -> int | None:
        self._check()  # down: nothing was sent (BusUnavailable); from here on a failure is "maybe"
        ch = self.channel(room)
        script: Any = None
        if not history:
            command: tuple[Any, ...] = (self.publish_command, ch, b"- " + payload)
        else:
            meta = self.key("m", room)
            window_ms = int(dedupe_window * 1000) if dedupe_key is not None else 0
            keys = [self.key("h", room), meta, f"{self.key('i', room)}:{dedupe_key}" if window_ms > 0 else meta,
                    self.epoch_key(room)]
            args = [ch, payload, self.opts.history_size, int(self.opts.history_ttl * 1000), os.urandom(6).hex(),
                    window_ms, self.publish_command, self.failover_flag]
            script = self.scripts["publish"]
            command = ("EVALSHA", script.sha, len(keys), *keys, *args)
        if self._publish_batch is not None:  # the batcher answers BusUnavailable / PublishOutcomeUnknown itself
            result = await self._publish_batch.submit(command, script, ch)
        else:
            client = self.client
            try:
                if script is None:
                    result = await self._call("publish", lambda: client.execute_command(*command), self.errors)
                else:
                    result = await self._call("publish", lambda: script(keys=keys, args=args, client=client),
                                              self.errors)
            except BusUnavailable as exc:
                raise PublishOutcomeUnknown(str(exc)) from exc
        return None if script is None else int(result[0])

    async def subscribe(self, room: str) -> None:
        self._check()
        pubsub, ch = self._pubsub, self.channel(room)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._sub_waiters.setdefault(ch, []).append(fut)
        self._rooms.add(room)
        self._channel_rooms[ch] = room
        try:
            await self._call("subscribe", lambda: pubsub.subscribe(ch), self.errors)
            await self._call("subscribe", lambda: asyncio.shield(fut), (BusUnavailable,), fail_on_error=False)
        except BaseException:
            self._rooms.discard(room)
            self._channel_rooms.pop(ch, None)
            raise

    async def unsubscribe(self, room: str) -> None:
        if room not in self._rooms:
            return
        self._rooms.discard(room)
        ch = self.channel(room)
        self._channel_rooms.pop(ch, None)
        pubsub = self._pubsub
        if self._healthy and pubsub is not None:
            with contextlib.suppress(BusUnavailable):  # a new connection will not subscribe it
                await self._call("unsubscribe", lambda: pubsub.unsubscribe(ch), self.errors)


class RedisHistory:
    """History reads go through the bus's per-iteration pipeline (:mod:`wirehub.builtins.bus.redis_batch`):
    the reads of one room and range asked for in one loop iteration (a reconnect storm's replays, a join
    storm's positions) are ONE script run, parsed once, whose result every caller shares (callers must
    not change it)."""

    def __init__(self, bus: RedisBus) -> None:
        self.bus = bus

    async def read(self, room: str, after: int | None, limit: int) -> HistoryPage:
        bus = self.bus
        keys = [bus.key("h", room), bus.key("m", room), bus.epoch_key(room)]
        after_arg, limit_arg = -1 if after is None else max(0, after), max(0, limit)
        args = [after_arg, limit_arg, int(bus.opts.history_ttl * 1000), epoch_candidate(), bus.failover_flag]
        page: HistoryPage = await bus.batch.run(lambda: [bus.batch.script(READ, keys, args)],
                                                share=("read", room, after_arg, limit_arg), parse=_history_page)
        return page

    async def position(self, room: str) -> tuple[int, str]:
        bus = self.bus

        def command() -> list[Command]:  # built only by the first caller of the batch
            keys = [bus.key("h", room), bus.key("m", room), bus.epoch_key(room)]
            args = [int(bus.opts.history_ttl * 1000), epoch_candidate(), bus.failover_flag]
            return [bus.batch.script(POSITION, keys, args)]

        top_epoch: tuple[int, str] = await bus.batch.run(command, share=("position", room), parse=_position)
        return top_epoch


def epoch_candidate() -> str:
    """A random epoch base, used by a script only when Redis lost the base (so it differs from the lost one)."""
    return os.urandom(6).hex()


def _history_page(replies: list[Any]) -> HistoryPage:
    out = replies[0]
    epoch, top, complete = out[0].decode(), int(out[1]), bool(out[2])
    messages = [(int(out[i].split(b"-")[0]), bytes(out[i + 1])) for i in range(3, len(out), 2)]
    return HistoryPage(epoch, top, messages, complete)


def _position(replies: list[Any]) -> tuple[int, str]:
    out = replies[0]
    return int(out[0]), out[1].decode()


class RedisStateStore:
    def __init__(self, bus: RedisBus) -> None:
        self.bus = bus

    async def get(self, room: str) -> tuple[int, Any] | None:
        bus = self.bus
        bus._check()
        client, key = bus.client, bus.key("s", room)
        v, d = await bus._call("state", lambda: client.hmget(key, ["v", "d"]), bus.errors)
        if v is None:
            return None
        return int(v), json.loads(d)

    async def compare_and_set(self, room: str, expected_version: int, document: Any) -> int:
        bus = self.bus
        bus._check()
        client, script, key = bus.client, bus.scripts["state_cas"], bus.key("s", room)
        doc = json.dumps(document, separators=(",", ":"))
        result = int(await bus._call("state", lambda: script(keys=[key], args=[expected_version, doc], client=client),
                                     bus.errors))
        if result < 0:
            current = -1 - result
            raise StateConflict(f"room {room!r} is at version {current}, not {expected_version}")
        return result

    async def delete(self, room: str) -> None:
        bus = self.bus
        bus._check()
        client, key = bus.client, bus.key("s", room)
        await bus._call("state", lambda: client.delete(key), bus.errors)


def create_backend(options: Mapping[str, Any], key: str) -> Backend:
    opts = parse_options(options, key)
    _import_redis(key)
    bus: RedisBus
    if opts.mode == "cluster":
        from wirehub.builtins.bus.redis_cluster import RedisClusterBus

        bus = RedisClusterBus(opts, key)
    else:
        bus = RedisBus(opts, key)
    presence = RedisPresence(bus, opts.presence_ttl)
    bus.presence = presence
    return Backend(bus=bus, history=RedisHistory(bus), presence=presence, state=RedisStateStore(bus), name="redis",
                   extra={"options": opts})


@hookimpl
def wirehub_register_buses() -> Mapping[str, BusFactory]:
    return {"redis": create_backend}
