"""History on NATS: a room's retained history messages by offset, from the tail of a room the replica follows
(:mod:`~wirehub.builtins.bus.nats_tail`) or read back from the bus's stream."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from wirehub import HistoryPage
from wirehub.builtins.bus.nats_live import HDR_OFFSET, HDR_START
from wirehub.builtins.bus.nats_tail import Entry

if TYPE_CHECKING:
    from wirehub.builtins.bus.nats_bus import NatsBus


_Scan = list[Entry]


class NatsHistory:
    def __init__(self, bus: NatsBus) -> None:
        self.bus = bus
        #: scans in flight by (room, floor, top, epoch): the reads of a reconnect storm share them
        self._scans: dict[tuple[str, int, int, str], asyncio.Future[_Scan]] = {}

    async def position(self, room: str) -> tuple[int, str]:
        # no round trip while this replica follows the room (see NatsBus.position)
        top = await self.bus.position(room)
        return top, self.bus.epoch_of(room)

    async def read(self, room: str, after: int | None, limit: int) -> HistoryPage:
        bus = self.bus
        bus._check()
        epoch = bus.epoch_of(room)
        tail = bus.tails.get(room)
        ready = tail is not None and tail.ready  # before the newest message is asked for: see Tails.seed
        seq, top, _ = await bus.newest(room)
        if seq == 0:
            return HistoryPage(epoch, 0, [], after is None or after == 0)
        if after is not None and after > top:
            return HistoryPage(epoch, top, [], False)
        if (after is not None and after == top) or bus.opts.history_size == 0:
            return HistoryPage(epoch, top, [], after is None or after == top)
        if after is None and limit <= 0:
            return HistoryPage(epoch, top, [], True)
        floor = top - limit if after is None else after
        found = await self._from_tail(room, seq, floor, top)
        if found is None:
            # an offset never exceeds its stream sequence: floor + 1 is a safe place to start reading
            found = await self._shared_scan(room, floor, top)
            if ready and tail is not None and epoch == bus.epoch_of(room):
                bus.tails.seed(room, tail, floor, found, seq)
        if after is None:
            return HistoryPage(epoch, top, [(o, p) for o, p, _, _ in found][-limit:], True)
        complete = bool(found) and (found[0][0] == after + 1 or (after == 0 and found[0][2]))
        return HistoryPage(epoch, top, [(o, p) for o, p, _, _ in found[:limit]] if complete else [], complete)

    async def _from_tail(self, room: str, seq: int, floor: int, top: int) -> _Scan | None:
        """The range from the room's tail (:mod:`~wirehub.builtins.bus.nats_tail`) once its subscription
        delivered ``seq`` (the newest message this read saw); None when it does not hold the whole range. Waiting is
        safe only once the tail has a sequence (a delivered message, or a seeded range, see
        :meth:`~wirehub.builtins.bus.nats_tail.Tails.seed`): every later message then comes through the
        subscription, while one whose baseline is after ``seq`` never delivers it."""
        tails = self.bus.tails
        tail = tails.get(room)
        if tail is None or not tail.seq or not await tails.reach(room, tail, seq, self.bus.op_timeout):
            return None
        tails.expire(tail)
        return tail.range(floor, top)

    async def _shared_scan(self, room: str, floor: int, top: int) -> _Scan:
        """:meth:`_scan`, one per (room, floor, top, epoch) at a time. Each scan is an ephemeral consumer: a
        reconnect storm's rejoins with the same ``since`` (every member of a killed replica saw the same last
        message) made one each, and nats-server spent about 20 ms of CPU per rejoin on them. Sharing is
        exact: the stream's messages up to ``top`` (which each caller read itself, after it joined) are
        what any scan of that range returns."""
        key = (room, floor, top, self.bus.epoch_of(room))  # a stream made again reuses offsets: never its scans
        scan = self._scans.get(key)
        if scan is None:
            scan = asyncio.ensure_future(self.bus.call("history", lambda: self._scan(room, floor, top)))
            self._scans[key] = scan
            scan.add_done_callback(lambda done: self._scan_done(key, done))
        return await asyncio.shield(scan)  # a caller's cancellation leaves the scan to the others

    def _scan_done(self, key: tuple[str, int, int, str], scan: asyncio.Future[_Scan]) -> None:
        del self._scans[key]
        if not scan.cancelled():
            scan.exception()  # retrieved: every caller may have gone (each got its own CancelledError)

    async def _scan(self, room: str, floor: int, top: int) -> _Scan:
        """Retained history messages of ``room`` with offset > floor, up to ``top``, in order."""
        bus = self.bus
        api = bus.nats.js.api
        config = api.ConsumerConfig(deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
                                    opt_start_seq=max(1, floor + 1))
        sub = await bus.js.subscribe(bus.subject(room), stream=bus.stream_of(room).name, ordered_consumer=True,
                                     config=config)
        out: _Scan = []
        try:
            while True:
                msg = await sub.next_msg(timeout=bus.op_timeout)
                hdr = msg.headers or {}
                offset = int(hdr.get(HDR_OFFSET, 0))
                if offset > floor:
                    out.append((offset, msg.data, HDR_START in hdr, msg.metadata.timestamp.timestamp()))
                if offset >= top or msg.metadata.num_pending == 0:
                    return out
        finally:
            await sub.unsubscribe()
