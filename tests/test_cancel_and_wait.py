"""A bus close is bounded: ``cancel_and_wait`` stops a task that swallows a cancellation, and gives up
(with a warning) on one that never stops instead of hanging the close."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from wirehub.builtins.bus._broker import cancel_and_wait

log = logging.getLogger("test.cancel")


async def test_a_task_that_swallowed_one_cancellation_is_cancelled_again() -> None:
    swallowed = 0

    async def loop_that_swallows_once() -> None:
        nonlocal swallowed
        while True:
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                if swallowed:
                    raise
                swallowed += 1  # as 3.11's wait_for can, when its operation finished at the same moment

    task = asyncio.ensure_future(loop_that_swallows_once())
    await asyncio.sleep(0.02)
    await cancel_and_wait(log, [task], timeout=2.0)
    assert task.cancelled() and swallowed == 1


async def test_a_task_that_never_stops_bounds_the_close(caplog: pytest.LogCaptureFixture) -> None:
    stop = asyncio.Event()

    async def stubborn() -> None:
        while not stop.is_set():
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                continue

    task = asyncio.ensure_future(stubborn())
    await asyncio.sleep(0.02)  # inside its loop
    started = time.monotonic()
    await cancel_and_wait(log, [task], timeout=0.3)
    assert time.monotonic() - started < 1.0 and not task.done()
    assert "did not stop within" in caplog.text
    stop.set()
    await task
