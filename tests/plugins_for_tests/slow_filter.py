"""A ``wirehub_filter_message`` that takes 50 ms for data objects with ``"slow": true``, so that
publishes are reliably in flight when a replica gets SIGTERM (tests/adversarial/test_attack_drain.py)."""

from __future__ import annotations

import asyncio
from typing import Any

from wirehub import Session, hookimpl

DELAY = 0.05


@hookimpl
async def wirehub_filter_message(session: Session | None, room: str, data: Any) -> Any:
    if isinstance(data, dict) and data.get("slow") is True:
        await asyncio.sleep(DELAY)
    return None
