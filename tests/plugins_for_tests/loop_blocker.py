"""SIGUSR2 blocks the event loop of the process that gets it for :data:`BLOCK_SECONDS` (a ``time.sleep`` in a
loop callback, as a plugin doing blocking I/O would): a worker that lives but serves nothing
(tests/test_processes.py)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from typing import Any

from wirehub import hookimpl

MODULE = "tests.plugins_for_tests.loop_blocker"
#: longer than any test waits: the process ends by SIGKILL, not by waking up
BLOCK_SECONDS = 60.0

log = logging.getLogger("wirehub.test.loop_blocker")


def _block() -> None:
    log.warning("blocking the event loop of pid %d for %gs", os.getpid(), BLOCK_SECONDS)
    time.sleep(BLOCK_SECONDS)


@hookimpl
async def wirehub_startup(app: Any) -> None:
    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR2, _block)
