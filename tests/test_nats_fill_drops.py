"""Gap fills whose answers overflow the acks inbox (nats-py drops messages past a subscription's pending limit):
the batch's chain of sequences shows the hole, the overflow fails the requests under way, and the fill asks
again in smaller batches, so the room still gets every message in order. Real nats-server processes."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import nats
import nats.errors
import pytest

from tests.helpers import bus_options
from wirehub.brokers import BrokerProcess
from wirehub.builtins.bus.nats import NatsBus, create_backend
from wirehub.builtins.bus.nats_acks import Acks, Dropped
from wirehub.testing import Recorder, unique_room

#: the acks inbox's pending byte limit in these tests (nats-py's default is 128 MiB)
LIMIT = 64 * 1024
#: messages of the gap, and their payload size: a batch of 256 is 4 times the limit
GAP = 600
SIZE = 1024


def _payload(i: int) -> bytes:
    return b"%05d" % i + b"x" * (SIZE - 5)


@pytest.fixture
async def pair(nats_server: BrokerProcess) -> AsyncIterator[tuple[NatsBus, Recorder, NatsBus]]:
    """(reader, its recorder, writer): two replicas of one install on the session's nats-server."""
    prefix = f"fd{uuid.uuid4().hex[:8]}"
    made = []
    for _ in range(2):
        backend = create_backend(bus_options("nats", nats_server, prefix, history_size=2 * GAP, op_timeout=5.0),
                                 "bus.nats")
        made.append((backend, Recorder()))
        await backend.bus.start(made[-1][1])
    reader, writer = made[0][0].bus, made[1][0].bus
    assert isinstance(reader, NatsBus) and isinstance(writer, NatsBus)
    yield reader, made[0][1], writer
    for backend, _ in made:
        await backend.bus.close()


async def test_a_gap_fill_that_overflows_the_acks_inbox_still_delivers_every_message_in_order(
        pair: tuple[NatsBus, Recorder, NatsBus], monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """The reviewer's case: 256 answers of 1 KiB into a 64 KiB inbox delivered 189 with 2 holes, silently."""
    reader, recorder, writer = pair
    assert reader.acks is not None
    reader.acks._sub._pending_bytes_limit = LIMIT
    room = unique_room()
    await reader.subscribe(room)
    real = reader._receive

    def lossy(room_: str, st: Any, msg: Any) -> None:
        if msg.data[:5] in (b"%05d" % 0, b"%05d" % (GAP - 1)):  # every message between is missed live
            real(room_, st, msg)

    monkeypatch.setattr(reader, "_receive", lossy)
    for i in range(GAP):
        await writer.publish(room, _payload(i), history=i % 2 == 0)
    got = await recorder.wait_for(room, GAP, timeout=20)
    assert [m[:5] for m in got] == [b"%05d" % i for i in range(GAP)]
    assert reader.gap_fills == 1
    assert "the acks inbox overflowed" in caplog.text  # the case happened (else this test shows nothing)


async def test_a_batch_with_a_lost_message_is_refused_not_delivered_with_a_hole(nats_server: BrokerProcess) -> None:
    """Without the bus's overflow handling (nats-py's error callback does nothing here) the chain of
    ``Nats-Last-Sequence`` / ``Nats-Num-Pending`` alone finds the hole: the batch fails with its intact prefix."""
    drops = 0

    async def on_error(exc: Exception) -> None:
        nonlocal drops
        drops += isinstance(exc, nats.errors.SlowConsumerError)

    nc = await nats.connect(nats_server.url, error_cb=on_error)
    name = f"FD{uuid.uuid4().hex[:8]}"
    try:
        js = nc.jetstream()
        await js.add_stream(name=name, subjects=[f"{name}.*"], allow_direct=True)
        for i in range(300):
            await js.publish(f"{name}.{'a' if i % 3 else 'b'}", _payload(i))
        acks = Acks(nc, 5.0)
        await acks.start()
        acks._sub._pending_bytes_limit = LIMIT
        req = json.dumps({"seq": 1, "next_by_subj": f"{name}.*", "batch": 256, "max_bytes": 1 << 20}).encode()
        try:
            msgs, _ = await acks.batch(f"$JS.API.DIRECT.GET.{name}", req)
            raise AssertionError(f"{len(msgs)} of 256 delivered as a whole batch")
        except Dropped as exc:
            msgs = exc.msgs
        assert drops > 0
        seqs = [int(m.headers["Nats-Sequence"]) for m in msgs]
        assert seqs == list(range(1, len(seqs) + 1)) and len(seqs) < 256
        await js.delete_stream(name)
    finally:
        await nc.close()
