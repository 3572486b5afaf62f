"""JetStream writes whose acknowledgements come back on one inbox subscription per connection.

nats-py's ``js.publish`` is a request: a new reply token, a future, an ``asyncio.wait_for`` (a timer,
and under the bus's own ``op_timeout`` a task too) per message. In a join storm that bookkeeping
cost more than the write. Here every write of a connection replies to ``<inbox>.<n>`` under one
wildcard subscription, a write waits on a bare future, and the writes started in one event-loop
iteration share one timeout timer. The bytes go out through nats-py's buffer, flushed once per
iteration however many writes it holds.

:class:`Lanes`: the per-room subscriptions (a followed room's live delivery, a presence copy) of one
connection, delivered through one dispatcher. nats-py gives every subscription with a callback its own task,
``asyncio.Queue`` and :class:`~nats.aio.subscription.Subscription` (about 4.8 KB traced per subscription, two
per followed room); a :class:`Lane` is one small object that nats-py's reader takes for a subscription, with
the same per-subscription pending limit (past it nats-py drops the message and reports a slow consumer by the
lane's sid, as before).
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("wirehub.bus.nats")

#: seconds between two log lines of a failing lane handler (a bug in a busy room would write one per message)
FAILURE_LOG_INTERVAL = 60.0


class AckRefused(Exception):
    """JetStream answered with an error (or nobody answered: no stream for the subject)."""

    def __init__(self, text: str, code: int = 0) -> None:
        super().__init__(text)
        self.code = code


class Dropped(AckRefused):
    """Answers to the request were lost: nats-py dropped messages of the acks inbox (its pending limit, a
    slow consumer), or a batched direct get's chain of sequences broke. ``msgs`` is the batch's intact
    prefix (messages in stream order with none missing before them), to deliver before asking again."""

    def __init__(self, text: str, msgs: list[Any] | None = None) -> None:
        super().__init__(text)
        self.msgs = msgs or []


class _Chain:
    """A batched direct get under way. In one batch each message's ``Nats-Last-Sequence`` is the previous
    message's sequence (0 for the first) and its ``Nats-Num-Pending`` one less than the previous one's; the
    closing 204 repeats the last message's. A message the inbox dropped breaks that chain."""

    __slots__ = ("last", "msgs", "pending")

    def __init__(self) -> None:
        self.msgs: list[Any] = []
        self.last = 0
        self.pending = -1

    def follows(self, hdr: Any, *, end: bool) -> bool:
        try:
            last, pending = int(hdr.get("Nats-Last-Sequence") or 0), int(hdr.get("Nats-Num-Pending") or 0)
        except ValueError:
            return False
        if last != self.last:
            return False
        if self.pending >= 0 and pending != (self.pending if end else self.pending - 1):
            return False
        self.pending = pending
        return True


