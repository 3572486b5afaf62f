"""The yjs endpoint: y-websocket connections to Yjs documents shared by every replica.

The document is named by the URL path below the endpoint (``WebsocketProvider('ws://host/ws/yjs',
'notes', doc)`` connects to ``/ws/yjs/notes``). On open the handler checks the name and the
policy (``join`` to read, ``update`` to write), loads the document (``document.py``) and sends
sync step 1 and the awareness states, as the y-websocket server does. Binary frames are then
sync, awareness, auth and query-awareness messages (``wire.py``). Problems close the connection
with a documented code (docs/collaboration.md, "Limits and close codes").

A maintenance task, running while documents are loaded, publishes each document's heartbeat
(for the awareness TTL), expires the awareness of dead replicas, compacts documents with
uncompacted updates every ``compact_interval`` and unloads documents idle for ``idle_unload``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import uuid
import weakref
from typing import Any
from urllib.parse import unquote

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from wirehub import BusUnavailable, CloseCode, HandlerContext, Session, TokenBucket
from wirehub.builtins.handlers.yjs import wire
from wirehub.builtins.handlers.yjs.document import Document, Member, TooLarge
from wirehub.builtins.handlers.yjs.options import YjsOptions
from wirehub.builtins.handlers.yjs.store import DocumentStore
from wirehub.builtins.handlers.yjs.wire import Reader, WireError

log = logging.getLogger("wirehub.yjs")

#: session.state key of the connection's :class:`Member` and document
_MEMBER = "yjs.member"
_DOC = "yjs.document"


class YjsHandler:
    def __init__(self, options: YjsOptions, context: HandlerContext) -> None:
        self.options = options
        self.context = context
        self.endpoint = context.endpoint.path
        #: this process's identity on the bus (a restarted replica is a new instance)
        self.instance = f"{context.node}/{uuid.uuid4().hex[:8]}"
        self.store = DocumentStore(context.backend, options.max_retries)
        self.documents: dict[str, Document] = {}
        self.tasks: set[asyncio.Task[Any]] = set()
        self.closed = False
        self._maintainer: asyncio.Task[None] | None = None
        self._name_re = re.compile(options.document_pattern)
        m = _metrics(context.metrics.registry)
        ep = self.endpoint
        self.updates = m["updates"].labels(ep)
        self.compactions = m["compactions"].labels(ep)
        self.refused = m["refused"]
        self.resyncs = m["resyncs"].labels(ep)
        self.lost = m["lost"].labels(ep)
        self.awareness_expired = m["awareness_expired"].labels(ep)
        self.loaded_gauge = m["documents"].labels(ep)
        self.bytes_gauge = m["bytes"].labels(ep)
        self.sizes = m["sizes"].labels(ep)
        self.conflicts = m["conflicts"].labels(ep)
        self._conflicts_seen = 0

    # -- helpers -------------------------------------------------------------------------------------

    def key(self, name: str) -> str:
        return f"{self.options.namespace}/{name}"

    def bus_room(self, name: str) -> str:
        return f"{self.options.namespace}/{name}"

    @staticmethod
    def loop_time() -> float:
        return asyncio.get_running_loop().time()

    def spawn(self, coro: Any) -> None:
        if self.closed:
            coro.close()
            return
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("yjs task failed", exc_info=task.exception())

    def document_name(self, session: Session) -> str | None:
        prefix = self.endpoint.removesuffix("*")
        if not session.path.startswith(prefix):
            return None
        name = unquote(session.path[len(prefix):])
        return name if self._name_re.fullmatch(name) else None

    # -- the connection ----------------------------------------------------------------------------

    async def on_open(self, session: Session) -> None:
        name = self.document_name(session)
        if name is None:
            self.refused.labels(self.endpoint, "bad_name").inc()
            session.close(CloseCode.BAD_DOCUMENT_MESSAGE, "bad document name")
            return
        hooks = self.context.hooks
        if not await hooks.authorize(session.identity, "join", name):
            self.refused.labels(self.endpoint, "forbidden").inc()
            session.close(CloseCode.DOCUMENT_FORBIDDEN)
            return
        writable = await hooks.authorize(session.identity, "update", name)
        rate = self.options.messages_per_second
        member = Member(session, writable, TokenBucket(rate, int(2 * rate) or 1) if rate else None)
        try:
            document = await self._attach(member, name)
        except BusUnavailable:
            session.close(CloseCode.TRY_AGAIN_LATER, retry_ms=1000)
            return
        except _Full:
            self.refused.labels(self.endpoint, "max_documents").inc()
            session.close(CloseCode.TRY_AGAIN_LATER, retry_ms=5000)
            return
        if session.closed:
            await self._detach(session)
            return
        session.state[_MEMBER] = member
        session.state[_DOC] = document
        document.welcome(session)

    async def _attach(self, member: Member, name: str) -> Document:
        while True:
            document = self.documents.get(name)
            if document is None:
                if len(self.documents) >= self.options.max_documents:
                    raise _Full()
                document = self.documents[name] = Document(self, name)
                self.loaded_gauge.set(len(self.documents))
                self._ensure_maintainer()
            async with document.lock:
                if self.documents.get(name) is not document:
                    continue  # unloaded while we waited
                if not document.ready:
                    try:
                        await document.load()
                    except BaseException:
                        if not document.members:
                            await self._unload(document, compact=False)
                        raise
                document.members[member.session] = member
                document.idle_since = None
                return document

    async def on_message(self, session: Session, data: str | bytes) -> None:
        member: Member | None = session.state.get(_MEMBER)
        document: Document | None = session.state.get(_DOC)
        if member is None or document is None or session.closed:
            return
        if isinstance(data, str):
            self.refused.labels(self.endpoint, "bad_message").inc()
            session.close(CloseCode.BAD_DOCUMENT_MESSAGE, "bad message: binary y-websocket frames only")
            return
        bucket = member.bucket
        if bucket is not None and not bucket.take():
            self.refused.labels(self.endpoint, "rate_limited").inc()
            session.close(CloseCode.RATE_LIMITED, retry_ms=bucket.wait_ms() + 1000)
            return
        try:
            await self._dispatch(document, member, data)
        except (WireError, ValueError):
            self.refused.labels(self.endpoint, "bad_message").inc()
            session.close(CloseCode.BAD_DOCUMENT_MESSAGE)
        except TooLarge:
            session.close(CloseCode.DOCUMENT_TOO_LARGE)
        except BusUnavailable:
            self.refused.labels(self.endpoint, "unavailable").inc()
            session.close(CloseCode.TRY_AGAIN_LATER, retry_ms=1000)
        except Exception:
            # the core would answer with a JSON error frame, which a y-websocket client cannot read
            log.exception("document %s: a message from %r failed", document.name, session)
            session.close(CloseCode.INTERNAL)

    async def _dispatch(self, document: Document, member: Member, data: bytes) -> None:
        r = Reader(data)
        kind = r.uint()
        if kind == wire.MESSAGE_SYNC:
            step = r.uint()
            body = r.blob()
            if step == wire.SYNC_STEP1:
                try:
                    document.sync_reply(member.session, body)
                except ValueError:
                    raise WireError("bad state vector") from None
            elif step in (wire.SYNC_STEP2, wire.SYNC_UPDATE):
                await document.client_update(member, body)
            else:
                raise WireError(f"unknown sync message {step}")
        elif kind == wire.MESSAGE_AWARENESS:
            await document.client_awareness(member, r.blob())
        elif kind == wire.MESSAGE_QUERY_AWARENESS:
            document.send_awareness(member.session)
        elif kind == wire.MESSAGE_AUTH:
            return  # only the server sends auth messages; y-websocket servers ignore a client's
        else:
            raise WireError(f"unknown message type {kind}")

    async def on_close(self, session: Session) -> None:
        await self._detach(session)

    async def _detach(self, session: Session) -> None:
        document: Document | None = session.state.pop(_DOC, None)
        session.state.pop(_MEMBER, None)
        if document is None:
            for d in self.documents.values():
                if session in d.members:
                    document = d
                    break
        if document is None or document.members.pop(session, None) is None:
            return
        await document.member_left(session)
        if not document.members:
            document.idle_since = self.loop_time()
            if not self.options.idle_unload:
                async with document.lock:
                    if not document.members and self.documents.get(document.name) is document:
                        await self._unload(document)

    async def _unload(self, document: Document, compact: bool = True) -> None:
        if compact and document.ready and document.dirty:
            await document.compact()
        if self.documents.get(document.name) is document:
            del self.documents[document.name]
            self.loaded_gauge.set(len(self.documents))
        document.ready = False
        with contextlib.suppress(BusUnavailable):
            await self.context.hub.leave(document.room, document.tap)

    # -- maintenance -------------------------------------------------------------------------------

    def _ensure_maintainer(self) -> None:
        if self._maintainer is None and not self.closed:
            self._maintainer = asyncio.ensure_future(self._maintain())

    async def _maintain(self) -> None:
        opts = self.options
        step = min(1.0, opts.awareness_ttl / 3, opts.compact_interval, opts.idle_unload or 1.0)
        try:
            while not self.closed and self.documents:
                await asyncio.sleep(step)
                now = self.loop_time()
                total = 0
                for document in list(self.documents.values()):
                    if not document.ready:
                        continue
                    total += document.size + document.awareness.nbytes()
                    if document.members and now - document.last_heartbeat >= opts.awareness_ttl / 3:
                        document.last_heartbeat = now
                        self.spawn(document._publish_quietly(wire.BUS_HEARTBEAT, b""))
                    document.expire_awareness(now)
                    if document.dirty and now - document.last_compact >= opts.compact_interval:
                        self.spawn(document.compact())
                    if (not document.members and document.idle_since is not None
                            and now - document.idle_since >= opts.idle_unload):
                        async with document.lock:
                            if not document.members and self.documents.get(document.name) is document:
                                await self._unload(document)
                self.bytes_gauge.set(total)
                if self.store.conflicts != self._conflicts_seen:
                    self.conflicts.inc(self.store.conflicts - self._conflicts_seen)
                    self._conflicts_seen = self.store.conflicts
        finally:
            self._maintainer = None
            if not self.closed and self.documents:
                self._ensure_maintainer()

    async def close(self) -> None:
        """The app's shutdown (every session is closed): compact what is dirty, stop the tasks."""
        for document in list(self.documents.values()):
            if document.ready and document.dirty:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(document.compact(), 5)
        self.closed = True
        tasks = [t for t in (self._maintainer, *self.tasks) if t]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=2)


