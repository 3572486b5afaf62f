"""Issue 12, defect 10: the drain must not answer a publish that was delivered with a failure.

Two ``wirehub serve`` replicas on one broker (Redis, and NATS). Eight publishers POST to replica A
(each publish spends 50 ms in a filter plugin, so several are always in flight); a listener is a
chat member on replica B. A gets SIGTERM mid-stream. Publishers 0-3 send plain publishes and stop
at A's first refusal; publishers 4-7 send each message with an ``Idempotency-Key`` and, when A
does not answer 2xx, retry it on B with the same key (what a backend behind a load balancer does).

- every publish answered 2xx arrives exactly once; every one answered 503 never arrives; an
  unanswered one (connection refused or dropped) or a 504 arrives at most once;
- every idempotent message arrives exactly once, retried or not; and a message answered 200 by A
  and sent again to B with the same key is answered with A's offset and not delivered again;
- A exits 0 within its grace, and publishes in flight at the SIGTERM were answered 200.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPRequest

from tests.helpers import Cluster, ServerProcess, bus_block
from tests.plugins_for_tests import slow_filter
from wirehub.brokers import BrokerProcess
from wirehub.testing import WsClient, unique_room, ws_connect

API_KEY = "drain-test-key"
PUBLISHERS = 8
GRACE = 8.0


@pytest.fixture(params=["redis", "nats"])
def shared_broker(request: pytest.FixtureRequest) -> BrokerProcess:
    """The session's broker of each kind (nothing here kills it): one per run, not one per test."""
    server: BrokerProcess = request.getfixturevalue(f"{request.param}_server")
    return server


@pytest.fixture
def pair(shared_broker: BrokerProcess, tmp_path: Path) -> Iterator[list[ServerProcess]]:
    kind = "redis" if "redis" in type(shared_broker).__name__.lower() else "nats"
    cluster = Cluster.configure(tmp_path, ["drain-a", "drain-b"], {
        "bus": bus_block(kind, shared_broker, f"d{uuid.uuid4().hex[:6]}"),
        "endpoints": [{"path": "/ws/chat", "handler": "chat"}],
        "api": {"keys": [API_KEY], "idempotency_window": 60},
        "drain": {"grace": GRACE, "reconnect_jitter": 0},
        "plugins": {"load": ["tests.plugins_for_tests.slow_filter"]},
    })
    cluster.start()
    yield cluster.replicas
    for replica in cluster.replicas:
        replica.kill()


class Publisher:
    """POSTs to the publish API; every answer recorded as (status or 0 for none, offset or None)."""

    def __init__(self, client: AsyncHTTPClient) -> None:
        self.client = client

    async def post(self, replica: ServerProcess, body: dict[str, Any], key: str | None = None
                   ) -> tuple[int, int | None]:
        headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
        if key is not None:
            headers["Idempotency-Key"] = key
        req = HTTPRequest(replica.url("/api/publish"), method="POST", body=json.dumps(body), headers=headers,
                          connect_timeout=2, request_timeout=GRACE)
        try:
            resp = await self.client.fetch(req, raise_error=False)
        except OSError:
            return 0, None  # refused or dropped: no answer
        if resp.code == 599:
            return 0, None
        offset = json.loads(resp.body).get("offset") if resp.code == 200 else None
        return resp.code, offset


