"""The Redis bus's lean pipeline (``redis_batch.send_on_pool`` / ``send_on``), on a real redis-server: the
publish batches and the per-iteration batches write the packed pipeline to the connection's stream and
parse the replies with the connection's hiredis reader, not through redis-py's per-command layers.
Replies spanning many socket reads come back whole and in order, a command's error stays its own, a
connection the server closes mid-pipeline is an error and is never reused, and redis-py alone (no
hiredis) still works."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
import redis.exceptions as rexc

from wirehub.brokers import RedisServer
from wirehub.builtins.bus import redis_batch
from wirehub.builtins.bus.redis import create_backend
from wirehub.builtins.bus.redis_batch import READ_SIZE, send_on_pool
from wirehub.testing import Recorder, unique_room

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def pool(redis_server: RedisServer) -> AsyncIterator[Any]:
    made = aioredis.BlockingConnectionPool.from_url(redis_server.url, max_connections=2)
    yield made
    await made.aclose()


async def test_replies_over_many_socket_reads_come_back_whole_in_order_with_errors_their_own(pool: Any) -> None:
    key = f"lean-{uuid.uuid4().hex[:8]}"
    values = [(b"%04d" % i) * 512 for i in range(200)]  # 2 KiB each: 400 KiB of replies, many reads of READ_SIZE
    assert sum(map(len, values)) > 5 * READ_SIZE
    await send_on_pool(pool, [("RPUSH", key, v) for v in values])
    commands: list[tuple[Any, ...]] = [("LINDEX", key, i) for i in range(200)]
    commands.insert(100, ("INCR", key))  # WRONGTYPE: an error reply in the middle of the pipeline
    replies = await send_on_pool(pool, commands)
    assert isinstance(replies[100], rexc.ResponseError) and "WRONGTYPE" in str(replies[100])
    assert replies[:100] + replies[101:] == values
    # the connection went back to the pool with nothing left unread: the next pipeline gets its own replies
    assert await send_on_pool(pool, [("PING",), ("ECHO", b"after")]) == [b"PONG", b"after"]


async def test_the_pipeline_bypasses_redis_py_s_send_and_read(pool: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # what made a batch of one publish cost more than the publish: a write task and a coroutine chain per reply
    async def refused(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("redis-py's per-command path was used")

    await send_on_pool(pool, [("PING",)])  # connected (the handshake itself is redis-py's)
    monkeypatch.setattr(aioredis.connection.AbstractConnection, "send_packed_command", refused)
    monkeypatch.setattr(aioredis.connection.AbstractConnection, "read_response", refused)
    assert await send_on_pool(pool, [("PING",), ("ECHO", b"x")]) == [b"PONG", b"x"]


async def test_publish_batches_go_through_the_lean_pipeline(redis_server: RedisServer,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    backend = create_backend({"url": redis_server.url, "key_prefix": f"l{uuid.uuid4().hex[:6]}"}, "bus.redis")
    recorder = Recorder()
    await backend.bus.start(recorder)
    try:
        room = unique_room("lean")
        await backend.bus.subscribe(room)
        sent: list[int] = []
        real = redis_batch.send_on

        async def counted(conn: Any, commands: list[Any]) -> list[Any]:
            sent.append(len(commands))
            return await real(conn, commands)

        monkeypatch.setattr(redis_batch, "send_on", counted)
        offsets = [await backend.bus.publish(room, b"m%d" % i, history=True) for i in range(3)]
        assert offsets == [1, 2, 3]
        assert await backend.bus.publish(room, b"plain") is None
        assert sum(sent) >= 4  # every publish went through send_on (the first may carry its SCRIPT LOAD)
        assert await recorder.wait_for(room, 4) == [b"m0", b"m1", b"m2", b"plain"]
    finally:
        await backend.bus.close()


async def test_a_connection_the_server_closes_mid_pipeline_is_an_error_and_not_reused(
        pool: Any, redis_server: RedisServer) -> None:
    name = f"victim-{uuid.uuid4().hex[:6]}"
    # the first reply comes, then the connection waits in BLPOP until another client kills it
    waiting = asyncio.ensure_future(send_on_pool(pool, [("CLIENT", "SETNAME", name), ("BLPOP", name, 20)]))
    async with aioredis.Redis.from_url(redis_server.url) as admin:
        for _ in range(100):
            victims = [c for c in await admin.client_list() if c.get("name") == name]
            if victims:
                break
            await asyncio.sleep(0.02)
        assert victims
        await admin.client_kill_filter(_id=victims[0]["id"])
    with pytest.raises(rexc.ConnectionError):
        await asyncio.wait_for(waiting, 10)
    # the broken connection was disconnected: the next pipeline runs on a new one, with no name
    assert await send_on_pool(pool, [("CLIENT", "GETNAME"), ("PING",)]) == [None, b"PONG"]


async def test_without_hiredis_the_pipeline_is_redis_py_s(pool: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(redis_batch, "_pack_command", None)
    key = f"lean-{uuid.uuid4().hex[:8]}"
    replies = await send_on_pool(pool, [("SET", key, b"v"), ("INCR", key), ("GET", key)])
    assert replies[0] in (True, b"OK") and replies[2] == b"v"
    assert isinstance(replies[1], rexc.ResponseError)


async def test_a_resp3_push_between_the_replies_is_no_command_s_reply(pool: Any, redis_server: RedisServer) -> None:
    # client tracking (RESP3, redis-py's default): another client's write to a key the connection read sends
    # it an invalidation push, here while its pipeline waits in BLPOP, so between two of the replies
    key, queue = f"lean-{uuid.uuid4().hex[:8]}", f"lean-q-{uuid.uuid4().hex[:8]}"
    await send_on_pool(pool, [("SET", key, b"v1")])
    pipeline = asyncio.ensure_future(send_on_pool(pool, [
        ("CLIENT", "TRACKING", "ON"), ("GET", key), ("BLPOP", queue, 10), ("ECHO", b"mine")]))
    async with aioredis.Redis.from_url(redis_server.url) as other:
        for _ in range(100):  # the pipeline is blocked in BLPOP
            if any(c.get("cmd") == "blpop" for c in await other.client_list()):
                break
            await asyncio.sleep(0.02)
        await other.set(key, b"v2")  # the push goes out now, ahead of BLPOP's reply
        await other.rpush(queue, b"x")
    replies = await asyncio.wait_for(pipeline, 10)
    assert replies[:2] == [b"OK", b"v1"]
    assert [bytes(v) for v in replies[2]] == [queue.encode(), b"x"] and replies[3] == b"mine"


async def test_a_connection_class_with_its_own_read_response_keeps_redis_py_s_path(redis_server: RedisServer) -> None:
    # Sentinel's connection turns READONLY (a demoted master) into a disconnect in its read_response: the lean
    # pipeline, which parses replies itself, must leave such connections to redis-py
    seen: list[int] = []

    class OwnRead(aioredis.Connection):
        async def read_response(self, *args: Any, **kwargs: Any) -> Any:
            seen.append(1)
            return await super().read_response(*args, **kwargs)

    made = aioredis.BlockingConnectionPool.from_url(redis_server.url, max_connections=1, connection_class=OwnRead)
    try:
        await send_on_pool(made, [("PING",)])  # connected: the handshake's replies are read by redis-py anyway
        seen.clear()
        assert await send_on_pool(made, [("PING",), ("ECHO", b"own")]) == [b"PONG", b"own"]
        assert len(seen) == 2  # both replies went through the class's own read_response
    finally:
        await made.aclose()
