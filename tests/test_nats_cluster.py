"""The nats bus on a real 3-node NATS cluster with replicated JetStream (R3 stream and KV buckets): the
backend contract suites, and the stream and buckets placed on all three nodes.

One cluster per module (started once, never killed here: test_nats_failover.py has its own)."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
from nats.js.errors import NoKeysError

from wirehub.builtins.bus.nats import NatsBus
from wirehub.builtins.bus.nats import create_backend as nats_backend
from wirehub.bus import Backend
from wirehub.nats_cluster import NatsCluster
from wirehub.testing import (
    BackendPair,
    BusContract,
    Footprint,
    HistoryContract,
    PresenceContract,
    PresenceExpiryContract,
    Recorder,
    StateStoreContract,
)

FAST = {"heartbeat_interval": 0.5, "heartbeat_timeout": 2.0, "op_timeout": 3.0, "presence_ttl": 3.0}


@pytest.fixture(scope="module")
def cluster() -> Iterator[NatsCluster]:
    c = NatsCluster()
    try:
        c.start()
        yield c
    finally:
        c.close()


@pytest.fixture
def make_options(cluster: NatsCluster) -> Callable[..., dict[str, Any]]:
    prefix = f"t{uuid.uuid4().hex[:8]}"
    return lambda **o: {"servers": cluster.urls, "subject_prefix": prefix, "replicas": 3, "storage": "memory",
                        **FAST, **o}


async def _started(options: dict[str, Any]) -> tuple[Backend, Recorder]:
    backend = nats_backend(options, "bus.nats")
    recorder = Recorder()
    await backend.bus.start(recorder)
    return backend, recorder


@pytest.fixture
async def backend_pair(make_options: Callable[..., dict[str, Any]]) -> AsyncIterator[BackendPair]:
    first = await _started(make_options())
    second = await _started(make_options())
    yield first, second
    await first[0].bus.close()
    await second[0].bus.close()


@pytest.fixture
async def backend(backend_pair: BackendPair) -> Backend:
    return backend_pair[0][0]


@pytest.fixture
async def small_history_backend(make_options: Callable[..., dict[str, Any]]) -> AsyncIterator[Backend]:
    backend, _ = await _started(make_options(history_size=3))
    yield backend
    await backend.bus.close()


@pytest.fixture
def footprint(backend: Backend) -> Footprint:
    async def keys() -> list[str]:
        bus = backend.bus
        assert isinstance(bus, NatsBus) and bus.presence is not None
        info = await bus.js.stream_info(bus.stream, subjects_filter=">")
        out = [f"s:{subject}" for subject in (info.state.subjects or {})]
        for kv in (bus.presence.members_kv, bus.state_kv):
            with contextlib.suppress(NoKeysError):
                out += [f"{kv._name}:{key}" for key in await kv.keys()]
        return sorted(out)

    return keys


class TestBus(BusContract):
    pass


class TestHistory(HistoryContract):
    pass


class TestPresence(PresenceContract):
    pass


class TestStateStore(StateStoreContract):
    pass


@pytest.fixture
async def presence_replica(
        make_options: Callable[..., dict[str, Any]]) -> AsyncIterator[Callable[..., Awaitable[Backend]]]:
    made: list[Backend] = []

    async def make(**options: Any) -> Backend:
        backend, _ = await _started(make_options(**options))
        made.append(backend)
        return backend

    yield make
    for backend in made:
        await backend.bus.close()


@pytest.fixture
async def broker_ops(cluster: NatsCluster, make_options: Callable[..., dict[str, Any]]
                     ) -> AsyncIterator[Callable[[], Awaitable[int]]]:
    """Messages stored in this test's KV buckets (puts, purges, creates), as in test_contracts."""
    import nats

    nc = await nats.connect(cluster.urls)
    js = nc.jetstream()
    ours = f"KV_{make_options()['subject_prefix']}_"

    async def ops() -> int:
        return sum(int(info.state.last_seq) for info in await js.streams_info() if info.config.name.startswith(ours))

    yield ops
    await nc.close()


class TestPresenceExpiry(PresenceExpiryContract):
    pass


async def test_stream_and_buckets_have_three_replicas_on_three_nodes(
        make_options: Callable[..., dict[str, Any]]) -> None:
    backend, _ = await _started(make_options(storage="file"))
    try:
        bus = backend.bus
        assert isinstance(bus, NatsBus)
        await bus.publish("r3-room", b"x", history=True)
        names = [bus.stream, *[f"KV_{bus.prefix}_{b}" for b in ("members", "nodes", "claims", "state")]]
        for name in names:
            info = await bus.js.stream_info(name)
            assert info.config.num_replicas == 3, name
            placed = {info.cluster.leader, *(r.name for r in info.cluster.replicas or [])}
            assert placed == {"n1", "n2", "n3"}, (name, placed)
    finally:
        await backend.bus.close()
