"""NATS rooms hashed over several streams (``bus.nats.room_streams``): the bus and history contracts at 3
streams, the hash every replica agrees on, gap fills per stream, the refusal of a server whose room streams are
of another count, and the streams' leaders spread over the R3 cluster's nodes. Real nats-server processes."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import nats.errors
import pytest

from tests.helpers import FAST_BUS, bus_options, started_nats
from wirehub.brokers import BrokerProcess
from wirehub.builtins.bus import nats_leaders, nats_live
from wirehub.builtins.bus.nats import NatsBus, create_backend
from wirehub.bus import Backend, BusUnavailable, PublishOutcomeUnknown
from wirehub.nats_cluster import NatsCluster, NatsNode
from wirehub.testing import BusContract, Footprint, HistoryContract, Recorder, eventually, unique_room

STREAMS = 3
Make = Callable[..., Any]


@pytest.fixture
def bus_config(nats_server: BrokerProcess) -> dict[str, Any]:
    """The contract suites' bus block: three room streams on the session's nats-server."""
    return {"plugin": "nats", "nats": {"servers": [nats_server.url], "subject_prefix": f"t{uuid.uuid4().hex[:8]}",
                                       "storage": "memory", "room_streams": STREAMS, **FAST_BUS}}


@pytest.fixture
def footprint(backend: Backend) -> Footprint:
    """The subjects of every room stream."""
    bus = backend.bus
    assert isinstance(bus, NatsBus)

    async def subjects() -> list[str]:
        out: list[str] = []
        for rs in bus.streams:
            info = await bus.js.stream_info(rs.name, subjects_filter=">")
            out += [f"s:{subject}" for subject in (info.state.subjects or {})]
        return sorted(out)

    return subjects


class TestBus(BusContract):
    pass


class TestHistory(HistoryContract):
    pass


@pytest.fixture
async def make(nats_server: BrokerProcess) -> AsyncIterator[Make]:
    """``await make(prefix, **options)``: a started backend (bus, recorder) on the session's nats-server."""
    async with started_nats() as start:
        yield lambda prefix, **extra: start(bus_options("nats", nats_server, prefix, **extra))


def _prefix() -> str:
    return f"rs{uuid.uuid4().hex[:8]}"


async def test_rooms_spread_over_the_streams_by_a_hash_every_replica_agrees_on(make: Make) -> None:
    prefix = _prefix()
    a, rec_a = await make(prefix, room_streams=STREAMS)
    b, _ = await make(prefix, room_streams=STREAMS)
    assert [rs.name for rs in a.streams] == [f"{prefix}_rooms_{i}of3" for i in range(STREAMS)]
    rooms = [f"room-{i}" for i in range(60)]
    assert [a.stream_of(r).index for r in rooms] == [b.stream_of(r).index for r in rooms]
    # a fixed mapping (crc32 of the base64url name), the same in every process and version
    assert [a.stream_of(r).index for r in ("lobby", "room-1", "room-7")] == [2, 0, 1]
    assert sorted(collections.Counter(a.stream_of(r).index for r in rooms).values()) == [19, 20, 21]
    await asyncio.gather(*(a.subscribe(r) for r in rooms))
    for i, room in enumerate(rooms):
        await b.publish(room, b"h%d" % i, history=True)
        await b.publish(room, b"e%d" % i)
    for i, room in enumerate(rooms):
        assert await rec_a.wait_for(room, 2) == [b"h%d" % i, b"e%d" % i]
    for rs in a.streams:
        info = await a.js.stream_info(rs.name, subjects_filter=">")
        assert info.config.republish.dest == f"{prefix}.{rs.live}.>"
        held = {s.split(".")[2] for s in info.state.subjects or {}}
        assert held == {a.subject(r).split(".")[2] for r in rooms if a.stream_of(r) is rs}
    epochs = {rs.epoch for rs in a.streams}
    assert len(epochs) == STREAMS and a.epoch_of(rooms[0]) == a.stream_of(rooms[0]).epoch


