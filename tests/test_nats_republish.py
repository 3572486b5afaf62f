"""NATS live room delivery through the stream's RePublish and core subscriptions (plugins/bus/nats_bus.py):
no JetStream consumer per room, and the guarantees of docs/buses.md kept by gap detection (Nats-Last-Sequence),
gap fills from the stream's leader, duplicate drops, and the RePublish put back after an older replica removed
it. Real nats-server processes: the session's single server and the module's 3-node R3 cluster."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from tests.helpers import bus_options, started_nats
from wirehub.brokers import BrokerProcess
from wirehub.builtins.bus.nats import NatsBus, create_backend
from wirehub.nats_cluster import NatsCluster
from wirehub.testing import Recorder, eventually, unique_room

Make = Callable[..., Any]


@pytest.fixture
async def make(nats_server: BrokerProcess) -> AsyncIterator[Make]:
    """``await make(prefix, **options)``: a started backend (bus, recorder) on the session's nats-server."""
    async with started_nats() as start:
        yield lambda prefix, **extra: start(bus_options("nats", nats_server, prefix, **extra))


def _prefix() -> str:
    return f"rp{uuid.uuid4().hex[:8]}"


async def _subscribed(make: Make) -> tuple[NatsBus, Recorder, NatsBus, str]:
    """A reader following a new room and a writer, on one new prefix."""
    prefix = _prefix()
    reader, recorder = await make(prefix)
    writer, _ = await make(prefix)
    room = unique_room()
    await reader.subscribe(room)
    return reader, recorder, writer, room


async def _consumers(bus: NatsBus) -> int:
    return int((await bus.js.stream_info(bus.stream)).state.consumer_count)


def _offsets(recorder: Recorder, room: str) -> list[int | None]:
    return [o for r, _, o in recorder.messages if r == room]


async def test_rooms_are_followed_without_a_jetstream_consumer(make: Make) -> None:
    bus, recorder = await make(_prefix())
    rooms = [unique_room() for _ in range(30)]
    await asyncio.gather(*(bus.subscribe(r) for r in rooms))
    assert await _consumers(bus) == 0  # before: one ordered consumer per room
    for i, room in enumerate(rooms):
        await bus.publish(room, b"h%d" % i, history=True)
        await bus.publish(room, b"e%d" % i)
    for i, room in enumerate(rooms):
        assert await recorder.wait_for(room, 2) == [b"h%d" % i, b"e%d" % i]
    config = (await bus.js.stream_info(bus.stream)).config
    assert config.republish is not None and config.republish.dest == f"{bus.prefix}.rl.>"


async def test_a_message_the_subscription_missed_is_filled_in_order(make: Make, monkeypatch: pytest.MonkeyPatch
                                                                    ) -> None:
    """A republished message that never reached the subscription (dropped here on arrival) is found by the
    next message's Nats-Last-Sequence, read from the stream and delivered before it."""
    reader, recorder, writer, room = await _subscribed(make)
    real = reader._receive
    dropped: list[bytes] = []

    def lossy(room_: str, st: Any, msg: Any) -> None:
        if msg.data in (b"m2", b"m3") and msg.data not in dropped:
            dropped.append(msg.data)  # the core subscription never saw it
            return
        real(room_, st, msg)

    monkeypatch.setattr(reader, "_receive", lossy)
    offsets = [await writer.publish(room, b"m%d" % i, history=True) for i in range(6)]
    assert await recorder.wait_for(room, 6) == [b"m%d" % i for i in range(6)]
    assert _offsets(recorder, room) == offsets
    assert dropped == [b"m2", b"m3"] and reader.gap_fills >= 1
    # the tail holds the filled messages too: a read of the range needs no scan
    tail = reader.tails.get(room)
    assert tail is not None and tail.range(offsets[0], offsets[5]) is not None


async def _count_reads(url: str, stream: str) -> tuple[Any, list[str]]:
    """A connection of its own that sees every leader get and direct get of ``stream`` reach the broker."""
    import nats

    nc = await nats.connect(url)
    seen: list[str] = []

    async def note(msg: Any) -> None:
        seen.append(msg.subject)

    for subject in (f"$JS.API.DIRECT.GET.{stream}", f"$JS.API.STREAM.MSG.GET.{stream}"):
        await nc.subscribe(subject, cb=note)
    await nc.flush()
    return nc, seen


