"""Issue 12, defect 11: a client's position never moves backwards right after a join.

A publisher sends a few hundred messages a second while clients of the Python client library join the
room and are forced to reconnect at once (the server closes them with 1001), over and over. The
``joined`` reply and the live messages right after it arrive together; had the position been taken
from ``joined`` after those messages were handed to ``on_message``, the rejoin would ask for them again
and deliver them twice. Each client must get every message from its first join on exactly once, in
order, across its reconnects.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from wirehub.client import Client
from wirehub.protocol import CloseCode, close_reason
from wirehub.testing import LiveServer, unique_room

FAST = {"backoff_min": 0.01, "backoff_max": 0.05, "ack_timeout": 5.0, "ping_interval": 0}
WORKERS = 6
ROUNDS = 6  # joins per worker, each followed by forced reconnects


async def until(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"not within {timeout}s: {what}"
        await asyncio.sleep(0.005)


@pytest.fixture
async def server(wirehub_server: Callable[..., Awaitable[LiveServer]]) -> LiveServer:
    chat = {"path": "/ws/chat", "handler": "chat", "options": {"publish_rate": 5000, "publish_burst": 5000}}
    return await wirehub_server({"endpoints": [chat]})


@pytest.fixture
async def clients() -> AsyncIterator[list[Client]]:
    made: list[Client] = []
    yield made
    for client in made:
        await client.close()


async def publish_steadily(pub: Client, room: str, acked: list[int], stop: asyncio.Event) -> None:
    """About 300 messages a second (one round trip each, then a short pause)."""
    seq = 0
    while not stop.is_set():
        seq += 1
        acked.append(await pub.publish(room, {"seq": seq}))
        await asyncio.sleep(0.002)


def force_reconnect(server: LiveServer, client: Client) -> None:
    user = (client.welcome or {})["user"]
    for session in list(server.app.sessions):
        if session.identity.user == user:
            session.close(CloseCode.GOING_AWAY, close_reason(CloseCode.GOING_AWAY, 0))


async def join_and_bounce(server: LiveServer, clients: list[Client], room: str, acked: list[int],
                          rng: random.Random) -> tuple[int, list[int], list[dict[str, Any]]]:
    """A new client joins, is closed by the server right away (twice), and reads on until it has
    caught up; returns (its first join offset, the offsets it was handed, its joins)."""
    client = Client(server.ws_url("/ws/chat"), **FAST)  # type: ignore[arg-type]
    clients.append(client)
    got: list[int] = []
    joins: list[dict[str, Any]] = []
    await client.join(room, lambda m: got.append(m["offset"]), on_joined=joins.append)
    for bounce in range(2):
        if rng.random() < 0.5:
            await asyncio.sleep(rng.uniform(0, 0.01))
        force_reconnect(server, client)  # right after joined: the live messages after it are in flight
        await until(lambda n=bounce: len(joins) == n + 2, 5, "the rejoin")  # type: ignore[misc]
    target = acked[-1] + 20
    await until(lambda: bool(got) and got[-1] >= target, 5, "catching up after the rejoins")
    await client.close()
    return joins[0]["offset"], got, joins


async def test_positions_only_move_forward_across_joins_and_reconnects(
        server: LiveServer, clients: list[Client]) -> None:
    room = unique_room("pos")
    pub = Client(server.ws_url("/ws/chat"), **FAST)  # type: ignore[arg-type]
    clients.append(pub)
    await pub.join(room, lambda m: None)
    acked: list[int] = []
    stop = asyncio.Event()
    publishing = asyncio.ensure_future(publish_steadily(pub, room, acked, stop))
    await until(lambda: len(acked) > 20, 5, "the publisher runs")
    rng = random.Random(12)

    async def worker() -> list[tuple[int, list[int], list[dict[str, Any]]]]:
        return [await join_and_bounce(server, clients, room, acked, rng) for _ in range(ROUNDS)]

    try:
        results = [r for rs in await asyncio.gather(*(worker() for _ in range(WORKERS))) for r in rs]
    finally:
        stop.set()
        await asyncio.wait_for(publishing, 10)
    assert len(results) == WORKERS * ROUNDS
    duplicates = lost = 0
    for first, got, joins in results:
        duplicates += len(got) - len(set(got))
        assert got == sorted(got), "out of order"
        lost += len(set(range(first + 1, got[-1] + 1)) - set(got))
        assert [j["recovered"] for j in joins] == [False, True, True]  # the rejoins did recover
    assert (duplicates, lost) == (0, 0)

    # a bystander on the same server is served: its publish round-trips to another member
    other = Client(server.ws_url("/ws/chat"), **FAST)  # type: ignore[arg-type]
    clients.append(other)
    seen: list[Any] = []
    await other.join(room, lambda m: seen.append(m["data"]))
    offset = await pub.publish(room, "bystander check")
    await until(lambda: "bystander check" in seen, 5, "the bystander gets the message")
    assert offset > acked[-1]
