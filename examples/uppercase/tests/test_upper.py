from __future__ import annotations

from collections.abc import Awaitable, Callable

from wirehub.testing import LiveServer


async def test_upper_cases_text(wirehub_server: Callable[..., Awaitable[LiveServer]]) -> None:
    server = await wirehub_server({
        "plugins": {"load": ["wirehub_uppercase.plugin"]},
        "endpoints": [{"path": "/ws/upper", "handler": "upper", "options": {"prefix": "> "}}],
    })
    client = await server.ws("/ws/upper")
    await client.send("hello")
    assert await client.recv_raw() == "> HELLO"