class _Full(Exception):
    """``max_documents`` are loaded on this replica."""


_METRICS: weakref.WeakKeyDictionary[CollectorRegistry, dict[str, Any]] = weakref.WeakKeyDictionary()


def _metrics(registry: CollectorRegistry) -> dict[str, Any]:
    """The yjs metrics of one app's registry (created once, shared by its yjs endpoints)."""
    found = _METRICS.get(registry)
    if found is None:
        def counter(name: str, text: str) -> Counter:
            return Counter(f"wirehub_yjs_{name}", text, ["endpoint"], registry=registry)

        found = _METRICS[registry] = {
            "updates": counter("updates", "Yjs updates accepted from clients of this replica"),
            "compactions": counter("compactions", "Snapshots written (log compactions)"),
            "conflicts": counter("compaction_conflicts", "Compactions retried after a compare-and-set conflict"),
            "resyncs": counter("resyncs", "Documents merged again from the store after an outage history missed"),
            "lost": counter("log_gaps", "Document loads that found the log trimmed past the snapshot"),
            "awareness_expired": counter("awareness_expired",
                                         "Awareness states removed because their replica stopped its heartbeat"),
            "refused": Counter("wirehub_yjs_refused", "Yjs connections or messages refused, by reason",
                               ["endpoint", "reason"], registry=registry),
            "documents": Gauge("wirehub_yjs_documents", "Yjs documents loaded on this replica", ["endpoint"],
                               registry=registry),
            "bytes": Gauge("wirehub_yjs_document_bytes",
                           "Encoded size of the loaded documents plus their awareness states, summed; divide by "
                           "wirehub_yjs_documents for the size per document", ["endpoint"], registry=registry),
            "sizes": Histogram("wirehub_yjs_document_size_bytes",
                               "Encoded size of a document, observed at each load and compaction", ["endpoint"],
                               buckets=(1e3, 1e4, 1e5, 2.5e5, 5e5, 1e6, 4e6), registry=registry),
        }
    return found
