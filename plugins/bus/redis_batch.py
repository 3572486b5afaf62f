"""One round trip per loop iteration for the redis bus's small commands (presence, history position and reads).

Callers queue raw commands (tuples of arguments, as for ``EXECUTE_COMMAND``); what is queued in one
loop iteration goes out as ONE pipeline (no MULTI) on one pooled connection: one write, one round
trip, one ``op_timeout``. At most ``MAX_IN_FLIGHT`` pipelines of at most ``MAX_BATCH`` requests are
in flight; what is asked for meanwhile goes out as the next one when one comes back. A join storm of
500 joins in flight then costs a few large pipelines, not three round trips per join, on at most two
connections of the pool, not 500 turns at it (the publisher's publishes share that pool). A command
waits for the pipelines ahead of it, then ``op_timeout`` for its own.

Order: requests that name a room (``rooms`` of :meth:`Batcher.run`, ``scope`` of :meth:`Batcher.gather`:
presence writes) reach Redis in the order they were queued. Within a pipeline that is its order; but
pipelines go on different pooled connections, which Redis reads in no set order (a long one 16 KiB at a
time, the others served in between), so a room's request waits while a pipeline holding a request of that
room is in flight, and goes in the next one after it (as the publish batcher holds a room's publishes). A
leave at the end of a long pipeline and the rejoin of its session sent in the next could otherwise run in
the other order: the member absent while joined. What waits keeps gathering (a join storm's joins into a
room while its pipeline is in flight are one script run when it comes back), and the next pipeline is
written as soon as the replies of the one ahead are in, before their callers are woken: Redis runs it while
this process handles those replies, as when two pipelines of a room were in flight at once. Reads name no
room: one asked for while a write of its room is in flight may see it or not, as any read concurrent with a
write; it sees every write acknowledged before it was asked for.

Requests with the same ``share`` key in one batch (the history position of a room, the same range of
its history, the first presence page of a room) are sent ONCE and every caller gets the one parsed
reply. That is correct because the batch is sent after every request in it was made: what the
command reads is at least as new as what each caller asked for (a join's position or replay is read
after the member was added to the room). A request made after the batch was taken goes into the next
one: a reply is never shared with a caller who asked after the command was sent.

Standalone and sentinel send on a pooled connection with redis-py's packer and hiredis parser and no
per-command layers (no response callbacks, no per-reply timer): replies are raw (``b"OK"``, ints,
bytes, lists). The cluster subclass (:mod:`wirehub.builtins.bus.redis_cluster`) sends through
redis-py's cluster pipeline, which routes each command to its slot's node.
"""

from __future__ import annotations

import abc
import asyncio
import hashlib
import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from wirehub.builtins.bus.redis import RedisBus

from wirehub import BusUnavailable

_pack_command: Callable[[Command], bytes] | None
_PUSH: type | None  # a RESP3 push as hiredis parses it
try:
    from hiredis import PushNotification as _PUSH
    from hiredis import pack_command as _pack_command
except ImportError:  # pragma: no cover - hiredis (3.2+) is in the redis extra; without it redis-py's paths run
    _pack_command = _PUSH = None

Command = tuple[Any, ...]
#: pipelines in flight at once; what is asked for meanwhile waits and goes out as the next one, so a
#: storm's commands travel in a few large pipelines on a few connections, not one per loop iteration (a room's
#: presence writes: one pipeline in flight at a time, see "Order" above)
MAX_IN_FLIGHT = 2
#: requests in one pipeline at most, a :meth:`Batcher.gather` request counting as its items: a reply wakes at
#: most this many callers in one loop iteration, so a storm's continuations do not hold back the deliveries
#: to the other members for long
MAX_BATCH = 256
#: items of one :meth:`Batcher.gather` request at most (more: a second request of that key)
MAX_GROUP = 256
Parse = Callable[[list[Any]], Any]


def _raw(replies: list[Any]) -> Any:
    return replies


@dataclass(eq=False)
class _Request:
    commands: Sequence[Command]
    parse: Parse
    future: asyncio.Future[Any]
    share: Hashable | None = None
    #: with ``share``: a future per caller, each settled with ``future`` (a caller that gives up
    #: cancels only its own; cheaper than a shield per caller, which adds a loop callback to each wake-up);
    #: with ``items``: the future of each item's caller, in the order of ``items``
    sharers: list[asyncio.Future[Any]] | None = None
    #: a request of :meth:`Batcher.gather`: its callers' items, and what makes its commands from them when it
    #: is sent and splits its replies into one result per item
    items: list[Any] | None = None
    group: Group | None = None
    #: what ``group.commands`` gave with the commands, for ``group.results``
    context: Any = None
    #: the rooms whose requests must reach Redis in the order they were queued (see the module docstring)
    rooms: Sequence[Hashable] = ()


