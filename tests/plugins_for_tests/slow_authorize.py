"""An authorize hook that takes its time for rooms ``slow-*`` (0.6 s), as a policy service or a bus in a
storm may: tests/test_url_join.py checks that a URL join waiting on it keeps its connection alive."""

from __future__ import annotations

import asyncio

from wirehub import Identity, hookimpl

DELAY = 0.6


@hookimpl
async def wirehub_authorize(identity: Identity, action: str, room: str) -> bool | None:
    if room.startswith("slow-"):
        await asyncio.sleep(DELAY)
        return True
    return None
