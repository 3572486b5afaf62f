"""Idempotency keys and honest outcomes of a publish, over real HTTP and real WebSockets.

The cross-replica dedupe itself is a bus contract (wirehub.testing.BusContract, on memory, Redis
and NATS) and tests/adversarial/test_attack_drain.py runs it through a SIGTERM; here: the API's
and chat's answers (400 for a bad key, 504 / ``error timeout`` when the bus's answer was lost, the
original offset for a retry, 503 while stopping) and that a retried message is delivered once.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from wirehub.testing import LiveServer, WsClient, unique_room

CHAT = "/ws/chat"
KEY = "idempotency-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
ServerFactory = Callable[..., Awaitable[LiveServer]]


def config(bus: str = "memory") -> dict[str, Any]:
    return {
        "endpoints": [{"path": CHAT, "handler": "chat"}],
        "api": {"keys": [KEY]},
        "bus": {"plugin": bus},
        "plugins": {"load": ["tests.plugins_for_tests.uncertain_bus"]},
    }


async def member(server: LiveServer, room: str) -> WsClient:
    ws = await server.ws(CHAT, welcome=True)
    assert (await ws.request({"op": "join", "room": room}))["op"] == "joined"
    return ws


async def post(server: LiveServer, body: Any, **headers: str) -> tuple[int, dict[str, Any], Any]:
    resp = await server.http("/api/publish", "POST", body=body, headers={**AUTH, **headers})
    return resp.code, json.loads(resp.body), resp.headers


async def test_a_retried_api_publish_is_delivered_once(wirehub_server: ServerFactory) -> None:
    server = await wirehub_server(config())
    room = unique_room()
    listener = await member(server, room)
    code, first, _ = await post(server, {"room": room, "data": "once"}, **{"Idempotency-Key": "job-1"})
    assert code == 200
    # the same key in the body, or in both places, is the same publish: the first offset again
    code, again, _ = await post(server, {"room": room, "data": "once", "idempotency_key": "job-1"})
    assert (code, again) == (200, first)
    code, again, _ = await post(server, {"room": room, "data": "once", "idempotency_key": "job-1"},
                                **{"Idempotency-Key": "job-1"})
    assert (code, again) == (200, first)
    code, other, _ = await post(server, {"room": room, "data": "next"}, **{"Idempotency-Key": "job-2"})
    assert code == 200 and other["offset"] == first["offset"] + 1
    assert (await listener.recv_op("message"))["data"] == "once"
    assert (await listener.recv_op("message"))["data"] == "next"
    await listener.expect_nothing()


async def test_bad_idempotency_keys_are_400(wirehub_server: ServerFactory) -> None:
    server = await wirehub_server(config())
    room = unique_room()
    for body, headers in (
        ({"room": room, "data": 1, "idempotency_key": "has space"}, {}),
        ({"room": room, "data": 1, "idempotency_key": "x" * 129}, {}),
        ({"room": room, "data": 1, "idempotency_key": 7}, {}),
        ({"room": room, "data": 1, "idempotency_key": "a"}, {"Idempotency-Key": "b"}),
    ):
        code, answer, _ = await post(server, body, **headers)
        assert (code, answer["error"]) == (400, "bad_request"), (body, headers, answer)
    listener = await member(server, room)  # the API and the chat endpoint still serve
    code, _, _ = await post(server, {"room": room, "data": "fine"}, **{"Idempotency-Key": "k" * 128})
    assert code == 200
    assert (await listener.recv_op("message"))["data"] == "fine"


async def test_a_lost_bus_answer_is_504_and_the_retry_is_not_delivered_again(wirehub_server: ServerFactory) -> None:
    server = await wirehub_server(config("uncertain"))
    room = unique_room()
    listener = await member(server, room)
    code, answer, _ = await post(server, {"room": room, "data": "uncertain"}, **{"Idempotency-Key": "lost-1"})
    assert (code, answer["error"]) == (504, "timeout")
    got = await listener.recv_op("message")  # it was published, once
    assert got["data"] == "uncertain"
    # the backend retries with the same key: success with the original offset, nothing delivered again
    code, answer, _ = await post(server, {"room": room, "data": "uncertain"}, **{"Idempotency-Key": "lost-1"})
    assert (code, answer) == (200, {"room": room, "offset": got["offset"]})
    await listener.expect_nothing()


async def test_chat_publish_idempotency_and_timeout(wirehub_server: ServerFactory) -> None:
    server = await wirehub_server(config("uncertain"))
    room = unique_room()
    publisher, listener = await member(server, room), await member(server, room)
    reply = await publisher.request({"op": "publish", "room": room, "data": "uncertain", "idempotency_key": "c-1"})
    assert (reply["op"], reply["code"]) == ("error", "timeout")
    got = await listener.recv_op("message")
    reply = await publisher.request({"op": "publish", "room": room, "data": "uncertain", "idempotency_key": "c-1"})
    assert reply == {"op": "ack", "id": reply["id"], "offset": got["offset"]}
    reply = await publisher.request({"op": "publish", "room": room, "data": "x", "idempotency_key": ""})
    assert (reply["op"], reply["code"]) == ("error", "bad_request")
    reply = await publisher.request({"op": "publish", "room": room, "data": "plain", "idempotency_key": "c-2"})
    assert reply["op"] == "ack" and reply["offset"] == got["offset"] + 1
    assert (await listener.recv_op("message"))["data"] == "plain"
    await listener.expect_nothing()


async def test_a_stopping_replica_refuses_publishes_with_503_before_publishing(wirehub_server: ServerFactory) -> None:
    server = await wirehub_server(config())
    room = unique_room()
    listener = await member(server, room)
    server.app.stopping = True  # what stop() sets before it waits for requests in flight
    code, answer, headers = await post(server, {"room": room, "data": "late"})
    assert (code, answer["error"], headers["Retry-After"], headers["Connection"]) == (503, "unavailable", "1", "close")
    await listener.expect_nothing()
    server.app.stopping = False
    code, _, _ = await post(server, {"room": room, "data": "on time"})
    assert code == 200
    assert (await listener.recv_op("message"))["data"] == "on time"
