"""One round trip per loop iteration for the redis bus's small commands (presence, history position and reads).

Callers queue raw commands (tuples of arguments, as for ``EXECUTE_COMMAND``); what is queued in one
loop iteration goes out as ONE pipeline (no MULTI) on one pooled connection: one write, one round
trip, one ``op_timeout``. At most ``MAX_IN_FLIGHT`` pipelines of at most ``MAX_BATCH`` requests are
in flight; what is asked for meanwhile goes out as the next one when one comes back. A join storm of
500 joins in flight then costs a few large pipelines, not three round trips per join, on at most two
connections of the pool, not 500 turns at it (the publisher's publishes share that pool). A command
waits for the pipelines ahead of it, then ``op_timeout`` for its own.

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
#: storm's commands travel in a few large pipelines on a few connections, not one per loop iteration
MAX_IN_FLIGHT = 2
#: requests in one pipeline at most: a reply wakes at most this many callers in one loop iteration, so
#: a storm's continuations do not hold back the deliveries to the other members for long
MAX_BATCH = 256
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
    #: cancels only its own; cheaper than a shield per caller, which adds a loop callback to each wake-up)
    sharers: list[asyncio.Future[Any]] | None = None


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
        self._running: set[asyncio.Task[None]] = set()
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
                  share: Hashable | None = None, parse: Parse = _raw) -> Any:
        """``parse`` of the replies of ``commands`` (a failed command raises its error). With ``share``,
        a request with the same key already queued in this iteration answers this one too (then
        ``commands``, when a callable, is not even built)."""
        self.bus._check()
        loop = asyncio.get_running_loop()
        if share is not None:
            same = self._by_share.get(share)
            if same is not None and same.sharers is not None:
                self.stats.shared += 1
                mine = loop.create_future()  # one caller giving up must not cancel the others
                same.sharers.append(mine)
                return await mine
        req = _Request(commands() if callable(commands) else commands, parse, loop.create_future(), share)
        self._queued.append(req)
        self._schedule()
        if share is None:
            return await req.future
        mine = loop.create_future()
        req.sharers = [mine]
        self._by_share[share] = req
        return await mine

    def _schedule(self) -> None:
        if not self._scheduled and self._queued and len(self._running) < MAX_IN_FLIGHT:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        if not self._queued or len(self._running) >= MAX_IN_FLIGHT:
            return  # sent when a batch in flight comes back
        batch, self._queued = self._queued[:MAX_BATCH], self._queued[MAX_BATCH:]
        if self._queued:
            for req in batch:  # sent now: a later request must not share its reply
                if req.share is not None and self._by_share.get(req.share) is req:
                    del self._by_share[req.share]
        else:
            self._by_share = {}
        task = asyncio.ensure_future(self._run(batch))
        self._running.add(task)
        task.add_done_callback(self._done)
        self._schedule()  # the rest, when another pipeline may go

    def _done(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        self._schedule()

    async def _run(self, batch: list[_Request]) -> None:
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
        i = 0
        for req in batch:
            out, i = replies[i:i + len(req.commands)], i + len(req.commands)
            failed = next((r for r in out if isinstance(r, Exception)), None)
            if failed is not None:  # a command failed: its caller's request fails, not the others'
                _finish(req, error=failed)
                continue
            try:
                result = req.parse(out)
            except Exception as exc:  # a reply the parser did not expect
                _finish(req, error=exc)
            else:
                _finish(req, result=result)

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
        for req in queued:
            _finish(req, error=BusUnavailable("the bus was closed"))
        for task in list(self._running):
            task.cancel()


def _finish(req: _Request, *, result: Any = None, error: BaseException | None = None) -> None:
    """Settle ``req``'s future and those of its sharers."""
    _settle(req.future, result=result, error=error)
    for fut in req.sharers or ():
        _settle(fut, result=result, error=error)


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
