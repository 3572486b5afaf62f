"""What the Redis and NATS buses share: the connection supervisor (watchdog, capped backoff,
resubscription) and the delivery gate that keeps the ``on_bus_state(True)``-first promise.

A subclass implements four coroutines over one broker connection:

- ``_open()``: connect, prepare, subscribe every room in ``self._rooms``; messages that arrive
  meanwhile go through :meth:`_deliver`, which holds them until the bus is declared up;
- ``_teardown()``: drop the connection (no callbacks after it returns);
- ``_roundtrip()``: one heartbeat through the broker; raises on failure;
- ``_refresh()``: periodic upkeep while healthy (presence entries).

The supervisor runs one heartbeat every ``heartbeat_interval``; a heartbeat that fails or takes
longer than ``heartbeat_timeout`` (or a connection error reported with :meth:`_fail`) marks the
bus down: ``healthy`` turns False, the handler gets ``on_bus_state(False)``, the connection is
torn down and reopened with exponential backoff capped at ``max_backoff`` (with jitter) until it
works; then the handler gets ``on_bus_state(True)`` and only after it the held messages of the
new connection, in order.
"""

from __future__ import annotations

import abc
import asyncio
import base64
import contextlib
import functools
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from wirehub import BusHandler, BusUnavailable

T = TypeVar("T")

#: messages held while a new connection resubscribes; beyond it they are dropped (history repairs)
MAX_HELD = 100_000


def encode_name(name: str) -> str:
    """A name as a token safe in NATS subjects, KV keys and Redis hash tags (base64url)."""
    return base64.urlsafe_b64encode(name.encode()).decode().rstrip("=") or "_"


#: cached: a join storm names one room thousands of times (a session id is named once: encode_name,
#: or a storm's sessions would fill the cache, ~150 B each, and evict the rooms)
encode_room = functools.lru_cache(maxsize=4096)(encode_name)


