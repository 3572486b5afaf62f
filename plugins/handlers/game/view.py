"""The read side of a game room on this replica: its *view* of the room and the view's members.

A :class:`_View` subscribes the room on the hub through a :class:`_RoomTap` (so bus messages
reach the view, not the clients directly), holds the room's document at the version its members
were last sent, puts the entries it receives in version order (entries of one replica can
overtake another's on the bus), checks that each one continues the commit it holds (epoch and
parent commit), applies runs of consecutive versions and sends each run to its members as one
``patch`` frame, encoded once. A hole that is not filled within ``gap_timeout``, an entry from
another epoch or history, a bus reconnect and the periodic check against the store
(``verify_interval``) all end in a *resync*: the view reloads the store's state and sends every
member a fresh ``state``. A member whose send queue is over ``slow_client_bytes`` skips patches
and gets one fresh ``state`` once it has drained.

The handler (``handler.py``) owns the views (``GameHandler.views``) and calls :meth:`_View.load`,
:meth:`_View.maintain` and :meth:`_View.resync`; the commit path (``commit.py``) feeds a view
directly when the bus is down.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import jsonpatch

from wirehub import BusUnavailable, Identity, OutFrame, Session, dumps
from wirehub.builtins.handlers.game.options import _APPLY_ERRORS

if TYPE_CHECKING:
    from wirehub.builtins.handlers.game.handler import GameHandler

log = logging.getLogger("wirehub.game")


class _NullTransport:
    """The tap is a hub member that never writes to a socket."""

    def send_frame(self, frame: OutFrame) -> None:
        return None

    def buffered(self) -> int:
        return 0

    def close(self, code: int, reason: str) -> None:
        return None

    @property
    def closed(self) -> bool:
        return False


class _RoomTap(Session):
    """The view's hub membership: bus messages of the room go to the view, not to clients."""

    def __init__(self, view: _View, endpoint: str, node: str) -> None:
        super().__init__(_NullTransport(), Identity(user="game-view"), endpoint=endpoint, node=node,
                         max_queue_bytes=1 << 62)
        self.view = view

    def deliver(self, room: str, frame: OutFrame, offset: int | None) -> None:
        try:
            self.view.on_bus(frame.payload)
        except Exception:
            log.exception("room %s: a bus message could not be handled; resyncing", self.view.room)
            self.view.handler.spawn(self.view.resync())


@dataclass(eq=False)
class _Member:
    session: Session
    #: skips patches until it gets a fresh state (joined, synced or slow)
    need_state: bool = False


# An entry: (epoch, version, commit, parent, ops, users)
_Entry = tuple[str, int, str, "str | None", list[Any], list[str]]


