"""/metrics: Prometheus text that the official parser reads, and counters that move with traffic."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from wirehub.auth import Identity
from wirehub.metrics import Metrics
from wirehub.session import OutFrame, Session
from wirehub.testing import FakeTransport, LiveServer, unique_room

ROOT = Path(__file__).resolve().parent.parent
ECHO = [{"path": "/ws/echo", "handler": "echo"}]


def parse(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``(sample name, sorted labels) -> value`` of every sample."""
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


async def scrape(server: LiveServer) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = await server.http("/metrics")
    assert response.code == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return parse(response.body.decode())


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_metrics_parse_and_start_at_zero(wirehub_server: Callable[..., Any]) -> None:
    server: LiveServer = await wirehub_server({"endpoints": ECHO})
    samples = await scrape(server)
    names = {name for name, _ in samples}
    for expected in ("wirehub_sessions", "wirehub_sessions_opened_total", "wirehub_messages_in_total",
                     "wirehub_messages_out_total", "wirehub_deliveries_total", "wirehub_slow_consumer_closes_total",
                     "wirehub_bus_up", "wirehub_bus_reconnects_total", "wirehub_publish_to_delivery_seconds_bucket",
                     "wirehub_draining", "wirehub_drain_sessions_remaining", "wirehub_build_info"):
        assert expected in names, expected
    assert value(samples, "wirehub_sessions", endpoint="/ws/echo") == 0  # exported before the first session
    assert value(samples, "wirehub_bus_up") == 1
    assert value(samples, "wirehub_draining") == 0


async def test_counters_move_with_traffic(wirehub_server: Callable[..., Any]) -> None:
    server: LiveServer = await wirehub_server({"endpoints": ECHO})
    before = await scrape(server)
    client = await server.ws("/ws/echo")
    for i in range(3):
        await client.send({"n": i})
        assert await client.recv() == {"echo": {"n": i}}
    await client.send("not json")
    assert (await client.recv())["code"] == "bad_json"
    during = await scrape(server)
    assert value(during, "wirehub_sessions", endpoint="/ws/echo") == 1
    assert value(during, "wirehub_sessions_opened_total", endpoint="/ws/echo") == 1
    assert value(during, "wirehub_messages_in_total", endpoint="/ws/echo") == 4
    assert value(during, "wirehub_messages_out_total") - value(before, "wirehub_messages_out_total") == 4
    assert value(during, "wirehub_errors_total", code="bad_json") == 1

    # A bus message fanned out to a member: delivery, bus message and latency are counted.
    (session,) = list(server.app.sessions)
    room = unique_room()
    await server.app.hub.join(room, session)
    assert value(await scrape(server), "wirehub_rooms") == 1
    await server.app.hub.publish(room, json.dumps({"op": "message", "room": room}).encode())
    assert (await client.recv())["room"] == room
    after_publish = await scrape(server)
    assert value(after_publish, "wirehub_deliveries_total") == 1
    assert value(after_publish, "wirehub_bus_messages_total") == 1
    assert value(after_publish, "wirehub_publish_to_delivery_seconds_count") == 1
    assert value(after_publish, "wirehub_publish_to_delivery_seconds_bucket", le="+Inf") == 1

    # A refused upgrade is an auth failure by reason.
    response = await server.http("/ws/echo", headers={"Upgrade": "websocket", "Connection": "Upgrade",
                                                      "Sec-WebSocket-Version": "13",
                                                      "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
                                                      "Origin": "https://evil.example"})
    assert response.code == 403

    client.close(1000)
    for _ in range(100):
        closed = await scrape(server)
        if value(closed, "wirehub_sessions", endpoint="/ws/echo") == 0:
            break
        await asyncio.sleep(0.02)
    assert value(closed, "wirehub_sessions", endpoint="/ws/echo") == 0
    assert value(closed, "wirehub_sessions_closed_total", endpoint="/ws/echo", code="1000") == 1
    assert value(closed, "wirehub_auth_failures_total", reason="origin") == 1
    assert value(closed, "wirehub_rooms") == 0