async def collect(listener: WsClient, room: str, got: collections.Counter[tuple[int, int]],
                  stop: asyncio.Event, arrived: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            msg = await listener.recv(0.2)
        except TimeoutError:
            continue
        if msg.get("op") == "message" and msg.get("room") == room:
            got[(msg["data"]["pub"], msg["data"]["n"])] += 1
            arrived.set()


async def until(event: asyncio.Event, done: Callable[[], bool], timeout: float) -> None:
    """Wait until ``done()``, re-checked whenever ``event`` is set, for at most ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not done():
        event.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), max(0.01, deadline - loop.time()))
        if loop.time() >= deadline:
            return


async def test_sigterm_mid_stream_answers_no_delivered_publish_with_failure(pair: list[ServerProcess]) -> None:
    a, b = pair
    await asyncio.gather(a.wait_ready(), b.wait_ready())
    room = unique_room("drain")
    listener = await ws_connect(b.url("/ws/chat", "ws"), welcome=True)
    bystander = await ws_connect(b.url("/ws/chat", "ws"), welcome=True)
    for c in (listener, bystander):
        assert (await c.request({"op": "join", "room": room}))["op"] == "joined"
    got: collections.Counter[tuple[int, int]] = collections.Counter()
    stop_listening, arrived, answered = asyncio.Event(), asyncio.Event(), asyncio.Event()
    listening = asyncio.ensure_future(collect(listener, room, got, stop_listening, arrived))
    http = AsyncHTTPClient(force_instance=True, max_clients=2 * PUBLISHERS)
    pub = Publisher(http)
    # per (publisher, n): A's answer, and for idempotent ones the retry's answer on B
    answers: dict[tuple[int, int], tuple[int, int | None]] = {}
    retried: dict[tuple[int, int], tuple[int, int | None]] = {}
    sigterm_at: list[float] = []
    late_ok: list[tuple[int, int]] = []  # sent before the SIGTERM, answered 200 after it

    async def publisher(i: int) -> None:
        n = 0
        while True:
            n += 1
            body = {"room": room, "data": {"pub": i, "n": n, "slow": True}}
            key = f"p{i}-{n}" if i >= PUBLISHERS // 2 else None
            sent = time.monotonic()
            status, offset = await pub.post(a, body, key)
            answers[(i, n)] = (status, offset)
            answered.set()
            if status == 200 and sigterm_at and sent < sigterm_at[0]:
                late_ok.append((i, n))
            if status == 200:
                continue
            if key is not None:  # a backend's retry elsewhere, same key
                retried[(i, n)] = await pub.post(b, body, key)
            return

    publishers = [asyncio.ensure_future(publisher(i)) for i in range(PUBLISHERS)]
    try:
        # one message acknowledged by A, then sent again to B with the same key (a retry after a lost answer)
        twice = {"room": room, "data": {"pub": 99, "n": 1}}
        status_a, offset_a = await pub.post(a, twice, "twice-1")
        status_b, offset_b = await pub.post(b, twice, "twice-1")
        assert (status_a, status_b) == (200, 200) and offset_a == offset_b
        await until(answered, lambda: sum(1 for s, _ in answers.values() if s == 200) >= 40, 10)
        # Every publisher has just sent its next request on a new connection: SIGTERM now would find most of
        # them still in the accept queue (reset, never accepted); half the filter's delay later they are
        # inside the replica, in the slow filter, which is what this test is about.
        await asyncio.sleep(slow_filter.DELAY / 2)
        sigterm_at.append(time.monotonic())
        exit_code = await asyncio.to_thread(a.stop, GRACE + 5)
        stopped_in = time.monotonic() - sigterm_at[0]
        await asyncio.wait_for(asyncio.gather(*publishers), GRACE)
        assert exit_code == 0, a.output()
        assert stopped_in < GRACE

        ok = {k for k, (s, _) in answers.items() if s == 200}
        refused = {k for k, (s, _) in answers.items() if s == 503}
        assert {s for s, _ in answers.values()} <= {200, 503, 504, 0}, answers
        assert all(s == 200 for s, _ in retried.values()), retried
        idempotent = {k for k in answers if k[0] >= PUBLISHERS // 2}
        plain = set(answers) - idempotent
        assert late_ok, "no publish was in flight at the SIGTERM: the test proved nothing"

        expected = ok | idempotent | {(99, 1)}
        await until(arrived, lambda: all(got[k] >= 1 for k in expected), 10)
        await asyncio.sleep(0.5)  # time for a duplicate to show up
        missing = sorted(k for k in expected if got[k] == 0)
        duplicated = sorted(k for k, count in got.items() if count > 1)
        assert not missing and not duplicated, (missing, duplicated)
        assert not [k for k in refused & plain if got[k]], "a publish answered 503 was delivered"
        assert got[(99, 1)] == 1

        # the bystander on B is still served
        reply = await bystander.request({"op": "publish", "room": room, "data": {"pub": 100, "n": 1}})
        assert reply["op"] == "ack"
    finally:
        stop_listening.set()
        for task in publishers:
            task.cancel()
        await asyncio.gather(listening, *publishers, return_exceptions=True)
        http.close()
        for c in (listener, bystander):
            c.close()
            if c.conn.stream is not None:
                c.conn.stream.close()
