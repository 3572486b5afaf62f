"""The Redis bus's hot paths, cheaper per event: the pub/sub reader and publish batching.

At the capacity plan's workload (docs/scaling.md) most of a replica's CPU is a fixed cost per
event-loop wakeup and per redis-py call, spread over few events. Both helpers here cut the calls:

- :func:`read_pubsub` takes the subscriber connection's input in the transport's own ``data_received``
  callback, lets hiredis parse every reply that arrived and dispatches the channel messages right there;
  redis-py's ``get_message`` costs a chain of coroutines, a health check and an observability hook per
  message, and even a read of the connection's ``StreamReader`` costs a Future, a task step and one more
  event-loop iteration per wakeup: with the groups spread over many replicas most bus messages come
  alone, so that was a fixed cost of each. Subscribe and unsubscribe confirmations (and error replies)
  still go through redis-py's ``handle_message`` in the reader's task, in order: from the first such
  reply on, what follows waits behind it.
- :class:`PublishBatcher` sends the publishes made in one event-loop turn as one pipeline (one
  write, one read wakeup, one pooled connection) instead of one round trip each; every publisher
  gets its own command's result or error.

Order: the commands of a batch reach Redis in the order they were submitted, and a room has at most one
batch with a publish to it in flight (batches go on pooled connections, which Redis reads in no set order):
the room's publishes made meanwhile wait, and they go in the next batch once it was answered. So a
room's publishes reach Redis in the order they were submitted (the bus's ``ordered_handoff``), Redis
decides each room's one order (docs/buses.md), and a room's publish rate is not bound to one round trip
each: when the round trip grows (a broker busy with a reconnect storm), the next batch grows instead of a
queue of batches.

Size: a batch holds at most :data:`MAX_BATCH_COMMANDS` publishes and, past its first, at most
:data:`MAX_BATCH_BYTES` of arguments. After a stall (a slow Redis, a failover) a room's waiting publishes
could otherwise all go as one pipeline of any size: one huge write, the replies of all of them within one
``op_timeout`` (so a stall that outlasted it would make every one of them "maybe"), and the subscribers'
replicas handed them in one read. What does not fit goes in the next batch, ahead of everything submitted
after it (for its rooms: once the batch ahead is answered), so the room's order holds; a publish then waits
for the batches of its room ahead of it, each of which Redis runs at its full rate (bench/README.md,
"Follow-up (branch rcap)").
Failure answers are those of a single publish:
``BusUnavailable`` when nothing was sent, ``PublishOutcomeUnknown`` when the connection broke or
timed out after the batch was sent, and a command's own Redis error to its publisher only.
A script's first use on a connection is loaded in the batch's own pipeline, ahead of it. Only if Redis
loses its script cache under a live connection (``SCRIPT FLUSH``) does an EVALSHA answer NOSCRIPT (not
run); it is then run again alone, after the rest of its batch, as redis-py's retry of a single call did.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

from wirehub import BusUnavailable, PublishOutcomeUnknown
from wirehub.builtins.bus.redis_batch import Command, hiredis_io, send_on_pool

#: publishes in one batch at most: a pipeline this long already runs at Redis's full rate per publish (one
#: round trip spread over 256), while its replies fit the socket buffers and one of them is a few ms of Redis
#: time (bench/README.md, "Follow-up (branch rcap)")
MAX_BATCH_COMMANDS = 256
#: bytes of arguments (payloads, keys) in one batch at most, except for its first publish (one larger than
#: this goes alone): 256 publishes of 4 KiB; larger ones gain nothing by sharing a write
MAX_BATCH_BYTES = 1 << 20


class BatchOwner(Protocol):
    """What the batcher needs of the bus: its client, its health check and its bounded call."""

    client: Any
    errors: tuple[type[BaseException], ...]

    def _check(self) -> None: ...

    async def _call(self, what: str, op: Callable[[], Any], errors: tuple[type[BaseException], ...]) -> Any: ...


async def read_pubsub(pubsub: Any, on_message: Callable[[bytes, bytes], None],
                      on_other: Callable[[Mapping[str, Any]], None]) -> None:
    """Read ``pubsub``'s connection until it fails: ``on_message(channel, data)`` for each channel
    message, ``on_other(message)`` (redis-py's parsed form) for the rest. Raises on a closed or
    broken connection. Nothing else may read this connection meanwhile (the bus only writes to it)."""
    found = hiredis_io(getattr(pubsub, "connection", None))  # None: no hiredis, read with get_message
    if found is None:
        while True:
            msg = await pubsub.get_message(timeout=None)
            if msg is not None:
                if msg.get("type") == "message":
                    on_message(msg["channel"], msg["data"])
                else:
                    on_other(msg)
    stream, reader, more = found
    transport = pubsub.connection._writer.transport
    feed = _SubscriberFeed(transport.get_protocol(), reader, more, on_message)
    # From here on the connection's StreamReader gets nothing: what it holds already is fed first (EOF
    # ends its read at once). The connection stays the feed's: once this reader ends, its input is dropped
    # (the bus tears the connection down after it; nothing else reads it).
    transport.set_protocol(feed)
    try:
        closing = transport.is_closing()  # closing before the swap: the old protocol gets its end, not the feed
        stream.feed_eof()
        feed.data_received(bytes(await stream.read(-1)))
        if closing and feed.error is None:  # so the reader ends here, after what was buffered
            feed.error = ConnectionError("the subscriber connection was closed")
        await feed.run(pubsub, on_other)
    finally:
        feed.stop()


def _is_message(reply: Any) -> bool:
    # RESP3 (redis-py's default) pushes a list subclass; RESP2 a list
    return isinstance(reply, list) and len(reply) == 3 and reply[0] == b"message"


class _SubscriberFeed(asyncio.Protocol):
    """The subscriber connection's protocol while :func:`read_pubsub` runs: parses its input as it arrives
    and calls ``on_message`` from ``data_received``; every other reply (and everything after it, to keep
    the connection's order) is queued for the reader's task. Flow control and the connection's end are
    passed on to the connection's own protocol (``inner``) too."""

    def __init__(self, inner: Any, reader: Any, more: object,
                 on_message: Callable[[bytes, bytes], None]) -> None:
        self.inner, self.reader, self.more, self.on_message = inner, reader, more, on_message
        #: replies for the task, in order (while not empty, messages queue behind them)
        self.queued: deque[Any] = deque()
        #: why the reader must end: a broken connection, or what on_message or the parser raised
        self.error: BaseException | None = None
        self.stopped = False
        self._wake: asyncio.Future[None] | None = None

    def data_received(self, data: bytes) -> None:
        if self.stopped or self.error is not None:
            return
        reader, more, queued, on_message = self.reader, self.more, self.queued, self.on_message
        try:
            reader.feed(data)
            # every complete reply now buffered, in order
            while (reply := reader.gets()) is not more:
                # _is_message inlined: this runs once per bus message
                if not queued and isinstance(reply, list) and len(reply) == 3 and reply[0] == b"message":
                    on_message(reply[1], reply[2])
                else:
                    queued.append(reply)
        except Exception as exc:  # the reader fails as when it raised in its own task
            self.error = exc
        if queued or self.error is not None:
            self._wakeup()

    def eof_received(self) -> bool | None:
        self.inner.eof_received()
        return None  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        if self.error is None:
            self.error = exc if exc is not None else ConnectionError(
                "the subscriber connection was closed by the server")
        self._wakeup()
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def stop(self) -> None:
        """No more calls of ``on_message`` (the reader's task ended or was cancelled)."""
        self.stopped = True

    def _wakeup(self) -> None:
        wake, self._wake = self._wake, None
        if wake is not None and not wake.done():
            wake.set_result(None)

    async def run(self, pubsub: Any, on_other: Callable[[Mapping[str, Any]], None]) -> None:
        """The reader's task: the queued replies in order, until the connection fails."""
        queued = self.queued
        while True:
            while queued:
                reply = queued[0]
                if isinstance(reply, BaseException):
                    raise reply
                if _is_message(reply):
                    self.on_message(reply[1], reply[2])
                else:
                    msg = await pubsub.handle_message(reply)  # subscribe bookkeeping stays redis-py's
                    if msg is not None:
                        on_other(msg)
                queued.popleft()  # only now: data_received queues behind it meanwhile
            if self.error is not None:
                raise self.error
            self._wake = asyncio.get_running_loop().create_future()
            await self._wake


class _Pending:
    """One publish waiting for its batch: the command, the publisher's future, the room's channel and the
    bytes of the command's arguments (what :data:`MAX_BATCH_BYTES` counts)."""

    __slots__ = ("args", "channel", "future", "script", "size")

    def __init__(self, args: Command, future: asyncio.Future[Any], script: Any, channel: bytes | None) -> None:
        self.args, self.future, self.script, self.channel = args, future, script, channel
        self.size = _size(args)


def _size(args: Command) -> int:
    """The bytes of ``args``' str and bytes arguments (ints are a few digits: not counted)."""
    n = 0
    for a in args:
        if type(a) is bytes or type(a) is str:
            n += len(a)
    return n


class PublishBatcher:
    """Publishes of one event-loop turn go to Redis as one pipeline; each gets its own result."""

    def __init__(self, owner: BatchOwner) -> None:
        self.owner = owner
        self._pending: list[_Pending] = []
        self._flushing: set[asyncio.Task[None]] = set()
        # scripts loaded on the current client: a batch's first use of a script loads it in the same
        # pipeline, ahead of its EVALSHAs (a NOSCRIPT retry would run it after the batch's later commands)
        self._client: Any = None
        self._loaded: set[str] = set()
        #: the channels with a batch in flight: their later publishes wait for its end (answered or failed), as
        #: batches go on different pooled connections (their order is not Redis's)
        self._tails: set[bytes] = set()
        #: channel -> its publishes submitted while its batch was in flight (or while older ones of the room were
        #: here), in order: the first of them, up to the caps, go in its next batch
        self._parked: dict[bytes, list[_Pending]] = {}
        #: (bytes, publishes) of a room each, taken from its parked ones when its batch ended: they go first, whole
        #: (each within the caps, older than anything pending of its room)
        self._resumed: list[tuple[int, list[_Pending]]] = []
        self._scheduled = False
        #: batches sent, commands in them and the most in one (tests and benchmarks read these)
        self.batches = 0
        self.commands = 0
        self.largest = 0

    def submit(self, args: Command, script: Any = None, channel: bytes | None = None) -> asyncio.Future[Any]:
        """Queue one command (``EVALSHA sha n keys... args...`` or ``PUBLISH ch data``); its future
        resolves to the command's reply. ``script`` (the redis-py Script of an EVALSHA) lets a
        command that Redis answered NOSCRIPT (not run: a flushed script cache) run again alone.

        The commands with the same ``channel`` (a room's) reach Redis in the order they were submitted,
        whatever batches they go in (the bus's ``ordered_handoff``): the call queues it before it returns."""
        self.owner._check()  # down: nothing is sent, the publisher gets BusUnavailable at once
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._start_flush)  # after the callbacks already due in this turn
        self._pending.append(_Pending(args, fut, script, channel))
        return fut

    def _schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._start_flush)

    def _start_flush(self) -> None:
        """One batch of at most the caps: the rooms' resumed publishes first, then the pending ones in order (a
        room with a batch in flight or publishes parked has the new ones parked behind them). Once it is full
        the rest waits, untouched, for the next turn: a publish is looked at once to be parked, not once per
        batch of a long backlog."""
        self._scheduled = False
        tails, parked = self._tails, self._parked
        ready: list[_Pending] = []
        size = 0
        full = False
        resumed = self._resumed
        if resumed:
            taken = 0
            released: set[bytes] = set()
            for nbytes, chunk in resumed:
                if ready and (len(ready) + len(chunk) > MAX_BATCH_COMMANDS or size + nbytes > MAX_BATCH_BYTES):
                    full = True
                    break
                live = [p for p in chunk if not p.future.done()]  # a cancelled publisher's command is not sent
                if not live and chunk[0].channel is not None:
                    # every publisher of it gave up: no batch of its room goes, so none ends to take the
                    # room's next parked ones; they are taken now
                    released.add(chunk[0].channel)
                ready += live
                size += nbytes
                taken += 1
            del resumed[:taken]
            if released:
                self._ended([], released)
        if not full:
            pending, self._pending = self._pending, []
            for i, p in enumerate(pending):
                if p.future.done():
                    continue
                c = p.channel
                if c is not None and (c in tails or c in parked):  # behind its room's batch in flight or older ones
                    parked.setdefault(c, []).append(p)
                    continue
                size += p.size
                if ready and (len(ready) >= MAX_BATCH_COMMANDS or size > MAX_BATCH_BYTES):
                    full = True
                    self._pending[:0] = pending[i:]  # ahead of what is submitted meanwhile
                    break
                ready.append(p)
        if full:
            self._schedule()
        if not ready:
            return
        channels = {p.channel for p in ready if p.channel is not None}
        tails |= channels
        task = asyncio.ensure_future(self._flush(ready))
        self._flushing.add(task)
        task.add_done_callback(self._flushing.discard)
        # in a callback, not a finally: a task cancelled before its first step runs no finally, and its rooms'
        # later publishes would wait forever
        task.add_done_callback(lambda _: self._ended(ready, channels))

    def _ended(self, batch: list[_Pending], channels: set[bytes]) -> None:
        """A batch's flush is over (answered, failed or cancelled): the oldest waiting publishes of each of its
        rooms, up to the caps, go next, ahead of any submitted since; the room's others stay parked."""
        _fail_all(batch, PublishOutcomeUnknown, "publish: cancelled")  # only those not answered (a shutdown)
        self._tails -= channels
        parked = self._parked
        for c in channels:
            waiting = parked.get(c)
            if waiting is None:
                continue
            n = size = 0
            for p in waiting:
                if n and (n >= MAX_BATCH_COMMANDS or size + p.size > MAX_BATCH_BYTES):
                    break
                size += p.size
                n += 1
            if n == len(waiting):
                del parked[c]
                chunk = waiting
            else:
                chunk = waiting[:n]
                del waiting[:n]
            self._resumed.append((size, chunk))
            self._schedule()

    async def _flush(self, batch: list[_Pending]) -> None:
        owner = self.owner
        try:
            owner._check()
        except BusUnavailable as exc:  # went down before the batch was sent: nothing was published
            _fail_all(batch, BusUnavailable, str(exc))
            return
        client = owner.client
        if client is not self._client:  # a new connection (a reconnect): maybe a new Redis
            self._client, self._loaded = client, set()
        loads = {p.script.sha: p.script for p in batch if p.script is not None and p.script.sha not in self._loaded}

        commands: list[Command] = [("SCRIPT", "LOAD", script.script) for script in loads.values()]
        commands += [p.args for p in batch]

        def run() -> Awaitable[list[Any]]:
            # redis_batch's lean pipeline: raw replies, a command's error reply as its exception
            return send_on_pool(client.connection_pool, commands)

        self.batches += 1
        self.commands += len(batch)
        self.largest = max(self.largest, len(batch))
        try:
            results = await owner._call("publish", run, owner.errors)
        except BusUnavailable as exc:  # sent, then no answer or a broken connection: maybe published
            _fail_all(batch, PublishOutcomeUnknown, str(exc))
            return
        except Exception as exc:  # anything else, once sent, is a "maybe" for each publisher too
            _fail_all(batch, PublishOutcomeUnknown, f"publish: {type(exc).__name__}: {exc}")
            return
        for sha, loaded in zip(loads, results, strict=False):
            if not isinstance(loaded, BaseException):
                self._loaded.add(sha)
        for p, result in zip(batch, results[len(loads):], strict=True):
            if isinstance(result, BaseException) and p.script is not None and _noscript(result):
                await self._retry_alone(p)
            elif p.future.done():
                continue
            elif isinstance(result, BaseException):
                p.future.set_exception(result)
            else:
                p.future.set_result(result)

    async def _retry_alone(self, p: _Pending) -> None:
        """NOSCRIPT: the script did not run (Redis lost its cache); redis-py's Script loads it and runs it."""
        owner = self.owner
        nkeys = int(p.args[2])
        keys, args = list(p.args[3:3 + nkeys]), list(p.args[3 + nkeys:])
        client = owner.client
        try:
            result = await owner._call("publish", lambda: p.script(keys=keys, args=args, client=client), owner.errors)
        except BusUnavailable as exc:
            result = PublishOutcomeUnknown(str(exc))
        except Exception as exc:
            result = exc
        if p.future.done():
            return
        if isinstance(result, BaseException):
            p.future.set_exception(result)
        else:
            p.future.set_result(result)

    async def close(self) -> None:
        """Wait for the batches in flight (each ends within op_timeout) and for those of the publishes that
        waited for them (started as they end); queued ones fail at their flush."""
        while self._flushing:
            await asyncio.wait(set(self._flushing))


def _noscript(exc: BaseException) -> bool:
    return str(exc).startswith("NOSCRIPT") or type(exc).__name__ == "NoScriptError"


def _fail_all(batch: list[_Pending], kind: type[BusUnavailable], message: str) -> None:
    """Each publisher gets its own exception object (one raised in several tasks would chain tracebacks)."""
    for p in batch:
        if not p.future.done():
            p.future.set_exception(kind(message))
