"""The redis bus on a Redis Cluster (``bus.redis.mode: cluster``, Redis 7+).

Commands and Lua scripts go through redis-py's ``redis.asyncio.cluster.RedisCluster``, which
routes by slot and follows MOVED/ASK. Every key and the channel of a room carry the hash tag
``{<room>}`` (the epoch base key of the room's slot too, see :func:`slot_tag`), so a room lives on
one slot and its scripts stay single-slot.

Pub/sub is sharded: the publish script sends with SPUBLISH (only the room's shard forwards it,
never the cluster-wide PUBLISH), and this replica keeps one subscriber connection per primary that
owns a subscribed room, with SSUBSCRIBE. A shard's failure stays on that shard:

- its subscriber connection drops (or stops answering PING within ``heartbeat_timeout / 2``), or
  Redis ends a channel's subscription with ``sunsubscribe`` (its slot moved to another node);
- the rooms on it are *moving*: messages for them are held; the topology is read again and the
  rooms are SSUBSCRIBEd on their new primary, retried with capped backoff;
- then the hub is told (``on_bus_rooms_resumed``): it repairs those rooms from history as after an
  outage (the replay, or ``gap`` when history cannot cover it), and the held messages follow.

Publishes to the shard fail with BusUnavailable (or PublishOutcomeUnknown) until its replica has
taken over; the bus stays healthy, and rooms on other shards are not disturbed. A promoted replica
has a new replication id, so each room of the shard gets a new epoch on first use (see
:mod:`wirehub.builtins.bus.redis_scripts`): the writes it may have missed are reported as a gap,
never lost silently. The bus is down only when no primary answers the heartbeat PING.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from wirehub import BusUnavailable
from wirehub.builtins.bus._broker import MAX_HELD, cancel_and_wait, encode_room, safe_close
from wirehub.builtins.bus.redis import RedisBus, log
from wirehub.builtins.bus.redis_options import RedisOptions
from wirehub.builtins.bus.redis_scripts import SCRIPTS

SLOTS = 16384


@functools.cache
def _slot_tags() -> tuple[str, ...]:
    """For each slot, a short string that hashes to it (about 0.1 s, once per process)."""
    from redis.crc import key_slot

    tags: list[str | None] = [None] * SLOTS
    missing, i = SLOTS, 0
    while missing:
        tag = format(i, "x")
        slot = key_slot(tag.encode())
        if tags[slot] is None:
            tags[slot] = tag
            missing -= 1
        i += 1
    return tuple(t or "" for t in tags)


def slot_tag(slot: int) -> str:
    return _slot_tags()[slot]


@dataclass(eq=False)
class _NodeSub:
    """One primary's sharded subscriber connection."""

    name: str
    client: Any
    pubsub: Any
    channels: set[bytes] = field(default_factory=set)
    reader: asyncio.Task[None] | None = None
    pongs: list[asyncio.Future[None]] = field(default_factory=list)
    #: held while a command is written: redis-py's PubSub opens its connection on first use without a lock,
    #: so two first commands at once would each open one and the first one's confirmation was never read
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class RedisClusterBus(RedisBus):
    def __init__(self, opts: RedisOptions, key: str = "bus.redis") -> None:
        super().__init__(opts, key)
        import redis.exceptions as rexc

        self.publish_command = "SPUBLISH"
        # one shard failing is not the bus failing: these only fail the operation (see _call)
        self.errors = (rexc.ConnectionError, rexc.TimeoutError, OSError, rexc.ClusterError,
                       rexc.RedisClusterException, rexc.TryAgainError, rexc.MovedError, rexc.AskError)
        self._subs: dict[str, _NodeSub] = {}
        self._ch_sub: dict[bytes, _NodeSub] = {}
        self._unsubscribing: set[bytes] = set()
        #: rooms being moved to a new primary -> messages held until the hub was told
        self._moving: dict[str, list[tuple[bytes, int | None]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._refreshing: asyncio.Task[None] | None = None
        #: rooms moved to another primary since start (a failover, a slot migration)
        self.moves = 0
        #: commands in flight at most (so at most that many connections to one node)
        self._pool_slots = asyncio.Semaphore(opts.max_connections)

    # -- naming: one hash tag per room ------------------------------------------------------------------

    def channel(self, room: str) -> bytes:
        return f"{self.prefix}:c:{{{encode_room(room)}}}".encode()

    def epoch_key(self, room: str) -> str:
        from redis.crc import key_slot

        return f"{self.prefix}:epoch:{{{slot_tag(key_slot(encode_room(room).encode()))}}}"

    def node_index_key(self, node: str) -> str:
        return f"{self.prefix}:pn:{{{node}}}"

    # -- connection -------------------------------------------------------------------------------------

    def _make_client(self) -> Any:
        from redis.asyncio.cluster import ClusterNode, RedisCluster

        nodes = [ClusterNode(host, int(port)) for host, _, port in (n.rpartition(":") for n in self.opts.cluster.nodes)]
        kwargs = self.client_kwargs()
        if "topology_refresh_min_interval" in inspect.signature(RedisCluster).parameters:
            # redis-py would run a refresh asked for by one shard's errors inside the next command, of
            # whatever shard, which then waits for it: refreshes run in the background instead
            # (_refresh_topology, _resubscribe); MOVED still patches the slot map at once
            kwargs["topology_refresh_min_interval"] = 1e9
        # redis-py fails a command when a node's pool is full: _call queues commands at max_connections
        # instead, and the few extra connections are for the watchdog's PINGs
        client = RedisCluster(startup_nodes=nodes, max_connections=self.opts.max_connections + 4,
                              require_full_coverage=False, **kwargs)
        # every node's connections are tracked (see Sockets): the startup nodes made here and the nodes a
        # topology refresh makes, from the nodes manager's connection keywords
        manager = client.nodes_manager
        node_kwargs = manager.connection_kwargs
        node_kwargs["connection_class"] = self.sockets.track(node_kwargs["connection_class"])
        for node in manager.startup_nodes.values():
            node.connection_class = self.sockets.track(node.connection_class)
        return client

    async def _call(self, what: str, op: Any, errors: tuple[type[BaseException], ...], *,
                    fail_on_error: bool = True, soft: tuple[type[BaseException], ...] = ()) -> Any:
        client = self.client

        async def queued() -> Any:
            async with self._pool_slots:  # the wait counts against op_timeout
                # a teardown may have come while this waited: redis-py's closed client would start itself
                # again for it and open node connections nothing closes (nor may it reach a newer client)
                self._check()
                if self.client is not client:
                    raise BusUnavailable(f"{what}: the connection was replaced while this waited")
                return await op()

        try:
            return await super()._call(what, queued, (), soft=(*errors, *soft))
        except BusUnavailable:
            self._refresh_topology()  # the slot may have a new primary by the next attempt
            raise

    async def send_batch(self, commands: list[Any]) -> list[Any]:
        """The per-iteration pipeline (see redis_batch) through redis-py's cluster pipeline: each
        command goes to its slot's node (one round trip per node, in parallel)."""
        pipe = self.client.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        return list(await pipe.execute(raise_on_error=False))

    def _refresh_topology(self) -> None:
        if self.client is None or (self._refreshing is not None and not self._refreshing.done()):
            return
        client = self.client

        async def refresh() -> None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.nodes_manager.initialize(), self.connect_timeout)

        self._refreshing = asyncio.ensure_future(refresh())

    async def _open(self) -> None:
        client = self.client = self._make_client()
        await asyncio.wait_for(client.initialize(), self.connect_timeout)
        self.scripts = {name: client.register_script(src) for name, src in SCRIPTS.items()}
        self._channel_rooms = {self.channel(room): room for room in self._rooms}
        await asyncio.wait_for(self._ssubscribe(list(self._rooms)), self.op_timeout)

    async def _teardown(self) -> None:
        tasks = [t for t in (*self._tasks, self._refreshing) if t is not None]
        await cancel_and_wait(log, tasks)
        self._tasks.clear()
        self._refreshing = None
        self._moving.clear()
        subs, self._subs = list(self._subs.values()), {}
        self._ch_sub.clear()
        self._unsubscribing.clear()
        for sub in subs:
            await self._close_sub(sub)
        for waiters in self._sub_waiters.values():
            for fut in waiters:
                if not fut.done():
                    fut.set_exception(BusUnavailable("the connection was closed"))
                    fut.exception()
        self._sub_waiters.clear()
        client, self.client = self.client, None
        if client is not None:
            await safe_close(log, "redis cluster client")(client.aclose())
        # redis-py's close stops at the first node whose close fails (the startup nodes stay open then)
        await self.sockets.abort_all()

    async def _close_sub(self, sub: _NodeSub) -> None:
        if sub.reader is not None and sub.reader is not asyncio.current_task():
            await cancel_and_wait(log, [sub.reader])
        for fut in sub.pongs:
            fut.cancel()
        await safe_close(log, "redis subscriber")(sub.pubsub.aclose())
        await safe_close(log, "redis subscriber client")(sub.client.aclose())

    def _sub_for(self, node: Any) -> _NodeSub:
        sub = self._subs.get(node.name)
        if sub is None:
            client = self._redis.Redis(host=node.host, port=node.port, **self.client_kwargs())
            self.track_pool(client.connection_pool)
            sub = self._subs[node.name] = _NodeSub(node.name, client, client.pubsub())
            sub.reader = asyncio.ensure_future(self._read_sub(sub))
        return sub

    async def _ssubscribe(self, rooms: list[str]) -> None:
        """SSUBSCRIBE ``rooms`` on the primaries that own them now; returns once each is confirmed."""
        client = self.client
        if client is None:
            raise ConnectionError("not connected")
        loop = asyncio.get_running_loop()
        # one SSUBSCRIBE per slot (Redis refuses channels of several slots in one)
        by_slot: dict[int, tuple[Any, list[bytes]]] = {}
        for room in rooms:
            ch = self.channel(room)
            slot = client.keyslot(ch)
            node = client.nodes_manager.get_node_from_slot(slot)
            if node is None:
                raise ConnectionError(f"no primary serves the slot of room {room!r}")
            by_slot.setdefault(slot, (node, []))[1].append(ch)
        waiters: list[asyncio.Future[None]] = []
        for node, chs in by_slot.values():
            sub = self._sub_for(node)
            for ch in chs:
                fut: asyncio.Future[None] = loop.create_future()
                self._sub_waiters.setdefault(ch, []).append(fut)
                waiters.append(fut)
                old = self._ch_sub.get(ch)
                if old is not None and old is not sub:
                    old.channels.discard(ch)
                self._ch_sub[ch] = sub
                sub.channels.add(ch)
            async with sub.lock:
                await sub.pubsub.ssubscribe(*chs)
        if waiters:
            await asyncio.gather(*waiters)

    async def _read_sub(self, sub: _NodeSub) -> None:
        try:
            while True:
                if not sub.pubsub.subscribed:  # nothing to read yet (get_message would return at once)
                    await asyncio.sleep(0.05)
                    continue
                msg = await sub.pubsub.get_message(timeout=1.0)
                if msg is not None:
                    self._on_shard_message(sub, msg)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._node_lost(sub, f"{type(exc).__name__}: {exc}")

    def _on_shard_message(self, sub: _NodeSub, msg: Mapping[str, Any]) -> None:
        kind, ch = msg.get("type"), msg.get("channel")
        if kind == "smessage":
            room = self._channel_rooms.get(ch)  # type: ignore[arg-type]
            if room is None:
                return
            head, _, payload = msg["data"].partition(b" ")
            offset = None if head == b"-" else int(head)
            held = self._moving.get(room)
            if held is not None:
                if len(held) < MAX_HELD:
                    held.append((payload, offset))
                return
            self._deliver(room, payload, offset)
        elif kind == "ssubscribe":
            for fut in self._sub_waiters.pop(ch, []):  # type: ignore[arg-type]
                if not fut.done():
                    fut.set_result(None)
        elif kind == "sunsubscribe":
            if ch in self._unsubscribing:
                self._unsubscribing.discard(ch)  # type: ignore[arg-type]
                return
            room = self._channel_rooms.get(ch)  # type: ignore[arg-type]
            if room is not None and self._ch_sub.get(ch) is sub:  # type: ignore[arg-type]
                log.warning("room %s: its slot left %s; moving its subscription", room, sub.name)
                sub.channels.discard(ch)  # type: ignore[arg-type]
                self._move([room])
        elif kind == "pong":
            for fut in sub.pongs:
                if not fut.done():
                    fut.set_result(None)
                    break

    # -- one shard failing -----------------------------------------------------------------------------

    def _node_lost(self, sub: _NodeSub, reason: str) -> None:
        if self._subs.get(sub.name) is not sub:
            return
        del self._subs[sub.name]
        rooms = [room for ch in sub.channels if (room := self._channel_rooms.get(ch)) is not None]
        for ch in sub.channels:
            if self._ch_sub.get(ch) is sub:
                del self._ch_sub[ch]
        log.warning("subscriber connection to %s lost (%s); moving %d rooms", sub.name, reason, len(rooms))
        self._spawn(self._close_sub(sub))
        self._move(rooms)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _move(self, rooms: list[str]) -> None:
        fresh = [room for room in rooms if room not in self._moving]
        for room in fresh:
            self._moving[room] = []
        if fresh:
            self._spawn(self._resubscribe(fresh))

    async def _resubscribe(self, rooms: list[str]) -> None:
        delay, attempt = 0.1, 0
        while True:
            rooms = [room for room in rooms if room in self._rooms]
            if not rooms:
                break
            attempt += 1
            try:
                client = self.client
                if client is None:
                    raise ConnectionError("not connected")
                await asyncio.wait_for(client.nodes_manager.initialize(), self.connect_timeout)
                await asyncio.wait_for(self._ssubscribe(rooms), self.op_timeout)
                break
            except Exception as exc:
                log.info("moving %d rooms, attempt %d: %s: %s", len(rooms), attempt, type(exc).__name__, exc)
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, self.max_backoff)
        held = {room: self._moving.pop(room, []) for room in rooms}
        self.moves += len(rooms)
        if rooms:
            log.warning("%d rooms resubscribed on their new primary after %d attempt(s)", len(rooms), attempt)
        resumed = getattr(self._handler, "on_bus_rooms_resumed", None)
        if resumed is not None and rooms and self._live:
            resumed(rooms)  # before anything held: the hub's repair comes first
        for room, messages in held.items():
            for payload, offset in messages:
                self._deliver(room, payload, offset)

    async def _roundtrip(self) -> None:
        """Down only when no primary answers; a silent subscriber connection moves its rooms."""
        client = self.client
        if client is None:
            raise ConnectionError("not connected")
        subs = list(self._subs.values())
        pings = [client.execute_command("PING", target_nodes=node) for node in client.get_primaries()]
        results = await asyncio.gather(*pings, *(self._ping_sub(sub) for sub in subs), return_exceptions=True)
        if all(isinstance(r, BaseException) for r in results[:len(pings)]):
            raise ConnectionError(f"no primary answers: {results[0]!r}")
        for sub, result in zip(subs, results[len(pings):], strict=True):
            if isinstance(result, BaseException) and sub.pubsub.subscribed:
                self._node_lost(sub, f"no PONG within {self.heartbeat_timeout / 2:g}s ({result!r})")

    async def _ping_sub(self, sub: _NodeSub) -> None:
        if not sub.pubsub.subscribed:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        sub.pongs.append(fut)
        try:
            async with sub.lock:
                await sub.pubsub.ping()
            await asyncio.wait_for(fut, self.heartbeat_timeout / 2)
        finally:
            sub.pongs.remove(fut)

    # -- Bus -------------------------------------------------------------------------------------------

    async def subscribe(self, room: str) -> None:
        self._check()
        ch = self.channel(room)
        self._rooms.add(room)
        self._channel_rooms[ch] = room
        try:
            await self._call("subscribe", lambda: self._ssubscribe([room]), self.errors)
        except BaseException:
            self._rooms.discard(room)
            self._channel_rooms.pop(ch, None)
            for fut in self._sub_waiters.pop(ch, []):
                fut.cancel()
            raise

    @staticmethod
    async def _sunsubscribe(sub: _NodeSub, ch: bytes) -> None:
        async with sub.lock:
            await sub.pubsub.sunsubscribe(ch)

    async def unsubscribe(self, room: str) -> None:
        if room not in self._rooms:
            return
        self._rooms.discard(room)
        ch = self.channel(room)
        self._channel_rooms.pop(ch, None)
        self._moving.pop(room, None)
        sub = self._ch_sub.pop(ch, None)
        if sub is None or not self._healthy or self._subs.get(sub.name) is not sub:
            return
        sub.channels.discard(ch)
        self._unsubscribing.add(ch)
        with contextlib.suppress(BusUnavailable):  # a new connection will not subscribe it
            await self._call("unsubscribe", lambda: self._sunsubscribe(sub, ch), self.errors)
