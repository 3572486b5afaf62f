"""The demo page in real headless Chromium shows "N here" from the room's count and follows presence.diff
events, with a bounded member list, in a big room (a batched-events room listing 3 members in joined)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from tests.test_browser import browser, eventually, open_page  # noqa: F401  (browser is a fixture)
from wirehub.testing import LiveServer, WsClient, unique_room

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ENDPOINTS = [
    {"path": "/ws/echo", "handler": "echo"},
    {"path": "/ws/chat", "handler": "chat", "options": {"presence_rules": [
        {"pattern": "big-*", "events": "batched", "interval": 0.2, "presence_limit": 3}]}},
    {"path": "/ws/game", "handler": "game"},
]


async def here(page: Any) -> str:
    text: str = await page.locator("#presence-count").inner_text()
    return text


async def test_demo_shows_n_here_in_a_big_room(wirehub_server: Callable[..., Any], browser: Any) -> None:  # noqa: F811
    server: LiveServer = await wirehub_server({"endpoints": ENDPOINTS})
    room = unique_room("big")
    guests: list[WsClient] = []
    for _ in range(5):
        ws = await server.ws("/ws/chat", welcome=True)
        assert (await ws.request({"op": "join", "room": room}))["op"] == "joined"
        guests.append(ws)
    await asyncio.sleep(0.5)  # their diffs are out: the page starts from joined's 3 members and the count
    page = await open_page(browser, server.url(f"/?room={room}&game={unique_room('board')}"))
    await eventually(lambda: _is(page, "6 here"), 5, "6 here")
    listed = await page.locator("#presence li").count()
    assert 3 <= listed <= 4  # joined's first page (and the page's own user, from its diff)

    newcomer = await server.ws("/ws/chat", welcome=True)
    await newcomer.request({"op": "join", "room": room})
    await eventually(lambda: _is(page, "7 here"), 5, "7 here after a join")
    guests[0].close()
    newcomer.close()
    await eventually(lambda: _is(page, "5 here"), 5, "5 here after two leaves")
    assert page.errors == [], page.errors


async def _is(page: Any, text: str) -> bool:
    return await here(page) == text