class _View:
    """One room on this replica: its members, the document they were sent, the reorder buffer."""

    def __init__(self, handler: GameHandler, room: str) -> None:
        self.handler = handler
        self.room = room
        self.key = handler.key(room)
        self.members: dict[Session, _Member] = {}
        self.tap = _RoomTap(self, handler.context.endpoint.path, handler.context.node)
        self.lock = asyncio.Lock()
        self.ready = False
        self.busy = False  # loading or resyncing: bus entries are only buffered
        self.epoch: str | None = None
        self.version = 0
        self.head: str | None = None
        self.doc: Any = None
        self._doc_json: str | None = None
        self._state_frame: OutFrame | None = None
        self.recent: dict[int, str] = {}  # version -> commit, the last ones applied
        self._recent_order: deque[int] = deque()
        self.pending: dict[int, _Entry] = {}
        #: a version known to exist (from the store) that the view has not reached yet
        self.known_top = 0
        self.catchup_deadline: float | None = None
        self.next_verify = 0.0
        self.checking = False
        #: syncs waiting for the view to reach a version
        self.waiters: list[tuple[int, asyncio.Future[None]]] = []

    # -- state ---------------------------------------------------------------------------------------

    def _set(self, found: tuple[int, Any] | None) -> None:
        version, epoch, head, doc = self.handler.unwrap(found)
        self.version, self.epoch, self.head, self.doc = version, epoch, head, doc
        self._doc_json = None
        self._state_frame = None
        self.recent.clear()
        self._recent_order.clear()
        self.pending = {v: e for v, e in self.pending.items() if v > version and (epoch is None or e[0] == epoch)}
        self.known_top = 0
        self.catchup_deadline = None
        self.next_verify = self.handler.loop_time() + self.handler.options.verify_interval
        self.wake(everyone=True)

    def wake(self, everyone: bool = False) -> None:
        if not self.waiters:
            return
        keep = []
        for version, fut in self.waiters:
            if everyone or version <= self.version:
                if not fut.done():
                    fut.set_result(None)
            else:
                keep.append((version, fut))
        self.waiters = keep

    @property
    def doc_json(self) -> str:
        if self._doc_json is None:
            self._doc_json = dumps(self.doc)
        return self._doc_json

    def state_payload(self, req_id: Any = None) -> bytes:
        head = '{"op":"state",' + (f'"id":{dumps(req_id)},' if req_id is not None else "")
        return (f'{head}"room":{dumps(self.room)},"version":{self.version},"state":{self.doc_json}}}').encode()

    def state_frame(self) -> OutFrame:
        if self._state_frame is None:
            self._state_frame = OutFrame(self.state_payload())
        return self._state_frame

    async def load(self) -> None:
        """Subscribe, then read the store: every commit after the read reaches the view."""
        hub = self.handler.context.hub
        self.busy = True
        try:
            await hub.join(self.handler.bus_room(self.room), self.tap)
            try:
                found = await self.handler.stored(self.key)
            except BaseException:
                await hub.leave(self.handler.bus_room(self.room), self.tap)
                raise
            self._set(found)
            self.ready = True
        finally:
            self.busy = False
        self.advance()

    # -- inbound entries -----------------------------------------------------------------------------

    def on_bus(self, payload: bytes) -> None:
        msg = json.loads(payload)
        if msg.get("op") != "commits":
            return
        epoch = msg["epoch"]
        diverged = False
        for version, commit, parent, ops, users in msg["entries"]:
            if self.ready and not self.busy and version <= self.version:
                seen = self.recent.get(version)
                if epoch != self.epoch or (seen is not None and seen != commit):
                    diverged = True
                continue
            self.pending[version] = (epoch, version, commit, parent, ops, users)
        if diverged:
            log.warning("room %s: an entry from another history of the room; resyncing", self.room)
            self.handler.spawn(self.resync())
            return
        if self.ready and not self.busy:
            self.advance()

    def advance(self) -> None:
        """Apply and send the run of consecutive versions that is complete."""
        run: list[_Entry] = []
        version, head, epoch = self.version, self.head, self.epoch
        while (entry := self.pending.get(version + 1)) is not None:
            e_epoch, _, commit, parent, _, _ = entry
            fresh = version == 0 and parent is None
            if not fresh and (e_epoch != epoch or parent != head):
                log.warning("room %s: version %d does not continue commit %s; resyncing", self.room, version + 1,
                            head)
                self.handler.spawn(self.resync())
                break
            del self.pending[version + 1]
            run.append(entry)
            version, head, epoch = version + 1, commit, e_epoch
        if run:
            self._apply_run(run)
        for v in [v for v in self.pending if v <= self.version]:
            del self.pending[v]
        if self.known_top <= self.version and not self.pending:
            self.known_top = 0
            self.catchup_deadline = None
        elif run or self.catchup_deadline is None:
            # something is missing: resync if the view makes no progress for gap_timeout (under a
            # steady load some version is nearly always in flight, so progress resets the clock)
            self.catchup_deadline = self.handler.loop_time() + self.handler.options.gap_timeout

    def _apply_run(self, run: list[_Entry]) -> None:
        ops: list[Any] = []
        users: list[str] = []
        for entry in run:
            ops.extend(entry[4])
            for user in entry[5]:
                if user not in users:
                    users.append(user)
        first, last = run[0][1], run[-1][1]
        # encoded before the ops are applied: applying inserts their values into the document
        frame = OutFrame(dumps({"op": "patch", "room": self.room, "from_version": first, "version": last,
                                "patch": ops, "by": users}).encode())
        doc = self.doc
        try:
            for entry in run:
                doc = jsonpatch.apply_patch(doc, entry[4], in_place=True)
        except _APPLY_ERRORS as exc:
            log.error("room %s: committed version %d does not apply here (%s); resyncing", self.room, last, exc)
            self.handler.spawn(self.resync())
            return
        self.doc = doc
        self._doc_json = None
        self._state_frame = None
        self.epoch = run[-1][0]
        self.version = last
        self.head = run[-1][2]
        for entry in run:
            self.recent[entry[1]] = entry[2]
            self._recent_order.append(entry[1])
        while len(self._recent_order) > 1024:
            self.recent.pop(self._recent_order.popleft(), None)
        self.forward(frame)
        self.wake()

    def forward(self, frame: OutFrame) -> None:
        slow = self.handler.options.slow_client_bytes
        n = 0
        for m in self.members.values():
            if m.need_state:
                continue
            buffered = m.session.buffered
            if buffered and buffered + len(frame) > slow:
                m.need_state = True
                self.handler.coalesced.inc()
                continue
            m.session.send_frame(frame)
            n += 1
        self.handler.context.metrics.deliveries.inc(n)
        self.serve_states()

    def serve_states(self) -> None:
        """Send the current state to members waiting for one whose queue has drained."""
        low = self.handler.options.slow_client_bytes // 2
        for m in self.members.values():
            if m.need_state and m.session.buffered <= low and not m.session.closed:
                m.session.send_frame(self.state_frame())
                m.need_state = False

    # -- repair ------------------------------------------------------------------------------------

    async def resync(self) -> None:
        """Reload the state from the store and send it to every member."""
        if self.busy or not self.ready:
            return
        self.busy = True
        try:
            found = await self.handler.stored(self.key)
        except BusUnavailable:
            self.busy = False
            self.next_verify = self.handler.loop_time() + min(1.0, self.handler.options.gap_timeout)
            self.catchup_deadline = self.next_verify
            return
        except BaseException:
            self.busy = False
            raise
        self.busy = False
        self.handler.resyncs.inc()
        self._set(found)
        for m in self.members.values():
            m.need_state = True
        self.advance()
        self.serve_states()

    async def verify(self) -> None:
        """Compare with the store: equal is fine, ahead waits for the entries, anything else resyncs."""
        if self.checking or self.busy or not self.ready:
            return
        self.checking = True
        try:
            found = await self.handler.stored(self.key)
        except BusUnavailable:
            self.next_verify = self.handler.loop_time() + 1.0
            return
        finally:
            self.checking = False
        now = self.handler.loop_time()
        self.next_verify = now + self.handler.options.verify_interval
        if self.busy:
            return
        version, epoch, head, _ = self.handler.unwrap(found)
        if version == self.version and epoch == self.epoch and head == self.head:
            return
        if version > self.version and (self.epoch is None or epoch == self.epoch):
            self.known_top = max(self.known_top, version)
            if self.catchup_deadline is None:
                self.catchup_deadline = now + self.handler.options.gap_timeout
            return
        log.warning("room %s: the store is at version %d (%s), this replica at %d (%s); resyncing", self.room,
                    version, epoch, self.version, self.epoch)
        await self.resync()

    def maintain(self, now: float, force_verify: bool) -> None:
        if not self.ready:
            return
        if self.catchup_deadline is not None and now >= self.catchup_deadline:
            log.info("room %s: versions after %d did not arrive in time; resyncing", self.room, self.version)
            self.catchup_deadline = None
            self.handler.spawn(self.resync())
        elif force_verify or (self.handler.options.verify_interval and now >= self.next_verify):
            self.handler.spawn(self.verify())
        if any(m.need_state for m in self.members.values()):
            self.serve_states()