class Group(abc.ABC):
    """What :meth:`Batcher.gather` makes of the items of one key: the commands, then a result per item."""

    __slots__ = ()

    @abc.abstractmethod
    def commands(self, key: Any, items: list[Any]) -> tuple[Sequence[Command], Any]:
        """The commands of ``items`` (made when the request is sent) and a context for :meth:`results`."""

    @abc.abstractmethod
    def results(self, key: Any, items: list[Any], replies: list[Any], context: Any) -> Sequence[Any]:
        """One result per item, in order, from the replies of :meth:`commands`'s commands."""


@dataclass(eq=False)
class BatchStats:
    """Counters for tests and diagnostics."""

    #: pipelines sent (round trips), commands in them, requests answered by a reply sent for another
    round_trips: int = 0
    commands: int = 0
    shared: int = 0
    #: the largest batch sent, in commands
    largest: int = 0


class Batcher:
    """The per-iteration pipeline of one :class:`RedisBus` (see the module docstring)."""

    def __init__(self, bus: RedisBus) -> None:
        self.bus = bus
        self._queued: list[_Request] = []
        self._by_share: dict[Hashable, _Request] = {}
        self._groups: dict[Hashable, _Request] = {}
        #: scope -> the keys of its requests in ``_groups`` (what :meth:`seal` closes; a set: a backlog that
        #: never empties the queue adds each key once)
        self._scopes: dict[Hashable, set[Hashable]] = {}
        self._running: set[asyncio.Task[None]] = set()
        #: the rooms of the requests in the pipelines in flight: their rooms' next requests wait for them
        self._busy: set[Hashable] = set()
        self._scheduled = False
        #: sha1 -> Lua source of the scripts sent with :meth:`script`, for a Redis that lost them
        self._sources: dict[str, str] = {}
        self._shas: dict[str, str] = {}
        self.stats = BatchStats()

    def script(self, source: str, keys: Sequence[Any], args: Sequence[Any]) -> Command:
        """A Lua script as a command: EVALSHA (a few bytes instead of the source in every command of
        a join storm); a Redis that does not know it (NOSCRIPT: restarted, flushed) gets it once more
        as EVAL (a command refused with NOSCRIPT did not run, so running it later changes nothing)."""
        sha = self._shas.get(source)
        if sha is None:
            sha = self._shas[source] = hashlib.sha1(source.encode()).hexdigest()
            self._sources[sha] = source
        return ("EVALSHA", sha, len(keys), *keys, *args)

    async def run(self, commands: Sequence[Command] | Callable[[], Sequence[Command]], *,
                  share: Hashable | None = None, parse: Parse = _raw, rooms: Sequence[Hashable] = ()) -> Any:
        """``parse`` of the replies of ``commands`` (a failed command raises its error). With ``share``,
        a request with the same key already queued in this iteration answers this one too (then
        ``commands``, when a callable, is not even built). ``rooms``: the rooms it writes; it reaches Redis
        after every request of those rooms queued before it (not with ``share``)."""
        self.bus._check()
        loop = asyncio.get_running_loop()
        if share is not None:
            same = self._by_share.get(share)
            if same is not None and same.sharers is not None:
                self.stats.shared += 1
                mine = loop.create_future()  # one caller giving up must not cancel the others
                same.sharers.append(mine)
                return await mine
        req = _Request(commands() if callable(commands) else commands, parse, loop.create_future(), share,
                       rooms=rooms)
        self._queued.append(req)
        self._schedule()
        if share is None:
            return await req.future
        mine = loop.create_future()
        req.sharers = [mine]
        self._by_share[share] = req
        return await mine

    async def gather(self, key: Hashable, item: Any, group: Group, *, scope: Hashable = None) -> Any:
        """This caller's result of ONE request for every ``item`` given with ``key`` while that request is queued
        (at most :data:`MAX_GROUP`; it may span loop iterations while pipelines are in flight), until
        :meth:`seal` of ``scope`` closes it: ``group.commands(key, items)`` when it is sent, ``group.results(key,
        items, replies, context)`` split among the callers, in order (``scope``: the same for every call with
        ``key``). A join storm's presence writes into one room are one script run and one reply, not a command,
        a reply and a request per join. The request keeps the queue place of its first item: a later item runs
        before what was queued after that, unless a :meth:`seal` came between. ``scope`` is its room too: it
        reaches Redis after the requests of that room queued before it. A failed command fails them all;
        one caller giving up cancels only its own future."""
        self.bus._check()
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        req = self._groups.get(key)
        if req is None or len(req.items or ()) >= MAX_GROUP:
            req = self._groups[key] = _Request((), _raw, fut, key, [], [], group)
            if scope is not None:
                req.rooms = (scope,)
                self._scopes.setdefault(scope, set()).add(key)
            self._queued.append(req)
            self._schedule()
        assert req.items is not None and req.sharers is not None
        req.items.append(item)
        req.sharers.append(fut)
        return await fut

    def seal(self, scope: Hashable) -> None:
        """No item given after this joins a queued :meth:`gather` request of ``scope``: it goes into a new
        request, behind what was queued meanwhile (a presence leave: a later join of the room must run after
        it, not in a script run queued before it)."""
        for key in self._scopes.pop(scope, ()):
            self._groups.pop(key, None)

    def _schedule(self) -> None:
        if not self._scheduled and self._queued and len(self._running) < MAX_IN_FLIGHT:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        if not self._queued or len(self._running) >= MAX_IN_FLIGHT:
            return  # sent when a batch in flight comes back
        queued, size = self._queued, 0
        batch: list[_Request] = []
        waiting: list[_Request] = []  # their rooms have a pipeline in flight: they keep their place
        held = self._busy  # rooms whose requests wait (copied before it grows)
        rest = 0
        cut = False
        for req in queued:
            if req.rooms and held and not held.isdisjoint(req.rooms):
                if held is self._busy:
                    held = set(held)
                held.update(req.rooms)  # a later request of any of its rooms waits behind it
                waiting.append(req)
                rest += 1
                continue
            size += 1 if req.items is None else len(req.items)  # a gather request: its callers woken by the reply
            if size > MAX_BATCH and batch:
                cut = True
                break
            batch.append(req)
            rest += 1
        if not batch:
            return  # all of them wait for pipelines in flight: sent when one comes back
        self._queued = waiting + queued[rest:] if waiting else queued[rest:]
        if self._queued:
            for req in batch:  # sent now: a later request must not share its reply, nor add to its items
                if req.share is not None:
                    if self._by_share.get(req.share) is req:
                        del self._by_share[req.share]
                    if self._groups.get(req.share) is req:
                        del self._groups[req.share]
        else:
            self._by_share = {}
            self._groups = {}
            self._scopes = {}
        rooms = {room for req in batch for room in req.rooms}
        self._busy |= rooms
        task = asyncio.ensure_future(self._run(batch, rooms))
        self._running.add(task)
        task.add_done_callback(lambda t: self._done(t, rooms))
        if cut:  # the rest, when another pipeline may go (what was not cut waits for a pipeline to come back)
            self._schedule()

    def _done(self, task: asyncio.Task[None], rooms: set[Hashable]) -> None:
        if self._release(task, rooms):  # not already released by ``_run`` once answered
            self._schedule()

    def _release(self, task: asyncio.Task[None] | None, rooms: set[Hashable]) -> bool:
        """``task``'s pipeline is answered (or failed): it no longer counts as in flight, nor holds its rooms."""
        if task not in self._running:
            return False
        self._running.discard(task)
        self._busy -= rooms
        return True

    async def _run(self, batch: list[_Request], rooms: set[Hashable]) -> None:
        for req in [r for r in batch if r.group is not None]:
            assert req.group is not None and req.items is not None
            try:
                req.commands, req.context = req.group.commands(req.share, req.items)
            except Exception as exc:  # its callers get the error; the rest of the batch goes
                _finish(req, error=exc)
                batch.remove(req)
        if not batch:
            return
        commands = [c for req in batch for c in req.commands]
        stats = self.stats
        stats.round_trips += 1
        stats.commands += len(commands)
        stats.largest = max(stats.largest, len(commands))
        bus = self.bus
        try:
            replies = await bus._call("redis batch", lambda: self._send(commands), bus.errors)
        except BaseException as exc:
            error = exc if isinstance(exc, Exception) else asyncio.CancelledError()
            for req in batch:
                _finish(req, error=error)
            if not isinstance(exc, Exception):
                raise
            return
        # every command of it ran: the next pipeline (its rooms' waiting writes) goes now, queued ahead of the
        # callers' continuations (woken one step later), so Redis runs it while this process handles the replies
        self._release(asyncio.current_task(), rooms)
        if self._queued:
            self._flush()
        asyncio.get_running_loop().call_soon(_settle_batch, batch, replies)

    async def _send(self, commands: list[Command]) -> list[Any]:
        from redis.exceptions import NoScriptError

        replies = await self.bus.send_batch(commands)
        again = [i for i, r in enumerate(replies) if isinstance(r, NoScriptError)]
        if again:
            self.stats.round_trips += 1
            resent = await self.bus.send_batch([("EVAL", self._sources[commands[i][1]], *commands[i][2:])
                                                for i in again])
            for i, reply in zip(again, resent, strict=True):
                replies[i] = reply
        return replies

    async def close(self) -> None:
        queued, self._queued = self._queued, []
        self._by_share = {}
        self._groups = {}
        self._scopes = {}
        for req in queued:
            _finish(req, error=BusUnavailable("the bus was closed"))
        for task in list(self._running):
            task.cancel()


