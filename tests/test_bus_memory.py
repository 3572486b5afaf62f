"""What a member of a big room costs in memory on the Redis and NATS buses (issue 11, branch rss2).

``tests/test_session_memory.py`` pins what the hub, the session, the chat handler and the memory presence
keep per member; this module pins the same count on the broker buses, whose presence keeps its own entry per
member of this replica (Redis: ``RedisPresence._local``; NATS: ``NatsPresence._local`` and the room's
roster). The joins run as a storm (many in flight), as on a real server, against a real broker; the figure
is ``tracemalloc``'s bytes still allocated after them, so it depends neither on timing nor on the
allocator's arenas.
"""

from __future__ import annotations

import asyncio
import gc
import tracemalloc
import uuid
from collections.abc import AsyncIterator, Callable

import pytest

from tests.test_session_memory import join_all, member
from wirehub.app import Wirehub
from wirehub.brokers import BrokerProcess
from wirehub.config import config_from_dict
from wirehub.session import Session
from wirehub.testing import config_for_tests

#: bytes per member a chat join may leave behind (Python 3.11, 2,000 joins after 200: Redis 557, NATS 692;
#: 625 and 850 before branch rss2: a (room, session) tuple per Redis presence entry, and the NATS presence's
#: session ids filling the room-name cache). About 110 B of it are 120-byte blocks that no object the garbage
#: collector knows holds; tracemalloc names them by whatever first allocated them (``loop.create_future()``
#: in the bus until branch natspres removed the NATS join's future, ``service/plugins.py`` since): see
#: bench/README.md, rss2 and natspres. NATS measured 639-665 B on branch natspres.
MAX_BYTES_PER_MEMBER = {"redis": 600, "nats": 740}
#: joins in flight at once (the bench's storm has 500 per replica)
IN_FLIGHT = 200


@pytest.fixture
async def app(kind: str, redis_server_factory: Callable[..., BrokerProcess],
              nats_server_factory: Callable[..., BrokerProcess]) -> AsyncIterator[Wirehub]:
    broker = redis_server_factory() if kind == "redis" else nats_server_factory()
    prefix = f"mem{uuid.uuid4().hex[:6]}"
    bus = ({"plugin": "redis", "redis": {"url": broker.url, "key_prefix": prefix}} if kind == "redis"
           else {"plugin": "nats", "nats": {"servers": [broker.url], "subject_prefix": prefix}})
    chat = {"path": "/ws/chat", "handler": "chat", "options": {"presence_rules": [{"pattern": "*", "events": "off"}]}}
    hub = Wirehub.build(config_from_dict(config_for_tests({"endpoints": [chat], "bus": bus})))
    await hub.backend.bus.start(hub.hub)
    hub.hub.on_bus_state(True)
    yield hub
    await hub.backend.bus.close()


async def storm(app: Wirehub, sessions: list[Session], room: str) -> None:
    handler = app.handlers["/ws/chat"]
    n = len(sessions)
    await asyncio.gather(*(join_all(handler, sessions[i:i + n // IN_FLIGHT], room)
                           for i in range(0, n, n // IN_FLIGHT)))
    assert all(not s.closed for s in sessions)


@pytest.mark.timeout(120)
async def test_a_member_of_a_big_room_keeps_few_bytes_on_a_broker(app: Wirehub, kind: str) -> None:
    # the room's own state (hub entry, roster, presence subscriptions, first page) exists before the count
    await storm(app, [member(app, i) for i in range(200)], "big")
    await asyncio.sleep(0.2)
    n = 2000
    sessions = [member(app, i) for i in range(200, 200 + n)]
    gc.collect()
    tracemalloc.start(1)
    try:
        before = tracemalloc.get_traced_memory()[0]
        await storm(app, sessions, "big")
        await asyncio.sleep(1.0)  # replies and echoes of the last joins handled
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(app.hub.members("big")) == 200 + n
    per_member = grown / n
    assert per_member <= MAX_BYTES_PER_MEMBER[kind], f"{kind}: {per_member:.0f} bytes per member"
