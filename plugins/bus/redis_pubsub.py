"""The Redis bus's hot paths, cheaper per event: the pub/sub reader and publish batching.

At the capacity plan's workload (docs/scaling.md) most of a replica's CPU is a fixed cost per
event-loop wakeup and per redis-py call, spread over few events. Both helpers here cut the calls:

- :func:`read_pubsub` reads the subscriber connection's socket itself and lets hiredis parse every
  reply that arrived, then dispatches them all in one loop; redis-py's ``get_message`` costs a chain
  of coroutines, a health check and an observability hook per message. Subscribe and unsubscribe
  confirmations still go through redis-py's ``handle_message``, which keeps its channel bookkeeping.
- :class:`PublishBatcher` sends the publishes made in one event-loop turn as one pipeline (one
  write, one read wakeup, one pooled connection) instead of one round trip each; every publisher
  gets its own command's result or error.

Order: the commands of a batch reach Redis in the order they were submitted, and a batch with a publish
to a room is sent once the batches before it with one to that room were answered (batches go on pooled
connections, which Redis reads in no set order). So a room's publishes reach Redis in the order they
were submitted (the bus's ``ordered_handoff``), and Redis decides each room's one order (docs/buses.md).
Failure answers are those of a single publish:
``BusUnavailable`` when nothing was sent, ``PublishOutcomeUnknown`` when the connection broke or
timed out after the batch was sent, and a command's own Redis error to its publisher only.
A script's first use on a connection is loaded in the batch's own pipeline, ahead of it. Only if Redis
loses its script cache under a live connection (``SCRIPT FLUSH``) does an EVALSHA answer NOSCRIPT (not
run); it is then run again alone, after the rest of its batch, as redis-py's retry of a single call did.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

from wirehub import BusUnavailable, PublishOutcomeUnknown
from wirehub.builtins.bus.redis_batch import READ_SIZE, Command, hiredis_io, send_on_pool


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
    while True:
        data = await stream.read(READ_SIZE)
        if not data:
            raise ConnectionError("the subscriber connection was closed by the server")
        reader.feed(data)
        # every complete reply now buffered, in order, without going back to the event loop
        while (reply := reader.gets()) is not more:
            if isinstance(reply, BaseException):
                raise reply
            # RESP3 (redis-py's default) pushes a list subclass; RESP2 a list
            if isinstance(reply, list) and len(reply) == 3 and reply[0] == b"message":
                on_message(reply[1], reply[2])
                continue
            msg = await pubsub.handle_message(reply)  # subscribe bookkeeping stays redis-py's
            if msg is not None:
                on_other(msg)


class _Pending:
    """One publish waiting for its batch: the command, the publisher's future and the room's channel."""

    __slots__ = ("args", "channel", "future", "script")

    def __init__(self, args: Command, future: asyncio.Future[Any], script: Any, channel: bytes | None) -> None:
        self.args, self.future, self.script, self.channel = args, future, script, channel


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
        #: channel -> the end (answered or failed) of the newest batch with a publish to it: a later batch
        #: with one waits for it, as batches go on different pooled connections (their order is not Redis's)
        self._tails: dict[bytes, asyncio.Future[None]] = {}
        #: batches sent and commands in them (tests and benchmarks read these)
        self.batches = 0
        self.commands = 0

    def submit(self, args: Command, script: Any = None, channel: bytes | None = None) -> asyncio.Future[Any]:
        """Queue one command (``EVALSHA sha n keys... args...`` or ``PUBLISH ch data``); its future
        resolves to the command's reply. ``script`` (the redis-py Script of an EVALSHA) lets a
        command that Redis answered NOSCRIPT (not run: a flushed script cache) run again alone.

        The commands with the same ``channel`` (a room's) reach Redis in the order they were submitted,
        whatever batches they go in (the bus's ``ordered_handoff``): the call queues it before it returns."""
        self.owner._check()  # down: nothing is sent, the publisher gets BusUnavailable at once
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        if not self._pending:
            loop.call_soon(self._start_flush)  # after the callbacks already due in this turn
        self._pending.append(_Pending(args, fut, script, channel))
        return fut

    def _start_flush(self) -> None:
        batch, self._pending = self._pending, []
        batch = [p for p in batch if not p.future.done()]  # a cancelled publisher's command is not sent
        if not batch:
            return
        # the batches this one must follow: the newest earlier one of each of its rooms still in flight
        channels = {p.channel for p in batch if p.channel is not None}
        tails = self._tails
        after = {tails[c] for c in channels if c in tails}
        end: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        for c in channels:
            tails[c] = end
        task = asyncio.ensure_future(self._flush_after(batch, after))
        self._flushing.add(task)
        task.add_done_callback(self._flushing.discard)
        # in a callback, not a finally: a task cancelled before its first step runs no finally, and its rooms'
        # later batches would wait for ``end`` forever
        task.add_done_callback(lambda _: self._ended(batch, end, channels))

    async def _flush_after(self, batch: list[_Pending], after: set[asyncio.Future[None]]) -> None:
        if after:
            await asyncio.wait(after)
        await self._flush(batch)

    def _ended(self, batch: list[_Pending], end: asyncio.Future[None], channels: set[bytes]) -> None:
        """A batch's flush is over (answered, failed or cancelled): the next batches of its rooms may go."""
        _fail_all(batch, PublishOutcomeUnknown, "publish: cancelled")  # only those not answered (a shutdown)
        end.set_result(None)
        tails = self._tails
        for c in channels:
            if tails.get(c) is end:
                del tails[c]

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
        """Wait for the batches in flight (each ends within op_timeout); queued ones fail at their flush."""
        if self._flushing:
            await asyncio.wait(set(self._flushing))


def _noscript(exc: BaseException) -> bool:
    return str(exc).startswith("NOSCRIPT") or type(exc).__name__ == "NoScriptError"


def _fail_all(batch: list[_Pending], kind: type[BusUnavailable], message: str) -> None:
    """Each publisher gets its own exception object (one raised in several tasks would chain tracebacks)."""
    for p in batch:
        if not p.future.done():
            p.future.set_exception(kind(message))