def _settle_batch(batch: list[_Request], replies: list[Any]) -> None:
    """Each request of a pipeline answered: its callers' results (or its command's error) from its replies."""
    i = 0
    for req in batch:
        out, i = replies[i:i + len(req.commands)], i + len(req.commands)
        failed = next((r for r in out if isinstance(r, Exception)), None)
        if failed is not None:  # a command failed: its caller's request fails, not the others'
            _finish(req, error=failed)
            continue
        if req.group is not None:
            _split(req, out)
            continue
        try:
            result = req.parse(out)
        except Exception as exc:  # a reply the parser did not expect
            _finish(req, error=exc)
        else:
            _finish(req, result=result)


def _finish(req: _Request, *, result: Any = None, error: BaseException | None = None) -> None:
    """Settle ``req``'s future and those of its sharers."""
    _settle(req.future, result=result, error=error)
    for fut in req.sharers or ():
        _settle(fut, result=result, error=error)


def _split(req: _Request, replies: list[Any]) -> None:
    """A :meth:`Batcher.gather` request's results, one to each caller."""
    assert req.group is not None and req.items is not None and req.sharers is not None
    try:
        results = req.group.results(req.share, req.items, replies, req.context)
        if len(results) != len(req.sharers):
            raise ValueError(f"{len(results)} results for {len(req.sharers)} items")
    except Exception as exc:  # a reply the parser did not expect
        _finish(req, error=exc)
        return
    for fut, result in zip(req.sharers, results, strict=True):  # the first caller's is ``req.future``
        _settle(fut, result=result)