class Acks:
    """Writes and JetStream API requests on one connection: :meth:`publish` returns the written
    message's stream sequence, :meth:`request` the API's JSON answer."""

    def __init__(self, nc: Any, timeout: float) -> None:
        self._nc = nc
        self._timeout = timeout
        self._prefix = f"{nc.new_inbox()}."
        self._waiting: dict[str, asyncio.Future[Any]] = {}
        #: tokens of the requests answered with the reply message itself (direct gets), not JSON
        self._raw: set[str] = set()
        #: batched direct gets under way: token -> the messages so far (the batch ends with status 204)
        self._batches: dict[str, _Chain] = {}
        self._n = 0
        #: tokens of the writes started in this loop iteration: they share one timeout timer
        self._batch: list[str] | None = None
        self._sub: Any = None

    async def start(self) -> None:
        self._sub = await self._nc.subscribe(self._prefix + "*", cb=self._on_ack)

    def owns(self, sid: int) -> bool:
        """Whether ``sid`` is the acks inbox's subscription (nats-py names a full subscription by its sid)."""
        return self._sub is not None and self._sub._id == sid

    def pending(self) -> int:
        return len(self._waiting)

    async def publish(self, subject: str, payload: bytes, headers: dict[str, str] | None = None) -> int:
        return int((await self.request(subject, payload, headers))["seq"])

    async def request(self, subject: str, payload: bytes, headers: dict[str, str] | None = None) -> dict[str, Any]:
        return await self._send(subject, payload, headers, raw=False)  # type: ignore[no-any-return]

    async def get(self, subject: str, payload: bytes) -> Any:
        """A direct get (``$JS.API.DIRECT.GET.<stream>``): the message (its headers carry ``Nats-Sequence``),
        None when there is none (status 404)."""
        return await self._send(subject, payload, None, raw=True)

    async def batch(self, subject: str, payload: bytes) -> tuple[list[Any], int]:
        """A batched direct get (``{"seq", "next_by_subj", "batch"}``, nats-server 2.11+, which the bus checks
        at connect): its messages in stream order and the ``Nats-Num-Pending`` of its end (matching messages
        after the last one sent, as the answering replica sees it); ``([], 0)`` when none matches (status 404).
        :class:`Dropped` (with the intact prefix) when a message of it was lost on the way."""
        return await self._send(subject, payload, None, raw=True, batched=True)  # type: ignore[no-any-return]

    async def _send(self, subject: str, payload: bytes, headers: dict[str, str] | None, *, raw: bool,
                    batched: bool = False) -> Any:
        loop = asyncio.get_running_loop()
        self._n += 1
        token = str(self._n)
        fut: asyncio.Future[Any] = loop.create_future()
        self._waiting[token] = fut
        if raw:
            self._raw.add(token)
        if batched:
            self._batches[token] = _Chain()
        if self._batch is None:
            batch: list[str] = []
            self._batch = batch
            loop.call_soon(self._end_batch)
            loop.call_later(self._timeout, self._expire, batch)
        self._batch.append(token)
        try:
            await self._nc.publish(subject, payload, reply=self._prefix + token, headers=headers)
            return await fut
        finally:
            self._waiting.pop(token, None)
            if raw:
                self._raw.discard(token)
            if batched:
                self._batches.pop(token, None)

    def fail_all(self, exc: BaseException) -> None:
        """The connection is gone: no write of it will be answered."""
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(exc)
        self._waiting.clear()
        self._raw.clear()
        self._batches.clear()

    def _end_batch(self) -> None:
        self._batch = None

    def _expire(self, batch: list[str]) -> None:
        for token in batch:
            fut = self._waiting.pop(token, None)
            if fut is not None and not fut.done():
                fut.set_exception(TimeoutError())

    async def _on_ack(self, msg: Any) -> None:
        token = msg.subject[len(self._prefix):]
        got = self._batches.get(token)
        if got is not None and token in self._waiting:
            hdr = msg.headers or {}
            status = hdr.get("Status")
            if status is None or status == "204":
                # a hole here would be delivered silently, and the next batch would start after it
                if not got.follows(hdr, end=status is not None):
                    self._end(token, exc=Dropped(f"batched direct get: a message after sequence {got.last} was "
                                                 f"lost (next: {hdr.get('Nats-Sequence', 'the end')})", got.msgs))
                elif status is None:
                    got.msgs.append(msg)
                    got.last = int(hdr["Nats-Sequence"])
                else:
                    self._end(token, (got.msgs, got.pending))
            elif status == "404":
                self._end(token, ([], 0))
            else:
                code = int(status) if status.isdigit() else 0
                self._end(token, exc=AckRefused(f"status {status} {hdr.get('Description', '')}", code))
            return
        fut = self._waiting.pop(token, None)
        if fut is None or fut.done():
            return
        if token in self._raw:
            status = (msg.headers or {}).get("Status")
            if status is None:
                fut.set_result(msg)
            elif status == "404":
                fut.set_result(None)
            else:
                fut.set_exception(AckRefused(f"status {status} {(msg.headers or {}).get('Description', '')}"))
            return
        if not msg.data:  # a status message: 503 "no responders" (no stream takes the subject)
            fut.set_exception(AckRefused(f"status {(msg.headers or {}).get('Status', '?')}"))
            return
        try:
            ack = json.loads(msg.data)
            if "error" in ack:
                err = ack["error"]
                fut.set_exception(AckRefused(f"{err.get('err_code')}: {err.get('description')}",
                                             int(err.get("err_code") or 0)))
            else:
                fut.set_result(ack)
        except (ValueError, TypeError, AttributeError) as exc:
            fut.set_exception(AckRefused(f"unreadable acknowledgement: {exc}"))

    def _end(self, token: str, result: Any = None, exc: BaseException | None = None) -> None:
        fut = self._waiting.pop(token, None)
        if fut is None or fut.done():
            return
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(result)


