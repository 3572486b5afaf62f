"""One Yjs document loaded on this replica: the pycrdt ``Doc``, its members and its bus room.

A :class:`Document` subscribes the document's bus room on the hub through a :class:`_Tap` (bus
messages reach the document, not the clients directly). Updates from clients of this replica are
checked, published with history (the log), then applied and sent to the other local members;
updates from other replicas arrive through the tap, are applied and sent to every local member.
Applying an update twice is harmless (Yjs updates are idempotent), which makes loading simple:
subscribe first (buffering what arrives), read the snapshot and the log after it, then apply the
buffer.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pycrdt

from wirehub import (
    BusUnavailable,
    CloseCode,
    Identity,
    OutFrame,
    PublishOutcomeUnknown,
    Session,
    TokenBucket,
    split_envelope,
)
from wirehub.builtins.handlers.yjs import wire
from wirehub.builtins.handlers.yjs.awareness import AwarenessMap
from wirehub.builtins.handlers.yjs.wire import WireError

if TYPE_CHECKING:
    from wirehub.builtins.handlers.yjs.handler import YjsHandler

log = logging.getLogger("wirehub.yjs")

_PAGE = 1000
#: bus messages kept while a document loads; past it the load reads the log once more instead
_MAX_BACKLOG = 10_000


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


class _Tap(Session):
    """The document's hub membership: the room's bus messages go to the document."""

    def __init__(self, document: Document, endpoint: str, node: str) -> None:
        super().__init__(_NullTransport(), Identity(user="yjs-document"), endpoint=endpoint, node=node,
                         max_queue_bytes=1 << 62)
        self.document = document

    def deliver(self, room: str, frame: OutFrame, offset: int | None) -> None:
        try:
            self.document.on_bus(frame.payload, offset)
        except Exception:
            log.exception("document %s: a bus message could not be handled", self.document.name)


@dataclass(eq=False)
class Member:
    session: Session
    writable: bool
    bucket: TokenBucket | None
    #: awareness client ids this connection announced
    clients: set[int] = field(default_factory=set)


class TooLarge(Exception):
    """The update would take the document over ``max_document_bytes``."""


class Document:
    def __init__(self, handler: YjsHandler, name: str) -> None:
        self.handler = handler
        self.name = name
        self.room = handler.bus_room(name)
        self.key = handler.key(name)
        self.doc: pycrdt.Doc[Any] = pycrdt.Doc()
        self.members: dict[Session, Member] = {}
        self.tap = _Tap(self, handler.context.endpoint.path, handler.context.node)
        self.lock = asyncio.Lock()
        self.ready = False
        #: bus messages that arrived while loading (applied after the log)
        self.backlog: list[tuple[bytes, int | None]] | None = []
        self.backlog_overflow = False
        self.offset = 0  # newest log offset applied
        self.epoch: str | None = None
        self.snap_offset = 0  # offset the stored snapshot covers, as far as this replica knows
        self.size = 0  # encoded size: exact after a load or compaction, an upper bound in between
        self.awareness = AwarenessMap()
        self.seen: dict[str, float] = {}  # replica instance -> loop time of its last bus message
        self.idle_since: float | None = None
        self.last_compact = handler.loop_time()
        self.last_heartbeat = 0.0
        self.compacting = False

    @property
    def dirty(self) -> bool:
        """Updates applied here that the stored snapshot may not hold."""
        return self.offset > self.snap_offset

    # -- loading -------------------------------------------------------------------------------------

    async def load(self) -> None:
        """Snapshot + log tail + what arrived meanwhile. Raises BusUnavailable."""
        h = self.handler
        await h.context.hub.join(self.room, self.tap)
        snap = await h.store.load(self.key)
        if snap.update:
            self.doc.apply_update(snap.update)
        top, epoch = await h.context.backend.history.position(self.room)
        after = snap.offset if snap.epoch == epoch else 0
        self.snap_offset = after
        self.epoch = epoch
        await self._read_log(after, top)
        backlog, self.backlog = self.backlog or [], None
        for frame, offset in backlog:
            self._handle(frame, offset, fan_out=False)
        if self.backlog_overflow:
            top, _ = await h.context.backend.history.position(self.room)
            await self._read_log(after, top)
        self.size = len(self.doc.get_update())
        self.ready = True
        h.sizes.observe(self.size)
        # others answer with the states of their clients (a replica that just loaded knows none)
        h.spawn(self.publish(wire.BUS_QUERY, ""))

    async def _read_log(self, after: int, top: int) -> int:
        """Apply the log after ``after``; returns how many updates were applied."""
        history = self.handler.context.backend.history
        applied = 0
        while True:
            page = await history.read(self.room, after, _PAGE)
            if not page.complete:
                self.handler.lost.inc()
                log.error("document %s: the log after offset %d was trimmed before it was compacted; "
                          "loading what is left", self.name, after)
            for offset, payload in page.messages:
                try:
                    bf = wire.parse_bus_frame(split_envelope(payload)[2])
                    if bf.kind == wire.BUS_UPDATE:
                        self.doc.apply_update(bf.body)
                        applied += 1
                except (ValueError, WireError):
                    log.error("document %s: skipped a malformed log entry at offset %d", self.name, offset)
                self.offset = max(self.offset, offset)
            if len(page.messages) < _PAGE or not page.messages or page.messages[-1][0] >= page.top:
                self.offset = max(self.offset, min(top, page.top) if page.complete else page.top)
                return applied
            after = page.messages[-1][0]

    async def reload(self) -> None:
        """The hub could not replay an outage from history: merge the store's view in again and
        send the members what they miss."""
        before = self.doc.get_state()
        snap = await self.handler.store.load(self.key)
        if snap.update:
            self.doc.apply_update(snap.update)
        top, epoch = await self.handler.context.backend.history.position(self.room)
        self.epoch = epoch
        self.offset = 0
        await self._read_log(snap.offset if snap.epoch == epoch else 0, top)
        diff = self.doc.get_update(before)
        if diff != wire.EMPTY_UPDATE:
            self.send_members(wire.sync_update(diff))
        self.handler.resyncs.inc()

    # -- bus -------------------------------------------------------------------------------------------

    async def publish(self, kind: bytes, session: str, body: bytes = b"", *, history: bool = False) -> int | None:
        frame = wire.bus_frame(kind, self.handler.instance, session, body)
        return await self.handler.context.hub.publish(self.room, frame, history=history)

    def on_bus(self, frame: bytes, offset: int | None) -> None:
        if self.backlog is not None:
            if len(self.backlog) < _MAX_BACKLOG:
                self.backlog.append((frame, offset))
            else:
                self.backlog_overflow = True  # the log has the updates: read it again after the load
            return
        self._handle(frame, offset, fan_out=True)

    def _handle(self, frame: bytes, offset: int | None, *, fan_out: bool) -> None:
        h = self.handler
        if frame[:1] == b"{":  # the hub's gap event: history could not cover an outage
            if b'"gap"' in frame[:16]:
                h.spawn(self.reload())
            return
        bf = wire.parse_bus_frame(frame)
        mine = bf.node == h.instance
        if not mine:
            self.seen[bf.node] = h.loop_time()
        if offset is not None:
            self.offset = max(self.offset, offset)
        if bf.kind == wire.BUS_UPDATE:
            if mine and self.ready:
                return  # applied and sent to the local members when it was published
            self.doc.apply_update(bf.body)
            self.size += len(bf.body)
            if fan_out:
                self.send_members(wire.sync_update(bf.body))
        elif bf.kind == wire.BUS_AWARENESS:
            if mine:
                return
            changed = self.awareness.apply(wire.decode_awareness(bf.body), bf.node, bf.session)
            if changed and fan_out:
                self.send_members(wire.awareness_message(wire.encode_awareness(changed)))
        elif bf.kind == wire.BUS_QUERY and not mine and self.members:
            mine_states = self.awareness.entries(h.instance)
            if mine_states:
                h.spawn(self._publish_quietly(wire.BUS_AWARENESS, wire.encode_awareness(mine_states)))

    async def _publish_quietly(self, kind: bytes, body: bytes) -> None:
        try:
            await self.publish(kind, "", body)
        except BusUnavailable:
            log.debug("document %s: bus down; awareness not published", self.name)

    # -- members ---------------------------------------------------------------------------------------

    def send_members(self, message: bytes, skip: Session | None = None) -> None:
        frame = OutFrame(message, binary=True)
        n = 0
        for s in list(self.members):
            if s is not skip:
                s.send_frame(frame)
                n += 1
        self.handler.context.metrics.deliveries.inc(n)

    def welcome(self, session: Session) -> None:
        """What the y-websocket server sends a new connection: sync step 1 and the awareness states."""
        session.send_frame(OutFrame(wire.sync_step1(self.doc.get_state()), binary=True))
        states = self.awareness.entries()
        if states:
            session.send_frame(OutFrame(wire.awareness_message(wire.encode_awareness(states)), binary=True))

    def sync_reply(self, session: Session, state_vector: bytes) -> None:
        session.send_frame(OutFrame(wire.sync_step2(self.doc.get_update(state_vector)), binary=True))

    def send_awareness(self, session: Session) -> None:
        entries = self.awareness.entries()
        session.send_frame(OutFrame(wire.awareness_message(wire.encode_awareness(entries)), binary=True))

    async def client_update(self, member: Member, update: bytes) -> None:
        """A client's sync step 2 or update. Raises WireError (malformed), TooLarge, BusUnavailable
        (not published)."""
        h = self.handler
        if update == wire.EMPTY_UPDATE:
            return
        if not member.writable:
            h.refused.labels(h.endpoint, "read_only").inc()
            member.session.send_frame(OutFrame(wire.permission_denied("read-only"), binary=True))
            return
        try:
            pycrdt.get_state(update)  # parses the whole update: garbage is refused before it is published
        except ValueError:
            raise WireError("not a Yjs update") from None
        limit = h.options.max_document_bytes
        if self.size + len(update) > limit:
            self.size = len(self.doc.get_update())
            if self.size + len(update) > limit:
                from wirehub.builtins.handlers.yjs.store import merge

                if len(merge(self.doc.get_update(), update)) > limit:
                    h.refused.labels(h.endpoint, "too_large").inc()
                    raise TooLarge()
        try:
            offset = await self.publish(wire.BUS_UPDATE, member.session.id, update, history=True)
        except PublishOutcomeUnknown:
            offset = None  # probably stored: the log has it then; apply it here as well
        self.doc.apply_update(update)
        self.size += len(update)
        h.updates.inc()
        self.send_members(wire.sync_update(update), skip=member.session)
        if offset is not None:
            self.offset = max(self.offset, offset)
            if offset - self.snap_offset >= h.options.compact_every:
                h.spawn(self.compact())

    async def client_awareness(self, member: Member, body: bytes) -> None:
        entries = wire.decode_awareness(body)
        for e in entries:
            member.clients.add(e.client)
        changed = self.awareness.apply(entries, self.handler.instance, member.session.id)
        if not changed:
            return
        encoded = wire.encode_awareness(changed)
        self.send_members(wire.awareness_message(encoded), skip=member.session)
        await self._publish_quietly(wire.BUS_AWARENESS, encoded)

    async def member_left(self, session: Session) -> None:
        """Null the states of the clients the connection announced (it may have closed without saying so)."""
        gone = self.awareness.remove(session.id, by="session")
        if gone:
            encoded = wire.encode_awareness(gone)
            self.send_members(wire.awareness_message(encoded))
            await self._publish_quietly(wire.BUS_AWARENESS, encoded)

    # -- maintenance -------------------------------------------------------------------------------------

    def expire_awareness(self, now: float) -> None:
        """Remove the states of replicas not heard of for ``awareness_ttl`` (a dead replica)."""
        ttl = self.handler.options.awareness_ttl
        me = self.handler.instance
        for instance in self.awareness.instances():
            if instance != me and instance not in self.seen:
                self.seen[instance] = now  # learnt from a load or a query answer: start its clock now
        for instance, seen in list(self.seen.items()):
            if now - seen <= ttl:
                continue
            del self.seen[instance]
            gone = self.awareness.remove(instance, by="instance")
            if gone:
                self.handler.awareness_expired.inc(len(gone))
                self.send_members(wire.awareness_message(wire.encode_awareness(gone)))

    async def compact(self) -> None:
        """Write a snapshot holding this replica's document (merged with the stored one)."""
        if self.compacting or not self.ready:
            return
        self.compacting = True
        h = self.handler
        try:
            offset, epoch = self.offset, self.epoch
            snap = await h.store.load(self.key)
            if snap.epoch == epoch and snap.offset >= offset:
                self.snap_offset = max(self.snap_offset, snap.offset)
                return  # another replica already stored everything this one holds
            written = await h.store.compact(self.key, self.doc.get_update(), offset, epoch)
            if written is not None:
                self.snap_offset = max(self.snap_offset, written.offset if written.epoch == epoch else offset)
                self.size = len(written.update)
                h.sizes.observe(self.size)
                h.compactions.inc()
        except BusUnavailable:
            log.info("document %s: compaction postponed, the backend is unavailable", self.name)
        finally:
            self.compacting = False
            self.last_compact = h.loop_time()

    def close_members(self, code: CloseCode, retry_ms: int | None = None) -> None:
        for s in list(self.members):
            s.close(code, retry_ms=retry_ms)

    def sessions(self) -> Iterable[Session]:
        return self.members.keys()
