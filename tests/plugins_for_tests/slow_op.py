"""A handler "slow" with the op ``wait {seconds}``, that awaits that long before it answers ``waited``: a
handler suspended for longer than the keepalive's ping timeout (tests/test_keepalive.py); and ``vanish``,
whose Task is cancelled while it is suspended (tests/test_suspended_op.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from wirehub import HandlerContext, OpHandler, Session, hookimpl

MODULE = "tests.plugins_for_tests.slow_op"


class SlowHandler(OpHandler):
    def __init__(self, context: HandlerContext) -> None:
        super().__init__(context)
        self.ops["wait"] = self.op_wait
        self.ops["vanish"] = self.op_vanish

    async def op_wait(self, session: Session, request: dict[str, Any]) -> None:
        await asyncio.sleep(float(request.get("seconds", 0)))
        self.reply(session, request, "waited")

    async def op_vanish(self, session: Session, request: dict[str, Any]) -> None:
        await asyncio.sleep(0)  # suspended: the op runs as a Task of its own
        task = asyncio.current_task()
        assert task is not None
        task.cancel()  # as a shutdown or a stray cancel would
        await asyncio.sleep(5)
        self.reply(session, request, "not cancelled")


def _factory(options: Mapping[str, Any], key: str, context: HandlerContext) -> SlowHandler:
    return SlowHandler(context)


@hookimpl
def wirehub_register_handlers() -> Mapping[str, Any]:
    return {"slow": _factory}
