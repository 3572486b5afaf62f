"""wirehub.testing's BackendFactory: replicas of one bus config block, for the contract suites."""

from __future__ import annotations

import uuid

import pytest

from wirehub.brokers import RedisServer
from wirehub.config import ConfigError
from wirehub.testing import BackendFactory, BusRegistry, find_buses, unique_room


async def test_an_unknown_bus_is_refused_with_the_registered_names(bus_registry: BusRegistry) -> None:
    with pytest.raises(ConfigError, match=r"^bus\.plugin: 'nope' is not a registered bus; choose one of: .*memory"):
        BackendFactory({"plugin": "nope"}, registry=bus_registry)
    with pytest.raises(ConfigError, match=r"^bus\.redis: expected the options mapping"):
        BackendFactory({"plugin": "redis", "redis": "redis://x"}, registry=bus_registry)


def test_the_registry_has_the_built_in_buses() -> None:
    assert {"memory", "redis", "nats"} <= set(find_buses())


async def test_a_memory_pair_is_one_backend_twice_and_replicas_are_new() -> None:
    async with BackendFactory({"plugin": "memory"}) as replicas:
        (a, ra), (b, rb) = await replicas.pair()
        assert a is b and ra is rb
        small, _ = await replicas.replica(history_size=3)
        assert small is not a and len(replicas.made) == 2
    assert replicas.made == []


async def test_broker_replicas_are_separate_backends_on_one_prefix(redis_server: RedisServer) -> None:
    """Each replica has its own connections; what one publishes reaches the other's subscriber; the
    options of a replica override the block's; close() closes every one made."""
    block = {"plugin": "redis", "redis": {"url": redis_server.url, "key_prefix": f"t{uuid.uuid4().hex[:8]}"}}
    replicas = BackendFactory(block)
    try:
        (a, _), (b, rb) = await replicas.pair()
        assert a is not b and a.bus is not b.bus
        room = unique_room()
        await b.bus.subscribe(room)
        await a.bus.publish(room, b"hi", history=True)
        assert await rb.wait_for(room, 1) == [b"hi"]
        small, _ = await replicas.replica(history_size=3)
        other = unique_room()
        for i in range(5):
            await small.bus.publish(other, str(i).encode(), history=True)
        page = await small.history.read(other, None, 10)
        assert [p for _, p in page.messages] == [b"2", b"3", b"4"]
        assert len(replicas.made) == 3
    finally:
        await replicas.close()
    assert replicas.made == []


async def test_a_bus_of_ones_own_may_be_declared_in_process(bus_registry: BusRegistry) -> None:
    """A bus not named in IN_PROCESS_BUSES gives two backends, unless one_process says otherwise (the
    ``bus_in_process`` fixture)."""
    async with BackendFactory({"plugin": "memory"}, registry=bus_registry, one_process=False) as replicas:
        (a, _), (b, _) = await replicas.pair()
        assert a is not b
