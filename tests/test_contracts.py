"""The backend contract suites of service.testing, run against every backend (one parametrised suite)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from plugins.bus.memory import create_backend as memory_backend
from service.bus import Backend
from service.testing import (
    BackendPair,
    BusContract,
    HistoryContract,
    PresenceContract,
    Recorder,
    StateStoreContract,
)

# name -> async maker(request, options) -> (backend factory over one broker)
Maker = Callable[[pytest.FixtureRequest, dict[str, Any]], Awaitable[Callable[[], Backend]]]


async def _memory(request: pytest.FixtureRequest, options: dict[str, Any]) -> Callable[[], Backend]:
    # One process, one memory backend: both "replicas" share it.
    backend = memory_backend(options, "bus.memory")
    return lambda: backend


MAKERS: dict[str, Maker] = {"memory": _memory}
SMALL_HISTORY = {"memory": {"history_size": 3}}


@pytest.fixture(params=sorted(MAKERS))
def backend_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def _start_all(backends: list[Backend]) -> list[tuple[Backend, Recorder]]:
    """Start each distinct backend once with its own Recorder (a shared one keeps its recorder)."""
    recorders: dict[int, Recorder] = {}
    for b in backends:
        if id(b) not in recorders:
            recorders[id(b)] = Recorder()
            await b.bus.start(recorders[id(b)])
    return [(b, recorders[id(b)]) for b in backends]


@pytest.fixture
async def backend_pair(backend_kind: str, request: pytest.FixtureRequest) -> AsyncIterator[BackendPair]:
    make = await MAKERS[backend_kind](request, {})
    first, second = await _start_all([make(), make()])
    yield first, second
    for b in {id(b): b for b in (first[0], second[0])}.values():
        await b.bus.close()


@pytest.fixture
async def backend(backend_pair: BackendPair) -> Backend:
    return backend_pair[0][0]


@pytest.fixture
async def small_history_backend(backend_kind: str, request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    make = await MAKERS[backend_kind](request, {"history_size": 3, **SMALL_HISTORY.get(backend_kind, {})})
    backend = make()
    await backend.bus.start(Recorder())
    yield backend
    await backend.bus.close()


class TestBus(BusContract):
    pass


class TestHistory(HistoryContract):
    pass


class TestPresence(PresenceContract):
    pass


class TestStateStore(StateStoreContract):
    pass
