"""The Redis backend: bus (pub/sub), history (Streams), presence and state store on one Redis.

``bus: {plugin: redis, redis: {url: redis://... | rediss://..., key_prefix: wirehub, ...}}``;
needs ``pip install 'wirehub[redis]'`` (redis-py, imported only when the backend is built).

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
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from wirehub import (
    Backend,
    BusFactory,
    BusUnavailable,
    ConfigError,
    HistoryPage,
    PublishOutcomeUnknown,
    StateConflict,
    hookimpl,
    opt,
    parse_block,
)
from wirehub.builtins.bus._broker import Supervised, encode_room, safe_close
from wirehub.builtins.bus.redis_presence import RedisPresence

log = logging.getLogger("wirehub.bus.redis")

INSTALL_HINT = "pip install 'wirehub[redis]'"


@dataclass(frozen=True)
class RedisOptions:
    #: redis://[user:password@]host:port/db or rediss:// (TLS); use $env: for secrets
    url: str = "redis://127.0.0.1:6379/0"
    #: overrides the URL's username/password when set (e.g. password: $env:REDIS_PASSWORD)
    username: str | None = None
    password: str | None = None
    #: CA bundle for rediss:// (default: the system's)
    tls_ca_file: str | None = None
    #: every key and channel starts with "<key_prefix>:"; replicas sharing rooms use the same one
    key_prefix: str = "wirehub"
    #: messages kept per room, and their maximum age in seconds
    history_size: int = opt(1000, min=0)
    history_ttl: float = opt(3600.0, min=1)
    #: a dead replica's presence entries are removed within presence_ttl + presence_interval seconds
    presence_ttl: float = opt(15.0, min=0.5)
    #: seconds between a replica's presence heartbeats (one round trip each); 0 = presence_ttl / 3
    presence_interval: float = opt(0.0, min=0)
    #: watchdog: a round trip through Redis every interval; down when one takes longer than timeout
    heartbeat_interval: float = opt(2.0, min=0.05)
    heartbeat_timeout: float = opt(6.0, min=0.05)
    #: longest wait for one command (publish, read, presence, state) before BusUnavailable
    op_timeout: float = opt(5.0, min=0.05)
    connect_timeout: float = opt(5.0, min=0.05)
    #: reconnect backoff doubles from 0.1 s up to this many seconds
    max_backoff: float = opt(5.0, min=0.1)
    #: connections in the command pool (the subscriber connection is extra)
    max_connections: int = opt(64, min=2)


_LUA_COMMON = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
-- The epoch a room's next meta hash gets, which a room without one reports: "<base>.<window>".
-- <base> is <key_prefix>:epoch (one key, made again after a flush or a restart without persistence;
-- derived from KEYS[2] = <key_prefix>:m:{room}); <window> numbers meta_ttl-long windows of server
-- time. A meta hash lives at least meta_ttl, so a room's next one is in a later window: a new epoch.
local function next_epoch(candidate, meta_ttl)
  local base_key = string.sub(KEYS[2], 1, string.find(KEYS[2], ':m:{', 1, true) - 1) .. ':epoch'
  local base = redis.call('GET', base_key)
  if not base then
    redis.call('SET', base_key, candidate)
    base = candidate
  end
  return base .. '.' .. string.format('%d', math.floor(now_ms() / meta_ttl))
end
local function ensure_meta(candidate, meta_ttl)
  if redis.call('EXISTS', KEYS[2]) == 0 then
    redis.call('DEL', KEYS[1])
    redis.call('HSET', KEYS[2], 'epoch', next_epoch(candidate, meta_ttl), 'top', 0)
  end
  redis.call('PEXPIRE', KEYS[2], meta_ttl)
end
local function trim_age(horizon)
  while true do
    local batch = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 64)
    if #batch == 0 then return end
    for i = 1, #batch do
      if tonumber(batch[i][2][2]) >= horizon then
        if i > 1 then redis.call('XTRIM', KEYS[1], 'MINID', batch[i][1]) end
        return
      end
    end
    local last = tonumber(string.match(batch[#batch][1], '^(%d+)'))
    redis.call('XTRIM', KEYS[1], 'MINID', string.format('%d-0', last + 1))
  end
end
"""