async def test_a_gap_in_a_room_of_another_stream_is_filled_in_order(make: Make,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    prefix = _prefix()
    reader, recorder = await make(prefix, room_streams=STREAMS)
    writer, _ = await make(prefix, room_streams=STREAMS)
    room = next(r for r in (unique_room() for _ in range(100)) if reader.stream_of(r).index == 2)
    await reader.subscribe(room)
    real = reader._receive

    def lossy(room_: str, st: Any, msg: Any) -> None:
        if msg.data not in (b"m1", b"m2", b"m3"):
            real(room_, st, msg)

    monkeypatch.setattr(reader, "_receive", lossy)
    for i in range(5):
        await writer.publish(room, b"m%d" % i, history=True)
    assert await recorder.wait_for(room, 5) == [b"m%d" % i for i in range(5)]
    assert reader.gap_fills == 1


@pytest.mark.parametrize(("first", "then"), [(1, 3), (3, 1), (3, 4)])
async def test_a_server_with_room_streams_of_another_count_is_refused(make: Make, first: int, then: int) -> None:
    """Rooms hash to other streams at another count: a replica that started anyway would split rooms into
    two orders and two histories. It refuses, naming the key."""
    prefix = _prefix()
    old, _ = await make(prefix, room_streams=first)
    await old.close()
    with pytest.raises(BusUnavailable, match=rf"bus\.nats\.room_streams: room_streams is {then} but the server "
                                             rf"holds the room streams {prefix}_rooms"):
        await make(prefix, room_streams=then)
    again, recorder = await make(prefix, room_streams=first)  # the same count starts
    room = unique_room()
    await again.subscribe(room)
    await again.publish(room, b"x")
    assert await recorder.wait_for(room, 1) == [b"x"]


def _cluster_options(cluster: NatsCluster, prefix: str) -> dict[str, Any]:
    return {"servers": cluster.urls, "subject_prefix": prefix, "replicas": 3, "room_streams": STREAMS, **FAST_BUS}


class _Leaders:
    """The room streams' leaders as ``bus`` reads them."""

    def __init__(self, bus: NatsBus) -> None:
        self.bus = bus

    async def read(self) -> list[str]:
        """Each stream's leader; [] while any stream has none (no answer, or an answer without a leader: both
        happen during an election, and a None counted as a node made 2 + 1 + None read as spread)."""
        try:
            leaders = [(await self.bus.js.stream_info(rs.name)).cluster for rs in self.bus.streams]
        except nats.errors.Error:
            return []
        named = [c.leader for c in leaders if c is not None and c.leader]
        return named if len(named) == len(leaders) else []

    async def spread(self) -> bool:
        return len(set(await self.read())) == STREAMS

    async def all_on_one_node(self) -> str:
        """Once the bus's own spreading (beside its start) is over, every leader moved onto one node: its name."""
        await eventually(self.spread, timeout=15)
        await asyncio.sleep(nats_leaders.SPREAD_JITTER + 0.5)
        node = (await self.known())[0]
        await self.move([node] * STREAMS)
        return node

    async def known(self) -> list[str]:
        """Every stream's leader, once each stream has one."""
        now: list[str] = []

        async def all_led() -> bool:
            now[:] = await self.read()
            return len(now) == STREAMS

        await eventually(all_led, timeout=15)
        return now

    async def move(self, placement: list[str]) -> None:
        """Stream ``i``'s leader moved onto ``placement[i]`` (the test's own elections)."""
        now = await self.known()
        for rs, node, was in zip(self.bus.streams, placement, now, strict=True):
            if node != was:
                await self.bus.request("test", f"$JS.API.STREAM.LEADER.STEPDOWN.{rs.name}",
                                       b'{"placement": {"preferred": "%s"}}' % node.encode())

        async def placed() -> bool:
            return await self.read() == placement

        await eventually(placed, timeout=15)


async def test_the_streams_leaders_are_spread_over_the_cluster_s_nodes(nats_cluster: NatsCluster) -> None:
    """JetStream may elect every stream's leader on one node (which then orders every publish): a replica
    that starts moves leaders until each node leads one. Here all three are first moved onto one node."""
    options = _cluster_options(nats_cluster, _prefix())
    async with started_nats() as start:
        bus, _ = await start(options)
        leaders = _Leaders(bus)
        await leaders.all_on_one_node()
        other, _ = await start(options)  # a replica's start (or reconnect) spreads them again
        await eventually(leaders.spread, timeout=15)
        room = unique_room()
        await bus.subscribe(room)
        await other.publish(room, b"after", history=True)

        async def delivered() -> bool:  # a followed room's position moves when its live copy gets the message
            return await bus.position(room) >= 1

        await eventually(delivered, timeout=10)


async def test_replicas_starting_together_move_each_leader_once(nats_cluster: NatsCluster) -> None:
    """Each replica moved leaders on what it saw at its connect: replicas starting together (a rolling update,
    a mass reconnect) could each ask the same streams to step down, and every election stalls the stream's
    publishes. Now one replica at a time spreads them, the one holding the claim in the state bucket: while
    another replica holds it a starting replica moves nothing; a claim whose replica died lapses; and all three
    leaders on one node then take two elections, however many replicas start."""
    prefix = _prefix()
    options = _cluster_options(nats_cluster, prefix)
    async with started_nats() as start:
        bus, _ = await start(options)
        leaders = _Leaders(bus)
        node = await leaders.all_on_one_node()
        await asyncio.sleep(0.5)
        elected: list[str] = []

        async def count(msg: Any) -> None:
            if msg.subject.rpartition(".")[2].startswith(f"{prefix}_rooms_"):
                elected.append(msg.subject)

        await bus.nc.subscribe("$JS.EVENT.ADVISORY.STREAM.LEADER_ELECTED.*", cb=count)
        await bus.nc.flush()
        # another replica is spreading them (its claim is fresh): a replica that starts leaves them
        await bus.state_kv.put(nats_leaders.SPREAD_KEY, b"%.3f" % time.time())
        await start(options)
        await asyncio.sleep(nats_leaders.SPREAD_JITTER + 1.0)
        assert elected == [] and await leaders.read() == [node] * STREAMS
        # that replica died while spreading: its claim lapses, and of the replicas starting together one moves
        # two leaders, each once
        await bus.state_kv.put(nats_leaders.SPREAD_KEY, b"%.3f" % (time.time() - nats_leaders.SPREAD_CLAIM - 1))
        await asyncio.gather(*(start(options) for _ in range(3)))
        await eventually(leaders.spread, timeout=15)
        await asyncio.sleep(nats_leaders.SPREAD_JITTER + 1.0)  # every replica's spreading is over
        assert await leaders.spread()
        assert len(elected) == STREAMS - 1, elected


#: the install's leader check cadence in the tests below (CHECK_INTERVAL is 60 s)
CADENCE = 0.5


async def _elections(bus: NatsBus, prefix: str) -> list[str]:
    """The room streams of ``prefix`` that elect a leader from now on, in order (their advisories)."""
    elected: list[str] = []

    async def count(msg: Any) -> None:
        if msg.subject.rpartition(".")[2].startswith(f"{prefix}_rooms_"):
            elected.append(msg.subject.rpartition(".")[2])

    await bus.nc.subscribe("$JS.EVENT.ADVISORY.STREAM.LEADER_ELECTED.*", cb=count)
    await bus.nc.flush()
    return elected


async def _publish_until(writer: NatsBus, rooms: list[str], stop: asyncio.Event,
                         acked: dict[str, list[bytes]], unknown: set[bytes]) -> None:
    """History publishes into ``rooms`` in turn until ``stop``; what was acknowledged, per room, and what may
    have been stored (no answer). A refused publish (BusUnavailable) was not stored."""
    i = 0
    while not stop.is_set():
        room = rooms[i % len(rooms)]
        payload = b"%06d" % i
        i += 1
        try:
            await writer.publish(room, payload, history=True)
            acked[room].append(payload)
        except PublishOutcomeUnknown:
            unknown.add(payload)
            await asyncio.sleep(0.05)
        except BusUnavailable:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.005)


