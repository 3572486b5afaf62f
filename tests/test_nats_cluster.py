"""The nats bus on a real 3-node NATS cluster with replicated JetStream (R3 stream and KV buckets): the
backend contract suites, and the stream and buckets placed on all three nodes.

The module's cluster (tests/conftest.py's nats_cluster); never killed here."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from nats.js.errors import NoKeysError

from wirehub.builtins.bus.nats import NatsBus
from wirehub.builtins.bus.nats import create_backend as nats_backend
from wirehub.bus import Backend
from wirehub.nats_cluster import NatsCluster
from wirehub.testing import (
    BusContract,
    Footprint,
    HistoryContract,
    PresenceContract,
    PresenceExpiryContract,
    Recorder,
    StateStoreContract,
)

FAST = {"heartbeat_interval": 0.5, "heartbeat_timeout": 2.0, "op_timeout": 3.0, "presence_ttl": 3.0}


@pytest.fixture
def cluster(nats_cluster: NatsCluster) -> NatsCluster:
    return nats_cluster


@pytest.fixture
def make_options(cluster: NatsCluster) -> Callable[..., dict[str, Any]]:
    prefix = f"t{uuid.uuid4().hex[:8]}"
    return lambda **o: {"servers": cluster.urls, "subject_prefix": prefix, "replicas": 3, "storage": "memory",
                        **FAST, **o}


@pytest.fixture
def bus_config(make_options: Callable[..., dict[str, Any]]) -> dict[str, Any]:
    """The bus block of this test (wirehub.testing's backend_pair, backend, ... start replicas of it)."""
    return {"plugin": "nats", "nats": make_options()}


async def _started(options: dict[str, Any]) -> tuple[Backend, Recorder]:
    backend = nats_backend(options, "bus.nats")
    recorder = Recorder()
    await backend.bus.start(recorder)
    return backend, recorder


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
async def broker_ops(cluster: NatsCluster, bus_config: dict[str, Any]
                     ) -> AsyncIterator[Callable[[], Awaitable[int]]]:
    """Messages stored in this test's KV buckets (puts, purges, creates), as in test_contracts."""
    import nats

    nc = await nats.connect(cluster.urls)
    js = nc.jetstream()
    ours = f"KV_{bus_config['nats']['subject_prefix']}_"

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