async def _long_gap(reader: NatsBus, recorder: Recorder, writer: NatsBus, room: str, url: str,
                    monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """300 history messages that never reach ``reader``'s subscription, then one that does: the gap is read
    back; returns the reads of the stream that reached the broker meanwhile."""
    first = await writer.publish(room, b"m000", history=True)
    assert await recorder.wait_for(room, 1) == [b"m000"]
    real = reader._receive

    def lossy(room_: str, st: Any, msg: Any) -> None:
        if msg.data in (b"m000", b"m301"):
            real(room_, st, msg)

    monkeypatch.setattr(reader, "_receive", lossy)
    nc, seen = await _count_reads(url, reader.stream)
    try:
        for i in range(1, 302):
            await writer.publish(room, b"m%03d" % i, history=True)
        got = await recorder.wait_for(room, 302, timeout=10)
        await nc.flush()
    finally:
        await nc.close()
    assert got == [b"m%03d" % i for i in range(302)]  # in order, each once
    assert _offsets(recorder, room) == list(range(first, first + 302))
    return seen


async def test_a_long_gap_is_read_in_a_few_batches(make: Make, nats_server: BrokerProcess,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A gap of 300 messages costs two batched direct gets (256 messages each at most), counted at the broker:
    it was 300 leader reads, one per message."""
    reader, recorder, writer, room = await _subscribed(make)
    seen = await _long_gap(reader, recorder, writer, room, nats_server.url, monkeypatch)
    assert reader.gap_fills == 1
    assert len(seen) == reader.fill_requests == 2, seen


async def test_a_gap_found_after_the_other_subject_moved_on_is_delivered_late_not_lost(
        make: Make, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The documented limit: a lost non-history message is only seen at the room's next non-history message;
    a history message delivered in between stays before it. Nothing is lost, and it is logged."""
    reader, recorder, writer, room = await _subscribed(make)
    real = reader._receive

    def lossy(room_: str, st: Any, msg: Any) -> None:
        if msg.data != b"e1":
            real(room_, st, msg)

    monkeypatch.setattr(reader, "_receive", lossy)
    await writer.publish(room, b"e0")
    await writer.publish(room, b"e1")  # never reaches the subscription
    await writer.publish(room, b"h0", history=True)
    await writer.publish(room, b"e2")
    assert await recorder.wait_for(room, 4) == [b"e0", b"h0", b"e1", b"e2"]
    await asyncio.sleep(0.2)
    assert len(recorder.of(room)) == 4
    assert "found late" in caplog.text


async def test_messages_are_delivered_once_when_republished_again(make: Make, monkeypatch: pytest.MonkeyPatch
                                                                  ) -> None:
    """A republished copy that arrives twice (a leader change republishes again) is delivered once."""
    reader, recorder, writer, room = await _subscribed(make)
    real = reader._receive

    def twice(room_: str, st: Any, msg: Any) -> None:
        real(room_, st, msg)
        real(room_, st, msg)

    monkeypatch.setattr(reader, "_receive", twice)
    for i in range(4):
        await writer.publish(room, b"h%d" % i, history=True)
        await writer.publish(room, b"e%d" % i)
    await recorder.wait_for(room, 8)
    await asyncio.sleep(0.2)
    assert recorder.of(room) == [b"%s%d" % (k, i) for i in range(4) for k in (b"h", b"e")]


async def test_a_full_subscription_drops_and_the_room_is_read_again(make: Make) -> None:
    """nats-py drops messages past a subscription's pending limit (a replica that fell behind): the room is
    read from the stream, so every message still arrives once, in order."""
    prefix = _prefix()
    reader, recorder = await make(prefix)
    writer, _ = await make(prefix)
    reader.pending_msgs_limit = 2
    room = unique_room()
    await reader.subscribe(room)
    sent = await asyncio.gather(*(writer.publish(room, b"m%03d" % i) for i in range(300)))
    assert sent == [None] * 300
    got = await recorder.wait_for(room, 300, timeout=10)
    await asyncio.sleep(0.2)
    stored = [m.data for m in await _stored(writer, room, 300)]
    assert recorder.of(room) == got == stored  # stream order, each once
    assert reader.gap_fills >= 1


async def test_a_drop_nats_py_reports_is_filled_without_a_later_message(make: Make,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The newest messages dropped (nothing after them shows a gap): the drop report alone reads them."""
    reader, recorder, writer, room = await _subscribed(make)
    await writer.publish(room, b"m0", history=True)
    await recorder.wait_for(room, 1)
    real = reader._receive
    sid = reader._followed[room].sub._id

    def full(room_: str, st: Any, msg: Any) -> None:
        if msg.data in (b"m1", b"m2"):
            reader._slow(sid)  # what nats-py's error callback reports instead of queueing it
            return
        real(room_, st, msg)

    monkeypatch.setattr(reader, "_receive", full)
    await writer.publish(room, b"m1", history=True)
    await writer.publish(room, b"m2")
    assert await recorder.wait_for(room, 3) == [b"m0", b"m1", b"m2"]
    await asyncio.sleep(0.2)
    assert recorder.of(room) == [b"m0", b"m1", b"m2"]


async def _stored(bus: NatsBus, room: str, count: int) -> list[Any]:
    sub = await bus.js.subscribe(bus.subject(room, "e"), stream=bus.stream, ordered_consumer=True)
    try:
        return [await sub.next_msg(timeout=2) for _ in range(count)]
    finally:
        await sub.unsubscribe()


def _held_back(bus: NatsBus, monkeypatch: pytest.MonkeyPatch, until: Callable[[], Awaitable[object]]) -> None:
    """``bus`` checks RePublish (advisory and upkeep) only once ``until()`` returned."""
    real = bus._assert_republish

    async def later(rs: Any) -> bool:
        await until()
        return await real(rs)

    monkeypatch.setattr(bus, "_assert_republish", later)


def _verified(bus: NatsBus, monkeypatch: pytest.MonkeyPatch) -> asyncio.Event:
    """Set once ``bus`` marked its followed rooms to be read again."""
    event, real = asyncio.Event(), bus._verify_all

    def verify_all(rs: Any) -> None:
        real(rs)
        event.set()

    monkeypatch.setattr(bus, "_verify_all", verify_all)
    return event


async def _restored(bus: NatsBus) -> bool:
    return (await bus.js.stream_info(bus.stream)).config.republish is not None


async def test_republish_removed_by_an_older_replica_is_restored_and_the_window_filled(
        make: Make, monkeypatch: pytest.MonkeyPatch) -> None:
    """An older replica's (re)start updates the stream without RePublish. The replicas put it back and
    read the followed rooms again: what was stored meanwhile arrives late but in order, nothing is lost.
    (The checks wait for the whole window: a message republished before this replica learnt of the
    window could come first, the documented limit of docs/buses.md.)"""
    reader, recorder, writer, room = await _subscribed(make)
    first = await writer.publish(room, b"before", history=True)
    await recorder.wait_for(room, 1)
    window = asyncio.Event()
    for bus in (reader, writer):
        _held_back(bus, monkeypatch, window.wait)
    old = dataclasses.replace(writer._stream_config, republish=None)
    await writer.js.update_stream(old)  # what the previous version's _open does
    during = [await writer.publish(room, b"during%d" % i, history=True) for i in range(3)]
    await writer.publish(room, b"during-e")  # none of these is republished until a replica restores it
    window.set()
    await eventually(lambda: _restored(writer), timeout=5)
    assert await recorder.wait_for(room, 5) == [b"before", b"during0", b"during1", b"during2", b"during-e"]
    after = await writer.publish(room, b"after", history=True)
    await recorder.wait_for(room, 6)
    assert recorder.of(room)[5:] == [b"after"]
    assert _offsets(recorder, room) == [first, *during, None, after]
    assert reader.republish_restored + writer.republish_restored >= 1


async def test_a_replica_that_finds_republish_already_restored_still_reads_the_window(
        make: Make, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another replica put RePublish back before this one looked (or won the race to update): what was
    stored in between reached no replica, so every update advisory reads the followed rooms again. The
    ephemeral message after the restore is not the next of its subject's gap: only that read finds it."""
    reader, recorder, writer, room = await _subscribed(make)
    await writer.publish(room, b"before", history=True)
    await recorder.wait_for(room, 1)
    window = asyncio.Event()

    async def after_the_writer() -> None:
        await window.wait()
        await eventually(lambda: _restored(writer), timeout=5)

    _held_back(writer, monkeypatch, window.wait)  # restores once the window holds messages
    _held_back(reader, monkeypatch, after_the_writer)  # finds it restored: nothing to put back
    verified = _verified(reader, monkeypatch)
    await writer.js.update_stream(dataclasses.replace(writer._stream_config, republish=None))
    for i in range(3):
        await writer.publish(room, b"during%d" % i, history=True)
    window.set()
    await asyncio.wait_for(verified.wait(), 5)
    await writer.publish(room, b"after-e")
    assert await recorder.wait_for(room, 5) == [b"before", b"during0", b"during1", b"during2", b"after-e"]
    assert reader.republish_restored == 0 and writer.republish_restored >= 1


async def test_a_window_learnt_of_after_a_later_message_of_the_other_subject_is_still_read(
        make: Make, monkeypatch: pytest.MonkeyPatch) -> None:
    """The ephemeral message after the window reached this replica before it learnt of the window (its
    check came late): the verifying read starts at each subject's last delivered message, not at the newest
    one, so the window's history messages arrive now (late, after it), not at the room's next history
    message, which may never come."""
    reader, recorder, writer, room = await _subscribed(make)
    await writer.publish(room, b"before", history=True)
    await recorder.wait_for(room, 1)
    window = asyncio.Event()

    async def after_the_ephemeral_message() -> None:
        await window.wait()
        await recorder.wait_for(room, 2)

    _held_back(writer, monkeypatch, window.wait)
    _held_back(reader, monkeypatch, after_the_ephemeral_message)
    await writer.js.update_stream(dataclasses.replace(writer._stream_config, republish=None))
    for i in range(3):
        await writer.publish(room, b"during%d" % i, history=True)
    window.set()
    await eventually(lambda: _restored(writer), timeout=5)
    await writer.publish(room, b"after-e")
    assert await recorder.wait_for(room, 5) == [b"before", b"after-e", b"during0", b"during1", b"during2"]


async def test_a_replica_start_and_its_keyed_publishes_leave_the_stream_as_it_is(make: Make) -> None:
    """Every update advisory makes every replica read its followed rooms again, so a start must not update
    the stream when only its dedupe window differs (set by the keyed publishes), nor reset that window, and a
    keyed publish with the window in place updates nothing."""
    prefix = _prefix()
    first, _ = await make(prefix)
    room = unique_room()
    await first.publish(room, b"k1", history=True, dedupe_key="k1", dedupe_window=600)  # sets the window: 1 update
    updates: list[bytes] = []

    async def updated(msg: Any) -> None:
        updates.append(msg.data)

    sub = await first.nc.subscribe(f"$JS.EVENT.ADVISORY.STREAM.UPDATED.{first.stream}", cb=updated)
    await first.nc.flush()
    second, _ = await make(prefix)
    await second.publish(room, b"k2", history=True, dedupe_key="k2", dedupe_window=600)
    assert await second.publish(room, b"k1 again", history=True, dedupe_key="k1", dedupe_window=600) == 1
    await first.nc.flush()
    await asyncio.sleep(0.2)
    assert updates == []
    assert (await first.js.stream_info(first.stream)).config.duplicate_window == 600
    await sub.unsubscribe()


async def test_a_join_right_after_subscribe_sees_every_later_message(make: Make) -> None:
    """subscribe() returns once the room's baseline is known: a message published after it is delivered even
    when the writer is another replica and publishes at once."""
    prefix = _prefix()
    reader, recorder = await make(prefix)
    writer, _ = await make(prefix)
    for _ in range(20):
        room = unique_room()
        await writer.publish(room, b"old", history=True)
        await reader.subscribe(room)
        await writer.publish(room, b"new", history=True)
        assert await recorder.wait_for(room, 1) == [b"new"]


# -- the R3 cluster -----------------------------------------------------------------------------------------


@pytest.fixture
async def cluster_replicas(nats_cluster: NatsCluster) -> AsyncIterator[list[tuple[NatsBus, Recorder]]]:
    prefix = _prefix()
    options = {"servers": nats_cluster.urls, "subject_prefix": prefix, "replicas": 3, "storage": "memory",
               "heartbeat_interval": 0.5, "heartbeat_timeout": 2.0, "op_timeout": 3.0, "presence_ttl": 3.0}
    made: list[tuple[NatsBus, Recorder]] = []
    for i in range(3):
        # each replica on another node: the stream's leader is remote for at least two of them
        backend = create_backend({**options, "servers": [nats_cluster.urls[i]]}, "bus.nats")
        recorder = Recorder()
        await backend.bus.start(recorder)
        assert isinstance(backend.bus, NatsBus)
        made.append((backend.bus, recorder))
    yield made
    for bus, _ in made:
        await bus.close()


async def test_three_replicas_on_the_cluster_deliver_one_order(
        cluster_replicas: list[tuple[NatsBus, Recorder]]) -> None:
    rooms = [unique_room() for _ in range(4)]
    for bus, _ in cluster_replicas:
        assert bus._clustered
        await asyncio.gather(*(bus.subscribe(r) for r in rooms))
    assert await _consumers(cluster_replicas[0][0]) == 0

    async def publisher(bus: NatsBus, who: int) -> None:
        for i in range(25):
            room = rooms[i % len(rooms)]
            if i % 3:
                await bus.publish(room, b"%d-%d" % (who, i), history=True)
            else:
                await bus.publish(room, b"%d-%d" % (who, i))

    await asyncio.gather(*(publisher(bus, w) for w, (bus, _) in enumerate(cluster_replicas)))
    for room in rooms:
        count = sum(1 for i in range(25) if rooms[i % len(rooms)] == room) * 3
        orders = [await rec.wait_for(room, count, timeout=10) for _, rec in cluster_replicas]
        assert orders[0] == orders[1] == orders[2] and len(set(orders[0])) == count
        offsets = [_offsets(rec, room) for _, rec in cluster_replicas]
        assert offsets[0] == offsets[1] == offsets[2]
        history = [o for o in offsets[0] if o is not None]
        assert history == list(range(history[0], history[0] + len(history)))


async def test_a_subscription_on_the_cluster_gets_every_message_after_it(
        cluster_replicas: list[tuple[NatsBus, Recorder]]) -> None:
    """The barrier: a replica that just subscribed (its node not the stream leader's) misses nothing that is
    published after subscribe() returned, by any replica."""
    (a, rec_a), (b, _), (c, _) = cluster_replicas
    for i in range(15):
        room = unique_room()
        await a.subscribe(room)
        writer = (b, c)[i % 2]
        await writer.publish(room, b"x", history=True)
        assert await rec_a.wait_for(room, 1) == [b"x"]


async def test_a_subscription_on_the_cluster_restores_a_removed_republish(
        cluster_replicas: list[tuple[NatsBus, Recorder]]) -> None:
    """An older replica removed RePublish: the barrier's probe does not come back; the subscription puts the
    setting back, probes again and succeeds, and the rooms followed before are read again."""
    (a, rec_a), (b, _), _ = cluster_replicas
    old_room = unique_room()
    await a.subscribe(old_room)
    await b.js.update_stream(dataclasses.replace(b._stream_config, republish=None))
    missed = await b.publish(old_room, b"while-off", history=True)
    room = unique_room()
    await a.subscribe(room)  # within op_timeout: half of it waiting, then restored and probed again
    assert (await a.js.stream_info(a.stream)).config.republish is not None
    await b.publish(room, b"after", history=True)
    assert await rec_a.wait_for(room, 1) == [b"after"]
    assert await rec_a.wait_for(old_room, 1) == [b"while-off"]
    assert _offsets(rec_a, old_room) == [missed]


async def test_after_a_leader_change_each_room_is_read_before_its_next_message(
        cluster_replicas: list[tuple[NatsBus, Recorder]], monkeypatch: pytest.MonkeyPatch) -> None:
    """A message the old leader stored and never republished (here: dropped on arrival) is read from the stream
    once the leader changed: before the room's next message, whatever its subject, and in a room that stays
    quiet by the upkeep."""
    (a, rec_a), (b, _), _ = cluster_replicas
    busy, quiet = unique_room(), unique_room()
    await a.subscribe(busy)
    await a.subscribe(quiet)
    real = a._receive
    lost = {b"busy-e", b"quiet-e"}

    def lossy(room_: str, st: Any, msg: Any) -> None:
        if msg.data not in lost:
            real(room_, st, msg)

    monkeypatch.setattr(a, "_receive", lossy)
    await b.publish(busy, b"busy-e")
    await b.publish(quiet, b"quiet-e")
    await asyncio.sleep(0.3)
    assert rec_a.of(busy) == rec_a.of(quiet) == []
    answer = await b.request("test", f"$JS.API.STREAM.LEADER.STEPDOWN.{b.stream}", b"")
    assert answer.get("success"), answer

    async def told() -> bool:
        return busy in a._unverified or a._followed[busy].seq > 0

    await eventually(told, timeout=10)
    await eventually(lambda: _published(b, busy, b"busy-h"), timeout=10)  # the new leader takes writes
    assert await rec_a.wait_for(busy, 2) == [b"busy-e", b"busy-h"]  # stream order, the lost one first
    assert await rec_a.wait_for(quiet, 1, timeout=10) == [b"quiet-e"]  # the upkeep's sweep


async def _published(bus: NatsBus, room: str, payload: bytes) -> bool:
    try:
        await bus.publish(room, payload, history=True)
    except Exception:
        return False
    return True


async def test_a_long_gap_on_the_cluster_is_read_in_a_few_batches(
        cluster_replicas: list[tuple[NatsBus, Recorder]], nats_cluster: NatsCluster,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """On the cluster a follower may answer a direct get: the batches, then one leader read that finds nothing
    more (or the messages a lagging follower did not have yet)."""
    (a, rec_a), (b, _), _ = cluster_replicas
    room = unique_room()
    await a.subscribe(room)
    seen = await _long_gap(a, rec_a, b, room, nats_cluster.urls[0], monkeypatch)
    assert a.gap_fills == 1
    assert len(seen) == a.fill_requests <= 4, seen