class Supervised(abc.ABC):
    """Base of the broker buses: health, handler gate and the reconnecting watchdog."""

    log: logging.Logger

    def __init__(self, *, heartbeat_interval: float, heartbeat_timeout: float, max_backoff: float,
                 op_timeout: float, connect_timeout: float, refresh_interval: float | None) -> None:
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout
        self.max_backoff = max_backoff
        self.op_timeout = op_timeout
        self.connect_timeout = connect_timeout
        self.refresh_interval = refresh_interval
        self._handler: BusHandler | None = None
        self._rooms: set[str] = set()
        self._healthy = False
        self._live = False
        self._held: list[tuple[str, bytes, int | None]] = []
        self._failed = asyncio.Event()
        self._closing = False
        self._supervisor: asyncio.Task[None] | None = None
        self._refresher: asyncio.Task[None] | None = None
        self.reconnects = 0

    # -- for subclasses ----------------------------------------------------------------------------

    @abc.abstractmethod
    async def _open(self) -> None:
        """Connect and resubscribe every room in ``self._rooms``; raise on failure."""

    @abc.abstractmethod
    async def _teardown(self) -> None:
        """Drop the connections (idempotent)."""

    @abc.abstractmethod
    async def _roundtrip(self) -> None:
        """One heartbeat through the broker; raise or hang when it is unhealthy."""

    async def _refresh(self) -> None:  # noqa: B027 - an optional hook, not an abstract one
        """Periodic upkeep while healthy; the default does nothing."""

    def _deliver(self, room: str, payload: bytes, offset: int | None) -> None:
        """Push one inbound message (from the connection's reader, in broker order)."""
        if room not in self._rooms or self._handler is None:
            return
        if not self._live:
            if len(self._held) < MAX_HELD:
                self._held.append((room, payload, offset))
            return
        self._handler.on_bus_message(room, payload, offset)

    def _fail(self, reason: str) -> None:
        """Report a broken connection (from a reader, a callback or a failed operation)."""
        if self._healthy and not self._failed.is_set():
            self.log.warning("bus connection failed: %s", reason)
        self._failed.set()

    def _check(self) -> None:
        if not self._healthy:
            raise BusUnavailable("the broker is unreachable")

    async def _call(self, what: str, op: Callable[[], Awaitable[T]], errors: tuple[type[BaseException], ...],
                    *, fail_on_error: bool = True, soft: tuple[type[BaseException], ...] = ()) -> T:
        """Run one broker operation with ``op_timeout``; broker errors become BusUnavailable.

        ``errors`` mean a broken connection (reported with :meth:`_fail` unless
        ``fail_on_error`` is False); ``soft`` ones only fail this operation.
        """
        self._check()
        try:
            return await asyncio.wait_for(op(), self.op_timeout)
        except TimeoutError:
            self.log.info("%s: no answer from the broker within %gs", what, self.op_timeout)
            raise BusUnavailable(f"{what}: no answer from the broker within {self.op_timeout:g}s") from None
        except errors as exc:
            if fail_on_error:
                self._fail(f"{what}: {type(exc).__name__}: {exc}")
            raise BusUnavailable(f"{what}: {type(exc).__name__}: {exc}") from exc
        except soft as exc:
            self.log.info("%s failed: %s: %s", what, type(exc).__name__, exc)
            raise BusUnavailable(f"{what}: {type(exc).__name__}: {exc}") from exc

    # -- Bus lifecycle -----------------------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        return self._healthy

    async def start(self, handler: BusHandler) -> None:
        self._closing = False
        self._handler = handler
        try:
            await asyncio.wait_for(self._open(), self.connect_timeout + self.op_timeout)
        except BusUnavailable:
            await self._teardown()
            raise
        except Exception as exc:
            await self._teardown()
            raise BusUnavailable(f"cannot connect to the broker: {type(exc).__name__}: {exc}") from exc
        self._failed.clear()
        self._healthy = True
        self._release_held()
        self._supervisor = asyncio.ensure_future(self._supervise())
        if self.refresh_interval:
            self._refresher = asyncio.ensure_future(self._refresh_loop(self.refresh_interval))

    async def close(self) -> None:
        self._closing = True
        self._handler = None
        self._healthy = False
        self._live = False
        self._held.clear()
        # cancel_and_wait, not one cancel: Python 3.11's wait_for in an upkeep can swallow it, and the loop
        # then ran on and close() never returned
        tasks = [t for t in (self._supervisor, self._refresher) if t is not None]
        await cancel_and_wait(self.log, tasks)
        for task in tasks:
            if task.done() and not task.cancelled():
                task.exception()  # retrieved: a failed loop is not news at close
        self._supervisor = self._refresher = None
        await self._teardown()

    def _release_held(self) -> None:
        held, self._held = self._held, []
        self._live = True
        handler = self._handler
        if handler is None:
            return
        for room, payload, offset in held:
            if room in self._rooms:
                handler.on_bus_message(room, payload, offset)

    def _set_state(self, healthy: bool) -> None:
        self._healthy = healthy
        if self._handler is not None:
            try:
                self._handler.on_bus_state(healthy)
            except Exception:
                self.log.exception("on_bus_state(%s) raised", healthy)

    async def _refresh_loop(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            if self._healthy:
                try:
                    await self._refresh()
                except Exception as exc:
                    self.log.debug("refresh failed: %s", exc)

    async def _supervise(self) -> None:
        while not self._closing:
            # healthy: one heartbeat per interval, or an earlier failure report
            reason = ""
            while not reason:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._failed.wait(), self.heartbeat_interval)
                if self._failed.is_set():
                    reason = "connection lost"
                    break
                try:
                    await asyncio.wait_for(self._roundtrip(), self.heartbeat_timeout)
                except TimeoutError:
                    reason = f"heartbeat timed out after {self.heartbeat_timeout:g}s"
                except Exception as exc:
                    reason = f"heartbeat failed: {type(exc).__name__}: {exc}"
            self.log.warning("bus down (%s); reconnecting", reason)
            self._live = False
            self._held.clear()
            self._set_state(False)
            await self._teardown()
            await self._reconnect()

    async def _reconnect(self) -> None:
        delay = min(0.1, self.max_backoff)
        attempt = 0
        while not self._closing:
            attempt += 1
            self._failed.clear()
            try:
                await asyncio.wait_for(self._open(), self.connect_timeout + self.op_timeout)
                await asyncio.wait_for(self._roundtrip(), self.heartbeat_timeout)
                if self._failed.is_set():
                    raise ConnectionError("the new connection failed while opening")
            except Exception as exc:
                self.log.info("reconnect attempt %d failed: %s: %s", attempt, type(exc).__name__, exc)
                self._live = False
                self._held.clear()
                await self._teardown()
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, self.max_backoff)
                continue
            self.reconnects += 1
            self.log.warning("bus reconnected after %d attempt(s); %d rooms resubscribed", attempt,
                             len(self._rooms))
            self._set_state(True)  # before anything of the new connection is pushed
            self._release_held()
            return


async def cancel_and_wait(log: logging.Logger, tasks: list[asyncio.Task[Any]] | list[asyncio.Future[Any]],
                          timeout: float = 2.0) -> None:
    """Cancel ``tasks`` and wait for them, bounded: a close never hangs. Cancelling again while
    waiting covers a task that swallowed one cancellation (Python 3.11's ``wait_for`` can, when the
    awaited operation finishes at the same moment) and went on looping."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    pending = {t for t in tasks if not t.done()}
    while pending and loop.time() < deadline:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=min(0.1, max(0.0, deadline - loop.time())))
    if pending:
        log.warning("%d background task(s) did not stop within %.0fs of a close", len(pending), timeout)


def safe_close(log: logging.Logger, what: str) -> Callable[[Awaitable[Any]], Awaitable[None]]:
    """``await safe_close(log, "x")(coro)``: run a close coroutine, bounded and silent."""

    async def run(coro: Awaitable[Any]) -> None:
        try:
            await asyncio.wait_for(coro, 2.0)
        except TimeoutError:
            log.debug("closing %s timed out", what)
        except Exception as exc:
            log.debug("closing %s: %s", what, exc)

    return run