# KEYS: stream, meta, dedupe key (the meta key again when none);
# ARGV: channel, payload, size, ttl_ms, epoch candidate, dedupe window ms (0 = none)
# -> {offset, 1 for a duplicate (nothing stored or sent) else 0}
_PUBLISH = _LUA_COMMON + """
local dedupe = tonumber(ARGV[6])
if dedupe > 0 then
  local seen = redis.call('GET', KEYS[3])
  if seen then return {tonumber(seen), 1} end
end
local ttl = tonumber(ARGV[4])
local now = now_ms()
ensure_meta(ARGV[5], 2 * ttl + 60000)
local top = redis.call('HINCRBY', KEYS[2], 'top', 1)
local size = tonumber(ARGV[3])
if size > 0 then
  redis.call('XADD', KEYS[1], 'MAXLEN', size, string.format('%d-0', top), 't', now, 'd', ARGV[2])
  trim_age(now - ttl)
  redis.call('PEXPIRE', KEYS[1], ttl + 1000)
end
redis.call('PUBLISH', ARGV[1], string.format('%d ', top) .. ARGV[2])
if dedupe > 0 then redis.call('SET', KEYS[3], top, 'PX', dedupe) end
return {top, 0}
"""

# KEYS: stream, meta; ARGV: after (-1 = newest), limit, ttl_ms, epoch base candidate
# -> {epoch, top, complete, id1, data1, id2, data2, ...}. A room without a meta hash is read as
# empty and creates nothing (a client must not be able to make keys by reading unique rooms).
_READ = _LUA_COMMON + """
local ttl = tonumber(ARGV[3])
local after = tonumber(ARGV[1])
if redis.call('EXISTS', KEYS[2]) == 0 then
  local complete = 0
  if after <= 0 then complete = 1 end
  return {next_epoch(ARGV[4], 2 * ttl + 60000), 0, complete}
end
redis.call('PEXPIRE', KEYS[2], 2 * ttl + 60000)
trim_age(now_ms() - ttl)
local epoch = redis.call('HGET', KEYS[2], 'epoch')
local top = tonumber(redis.call('HGET', KEYS[2], 'top'))
local limit = tonumber(ARGV[2])
local out = {epoch, top, 1}
local entries = {}
if after < 0 then
  if limit > 0 then
    local rev = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', limit)
    for i = #rev, 1, -1 do entries[#entries + 1] = rev[i] end
  end
else
  local oldest = top + 1
  local first = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)
  if #first > 0 then oldest = tonumber(string.match(first[1][1], '^(%d+)')) end
  if after > top or after < oldest - 1 then
    out[3] = 0
  elseif limit > 0 and after < top then
    entries = redis.call('XRANGE', KEYS[1], string.format('%d-0', after + 1), '+', 'COUNT', limit)
  end
end
for i = 1, #entries do
  out[#out + 1] = entries[i][1]
  out[#out + 1] = entries[i][2][4]
end
return out
"""

# KEYS: stream, meta; ARGV: ttl_ms, epoch base candidate -> {top, epoch}; creates nothing
_POSITION = _LUA_COMMON + """
local meta_ttl = 2 * tonumber(ARGV[1]) + 60000
if redis.call('EXISTS', KEYS[2]) == 0 then return {0, next_epoch(ARGV[2], meta_ttl)} end
redis.call('PEXPIRE', KEYS[2], meta_ttl)
return {tonumber(redis.call('HGET', KEYS[2], 'top')), redis.call('HGET', KEYS[2], 'epoch')}
"""

