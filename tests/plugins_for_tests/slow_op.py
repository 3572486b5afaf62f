"""A handler "slow" with one op, ``wait {seconds}``, that awaits that long before it answers ``waited``:
a handler suspended for longer than the keepalive's ping timeout (tests/test_keepalive.py)."""

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

    async def op_wait(self, session: Session, request: dict[str, Any]) -> None:
        await asyncio.sleep(float(request.get("seconds", 0)))
        self.reply(session, request, "waited")


def _factory(options: Mapping[str, Any], key: str, context: HandlerContext) -> SlowHandler:
    return SlowHandler(context)


@hookimpl
def wirehub_register_handlers() -> Mapping[str, Any]:
    return {"slow": _factory}
