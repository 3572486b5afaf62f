"""The echo handler: every JSON text comes back as ``{"echo": <it>}``.

Compatible with the classic echo test: ``{"hello":"server"}`` -> ``{"echo":{"hello":"server"}}``.
Text that the inbound decoder refuses (not JSON, nested deeper than ``server.max_json_depth``,
NaN or Infinity) gets ``error bad_json`` and a binary frame ``error bad_request``; the
connection stays open. With ``raw: true`` every frame, text or binary, is echoed verbatim (the
Autobahn conformance suite and benchmarks use that).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from wirehub import ErrorCode, HandlerContext, HandlerFactory, OutFrame, Session, hookimpl, inbound, opt, parse_block


@dataclass(frozen=True)
class EchoOptions:
    raw: bool = False
    #: per-endpoint override of server.max_message_size (read by the core)
    max_message_size: int | None = opt(None, min=125)


class EchoHandler:
    def __init__(self, options: EchoOptions, context: HandlerContext) -> None:
        self.options = options
        self.context = context

    async def on_open(self, session: Session) -> None:
        return None

    async def on_message(self, session: Session, data: str | bytes) -> None:
        if self.options.raw:
            binary = isinstance(data, bytes)
            session.send_frame(OutFrame(data if isinstance(data, bytes) else data.encode(), binary=binary))
            return
        if isinstance(data, bytes):
            session.send_error(ErrorCode.BAD_REQUEST, "binary frames are not accepted; send JSON text")
            return
        try:
            inbound.loads(data, self.context.config.server.max_json_depth)
        except inbound.JsonRejected as exc:
            session.send_error(ErrorCode.BAD_JSON, exc.explain("frame"))
            return
        # The text is strict JSON (no NaN, no lone surrogate), so splicing it in is valid JSON and
        # spares a re-encode.
        session.send_frame(OutFrame(b'{"echo":' + data.strip().encode() + b"}"))

    async def on_close(self, session: Session) -> None:
        return None


def _factory(options: Mapping[str, Any], key: str, context: HandlerContext) -> EchoHandler:
    return EchoHandler(parse_block(EchoOptions, options, key), context)


@hookimpl
def wirehub_register_handlers() -> Mapping[str, HandlerFactory]:
    return {"echo": _factory}