class Lane:
    """One subject's subscription, delivered by its :class:`Lanes`. It has the attributes that nats-py's
    reader (``Client._process_msg``) and ``Client.close`` read of a
    :class:`~nats.aio.subscription.Subscription`; its pending queue is a count (the messages wait in the
    dispatcher's one queue), bounded like a subscription's: past ``pending_msgs_limit`` messages (or
    ``pending_bytes_limit`` bytes) not yet handed to the callback, nats-py drops the next one and reports a
    :class:`~nats.errors.SlowConsumerError` naming this lane's sid and the lane itself."""

    __slots__ = ("_cb", "_closed", "_emptied", "_id", "_lanes", "_pending", "_pending_bytes_limit",
                 "_pending_msgs_limit", "_pending_size", "_received", "_subject")

    # what nats-py reads of a Subscription, and never set on a lane
    _queue = ""
    _max_msgs = 0
    _jsi = None
    _future = None
    _wait_for_msgs_task = None
    _message_iterator = None
    _pending_next_msgs_calls = None

    def __init__(self, lanes: Lanes, sid: int, subject: str, cb: Callable[[Any], None], pending_msgs_limit: int,
                 pending_bytes_limit: int) -> None:
        self._lanes = lanes
        self._id = sid
        self._subject = subject
        self._cb = cb
        self._pending_msgs_limit = pending_msgs_limit
        self._pending_bytes_limit = pending_bytes_limit
        self._received = 0
        self._pending = 0
        self._pending_size = 0
        self._closed = False
        #: set by a drain: resolved once nothing of this lane is queued
        self._emptied: asyncio.Future[None] | None = None

    @property
    def subject(self) -> str:
        return self._subject

    @property
    def _pending_queue(self) -> Lane:
        return self  # nats-py puts into sub._pending_queue, and the bus reads its qsize()

    def put_nowait(self, msg: Any) -> None:
        if 0 < self._pending_msgs_limit <= self._pending:  # 0: no limit, as a nats-py subscription's queue
            raise asyncio.QueueFull
        if self._closed or self._lanes._closed:
            self._pending_size -= len(msg.data)
            return
        self._pending += 1
        self._lanes._push(self, msg)

    def qsize(self) -> int:
        return self._pending

    @property
    def pending_msgs(self) -> int:
        """Messages received and not yet handed to the callback."""
        return self._pending

    @property
    def delivered(self) -> int:
        return self._received

    async def _drain(self) -> None:
        """nats-py's ``Client.drain``: the interest removed, then what is queued delivered before the lane
        goes (as a nats-py subscription's drain)."""
        nc = self._lanes.nc
        if not nc.is_closed:
            await nc._send_unsubscribe(self._id)
        if self._pending and not (self._closed or self._lanes._closed):
            self._emptied = asyncio.get_running_loop().create_future()
            await self._emptied
        self._lanes._remove(self)

    async def unsubscribe(self) -> None:
        """Remove the interest; messages of it still queued are dropped (as nats-py's unsubscribe does)."""
        self._lanes._remove(self)
        nc = self._lanes.nc
        if nc.is_closed:
            from nats import errors
            raise errors.ConnectionClosedError
        await nc._send_unsubscribe(self._id)