async def test_the_leaders_spread_again_once_a_killed_node_returns(nats_cluster: NatsCluster) -> None:
    """When a node dies its streams' leaders move to the survivors, and nothing moved them back when it
    returned: two nodes ordered every publish until a replica restarted. Now the install's check (every
    CHECK_INTERVAL seconds from the upkeep; here CADENCE) finds a node leading more than its share twice in a
    row and moves one leader back, with no replica restarting; publishes into a room of each stream meanwhile
    reach the reader in order, nothing acknowledged lost, nothing twice."""
    prefix = _prefix()
    victim = nats_cluster.nodes[2]
    # the replicas stay connected to the survivors throughout: none reconnects (a connect spreads them too)
    options = {**_cluster_options(nats_cluster, prefix),
               "servers": [n.url for n in nats_cluster.nodes if n is not victim]}
    stop = asyncio.Event()
    async with started_nats() as start:
        (reader, recorder), (writer, _) = await _checking_pair(start, options)
        leaders = _Leaders(reader)
        rooms = [next(r for r in (unique_room() for _ in range(200)) if reader.stream_of(r) is rs)
                 for rs in reader.streams]
        for room in rooms:
            await reader.subscribe(room)
        acked: dict[str, list[bytes]] = {room: [] for room in rooms}
        unknown: set[bytes] = set()
        publishing = asyncio.ensure_future(_publish_until(writer, rooms, stop, acked, unknown))
        try:
            await asyncio.sleep(0.5)
            victim.kill()

            async def moved_to_survivors() -> bool:
                now = await leaders.read()
                return len(now) == STREAMS and victim.name not in now

            await eventually(moved_to_survivors, timeout=30)
            assert not await leaders.spread()  # 2 + 1 on the survivors
            moves = reader.leaders.moved + writer.leaders.moved
            await asyncio.to_thread(victim.start)
            await asyncio.to_thread(nats_cluster.wait_healthy, [victim])
            await eventually(leaders.spread, timeout=30)  # each node leads one again
            # one leader moved back, by the checks (nobody connected)
            assert reader.leaders.moved + writer.leaders.moved == moves + 1
            await asyncio.sleep(0.5)
        finally:
            stop.set()
            await publishing
            nats_cluster.restore()
        for room in rooms:
            assert len(acked[room]) > 10
            await eventually(lambda room=room: _all_in(recorder.of(room), acked[room]), timeout=15)  # type: ignore[misc]
            got = recorder.of(room)
            assert got == sorted(got) and len(set(got)) == len(got), "out of order or twice"
            assert set(got) <= set(acked[room]) | unknown


