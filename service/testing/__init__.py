"""pytest plugin for wirehub and its plugin authors: live servers, a WebSocket client, contract suites.

Installing wirehub registers it (the ``pytest11`` entry point): no conftest needed. Tests are
asyncio tests (pytest-asyncio, ``asyncio_mode = auto``). docs/plugins.md lists every fixture and
contract suite with its shape.

- ``wirehub_server``: a factory fixture; ``await wirehub_server({...config...})`` starts a real
  Tornado server on a free port in this process and returns a :class:`LiveServer`.
- :func:`ws_connect`: a real WebSocket client with JSON helpers.
- Contract suites: subclass :class:`BusContract`, :class:`HistoryContract`,
  :class:`PresenceContract` or :class:`StateStoreContract` in a ``Test*`` class and provide an
  async ``backend`` fixture yielding a started :class:`wirehub.bus.Backend` (or a pair of them
  on one broker through ``backend_pair``, for the cross-replica cases). Buses whose replicas can
  die add :class:`PresenceExpiryContract` (fixtures ``presence_replica`` and ``broker_ops``).

The fixtures are defined here; the rest lives in :mod:`~wirehub.testing.helpers`,
:mod:`~wirehub.testing.contracts` and :mod:`~wirehub.testing.presence_contracts` and is imported from
this module.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
from tornado.netutil import bind_sockets

from wirehub.app import Wirehub
from wirehub.brokers import BrokerProcess, NatsServer, RedisServer
from wirehub.bus import BusUnavailable
from wirehub.config import config_from_dict
from wirehub.testing.contracts import (
    BackendPair,
    BusContract,
    Footprint,
    HistoryContract,
    Recorder,
    StateStoreContract,
    memory_footprint,
)
from wirehub.testing.helpers import (
    FakeTransport,
    LiveServer,
    WsClient,
    config_for_tests,
    eventually,
    free_port,
    unique_room,
    ws_connect,
)
from wirehub.testing.presence_contracts import InspectablePresence as InspectablePresence
from wirehub.testing.presence_contracts import PresenceContract, PresenceExpiryContract, ReplicaFactory

__all__ = [
    "BackendPair",
    "BrokerFactory",
    "BusContract",
    "BusUnavailable",
    "FakeTransport",
    "Footprint",
    "HistoryContract",
    "LiveServer",
    "PresenceContract",
    "PresenceExpiryContract",
    "Recorder",
    "ReplicaFactory",
    "StateStoreContract",
    "WsClient",
    "config_for_tests",
    "eventually",
    "free_port",
    "memory_footprint",
    "nats_server",
    "nats_server_factory",
    "redis_server",
    "redis_server_factory",
    "unique_room",
    "ws_connect",
]


# -- live server ------------------------------------------------------------------------------------------------


@pytest.fixture
async def wirehub_server() -> AsyncIterator[Callable[..., Awaitable[LiveServer]]]:
    """Factory: ``server = await wirehub_server({"endpoints": [...]})`` (merged over config_for_tests)."""
    started: list[LiveServer] = []

    async def start(overrides: dict[str, Any] | None = None) -> LiveServer:
        config = config_from_dict(config_for_tests(overrides), source="<test>")
        app = Wirehub.build(config)
        sockets = bind_sockets(0, "127.0.0.1", backlog=config.server.backlog)
        await app.start(sockets)
        assert app.port is not None
        server = LiveServer(app, app.port)
        started.append(server)
        return server

    yield start
    for server in started:
        await asyncio.gather(*(client.aclose() for client in server.clients))
        await server.app.stop()


# -- brokers (issue 5: Redis and NATS buses) -------------------------------------------------------------------
#
# ``redis_server`` / ``nats_server``: one broker per test session, shared; never kill or pause it.
# ``redis_server_factory`` / ``nats_server_factory``: ``factory(**kwargs)`` starts a broker of the
# test's own (a :class:`wirehub.brokers.RedisServer` / ``NatsServer``), closed after the test; use
# these to kill, stop, restart, pause or resume a broker.

BrokerFactory = Callable[..., BrokerProcess]


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A redis-server on a free port, shared by the test session (do not kill or pause it)."""
    server = RedisServer()
    server.start()
    yield server
    server.close()


@pytest.fixture(scope="session")
def nats_server() -> Iterator[NatsServer]:
    """A nats-server -js on a free port, shared by the test session (do not kill or pause it)."""
    server = NatsServer()
    server.start()
    yield server
    server.close()


def _factory(cls: type[BrokerProcess]) -> Iterator[Callable[..., BrokerProcess]]:
    started: list[BrokerProcess] = []

    def make(**kwargs: Any) -> BrokerProcess:
        server = cls(**kwargs)
        started.append(server)
        server.start()
        return server

    yield make
    for server in started:
        server.close()


@pytest.fixture
def redis_server_factory() -> Iterator[Callable[..., BrokerProcess]]:
    """``redis_server_factory(appendonly=True)``: a Redis of this test's own, closed after it."""
    yield from _factory(RedisServer)


@pytest.fixture
def nats_server_factory() -> Iterator[Callable[..., BrokerProcess]]:
    """``nats_server_factory()``: a NATS (JetStream) of this test's own, closed after it."""
    yield from _factory(NatsServer)