def _settle(fut: asyncio.Future[Any], *, result: Any = None, error: BaseException | None = None) -> None:
    if fut.done():
        return
    if error is not None:
        fut.set_exception(error)
        fut.exception()  # retrieved here: the callers may all have given up
    else:
        fut.set_result(result)


async def send_on_pool(pool: Any, commands: list[Command]) -> list[Any]:
    """``commands`` as one pipeline on a connection of redis-py's asyncio ``pool``; raw replies, a
    failed command's as its ResponseError. The caller bounds the wait (``op_timeout``)."""
    conn = await pool.get_connection()
    try:
        return await send_on(conn, commands)
    except BaseException:
        # cancelled or broken halfway: the rest of the replies may still come; never reuse it
        await conn.disconnect(nowait=True)
        raise
    finally:
        await pool.release(conn)


async def send_on(conn: Any, commands: list[Command]) -> list[Any]:
    """One pipeline on one redis-py connection (see :func:`send_on_pool`; the caller disconnects it on an
    error). With hiredis it writes the packed pipeline to the connection's stream itself and parses every
    reply that arrived per socket read with the connection's hiredis reader: redis-py's
    ``send_packed_command`` runs the write in a task of its own (``wait_for`` with ``socket_timeout``, one
    more loop iteration) and ``read_response`` is a coroutine chain per reply, which at the capacity plan's
    one or two publishes per pipeline cost more than the rest of the publish (docs/scaling.md)."""
    if not conn.is_connected:
        await conn.connect()
    io = _lean_io(conn)
    if io is None:  # no hiredis, or another redis-py layout: redis-py's own calls
        return await _send_slow(conn, commands)
    from redis.exceptions import ConnectionError as Broken  # what redis-py raises: the bus's errors include it

    writer, stream, reader, more, parser = io
    if writer.transport.is_closing():
        raise Broken("the connection was closed before the write")
    packed = pack(conn, commands)
    assert isinstance(packed, bytes)  # hiredis's packer, as _lean_io required
    writer.write(packed)
    await writer.drain()  # at once unless the socket's buffer is over its high-water mark
    out: list[Any] = []
    want = len(commands)
    while len(out) < want:
        reply = reader.gets()
        if reply is more:
            data = await stream.read(READ_SIZE)
            if not data:
                raise Broken("the connection was closed by the server")
            reader.feed(data)
            continue
        if isinstance(reply, Broken):  # redis-py raises these (LOADING, ...): the connection is not usable
            raise reply
        if isinstance(reply, list) and reply and isinstance(reply[0], Broken):  # as redis-py's reader does
            raise reply[0]
        if _PUSH is not None and isinstance(reply, _PUSH):
            # RESP3 (redis-py's default) may interleave a push (client tracking, a server's maintenance
            # notice) with the replies: it is no command's reply; redis-py's parser handles it as it would
            await parser.handle_push_response(reply)
            continue
        out.append(reply)  # a command's error reply stays its own (a ResponseError instance)
    return out