async def _checking_pair(start: Any, options: dict[str, Any]) -> list[tuple[NatsBus, Recorder]]:
    """Two replicas whose upkeeps check the placement every CADENCE, once their connect-time spreading is over
    and every stream has a leader of its own."""
    pair = [await start(options), await start(options)]
    for bus, _ in pair:
        bus.leaders.interval = CADENCE
    await eventually(_Leaders(pair[0][0]).spread, timeout=15)
    await asyncio.sleep(nats_leaders.SPREAD_JITTER + 0.5)  # the connect-time spreads are over
    return pair


async def _all_in(got: list[bytes], acked: list[bytes]) -> bool:
    return set(acked) <= set(got)


async def test_a_balanced_cluster_s_checks_move_no_leader(nats_cluster: NatsCluster) -> None:
    """The checks run on (both replicas' upkeeps, one check per CADENCE for the install: a replica that finds
    a recent check of another leaves it) and, the leaders being spread, cause no election at all."""
    prefix = _prefix()
    options = _cluster_options(nats_cluster, prefix)
    async with started_nats() as start:
        (a, _), (b, _) = await _checking_pair(start, options)
        leaders = _Leaders(a)
        elected = await _elections(a, prefix)
        checks, moved = a.leaders.checks + b.leaders.checks, a.leaders.moved + b.leaders.moved

        async def checked() -> bool:
            return a.leaders.checks + b.leaders.checks >= checks + 4

        await eventually(checked, timeout=15)
        assert elected == [] and a.leaders.moved + b.leaders.moved == moved
        assert await leaders.spread()
        entry = await a.state_kv.get(nats_leaders.CHECK_KEY)
        assert entry.value.split()[1] == b"0"  # no check in a row found a node over its share
        # a replica whose look comes right after another's check reads nothing
        a.leaders.interval = b.leaders.interval = 3600.0
        await asyncio.sleep(1.0)  # the looks due at the old cadence are over
        await a.leaders.check(a.acks, force=True)
        before = b.leaders.checks
        assert not await b.leaders.check(b.acks)
        assert b.leaders.checks == before


