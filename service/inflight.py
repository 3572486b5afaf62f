"""Counting work in flight, so that the drain can wait for it before closing the bus."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator


class InFlight:
    """How many operations are running; :meth:`wait` returns when none is (or on timeout)."""

    def __init__(self) -> None:
        self.count = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @contextlib.contextmanager
    def track(self) -> Iterator[None]:
        self.begin()
        try:
            yield
        finally:
            self.end()

    def begin(self) -> None:
        """One more operation (:meth:`track` without a generator, for a hot path: pair it with :meth:`end`)."""
        self.count += 1
        if self.count == 1:
            self._idle.clear()

    def end(self) -> None:
        self.count -= 1
        if self.count == 0:
            self._idle.set()

    async def wait(self, timeout: float) -> bool:
        """True when nothing is in flight (now or within ``timeout`` seconds)."""
        if self.count == 0:
            return True
        try:
            await asyncio.wait_for(self._idle.wait(), max(0.0, timeout))
        except TimeoutError:
            return False
        return True