#: bytes asked of the socket per read; hiredis parses whatever arrived, many replies at once
READ_SIZE = 65536


def hiredis_io(conn: Any) -> tuple[Any, Any, object] | None:
    """(stream reader, hiredis reader, its not-enough-data marker) of a connected redis-py connection, or
    None when redis-py parses in Python (no hiredis) or has another layout: then the caller uses redis-py's
    own calls."""
    parser = getattr(conn, "_parser", None)
    reader, stream = getattr(parser, "_reader", None), getattr(conn, "_reader", None)
    if reader is None or stream is None or not hasattr(reader, "gets") or not hasattr(stream, "read"):
        return None
    from redis._parsers.hiredis import NOT_ENOUGH_DATA  # redis-py 5.0.8+ (the extra's floor)

    return stream, reader, NOT_ENOUGH_DATA


def _lean_io(conn: Any) -> tuple[Any, Any, Any, object, Any] | None:
    """(stream writer, stream reader, hiredis reader, its not-enough-data marker, redis-py's parser) of a
    connected redis-py connection with the hiredis parser; else None. Every caller on a pooled connection
    reads all the replies of what it sent (or the connection is disconnected), so the hiredis reader holds
    nothing of another's. None too for a connection class with a ``read_response`` of its own (Sentinel's
    turns READONLY from a demoted master into a disconnect), which only redis-py's path honours."""
    from redis.asyncio.connection import AbstractConnection

    if _pack_command is None or type(conn).read_response is not AbstractConnection.read_response:
        return None
    found = hiredis_io(conn)
    parser, writer = getattr(conn, "_parser", None), getattr(conn, "_writer", None)
    if found is None or writer is None:
        return None
    if getattr(parser, "_connected", True) is False or not hasattr(parser, "handle_push_response"):
        return None
    stream, reader, more = found
    return writer, stream, reader, more, parser


async def _send_slow(conn: Any, commands: list[Command]) -> list[Any]:
    from redis.exceptions import ResponseError

    await conn.send_packed_command(pack(conn, commands), check_health=False)
    out: list[Any] = []
    for _ in commands:
        try:
            # math.inf: no per-reply timer (the caller's timeout covers the batch)
            out.append(await conn.read_response(timeout=math.inf))
        except ResponseError as exc:
            out.append(exc)
    return out


def pack(conn: Any, commands: list[Command]) -> bytes | list[bytes]:
    """RESP of ``commands``: hiredis's C packer when installed (redis-py's per-argument layers cost
    more than the rest of a join storm's Redis work), else redis-py's. Arguments are str, bytes, int."""
    if _pack_command is None:  # hiredis is in the redis extra; redis-py packs without it
        packed: list[bytes] = conn.pack_commands(commands)
        return packed
    return b"".join(map(_pack_command, commands))
