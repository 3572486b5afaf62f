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
  Or provide only ``bus_config`` (a config's ``bus:`` block; parametrize it to run the suites on
  several buses): the default ``backend_pair``, ``backend``, ``small_history_backend`` and
  ``presence_replica`` here start replicas of it through ``bus_backends``
  (a :class:`~wirehub.testing.backends.BackendFactory`).

The fixtures are defined here; the rest lives in :mod:`~wirehub.testing.helpers`,
:mod:`~wirehub.testing.contracts`, :mod:`~wirehub.testing.presence_contracts` and
:mod:`~wirehub.testing.backends` and is imported from this module.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
from tornado.netutil import bind_sockets

from wirehub.app import Wirehub
from wirehub.brokers import BrokerProcess, NatsServer, RedisServer
from wirehub.bus import Backend, BusUnavailable
from wirehub.config import config_from_dict
from wirehub.testing.backends import IN_PROCESS_BUSES, BackendFactory, BusConfig, BusRegistry, find_buses
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
    "IN_PROCESS_BUSES",
    "BackendFactory",
    "BackendPair",
    "BrokerFactory",
    "BusConfig",
    "BusContract",
    "BusRegistry",
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
    "find_buses",
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
    """Factory: ``server = await wirehub_server({"endpoints": [...]})`` (merged over config_for_tests).

    Each server gets a node id of its own (``test-1``, ``test-2``, ...) unless ``server.node_id`` is given:
    replicas on one shared bus are distinct nodes, as pods are, not all the machine's hostname."""
    started: list[LiveServer] = []

    async def start(overrides: dict[str, Any] | None = None) -> LiveServer:
        settings = config_for_tests(overrides)
        settings["server"].setdefault("node_id", f"test-{len(started) + 1}")
        config = config_from_dict(settings, source="<test>")
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


# -- contract-suite backends from a bus config block ------------------------------------------------------------
#
# A test module provides ``bus_config`` (a ``bus:`` block; parametrize it to run on several buses, with a
# fresh key prefix per test); these defaults give the suites their backends. A module's own ``backend_pair``
# (or ``backend``, ...) takes precedence over these, as before they existed.


@pytest.fixture(scope="session")
def bus_registry() -> BusRegistry:
    """The bus factories of the built-in plugins and installed entry points, found once per session
    (override it to add ``plugins.load`` modules: ``return find_buses({"load": [...]})``)."""
    return find_buses()


@pytest.fixture
def bus_in_process() -> bool | None:
    """Whether the replicas of ``bus_config`` are one backend (its state lives in the process): None
    decides by the plugin's name (:data:`IN_PROCESS_BUSES`); override it for a bus of your own."""
    return None


@pytest.fixture
async def bus_backends(bus_config: BusConfig, bus_registry: BusRegistry,
                       bus_in_process: bool | None) -> AsyncIterator[BackendFactory]:
    """Started replicas of ``bus_config`` (see :class:`BackendFactory`), all closed after the test."""
    factory = BackendFactory(bus_config, registry=bus_registry, one_process=bus_in_process)
    yield factory
    await factory.close()


@pytest.fixture
async def backend_pair(bus_backends: BackendFactory) -> BackendPair:
    """Two started replicas of ``bus_config`` (one backend twice for an in-process bus)."""
    return await bus_backends.pair()


@pytest.fixture
def backend(backend_pair: BackendPair) -> Backend:
    """The first backend of ``backend_pair``."""
    return backend_pair[0][0]


@pytest.fixture
async def small_history_backend(bus_backends: BackendFactory) -> Backend:
    """A started replica of ``bus_config`` keeping at most 3 messages per room."""
    return (await bus_backends.replica(history_size=3))[0]


@pytest.fixture
def presence_replica(bus_backends: BackendFactory) -> ReplicaFactory:
    """``await presence_replica(**options)``: a new started replica of ``bus_config`` (same prefix)."""

    async def make(**options: Any) -> Backend:
        return (await bus_backends.replica(**options))[0]

    return make
