"""No socket of the redis bus outlives its close, even when redis-py returns before the socket is closed.

redis-py closes some TLS connections without waiting (a PubSub's; a connect cancelled during its
handshake commands) and gives up waiting on others after ``socket_connect_timeout``; its cluster client
stops closing at the first node whose close fails, before the startup nodes. The socket then stays open
until the server answers the TLS close_notify: if the event loop stops first, it is garbage collected
open (``ResourceWarning: unclosed transport``), in whichever later test the collector runs. Each test
here makes the server silent at the moment that matters, closes the bus, stops the loop and collects
garbage: no ResourceWarning may come out (see ``Sockets`` in wirehub.builtins.bus.redis)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import socket
import ssl
import threading
import uuid
import warnings
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest

from wirehub.broker_clusters import REDIS7_HINT, RedisCluster, RedisNode, TlsFiles, find_redis7
from wirehub.builtins.bus.redis import create_backend
from wirehub.bus import BusUnavailable
from wirehub.testing import Recorder, unique_room

pytestmark = pytest.mark.skipif(find_redis7() is None, reason=REDIS7_HINT)

PASSWORD = "s3cret-" + uuid.uuid4().hex[:6]


@pytest.fixture(scope="module")
def tls_server(tls: TlsFiles) -> Iterator[RedisNode]:
    node = RedisNode(tls=tls, password=PASSWORD)
    node.start()
    yield node
    node.close()


@pytest.fixture(scope="module")
def tls_cluster(tls: TlsFiles) -> Iterator[RedisCluster]:
    with RedisCluster(primaries=3, replicas=0, tls=tls, password=PASSWORD) as cluster:
        yield cluster


def leaks_of(scenario: Callable[[], Awaitable[None]]) -> list[str]:
    """Run ``scenario`` on an event loop of its own, stop the loop, collect garbage: the ResourceWarnings."""
    gc.collect()  # what earlier tests left is theirs
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        asyncio.run(scenario())
        gc.collect()
    return [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]


async def start_and_use(options: dict[str, Any]) -> Any:
    backend = create_backend({"key_prefix": f"t{uuid.uuid4().hex[:8]}", "connect_timeout": 0.5, **options},
                             "bus.redis")
    await backend.bus.start(Recorder())
    room = unique_room()
    await backend.bus.subscribe(room)  # the subscriber connection: redis-py closes it without waiting
    assert await backend.bus.publish(room, b"x", history=True) == 1
    return backend


def test_a_close_while_the_tls_server_is_silent_leaves_no_socket(tls_server: RedisNode, tls: TlsFiles) -> None:
    async def scenario() -> None:
        backend = await start_and_use({"url": tls_server.url, "tls_ca_file": tls.ca, "password": PASSWORD})
        tls_server.pause()  # no close_notify comes back: every close waits, or gives up
        await backend.bus.close()

    try:
        assert leaks_of(scenario) == []
    finally:
        tls_server.resume()


def test_a_close_while_the_tls_cluster_is_silent_leaves_no_socket(tls_cluster: RedisCluster, tls: TlsFiles) -> None:
    async def scenario() -> None:
        backend = await start_and_use({"mode": "cluster", "cluster": {"nodes": tls_cluster.startup_nodes[:1]},
                                       "tls": True, "tls_ca_file": tls.ca, "password": PASSWORD})
        for node in tls_cluster.nodes:
            node.pause()
        await backend.bus.close()

    try:
        assert leaks_of(scenario) == []
    finally:
        for node in tls_cluster.nodes:
            node.resume()


def test_publishes_queued_for_a_cluster_connection_when_it_closes_open_none(
        tls_cluster: RedisCluster, tls: TlsFiles) -> None:
    """Publishes waiting for one of ``max_connections`` when the bus closes fail; they do not run on the closed
    client, which redis-py would start again, opening node connections nothing closes."""
    outcomes: list[Any] = []
    left_open: list[int] = []

    async def scenario() -> None:
        backend = await start_and_use({"mode": "cluster", "cluster": {"nodes": tls_cluster.startup_nodes[:1]},
                                       "tls": True, "tls_ca_file": tls.ca, "password": PASSWORD,
                                       "max_connections": 2})
        room = unique_room()
        publishes = [asyncio.ensure_future(backend.bus.publish(room, b"p%d" % i)) for i in range(200)]
        await asyncio.sleep(0)  # each waits for a connection or is under way
        await backend.bus.close()
        outcomes.extend(await asyncio.gather(*publishes, return_exceptions=True))
        left_open.append(len(backend.bus.sockets.open))

    assert leaks_of(scenario) == []
    assert left_open == [0]
    assert sum(isinstance(o, BusUnavailable) for o in outcomes) > 100, outcomes[-3:]  # the queued ones


class SilentTlsServer:
    """Completes the TLS handshake, then reads and answers nothing (a Redis that hangs after accepting)."""

    def __init__(self, tls: TlsFiles) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(tls.cert, tls.key)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return  # closed
            try:
                self.accepted.append(self.context.wrap_socket(conn, server_side=True))
            except (OSError, ssl.SSLError):
                conn.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):  # on Linux a close alone leaves the thread blocked in accept()
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self.thread.join(5)
        for conn in self.accepted:
            conn.close()


def test_a_start_that_times_out_after_the_tls_handshake_leaves_no_socket(tls: TlsFiles) -> None:
    server = SilentTlsServer(tls)

    async def scenario() -> None:
        backend = create_backend({"url": f"rediss://127.0.0.1:{server.port}/0", "tls_ca_file": tls.ca,
                                  "password": PASSWORD, "connect_timeout": 0.5}, "bus.redis")
        with pytest.raises(BusUnavailable):  # AUTH never answered: the connect is cancelled mid-handshake
            await backend.bus.start(Recorder())
        await backend.bus.close()

    try:
        assert leaks_of(scenario) == []
        assert server.accepted, "the TLS handshake never completed: the test did not reach AUTH"
    finally:
        server.close()
