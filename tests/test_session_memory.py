"""What a member of a big room costs in memory: the per-session state a chat join leaves behind.

Issue 11 wants the RSS of a member of a 50,000-member room at most the RSS of an idle connection plus
1 KiB. The benchmark (``bench/bench_rooms.py join``) measures RSS; this test pins the part the hub,
the session, the chat handler and the memory presence keep per member, counted by ``tracemalloc``
(bytes still allocated after the joins, so it does not depend on timing or the allocator's arenas).
"""

from __future__ import annotations

import gc
import json
import tracemalloc
from collections.abc import AsyncIterator

import pytest

from wirehub.app import Wirehub
from wirehub.auth import Identity
from wirehub.config import config_from_dict
from wirehub.handler import Handler
from wirehub.session import OutFrame, Session
from wirehub.testing import config_for_tests

#: bytes per member a chat join may leave behind (Python 3.11: about 600; it was about 1,100 with a set of
#: rooms, a duplicate floor and a (connections, info) tuple per member)
MAX_BYTES_PER_MEMBER = 800


class DroppingTransport:
    """Sends nothing and keeps nothing (a FakeTransport would keep every ``joined`` frame)."""

    __slots__ = ("closed_with",)

    def __init__(self) -> None:
        self.closed_with: tuple[int, str] | None = None

    def send_frame(self, frame: OutFrame) -> None:
        pass

    def buffered(self) -> int:
        return 0

    def close(self, code: int, reason: str) -> None:
        self.closed_with = (code, reason)

    @property
    def closed(self) -> bool:
        return self.closed_with is not None


@pytest.fixture
async def app() -> AsyncIterator[Wirehub]:
    chat = {"path": "/ws/chat", "handler": "chat", "options": {"presence_rules": [{"pattern": "*", "events": "off"}]}}
    hub = Wirehub.build(config_from_dict(config_for_tests({"endpoints": [chat]})))
    await hub.backend.bus.start(hub.hub)
    hub.hub.on_bus_state(True)
    yield hub
    await hub.backend.bus.close()


def member(app: Wirehub, i: int) -> Session:
    identity = Identity(user=f"user-{i:06d}", rooms=("*",))
    return Session(DroppingTransport(), identity, endpoint="/ws/chat", node=app.node, max_queue_bytes=1 << 20,
                   metrics=app.metrics)


async def join_all(handler: Handler, sessions: list[Session], room: str) -> None:
    for s in sessions:
        await handler.on_open(s)
        await handler.on_message(s, json.dumps({"op": "join", "room": room, "id": "j"}))


@pytest.mark.timeout(60)
async def test_a_member_of_a_big_room_keeps_few_bytes(app: Wirehub) -> None:
    handler = app.handlers["/ws/chat"]
    # the room's own state (its hub entry, roster, first presence page) exists before the count
    await join_all(handler, [member(app, i) for i in range(200)], "big")
    sessions = [member(app, i) for i in range(200, 2200)]
    gc.collect()
    tracemalloc.start(1)
    try:
        before = tracemalloc.get_traced_memory()[0]
        await join_all(handler, sessions, "big")
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(app.hub.members("big")) == 2200
    assert all(not s.closed for s in sessions)
    per_member = grown / len(sessions)
    assert per_member <= MAX_BYTES_PER_MEMBER, f"{per_member:.0f} bytes per member"
