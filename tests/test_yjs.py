"""The yjs endpoint with pycrdt as the second client, over real WebSockets against real servers.

tests/js/yjs (run by tests/test_yjs_node.py) covers the real ``yjs`` / ``y-websocket`` packages;
this file covers the protocol details, the limits and their close codes, persistence and the
compaction race.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pycrdt
import pytest

from plugins.handlers.yjs import wire
from plugins.handlers.yjs.store import DocumentStore
from service.testing import ws_connect
from tests.yjs_client import YClient, eventually

YJS = {"path": "/ws/yjs/*", "handler": "yjs", "options": {"idle_unload": 0}}


def config(**options: Any) -> dict[str, Any]:
    return {"endpoints": [{**YJS, "options": {**YJS["options"], **options}}, {"path": "/ws/echo", "handler": "echo"}]}


async def test_two_clients_converge_and_a_late_one_catches_up(wirehub_server: Any) -> None:
    server = await wirehub_server(config())
    a = await YClient.connect(server.ws_url("/ws/yjs/notes"))
    b = await YClient.connect(server.ws_url("/ws/yjs/notes"))
    await asyncio.wait_for(asyncio.gather(a.synced.wait(), b.synced.wait()), 5)
    await a.insert(0, "hello ")
    await b.insert(0, "world")
    await eventually(lambda: str(a.text) == str(b.text) and len(str(a.text)) == 11)
    c = await YClient.connect(server.ws_url("/ws/yjs/notes"))
    await asyncio.wait_for(c.synced.wait(), 5)
    await eventually(lambda: str(c.text) == str(a.text))
    for client in (a, b, c):
        await client.close()