async def test_drain_progress_is_exported(wirehub_server: Callable[..., Any]) -> None:
    server: LiveServer = await wirehub_server({"endpoints": ECHO, "drain": {"grace": 5, "batch_size": 2,
                                                                           "batch_interval": 0.01}})
    clients = [await server.ws("/ws/echo") for _ in range(5)]
    app = server.app
    drain = asyncio.ensure_future(app.drain())
    await asyncio.sleep(0)
    assert app.draining and value(parse(app.metrics.render().decode()), "wirehub_draining") == 1
    for client in clients:
        code, reason = await client.wait_closed()
        assert code == 1001 and reason is not None and re.fullmatch(r"server going away; retry_ms=\d+", reason)
    await drain
    samples = parse(app.metrics.render().decode())
    assert value(samples, "wirehub_draining") == 1
    assert value(samples, "wirehub_drain_sessions_remaining") == 0
    assert value(samples, "wirehub_sessions_closed_total", endpoint="/ws/echo", code="1001") == 5


def test_slow_consumer_closes_and_drops_are_counted() -> None:
    metrics = Metrics(["/ws/chat"])
    transport = FakeTransport()  # a client that stopped reading: everything stays queued
    session = Session(transport, Identity(user="u"), endpoint="/ws/chat", node="n", max_queue_bytes=1024,
                      metrics=metrics)
    frame = OutFrame(b"x" * 400)
    assert session.send_frame(frame) and session.send_frame(frame)
    assert session.send_frame(frame) is False
    assert transport.closed_with is not None and transport.closed_with[0] == 4008
    samples = parse(metrics.render().decode())
    assert value(samples, "wirehub_slow_consumer_closes_total") == 1
    assert value(samples, "wirehub_dropped_total", reason="slow_consumer") == 1
    assert value(samples, "wirehub_messages_out_total") == 2
    assert value(samples, "wirehub_sessions", endpoint="/ws/chat") == 0


def test_every_metric_is_documented() -> None:
    docs = (ROOT / "docs" / "operations.md").read_text()
    for family in Metrics().registry.collect():
        name = family.name + ("_total" if family.type == "counter" else "_info" if family.type == "info" else "")
        assert f"`{name}" in docs, f"{name} is missing from docs/operations.md"


async def test_client_chosen_close_codes_do_not_grow_metric_series(wirehub_server: Any) -> None:
    server = await wirehub_server({"endpoints": [{"path": "/ws/echo", "handler": "echo"}]})
    for code in (3001, 4123, 4999):
        client = await server.ws("/ws/echo")
        client.close(code)
    registry = server.app.metrics.registry
    for _ in range(100):
        if registry.get_sample_value("wirehub_sessions_closed_total", {"endpoint": "/ws/echo", "code": "other"}) == 3:
            break
        await asyncio.sleep(0.02)
    assert registry.get_sample_value("wirehub_sessions_closed_total", {"endpoint": "/ws/echo", "code": "other"}) == 3
    assert registry.get_sample_value("wirehub_sessions_closed_total", {"endpoint": "/ws/echo", "code": "4123"}) is None


def test_the_fan_out_s_latency_histogram_exports_as_prometheus_s_own() -> None:
    # The fan-out observes without a lock (TallyHistogram); the scrape must read as Histogram's would, a value
    # on a bucket's bound counted in that bucket (``le``)
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    from wirehub.metrics import LATENCY_BUCKETS

    metrics = Metrics()
    registry = CollectorRegistry()
    reference = Histogram("wirehub_publish_to_delivery_seconds", "x", buckets=LATENCY_BUCKETS, registry=registry)
    for seconds in (0.0, 0.0002, 0.0005, 0.003, 0.01, 1.0, 2.6, 5.0, 7.5, 120.0):
        metrics.latency.observe(seconds)
        reference.observe(seconds)
    ours = {k: v for k, v in parse(metrics.render().decode()).items()
            if k[0].startswith("wirehub_publish_to_delivery_seconds") and not k[0].endswith("_created")}
    theirs = {k: v for k, v in parse(generate_latest(registry).decode()).items() if not k[0].endswith("_created")}
    assert ours == theirs
    assert value(ours, "wirehub_publish_to_delivery_seconds_bucket", le="0.0005") == 3
    assert value(ours, "wirehub_publish_to_delivery_seconds_count") == 10



def test_the_latency_histogram_leaves_out_created_when_prometheus_does() -> None:
    # PROMETHEUS_DISABLE_CREATED_SERIES (or disable_created_metrics()) turns off every _created series
    from prometheus_client import disable_created_metrics, enable_created_metrics

    metrics = Metrics()
    assert "wirehub_publish_to_delivery_seconds_created" in metrics.render().decode()
    disable_created_metrics()
    try:
        text = metrics.render().decode()
    finally:
        enable_created_metrics()
    assert "_created" not in text
    assert "wirehub_publish_to_delivery_seconds_count" in text
