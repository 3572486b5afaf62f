"""Coroutines started eagerly: stepped once in the caller's own call, and only what is left when they suspend
goes to a Task (or is awaited).

Most of a connection's work (a frame's handler, the open hooks, a publish's hand-off to the bus) completes
without suspending, and then needs no Task; and what runs before the first suspension runs in the caller's
order (frame order: a pipelined publish takes its place in the room's order there). The WebSocket core, the lean
upgrade path and the chat publish share these two wrappers.
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any


class Resumed:
    """Awaits the rest of a coroutine that was started eagerly and suspended on ``first``."""

    __slots__ = ("coro", "first")

    def __init__(self, coro: Any, first: Any) -> None:
        self.coro, self.first = coro, first

    def __await__(self) -> Any:
        coro, value = self.coro, self.first
        while True:
            try:
                sent = yield value
            except BaseException as exc:  # thrown into the awaiting task: pass it on
                try:
                    value = coro.throw(exc)
                except StopIteration as stop:
                    return stop.value
            else:
                try:
                    value = coro.send(sent)
                except StopIteration as stop:
                    return stop.value


class Continued(Coroutine[Any, Any, Any]):
    """A coroutine that was started eagerly and suspended on ``first``, as a coroutine a Task drives
    itself: the Task's first step gets ``first``, every later one goes to the coroutine."""

    __slots__ = ("coro", "first", "started")

    def __init__(self, coro: Coroutine[Any, Any, Any], first: Any) -> None:
        self.coro, self.first, self.started = coro, first, False

    def send(self, value: Any) -> Any:
        if self.started:
            return self.coro.send(value)
        self.started = True
        first, self.first = self.first, None
        return first

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any:
        self.started, self.first = True, None  # cancelled before its first step: into the coroutine
        if val is None and tb is None:
            return self.coro.throw(typ)
        return self.coro.throw(typ, val, tb)

    def close(self) -> None:
        self.coro.close()

    def __await__(self) -> Any:  # the Coroutine ABC's; a Task uses send and throw
        if self.started:
            raise RuntimeError("the coroutine is already running")
        self.started = True
        return Resumed(self.coro, self.first).__await__()
