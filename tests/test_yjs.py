"""The yjs endpoint with pycrdt as the second client, over real WebSockets against real servers.

tests/js/yjs (run by tests/test_yjs_node.py) covers the real ``yjs`` / ``y-websocket`` packages;
this file covers the protocol details, the limits and their close codes, persistence and the
compaction race.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pycrdt
import pytest

from tests.yjs_client import YClient, eventually
from wirehub.builtins.handlers.yjs import wire
from wirehub.builtins.handlers.yjs.store import DocumentStore

YJS = {"path": "/ws/yjs/*", "handler": "yjs", "options": {"idle_unload": 0}}


def config(**options: Any) -> dict[str, Any]:
    return {"endpoints": [{**YJS, "options": {**YJS["options"], **options}}, {"path": "/ws/echo", "handler": "echo"}]}


async def test_two_clients_converge_and_a_late_one_catches_up(wirehub_server: Any) -> None:
    server = await wirehub_server(config())
    a = await YClient.connect(server, "/ws/yjs/notes")
    b = await YClient.connect(server, "/ws/yjs/notes")
    await asyncio.wait_for(asyncio.gather(a.synced.wait(), b.synced.wait()), 5)
    await a.insert(0, "hello ")
    await b.insert(0, "world")
    await eventually(lambda: str(a.text) == str(b.text) and len(str(a.text)) == 11)
    c = await YClient.connect(server, "/ws/yjs/notes")
    await asyncio.wait_for(c.synced.wait(), 5)
    await eventually(lambda: str(c.text) == str(a.text))
    for client in (a, b, c):
        await client.close()


SECRET = "s" * 40


def jwt_config(**options: Any) -> dict[str, Any]:
    return {**config(**options), "auth": {"plugin": "jwt", "jwt": {"algorithms": ["HS256"], "secret": SECRET}}}


def token(sub: str, rooms: list[str]) -> str:
    import time

    import jwt

    return jwt.encode({"sub": sub, "rooms": rooms, "exp": int(time.time() + 600)}, SECRET, algorithm="HS256")


async def assert_bystander_served(server: Any, **kwargs: Any) -> None:
    """Another session on the same server still gets answers."""
    echo = await server.ws("/ws/echo", **kwargs)
    await echo.send({"still": "here"})
    assert await echo.recv() == {"echo": {"still": "here"}}


async def test_a_read_only_client_gets_permission_denied_and_its_update_reaches_nobody(wirehub_server: Any) -> None:
    server = await wirehub_server(jwt_config())
    url = "/ws/yjs/handbook-1"
    writer = await YClient.connect(server, url + "?token=" + token("w", ["*"]))
    reader = await YClient.connect(server, url + "?token=" + token("r", ["read:handbook-*"]))
    await asyncio.wait_for(asyncio.gather(writer.synced.wait(), reader.synced.wait()), 5)
    await writer.insert(0, "rules")
    await eventually(lambda: str(reader.text) == "rules")  # the reader reads
    await reader.insert(0, "VANDAL ")
    await eventually(lambda: reader.denied == ["read-only"])
    await asyncio.sleep(0.3)
    assert str(writer.text) == "rules"
    fresh = await YClient.connect(server, url + "?token=" + token("w2", ["*"]))
    await asyncio.wait_for(fresh.synced.wait(), 5)
    assert str(fresh.text) == "rules"
    metrics = (await server.http("/metrics")).body.decode()
    assert 'wirehub_yjs_refused_total{endpoint="/ws/yjs/*",reason="read_only"} 1.0' in metrics
    for c in (writer, reader, fresh):
        await c.close()


@pytest.mark.parametrize(("path", "rooms", "code"), [
    ("/ws/yjs/secret", ["public-*"], 4403),
    ("/ws/yjs/bad%20name", ["*"], 4400),
    ("/ws/yjs/" + "x" * 200, ["*"], 4400),
])
async def test_documents_that_may_not_be_opened_close_at_once(wirehub_server: Any, path: str, rooms: list[str],
                                                              code: int) -> None:
    server = await wirehub_server(jwt_config())
    tok = token("u", rooms)
    client = await server.ws(path + "?token=" + tok)
    assert (await client.wait_closed())[0] == code
    await assert_bystander_served(server, headers={"Authorization": f"Bearer {tok}"})


@pytest.mark.parametrize(("frame", "reason"), [
    ("text", "bad message: binary y-websocket frames only"),
    (b"\x00\x07\x01\x00", "bad message"),  # an unknown sync step
    (b"\x09", "bad message"),  # an unknown message type
    (b"\x00\x02\x05\x01\x02", "bad message"),  # an update cut short
    (b"\x00\x02\x03\xff\xff\xff", "bad message"),  # bytes that are no Yjs update
    (b"\x01\x05\x01\x02\x03", "bad message"),  # a malformed awareness update
])
async def test_malformed_messages_close_with_4400(wirehub_server: Any, frame: Any, reason: str) -> None:
    server = await wirehub_server(config())
    client = await YClient.connect(server, "/ws/yjs/doc")
    await asyncio.wait_for(client.synced.wait(), 5)
    client._reader.cancel()
    await client.conn.send(frame)
    assert await client.conn.wait_closed() == (4400, reason)
    await assert_bystander_served(server)
    # the document is still served
    other = await YClient.connect(server, "/ws/yjs/doc")
    await asyncio.wait_for(other.synced.wait(), 5)


async def test_an_update_over_the_document_limit_closes_with_4413_and_is_not_stored(wirehub_server: Any) -> None:
    server = await wirehub_server(config(max_document_bytes=2048))
    a = await YClient.connect(server, "/ws/yjs/big")
    await asyncio.wait_for(a.synced.wait(), 5)
    await a.insert(0, "small")
    a.text.insert(5, "y" * 3000)
    await a.flush()
    assert (await a.wait_closed())[0] == 4413
    b = await YClient.connect(server, "/ws/yjs/big")
    await asyncio.wait_for(b.synced.wait(), 5)
    await eventually(lambda: str(b.text) == "small")
    await assert_bystander_served(server)


async def test_an_update_over_the_message_size_closes_with_1009(wirehub_server: Any) -> None:
    server = await wirehub_server(config(max_message_size=1024))
    a = await YClient.connect(server, "/ws/yjs/frames")
    await asyncio.wait_for(a.synced.wait(), 5)
    a.text.insert(0, "z" * 2000)
    await a.flush()
    assert (await a.wait_closed())[0] == 1009
    await assert_bystander_served(server)


async def test_flooding_closes_with_4029_and_a_retry_hint(wirehub_server: Any) -> None:
    server = await wirehub_server(config(messages_per_second=5))
    a = await YClient.connect(server, "/ws/yjs/flood")
    await asyncio.wait_for(a.synced.wait(), 5)
    a._reader.cancel()
    from tornado.websocket import WebSocketClosedError

    with contextlib.suppress(WebSocketClosedError):  # the server may close while we are still writing
        for clock in range(1, 40):
            await a.set_awareness(7, clock, {"n": clock})
    code, reason = await a.conn.wait_closed()
    assert code == 4029
    assert reason is not None and reason.startswith("rate limited; retry_ms=")
    await assert_bystander_served(server)


async def test_awareness_of_a_connection_that_drops_is_removed_for_the_others(wirehub_server: Any) -> None:
    server = await wirehub_server(config())
    a = await YClient.connect(server, "/ws/yjs/cursors")
    b = await YClient.connect(server, "/ws/yjs/cursors")
    await asyncio.wait_for(asyncio.gather(a.synced.wait(), b.synced.wait()), 5)
    await a.set_awareness(1234, 1, {"user": "ann", "cursor": 2})
    await eventually(lambda: b.awareness.get(1234) == {"user": "ann", "cursor": 2})
    # a third connection gets the state on connect, and on query-awareness
    c = await YClient.connect(server, "/ws/yjs/cursors")
    await eventually(lambda: 1234 in c.awareness)
    c.awareness.clear()
    await c.conn.send(wire.QUERY_AWARENESS)
    await eventually(lambda: 1234 in c.awareness)
    await a.close()  # no goodbye from the client
    await eventually(lambda: 1234 not in b.awareness and 1234 not in c.awareness)


@pytest.mark.parametrize("idle_unload", [0, 0.3])
async def test_the_document_survives_an_unload_and_memory_is_reported(wirehub_server: Any,
                                                                       idle_unload: float) -> None:
    server = await wirehub_server(config(idle_unload=idle_unload))
    a = await YClient.connect(server, "/ws/yjs/keep")
    await asyncio.wait_for(a.synced.wait(), 5)
    for i in range(30):
        await a.insert(i, "k")
    b = await YClient.connect(server, "/ws/yjs/keep")
    await eventually(lambda: str(b.text) == "k" * 30)
    metrics = (await server.http("/metrics")).body.decode()
    assert 'wirehub_yjs_documents{endpoint="/ws/yjs/*"} 1.0' in metrics
    handler = server.app.handlers["/ws/yjs/*"]
    await eventually(lambda: handler.bytes_gauge._value.get() > 30)
    await a.close()
    await b.close()
    await eventually(lambda: not handler.documents)  # unloaded idle_unload after the last one left
    stored = await handler.store.load("yjs/keep")
    assert stored.version >= 1 and stored.offset >= 30  # compacted on unload
    c = await YClient.connect(server, "/ws/yjs/keep")
    await eventually(lambda: str(c.text) == "k" * 30)


@pytest.mark.parametrize("kind", ["redis", "nats"])
async def test_two_replicas_compacting_at_once_lose_nothing(kind: str, request: pytest.FixtureRequest) -> None:
    """Each replica holds edits the other never saw; they compact at the same moment, ten times."""
    import uuid

    from wirehub.builtins.bus.nats import create_backend as nats_backend
    from wirehub.builtins.bus.redis import create_backend as redis_backend
    from wirehub.testing import Recorder

    broker = request.getfixturevalue(f"{kind}_server")
    prefix = f"yc{uuid.uuid4().hex[:8]}"
    backends = [redis_backend({"url": broker.url, "key_prefix": prefix}, "bus.redis") if kind == "redis" else
                nats_backend({"servers": [broker.url], "subject_prefix": prefix, "storage": "memory"}, "bus.nats")
                for _ in range(2)]
    for b in backends:
        await b.bus.start(Recorder())
    try:
        stores = [DocumentStore(b, max_retries=50) for b in backends]
        docs: list[pycrdt.Doc[Any]] = [pycrdt.Doc(), pycrdt.Doc()]
        for round_ in range(10):
            for i, doc in enumerate(docs):
                doc.get("items", type=pycrdt.Map)[f"r{round_}-replica{i}"] = round_
            await asyncio.gather(*(s.compact("yjs/race", d.get_update(), round_ + 1, "e1")
                                   for s, d in zip(stores, docs, strict=True)))
        stored = await stores[0].load("yjs/race")
        merged: pycrdt.Doc[Any] = pycrdt.Doc()
        merged.apply_update(stored.update)
        items = merged.get("items", type=pycrdt.Map)
        assert sorted(items.keys()) == sorted(f"r{r}-replica{i}" for r in range(10) for i in range(2))
        assert stored.offset == 10 and stored.epoch == "e1"
        assert sum(s.conflicts for s in stores) >= 1  # they did race
    finally:
        for b in backends:
            await b.bus.close()


async def test_an_update_while_the_bus_is_down_closes_with_1013_and_arrives_after_the_reconnect(
        wirehub_server: Any, redis_server_factory: Any) -> None:
    from tests.helpers import FAST_BUS

    broker = redis_server_factory(appendonly=True)
    server = await wirehub_server({**config(), "bus": {"plugin": "redis",
                                                       "redis": {"url": broker.url, **FAST_BUS}}})
    a = await YClient.connect(server, "/ws/yjs/outage")
    await asyncio.wait_for(a.synced.wait(), 5)
    await a.insert(0, "before ")
    await eventually(lambda: server.app.handlers["/ws/yjs/*"].documents["outage"].offset >= 1)
    broker.pause()
    try:
        await eventually(lambda: not server.app.hub.healthy, 10)  # the watchdog noticed
        await a.insert(7, "during")
        code, reason = await a.wait_closed(10)
        assert code == 1013 and reason == "try again later; retry_ms=1000"
        # the provider reconnects after retry_ms, and its sync step 2 carries the refused edit
    finally:
        broker.resume()
    await eventually(lambda: server.app.hub.healthy, 10)
    again = await YClient.connect(server, "/ws/yjs/outage")
    again.doc.apply_update(a.doc.get_update())  # what the reconnecting provider holds
    await asyncio.wait_for(again.synced.wait(), 5)
    await again.conn.send(wire.sync_step2(again.doc.get_update()))
    fresh = await YClient.connect(server, "/ws/yjs/outage")
    await eventually(lambda: str(fresh.text) == "before during")
    await assert_bystander_served(server)


async def test_read_patterns_let_a_chat_member_read_but_not_publish(wirehub_server: Any) -> None:
    server = await wirehub_server({"auth": jwt_config()["auth"]})
    client = await server.ws("/ws/chat?token=" + token("viewer", ["read:news-*"]))
    await client.recv_op("welcome")
    assert (await client.request({"op": "join", "id": 1, "room": "news-1"}))["op"] == "joined"
    refused = await client.request({"op": "publish", "id": 2, "room": "news-1", "data": "hi"})
    assert refused["code"] == "forbidden"
    assert (await client.request({"op": "join", "id": 3, "room": "other"}))["code"] == "forbidden"


async def test_the_prefix_endpoint_needs_a_document_name(wirehub_server: Any) -> None:
    server = await wirehub_server(config())
    for path in ("/ws/yjs", "/ws/yjs/"):
        resp = await server.http(path, headers={"Connection": "Upgrade", "Upgrade": "websocket"})
        assert resp.code == 404, path
    assert (await server.http("/ws/yjs/doc")).code == 426  # a plain GET of a document: upgrade required


@pytest.mark.parametrize(("endpoint", "bus", "key", "message"), [
    ({"path": "/ws/a*b", "handler": "echo"}, {}, "endpoints[0].path", "a prefix like /ws/yjs/*"),
    ({"path": "/ws/yjs", "handler": "yjs"}, {}, "endpoints[0].path", "needs a prefix endpoint"),
    ({"path": "/ws/yjs/*", "handler": "yjs", "options": {"compact_every": 600}},
     {"plugin": "memory", "memory": {"history_size": 1000}}, "endpoints[0].options.compact_every",
     "at most half of bus.memory.history_size"),
    ({"path": "/ws/yjs/*", "handler": "yjs", "options": {"document_pattern": "("}}, {},
     "endpoints[0].options.document_pattern", "not a regular expression"),
])
def test_config_errors_name_the_key(endpoint: dict[str, Any], bus: dict[str, Any], key: str, message: str) -> None:
    from wirehub.app import Wirehub
    from wirehub.config import ConfigError, config_from_dict
    from wirehub.testing import config_for_tests

    overrides: dict[str, Any] = {"endpoints": [endpoint]}
    if bus:
        overrides["bus"] = bus
    with pytest.raises(ConfigError) as info:
        Wirehub.build(config_from_dict(config_for_tests(overrides)))
    assert info.value.key == key and message in str(info.value)


def test_a_document_limit_that_does_not_fit_the_send_queue_is_a_config_error() -> None:
    from wirehub.app import Wirehub
    from wirehub.config import ConfigError, config_from_dict
    from wirehub.testing import config_for_tests

    overrides = {"server": {"send_queue_bytes": 65536},
                 "endpoints": [{"path": "/ws/yjs/*", "handler": "yjs", "options": {"max_document_bytes": 40000}}]}
    with pytest.raises(ConfigError) as info:
        Wirehub.build(config_from_dict(config_for_tests(overrides)))
    assert info.value.key == "endpoints[0].options.max_document_bytes"


async def test_a_failing_message_closes_with_1011_not_a_json_error(wirehub_server: Any,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from wirehub.builtins.handlers.yjs.document import Document

    server = await wirehub_server(config())
    a = await YClient.connect(server, "/ws/yjs/bug")
    await asyncio.wait_for(a.synced.wait(), 5)

    def broken(self: Document, session: Any) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(Document, "send_awareness", broken)
    await a.conn.send(wire.QUERY_AWARENESS)
    assert await a.wait_closed() == (1011, "internal error")
    await assert_bystander_served(server)


def test_every_option_is_documented() -> None:
    import dataclasses
    import re
    from pathlib import Path

    from wirehub.builtins.handlers.yjs.options import YjsOptions

    docs = Path(__file__).resolve().parent.parent / "docs"
    for page in ("collaboration.md", "configuration.md"):
        text = (docs / page).read_text()
        missing = [f.name for f in dataclasses.fields(YjsOptions)
                   if not re.search(rf"^\| `{f.name}` \|", text, re.MULTILINE)]
        assert not missing, f"yjs options missing from docs/{page}: {missing}"
