"""Issue 12, defect 9: no needless ``gap`` after a broker restart.

Two replicas on a real broker of the test's own; a subscriber on each; a publisher on replica A that
publishes with acks at a steady rate while the broker is killed and restarted (without persistence:
the room's history, and so its epoch, is lost each time). Replica B reconnects later than A (a larger
backoff), so the messages its members miss were published after the restart, into the new epoch's
history. Every acked message must reach both subscribers exactly once, in order; the only ``gap`` is
the one for the lost epoch (``offset: 0``: nothing of the new epoch is lost), and each subscriber's
position ends where the room is.

One exception, which no server can avoid: the publish in flight when the broker is killed may be
acked to A (Redis wrote A's reply) while the same PUBLISH never reaches B's subscriber connection
(Redis died before writing it, or B dropped what it had not read yet when it noticed the death).
That message existed only in the old epoch's history, which the restart lost: it is part of what the
``gap {epoch, offset: 0}`` announces. So a subscriber may miss the *tail* of a lost epoch, and
nothing else: everything it got of an epoch is a prefix of that epoch's acked messages, it gets the
start of every new epoch (the replay from history) and all of the last one.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from tests.helpers import bus_options
from wirehub.brokers import BrokerProcess
from wirehub.client import Client
from wirehub.testing import LiveServer, WsClient, unique_room

RESTARTS = 3
#: seconds between two publishes of the publisher
PUBLISH_EVERY = 0.01


async def until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"not within {timeout}s: {what}"
        await asyncio.sleep(0.02)


class Listener:
    """A subscriber that stays connected: every message and gap, in arrival order."""

    def __init__(self, ws: WsClient, room: str) -> None:
        self.ws, self.room = ws, room
        self.frames: list[dict[str, Any]] = []
        self.task: asyncio.Task[None] | None = None

    async def join(self) -> dict[str, Any]:
        joined = await self.ws.request({"op": "join", "room": self.room})
        assert joined["op"] == "joined", joined
        self.joined = joined
        self.task = asyncio.ensure_future(self._read())
        return joined

    async def _read(self) -> None:
        with contextlib.suppress(ConnectionError):
            while True:
                frame = await self.ws.recv(60)
                if frame.get("op") in ("message", "gap"):
                    self.frames.append(frame)

    def seqs(self) -> list[int]:
        return [f["data"]["seq"] for f in self.frames if f["op"] == "message"]

    def gaps(self) -> list[dict[str, Any]]:
        return [f for f in self.frames if f["op"] == "gap"]

    def position(self) -> tuple[int, str]:
        """Where a client that follows the frames is: offsets grow within an epoch, a gap moves it."""
        offset, epoch = self.joined["offset"], self.joined["epoch"]
        for f in self.frames:
            if f["op"] == "gap":
                assert f["epoch"] != epoch or f["offset"] >= offset, f"gap moved back: {f}"
                offset, epoch = f["offset"], f["epoch"]
            else:
                assert f["offset"] > offset, f"offset {f['offset']} after {offset} in epoch {epoch}"
                offset = f["offset"]
        return offset, epoch

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.wait([self.task])


async def publisher(ws: WsClient, room: str, acked: list[int], offsets: list[int], stop: asyncio.Event) -> None:
    """Publish ``{seq}`` every PUBLISH_EVERY s; ``acked`` gets the seq of each publish answered ``ack``,
    ``offsets`` its offset (an offset below the previous one starts a new epoch)."""
    seq = 0
    while not stop.is_set():
        seq += 1
        reply = await ws.request({"op": "publish", "room": room, "data": {"seq": seq}}, timeout=10)
        if reply["op"] == "ack":
            acked.append(seq)
            offsets.append(reply["offset"])
        else:
            # unavailable: not published; timeout: handed to the broker as it died, outcome unknown
            assert reply["op"] == "error" and reply["code"] in ("unavailable", "timeout"), reply
        await asyncio.sleep(PUBLISH_EVERY)


def epochs_of(acked: list[int], offsets: list[int]) -> list[list[int]]:
    """The acked seqs split by epoch: offsets grow within an epoch and start over in a new one."""
    epochs: list[list[int]] = []
    previous = None
    for seq, offset in zip(acked, offsets, strict=True):
        if previous is None or offset <= previous:
            epochs.append([])
        epochs[-1].append(seq)
        previous = offset
    return epochs


def check_delivery(name: str, got: list[int], epochs: list[list[int]]) -> None:
    """``got`` (seqs in arrival order) has each acked message once, in order, and misses only the tail
    of a lost epoch: the publish that raced the kill (see the module docstring)."""
    acked = {seq for epoch in epochs for seq in epoch}
    seqs = [s for s in got if s in acked]
    assert len(seqs) == len(set(seqs)), f"{name}: duplicates"
    assert seqs == sorted(seqs), f"{name}: out of order"
    received = set(seqs)
    *lost, last = epochs
    assert not set(last) - received, f"{name}: lost {sorted(set(last) - received)} of the last epoch"
    for i, epoch in enumerate(lost):
        kept = [s for s in epoch if s in received]
        assert kept == epoch[: len(kept)], f"{name}: lost {sorted(set(epoch) - received)} inside epoch {i}"
        if i > 0:  # a new epoch's start came from history (B) or live (A): it is never lost
            assert kept, f"{name}: the start of epoch {i} was not replayed"


async def restarts(broker: BrokerProcess, a: LiveServer, b: LiveServer, acked: list[int]) -> tuple[int, int]:
    """Kill and restart the broker at least RESTARTS times while the replicas are busy, more (up to twice as
    many) until some publish was acked while A was back and B not yet (B's backoff timer may fire just after
    the restart); returns how many were, and the restarts made."""
    bus_a, bus_b = a.app.backend.bus, b.app.backend.bus
    behind = rounds = 0
    while rounds < RESTARTS or (not behind and rounds < 2 * RESTARTS):
        rounds += 1
        await asyncio.sleep(0.4)
        broker.kill()
        await until(lambda: not bus_a.healthy and not bus_b.healthy, 5, "both replicas notice the kill")
        await asyncio.sleep(1.0)  # B's backoff has grown meanwhile, A's is capped at 0.1 s
        broker.start()
        await until(lambda: bus_a.healthy, 10, "A reconnects")
        before = len(acked)
        await until(lambda: bus_b.healthy, 10, "B reconnects")
        behind += len(acked) - before
    await asyncio.sleep(0.4)
    return behind, rounds


async def test_no_acked_message_is_lost_across_broker_restarts(
        kind: str, broker: BrokerProcess, wirehub_server: Callable[..., Awaitable[LiveServer]]) -> None:
    prefix = f"g{uuid.uuid4().hex[:6]}"
    extra = {"storage": "memory"} if kind == "nats" else {}  # a restart loses the history, as Redis does
    chat = {"path": "/ws/chat", "handler": "chat", "options": {"publish_rate": 1000, "publish_burst": 1000}}

    def config(max_backoff: float) -> dict[str, Any]:
        opts = bus_options(kind, broker, prefix, max_backoff=max_backoff, **extra)
        return {"bus": {"plugin": kind, kind: opts}, "endpoints": [chat]}

    # B reconnects up to a second later than A: its members miss what A's publisher sends meanwhile
    a, b = await wirehub_server(config(0.1)), await wirehub_server(config(2.0))
    room = unique_room("gap")
    pub = await a.ws("/ws/chat", welcome=True)
    assert (await pub.request({"op": "join", "room": room}))["op"] == "joined"
    for seq in range(-30, 0):  # some history first: the listeners' join positions are not 0
        ack = await pub.request({"op": "publish", "room": room, "data": {"seq": seq}})
        assert ack["op"] == "ack"
    listeners = [Listener(await server.ws("/ws/chat", welcome=True), room) for server in (a, b)]
    for listener in listeners:
        assert (await listener.join())["offset"] == ack["offset"] >= 30
    # and a client of the Python library on B, which keeps its position from the frames
    lib = Client(b.ws_url("/ws/chat"), backoff_min=0.05, backoff_max=0.2, ping_interval=0)
    try:
        lib_seqs: list[int] = []
        sub = await lib.join(room, lambda m: lib_seqs.append(m["data"]["seq"]))
        acked: list[int] = []
        offsets: list[int] = []
        stop = asyncio.Event()
        pub_task = asyncio.ensure_future(publisher(pub, room, acked, offsets, stop))
        try:
            behind, rounds = await restarts(broker, a, b, acked)
        finally:
            stop.set()
            await asyncio.wait_for(pub_task, 15)
        assert behind > 0, "B never reconnected after A: the race was not exercised"
        epochs = epochs_of(acked, offsets)
        assert len(epochs) == rounds + 1, f"acked offsets {offsets}"
        # the last epoch is never lost: once its last message arrived everywhere, everything has
        want = set(epochs[-1])
        with contextlib.suppress(AssertionError):  # the exact counts are asserted below
            await until(lambda: want <= set(lib_seqs) and all(want <= set(x.seqs()) for x in listeners), 10,
                        "every acked message arrives")
        history = await pub.request({"op": "history", "room": room, "limit": 1})
        check_delivery("lib", lib_seqs, epochs)
        assert sub.position == {"offset": history["offset"], "epoch": history["epoch"]}
        assert lib.connections == 1  # it stayed connected
    finally:
        for listener in listeners:
            await listener.stop()
        await lib.close()
    for name, listener in zip("AB", listeners, strict=True):
        check_delivery(name, listener.seqs(), epochs)
        # one gap per restart, for the lost epoch only: the new epoch is replayed from its start
        gaps = listener.gaps()
        assert [g["offset"] for g in gaps] == [0] * rounds, f"{name}: {gaps}"
        assert len({g["epoch"] for g in gaps}) == rounds
        assert listener.position() == (history["offset"], history["epoch"]), name

    # bystanders on both replicas are served
    for server in (a, b):
        other = await server.ws("/ws/chat", welcome=True)
        assert (await other.request({"op": "ping"}))["op"] == "pong"
        assert (await other.request({"op": "join", "room": room}))["offset"] == history["offset"]


def test_delivery_check_allows_only_the_tail_of_a_lost_epoch() -> None:
    """The check above against the failure seen on a loaded machine (seq 34, the publish in flight at
    the first kill, acked to A, never reached B; 35..121 were refused while the broker was down), and
    against the losses it must still catch."""
    epochs = [list(range(1, 35)), list(range(122, 160)), list(range(200, 240)), list(range(280, 300))]
    everything = [s for epoch in epochs for s in epoch]
    check_delivery("B", [s for s in everything if s != 34], epochs)
    check_delivery("B", [s for s in everything if s not in (33, 34, 159)], epochs)
    losses = {
        "a replay dropped after the gap": [s for s in everything if not 122 <= s < 130],
        "inside a lost epoch": [s for s in everything if s != 20],
        "of the last epoch": [s for s in everything if s != 299],
        "a whole new epoch": [s for s in everything if not 200 <= s < 240],
    }
    for what, got in losses.items():
        with pytest.raises(AssertionError):
            check_delivery(what, got, epochs)
    with pytest.raises(AssertionError, match="duplicates"):
        check_delivery("B", [*everything[:50], everything[49], *everything[50:]], epochs)
    with pytest.raises(AssertionError, match="out of order"):
        check_delivery("B", [*everything[:50], everything[51], everything[50], *everything[52:]], epochs)
