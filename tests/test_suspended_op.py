"""A frame whose op suspends (every join on Redis and NATS; here a join behind a slow authorize hook) is
waited for as the handler's own Task (``service/frames.py`` ``_run_callback``): no Future of Tornado's around
it, and the frames sent behind it are handled after it, in order, on a real server; a Task that ends cancelled
is logged and aborts its connection, not the others."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from tornado import gen

from wirehub.eager import Continued
from wirehub.testing import LiveServer, unique_room

Start = Callable[..., Awaitable[LiveServer]]
CHAT = "/ws/chat"


async def test_a_suspended_op_is_waited_for_as_its_own_task_and_the_next_frames_follow_it(
        wirehub_server: Start, monkeypatch: pytest.MonkeyPatch) -> None:
    server = await wirehub_server({"endpoints": [{"path": CHAT, "handler": "chat"}],
                                   "plugins": {"load": ["tests.plugins_for_tests.slow_authorize"]}})
    wrapped: list[Any] = []
    convert = gen.convert_yielded

    def counted(yielded: Any) -> Any:
        if isinstance(yielded, asyncio.Task) and isinstance(yielded.get_coro(), Continued):  # an op's Task
            wrapped.append(yielded)
        return convert(yielded)

    monkeypatch.setattr(gen, "convert_yielded", counted)
    ws = await server.ws(CHAT)
    assert (await ws.recv())["op"] == "welcome"
    slow, fast = "slow-" + unique_room(), unique_room()
    for request in ({"op": "join", "room": slow, "id": 1}, {"op": "ping", "id": 2},
                    {"op": "join", "room": fast, "id": 3}):
        await ws.send(request)
    replies = [await asyncio.wait_for(ws.recv(), 5) for _ in range(3)]
    assert [(r["op"], r["id"]) for r in replies] == [("joined", 1), ("pong", 2), ("joined", 3)]
    assert wrapped == []  # the join's Task itself, not a Tornado Future settled from it


async def test_a_suspended_op_whose_task_is_cancelled_aborts_its_connection_and_is_logged(
        wirehub_server: Start, caplog: pytest.LogCaptureFixture) -> None:
    from tests.plugins_for_tests.slow_op import MODULE

    server = await wirehub_server({"endpoints": [{"path": "/ws/slow", "handler": "slow"}],
                                   "plugins": {"load": [MODULE]}})
    ws, other = await server.ws("/ws/slow"), await server.ws("/ws/slow")
    for client in (ws, other):
        assert (await client.recv())["op"] == "welcome"
    with caplog.at_level(logging.ERROR):
        await ws.send({"op": "vanish", "id": 1})
        code, _ = await ws.wait_closed()  # aborted: no frame, not even a Close frame, comes
    assert code is None
    assert any(r.exc_info is not None and r.exc_info[0] is asyncio.CancelledError for r in caplog.records)
    await other.send({"op": "wait", "seconds": 0, "id": 2})
    assert (await other.recv())["op"] == "waited"