# KEYS: state hash; ARGV: expected version, document json -> new version, or -1 - current
_STATE_CAS = """
local v = tonumber(redis.call('HGET', KEYS[1], 'v') or '0')
if v ~= tonumber(ARGV[1]) then return -1 - v end
redis.call('HSET', KEYS[1], 'v', v + 1, 'd', ARGV[2])
return v + 1
"""


def _import_redis(key: str = "bus.redis") -> Any:
    try:
        import redis.asyncio as aioredis
    except ImportError as exc:  # pragma: no cover - exercised without the extra
        raise ConfigError(key, f"the redis bus needs redis-py: {INSTALL_HINT} ({exc})") from None
    return aioredis


class RedisBus(Supervised):
    """The bus; also holds the connection that history, presence and state use."""

    log = log

    def __init__(self, opts: RedisOptions, key: str = "bus.redis") -> None:
        super().__init__(heartbeat_interval=opts.heartbeat_interval, heartbeat_timeout=opts.heartbeat_timeout,
                         max_backoff=opts.max_backoff, op_timeout=opts.op_timeout,
                         connect_timeout=opts.connect_timeout,
                         refresh_interval=opts.presence_interval or opts.presence_ttl / 3)
        self.opts = opts
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

    # -- naming --------------------------------------------------------------------------------------

    def key(self, kind: str, room: str) -> str:
        return f"{self.prefix}:{kind}:{{{encode_room(room)}}}"

    def channel(self, room: str) -> bytes:
        return f"{self.prefix}:c:{encode_room(room)}".encode()

    # -- connection ----------------------------------------------------------------------------------

    def _make_client(self) -> Any:
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        kwargs: dict[str, Any] = {
            "socket_timeout": self.opts.op_timeout + 1,
            "socket_connect_timeout": self.opts.connect_timeout,
            "retry": Retry(NoBackoff(), 0),  # a retried publish could run twice: never retry
            "max_connections": self.opts.max_connections,
            # a busy pool makes callers wait (op_timeout applies), instead of failing like a broken connection
            "timeout": self.opts.op_timeout + 1,
            "health_check_interval": 0,
            "client_name": "wirehub",
        }
        if self.opts.username is not None:
            kwargs["username"] = self.opts.username
        if self.opts.password is not None:
            kwargs["password"] = self.opts.password
        if self.opts.tls_ca_file and self.opts.url.startswith("rediss:"):
            kwargs["ssl_ca_certs"] = self.opts.tls_ca_file
        pool = self._redis.BlockingConnectionPool.from_url(self.opts.url, **kwargs)
        return self._redis.Redis.from_pool(pool)

    async def _open(self) -> None:
        loop = asyncio.get_running_loop()
        client = self.client = self._make_client()
        self.scripts = {name: client.register_script(src) for name, src in _SCRIPTS.items()}
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
            reader.cancel()
            await asyncio.wait([reader])
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

    async def _read(self, pubsub: Any) -> None:
        try:
            while True:
                msg = await pubsub.get_message(timeout=1.0)
                if msg is not None:
                    self._on_pubsub(msg)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._fail(f"subscriber connection: {type(exc).__name__}: {exc}")

    def _on_pubsub(self, msg: Mapping[str, Any]) -> None:
        kind, ch = msg.get("type"), msg.get("channel")
        if kind == "message":
            data: bytes = msg["data"]
            if ch == self._hb_channel:
                fut = self._hb_waiters.pop(data, None)
                if fut is not None and not fut.done():
                    fut.set_result(None)
                return
            room = self._channel_rooms.get(ch)  # type: ignore[arg-type]
            if room is None:
                return
            head, _, payload = data.partition(b" ")
            self._deliver(room, payload, None if head == b"-" else int(head))
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

    async def _refresh(self) -> None:
        if self.presence is not None:
            await self.presence.upkeep()

    async def close(self) -> None:
        if self.presence is not None:
            await self.presence.close()
        await super().close()

    # -- Bus -------------------------------------------------------------------------------------------

    async def publish(self, room: str, payload: bytes, *, history: bool = False, dedupe_key: str | None = None,
                      dedupe_window: float = 0.0) -> int | None:
        self._check()  # down: nothing was sent (BusUnavailable); from here on a failure is "maybe"
        client, ch = self.client, self.channel(room)
        try:
            if not history:
                await self._call("publish", lambda: client.publish(ch, b"- " + payload), self.errors)
                return None
            meta = self.key("m", room)
            window_ms = int(dedupe_window * 1000) if dedupe_key is not None else 0
            keys = [self.key("h", room), meta, f"{self.key('i', room)}:{dedupe_key}" if window_ms > 0 else meta]
            args = [ch, payload, self.opts.history_size, int(self.opts.history_ttl * 1000), uuid.uuid4().hex[:12],
                    window_ms]
            script = self.scripts["publish"]
            result = await self._call("publish", lambda: script(keys=keys, args=args, client=client), self.errors)
        except BusUnavailable as exc:
            raise PublishOutcomeUnknown(str(exc)) from exc
        return int(result[0])

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
    def __init__(self, bus: RedisBus) -> None:
        self.bus = bus

    async def read(self, room: str, after: int | None, limit: int) -> HistoryPage:
        bus = self.bus
        bus._check()
        client, script = bus.client, bus.scripts["read"]
        keys = [bus.key("h", room), bus.key("m", room)]
        args = [-1 if after is None else max(0, after), max(0, limit), int(bus.opts.history_ttl * 1000),
                uuid.uuid4().hex[:12]]
        out = await bus._call("history", lambda: script(keys=keys, args=args, client=client), bus.errors)
        epoch, top, complete = out[0].decode(), int(out[1]), bool(out[2])
        messages = [(int(out[i].split(b"-")[0]), bytes(out[i + 1])) for i in range(3, len(out), 2)]
        return HistoryPage(epoch, top, messages, complete)

    async def position(self, room: str) -> tuple[int, str]:
        bus = self.bus
        bus._check()
        client, script = bus.client, bus.scripts["position"]
        keys = [bus.key("h", room), bus.key("m", room)]
        args = [int(bus.opts.history_ttl * 1000), uuid.uuid4().hex[:12]]
        out = await bus._call("history", lambda: script(keys=keys, args=args, client=client), bus.errors)
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


