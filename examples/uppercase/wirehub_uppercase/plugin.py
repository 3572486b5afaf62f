"""Registers the ``upper`` handler: every text frame comes back upper-cased.

Options (endpoint ``options`` block): ``prefix`` (string put before each reply, default "").
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from wirehub import ErrorCode, HandlerContext, OutFrame, Session, hookimpl, parse_block


@dataclass(frozen=True)
class UpperOptions:
    prefix: str = ""


class UpperHandler:
    def __init__(self, options: UpperOptions) -> None:
        self.prefix = options.prefix

    async def on_open(self, session: Session) -> None:
        return None

    async def on_message(self, session: Session, data: str | bytes) -> None:
        if isinstance(data, bytes):
            session.send_error(ErrorCode.BAD_REQUEST, "send text")
            return
        session.send_frame(OutFrame((self.prefix + data.upper()).encode()))

    async def on_close(self, session: Session) -> None:
        return None


def make_handler(options: Mapping[str, Any], key: str, context: HandlerContext) -> UpperHandler:
    return UpperHandler(parse_block(UpperOptions, options, key))


@hookimpl
def wirehub_register_handlers() -> Mapping[str, Any]:
    return {"upper": make_handler}