async def test_leaders_move_only_when_two_checks_in_a_row_find_a_node_over_its_share(
        nats_cluster: NatsCluster) -> None:
    """Hysteresis: each election stalls a stream and makes every replica read its rooms again, so one look at
    an unbalanced cluster (a node that returned and may die again) moves nothing; a balanced check in between
    starts the count again; the second check in a row moves the leaders (two elections, all three having been
    on one node). The checks are called here (the upkeep's cadence set beyond the test)."""
    prefix = _prefix()
    async with started_nats() as start:
        bus, _ = await start(_cluster_options(nats_cluster, prefix))
        bus.leaders.interval = 3600.0
        leaders = _Leaders(bus)
        node = await leaders.all_on_one_node()
        others = sorted({n.name for n in nats_cluster.nodes} - {node})
        await bus.state_kv.delete(nats_leaders.CHECK_KEY)  # the first upkeep's check, whatever it saw
        elected = await _elections(bus, prefix)
        moved = bus.leaders.moved  # at its connect
        assert await bus.leaders.check(bus.acks, force=True)  # over: 1 in a row
        await asyncio.sleep(1.0)
        assert bus.leaders.moved == moved and elected == [] and await leaders.read() == [node] * STREAMS
        await leaders.move([node, *others])  # balanced again before the next check (the test's elections)
        assert await bus.leaders.check(bus.acks, force=True)  # not over: 0 in a row
        await leaders.move([node] * STREAMS)
        assert await bus.leaders.check(bus.acks, force=True)  # over: 1 in a row
        await asyncio.sleep(1.0)
        assert bus.leaders.moved == moved and await leaders.read() == [node] * STREAMS
        del elected[:]
        assert await bus.leaders.check(bus.acks, force=True)  # over: 2 in a row, the leaders move
        await eventually(leaders.spread, timeout=15)
        assert bus.leaders.moved == moved + STREAMS - 1
        await asyncio.sleep(1.0)
        assert len(elected) == STREAMS - 1, elected  # each moved leader once
        # the move starts the count again: a leader that did not go where asked is asked again two checks later
        assert nats_leaders._parse((await bus.state_kv.get(nats_leaders.CHECK_KEY)).value)[1] == 0
        # a check recorded by a replica whose clock runs an hour ahead is not waited for
        await bus.state_kv.put(nats_leaders.CHECK_KEY, b"%.3f 1" % (time.time() + 3600))
        bus.leaders.interval = 60.0
        assert await bus.leaders.check(bus.acks)
        assert nats_leaders._parse((await bus.state_kv.get(nats_leaders.CHECK_KEY)).value)[0] <= time.time()