_SCRIPTS = {
    "publish": _PUBLISH,
    "read": _READ,
    "position": _POSITION,
    "state_cas": _STATE_CAS,
}


def create_backend(options: Mapping[str, Any], key: str) -> Backend:
    opts = parse_block(RedisOptions, options, key)
    scheme = urlsplit(opts.url).scheme
    if scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(f"{key}.url", f"expected a redis://, rediss:// or unix:// URL, got scheme {scheme!r}")
    if not opts.key_prefix or any(c in opts.key_prefix for c in " {}"):
        raise ConfigError(f"{key}.key_prefix", f"expected a non-empty prefix without spaces or braces, "
                          f"got {opts.key_prefix!r}")
    if opts.heartbeat_timeout < opts.heartbeat_interval / 2:
        raise ConfigError(f"{key}.heartbeat_timeout", "must be at least half of heartbeat_interval")
    if opts.presence_interval >= opts.presence_ttl:
        raise ConfigError(f"{key}.presence_interval", f"must be less than presence_ttl ({opts.presence_ttl:g}), "
                          f"got {opts.presence_interval:g}")
    bus = RedisBus(opts, key)
    presence = RedisPresence(bus, opts.presence_ttl)
    bus.presence = presence
    return Backend(bus=bus, history=RedisHistory(bus), presence=presence, state=RedisStateStore(bus), name="redis",
                   extra={"options": opts})


@hookimpl
def wirehub_register_buses() -> Mapping[str, BusFactory]:
    return {"redis": create_backend}