def _native(nc: Any) -> bool:
    """Whether the connection has what a :class:`Lane` relies on: ``Client._subs`` (sid -> subscription, read by
    ``_process_msg``), ``_sid`` and ``_send_subscribe``, in a nats-py of the 2.x line whose reader was read for
    it (2.9 to 2.16; a later 2.x reads the same attributes of a subscription); another major version gets
    nats-py subscriptions."""
    from nats.aio import client

    version = str(getattr(client, "__version__", ""))
    return (version.split(".")[0] == "2"
            and isinstance(getattr(nc, "_subs", None), dict) and isinstance(getattr(nc, "_sid", None), int)
            and callable(getattr(nc, "_send_subscribe", None)) and callable(getattr(nc, "_send_unsubscribe", None)))


class Lanes:
    """The dispatcher of a connection's lanes: one queue of (lane, message) in arrival order, drained by one
    callback per loop iteration (a lane's messages stay in order; no task per subscription). A callback
    is a plain function; an exception it raises is logged and the next message goes on."""

    def __init__(self, nc: Any) -> None:
        self.nc = nc
        self._queue: collections.deque[tuple[Lane, Any]] = collections.deque()
        self._scheduled = False
        self._closed = False
        #: nats-py has the internals a lane relies on; else each lane is a nats-py subscription of its own
        self.native = _native(nc)
        #: time.monotonic() of the last handler failure logged, and those not logged since
        self._failed_at = -FAILURE_LOG_INTERVAL
        self._failures_quiet = 0

    async def subscribe(self, subject: str, cb: Callable[[Any], None], *, pending_msgs_limit: int,
                        pending_bytes_limit: int = 128 * 1024 * 1024) -> Any:
        """Subscribe ``subject``; ``cb(msg)`` gets its messages in order. The subscription (a :class:`Lane`),
        which has ``_id``, ``pending_msgs``, ``_pending_queue.qsize()`` and ``unsubscribe()``."""
        nc = self.nc
        if not self.native:
            async def call(msg: Any) -> None:
                cb(msg)
            return await nc.subscribe(subject, cb=call, pending_msgs_limit=pending_msgs_limit,
                                      pending_bytes_limit=pending_bytes_limit)
        from nats import errors
        if not subject or any(c in subject for c in " \t\r\n"):
            raise errors.BadSubjectError
        if nc.is_closed:
            raise errors.ConnectionClosedError
        if nc.is_draining:
            raise errors.ConnectionDrainingError
        nc._sid += 1
        lane = Lane(self, nc._sid, subject, cb, pending_msgs_limit, pending_bytes_limit)
        nc._subs[lane._id] = lane
        await nc._send_subscribe(lane)
        return lane

    def close(self) -> None:
        """The connection is gone: nothing queued is delivered (a drain waiting for it ends)."""
        self._closed = True
        for lane, _ in self._queue:
            if lane._emptied is not None and not lane._emptied.done():
                lane._emptied.set_result(None)
        self._queue.clear()

    def _remove(self, lane: Lane) -> None:
        lane._closed = True
        subs = self.nc._subs
        if subs.get(lane._id) is lane:
            del subs[lane._id]

    def _push(self, lane: Lane, msg: Any) -> None:
        self._queue.append((lane, msg))
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._drain)

    def _drain(self) -> None:
        self._scheduled = False
        queue = self._queue
        while queue:
            lane, msg = queue.popleft()
            lane._pending -= 1
            lane._pending_size -= len(msg.data)
            if lane._closed:
                continue
            if lane._emptied is not None and not lane._pending and not lane._emptied.done():
                lane._emptied.set_result(None)  # a drain's last message: it goes, then the lane
            try:
                lane._cb(msg)
            except Exception:  # one room's failure: the other rooms' messages go on (one line per minute)
                now = time.monotonic()
                if now - self._failed_at < FAILURE_LOG_INTERVAL:
                    self._failures_quiet += 1
                    continue
                log.exception("nats: a message of %s was not handled (%d more failures not logged)",
                              lane._subject, self._failures_quiet)
                self._failed_at, self._failures_quiet = now, 0