class _NoListing(NatsNode):
    """A nats-server whose one user may do everything but list the streams."""

    def config(self) -> str:
        return super().config() + ('authorization { users: [{user: "w", password: "p", permissions: '
                                   '{publish: {deny: ["$JS.API.STREAM.NAMES"]}}}] }\n')


async def test_a_user_not_allowed_to_list_streams_starts_without_the_check(
        caplog: pytest.LogCaptureFixture) -> None:
    """The check needs ``$JS.API.STREAM.NAMES``; a user allowed its own streams only is not refused for it."""
    with _NoListing() as node:
        backend = create_backend({"servers": [node.url], "user": "w", "password": "p", "subject_prefix": _prefix(),
                                  "room_streams": STREAMS, **FAST_BUS}, "bus.nats")
        recorder = Recorder()
        await backend.bus.start(recorder)
        try:
            room = unique_room()
            await backend.bus.subscribe(room)
            await backend.bus.publish(room, b"x", history=True)
            assert await recorder.wait_for(room, 1) == [b"x"]
        finally:
            await backend.bus.close()
    assert "room streams not checked against room_streams" in caplog.text


async def test_the_upkeep_checks_the_republish_of_a_few_streams_in_turn(make: Make) -> None:
    """One STREAM.INFO per room stream per upkeep was ~500 requests/s at 64 streams and 40 replicas: each upkeep
    checks REPUBLISH_PER_UPKEEP of them, in turn, so every stream gets its turn."""
    bus, _ = await make(_prefix(), room_streams=6, presence_ttl=120.0)  # no upkeep of its own meanwhile
    assert bus.acks is not None
    real = bus.acks.request
    asked: list[str] = []

    async def counting(subject: str, payload: bytes, headers: dict[str, str] | None = None) -> dict[str, Any]:
        if subject.startswith("$JS.API.STREAM.INFO.") and "_rooms" in subject:
            asked.append(subject.rpartition(".")[2])
        return await real(subject, payload, headers)

    bus.acks.request = counting  # type: ignore[method-assign]
    for _ in range(3):
        before = len(asked)
        await bus._refresh()
        assert len(asked) - before == nats_live.REPUBLISH_PER_UPKEEP
    assert sorted(asked) == sorted(rs.name for rs in bus.streams)


async def test_a_stream_updated_without_republish_is_put_back_at_once(make: Make) -> None:
    """The stream's update advisory makes each replica check that stream then, not at its upkeep turn (which
    may come room_streams / REPUBLISH_PER_UPKEEP upkeeps later)."""
    prefix = _prefix()
    reader, recorder = await make(prefix, room_streams=STREAMS, presence_ttl=120.0)
    writer, _ = await make(prefix, room_streams=STREAMS, presence_ttl=120.0)
    room = unique_room()
    await reader.subscribe(room)
    rs = writer.stream_of(room)
    await writer.js.update_stream(dataclasses.replace(rs.config, republish=None))  # an older replica's start
    await writer.publish(room, b"while-off", history=True)

    async def restored() -> bool:
        return (await writer.js.stream_info(rs.name)).config.republish is not None

    await eventually(restored, timeout=3)
    assert await recorder.wait_for(room, 1) == [b"while-off"]


async def test_replicas_of_two_counts_starting_together_do_not_both_start(make: Make,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The check before the streams are made passes for both on an empty server (here: the second replica's
    first check ran before the first replica made its stream); the check after them refuses."""
    prefix = _prefix()
    await make(prefix, room_streams=1)
    real = NatsBus._check_layout
    calls: list[int] = []

    async def late(self: NatsBus, acks: Any) -> bool:
        calls.append(1)
        if len(calls) > 1:
            return await real(self, acks)
        return True  # the first listed the server while it was still empty

    monkeypatch.setattr(NatsBus, "_check_layout", late)
    with pytest.raises(BusUnavailable, match=rf"bus\.nats\.room_streams: room_streams is 3 but the server holds the "
                                             rf"room streams {prefix}_rooms of another"):
        await make(prefix, room_streams=3)
