"""JetStream writes whose acknowledgements come back on one inbox subscription per connection.

nats-py's ``js.publish`` is a request: a new reply token, a future, an ``asyncio.wait_for`` (a timer,
and under the bus's own ``op_timeout`` a task too) per message. In a join storm that bookkeeping
cost more than the write. Here every write of a connection replies to ``<inbox>.<n>`` under one
wildcard subscription, a write waits on a bare future, and the writes started in one event-loop
iteration share one timeout timer. The bytes go out through nats-py's buffer, flushed once per
iteration however many writes it holds.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any


class AckRefused(Exception):
    """JetStream answered with an error (or nobody answered: no stream for the subject)."""

    def __init__(self, text: str, code: int = 0) -> None:
        super().__init__(text)
        self.code = code


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
        self._n = 0
        #: tokens of the writes started in this loop iteration: they share one timeout timer
        self._batch: list[str] | None = None
        self._sub: Any = None

    async def start(self) -> None:
        self._sub = await self._nc.subscribe(self._prefix + "*", cb=self._on_ack)

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

    async def _send(self, subject: str, payload: bytes, headers: dict[str, str] | None, *, raw: bool) -> Any:
        loop = asyncio.get_running_loop()
        self._n += 1
        token = str(self._n)
        fut: asyncio.Future[Any] = loop.create_future()
        self._waiting[token] = fut
        if raw:
            self._raw.add(token)
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

    def fail_all(self, exc: BaseException) -> None:
        """The connection is gone: no write of it will be answered."""
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(exc)
        self._waiting.clear()
        self._raw.clear()

    def _end_batch(self) -> None:
        self._batch = None

    def _expire(self, batch: list[str]) -> None:
        for token in batch:
            fut = self._waiting.pop(token, None)
            if fut is not None and not fut.done():
                fut.set_exception(TimeoutError())

    async def _on_ack(self, msg: Any) -> None:
        token = msg.subject[len(self._prefix):]
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
