"""The NATS bus (:mod:`wirehub.builtins.bus.nats`): the connection that history, presence and state share,
live room delivery, and history publishes that give each room consecutive offsets.

One order per room: the stream republishes every message it stores (``RePublish`` ``<p>.r.>`` to
``<p>.rl.>``; one publisher, the stream's leader, in stream order, with ``Nats-Sequence`` and
``Nats-Last-Sequence``, the previous stored sequence of the same subject) and each replica follows a room
with one core subscription to ``<p>.rl.<r>.*``: no JetStream consumer per room. ``subscribe`` returns once
its baseline is known (every message stored later reaches the subscription; see ``_consume`` and
``_barrier``). A message whose ``Nats-Last-Sequence`` is newer than the last one of its subject delivered, a
drop nats-py reports (a full subscription), or a RePublish found missing (an older replica updated the
stream) makes the room's live messages wait while the missed ones are read from the stream's leader and
delivered in order; copies already delivered are dropped; after a stream leader change (its advisory) each
room is read again before its next message. So every replica gets the room in stream order, without loss or
duplicate while connected (the exception, a loss none of these notices, found only after a newer message of
the room's other subject and then delivered late: docs/buses.md).

Offsets: a per-room counter carried in the ``Wh-Off`` header. A history publish sends the next
offset with ``Nats-Expected-Last-Subject-Sequence`` set to the stream sequence of the room's last
history message; JetStream refuses it if another replica got there first, and the publisher
re-reads the room's last message and tries again. So offsets are consecutive in stream order.
When a room has no retained message (new, or everything expired), its next offset starts a new
*run* at ``last stream sequence + 1`` (larger than every earlier offset of the room, since an
offset never exceeds its message's stream sequence) and is marked ``Wh-Start``; a reader that
was at 0 (joined an empty room) recovers from a run start, anyone else gets ``complete=False``.

Epoch: derived from the stream's creation time; it changes when the stream is deleted and
created again (a broker that lost its store, an operator's reset). A restart that keeps the
JetStream store keeps the epoch and the history.

Cluster (``replicas`` > 1, ``servers`` naming several nodes): a core PING/PONG only proves the one server
this replica is connected to; a JetStream write needs a quorum of the stream's replicas. So each
heartbeat also publishes one probe to the stream ``<P>_quorum`` (subjects ``<p>.q.*``, one message kept
per subject, same replicas; the probe runs beside the PING/PONG, never delaying it) and the bus is down
once no probe was acknowledged for ``quorum_timeout`` seconds: a lost majority turns the replica
unready, while the few seconds of a leader election after one node's death do not.

Failures: nats-py's own reconnect (and the publish buffer it fills while reconnecting) is
disabled; :mod:`wirehub.builtins.bus._broker` supervises the connection: a PING/PONG flush every
``heartbeat_interval`` that must answer within ``heartbeat_timeout``, capped backoff, resubscribe.
``publish`` is a JetStream publish that waits for the stream's acknowledgement: it returns only
when the message is stored, and raises BusUnavailable when the bus is down or JetStream refused
it, PublishOutcomeUnknown when no ack came within ``op_timeout`` (it may still have been stored).
Idempotent publishes carry ``Nats-Msg-Id: <r>.<key>``: JetStream stores one message per id within
the stream's ``duplicate_window`` (set to the publisher's window, at most ``history_ttl``) and
acks a duplicate with ``duplicate=True`` and the first one's sequence, whose ``Wh-Off`` is returned.
"""

from __future__ import annotations

import asyncio
import base64
import calendar
import collections
import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import re
import ssl
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from wirehub import BusHandler, BusUnavailable, ConfigError, PublishOutcomeUnknown
from wirehub.builtins.bus._broker import Supervised, encode_room, safe_close
from wirehub.builtins.bus.nats_acks import AckRefused, Acks
from wirehub.builtins.bus.nats_tail import Tails

if TYPE_CHECKING:
    from wirehub.builtins.bus.nats import NatsOptions
    from wirehub.builtins.bus.nats_presence import NatsPresence

log = logging.getLogger("wirehub.bus.nats")
T = TypeVar("T")

INSTALL_HINT = "pip install 'wirehub[nats]'"
HDR_OFFSET = "Wh-Off"
HDR_START = "Wh-Start"
EXPECTED_LAST_SUBJECT_SEQ = "Nats-Expected-Last-Subject-Sequence"
MSG_ID = "Nats-Msg-Id"
WRONG_LAST_SEQUENCE = (10071, 10164)
#: "duplicate message id is in process": a publish with the same Nats-Msg-Id is being stored (in a
#: cluster, replicated) right now; once it is, the retry is answered as a duplicate with its sequence
DUPLICATE_IN_PROCESS = 10158
#: the oldest nats-server wirehub runs on: per-message TTLs (presence purge markers) and batched direct gets
#: (presence copies) came in 2.11
MIN_SERVER = (2, 11, 0)
#: "no message found" (a leader get past the subject's last message)
NO_MESSAGE = 10037
#: the stream republishes ``<p>.r.<r>.<kind>`` to ``<p>.<LIVE>.<r>.<kind>``
LIVE = "rl"
#: followed rooms read per upkeep after a leader change, while they stay quiet (the others are read at
#: their next message)
VERIFY_PER_UPKEEP = 500
#: the room token of the subscription barriers' probes: "~" is never base64url, so never a room
BARRIER = "~"


class _Live:
    """One followed room's live delivery on one connection."""

    __slots__ = ("base", "filling", "held", "kinds", "lost", "need", "received", "seq", "sub", "verify")

    def __init__(self) -> None:
        #: the room's last stream sequence when this replica began to follow it (nothing up to it is delivered)
        self.base = 0
        #: newest stream sequence delivered; -1 while the baseline is unknown
        self.seq = -1
        #: subject kind ("h", "e") -> newest stream sequence of it delivered
        self.kinds: dict[str, int] = {}
        #: messages received while the baseline is unknown or a gap is being filled; None: delivering
        self.held: list[Any] | None = []
        self.filling = False
        #: nats-py dropped a message of the subscription: read the room from the stream (again)
        self.lost = False
        #: messages the subscription's callback got; past ``need``, one that came after the last drop
        self.received = 0
        self.need = 0
        #: the stream's leader changed since the last delivery: read the room before the next message
        self.verify = False
        self.sub: Any = None


@functools.lru_cache(maxsize=64)
def _second(text: str) -> int:
    return calendar.timegm(time.strptime(text, "%Y-%m-%dT%H:%M:%S"))


def _stamp(text: str) -> float:
    """An RFC 3339 UTC time as JetStream writes it (``2026-12-05T03:41:39.702316293Z``), in epoch seconds."""
    try:
        frac = text[19:].rstrip("Z")
        return _second(text[:19]) + (float(frac) if frac else 0.0)
    except ValueError:
        return time.time()


def _sequence(msg: Any) -> int | None:
    """The stream sequence of a republished message; None when it has none readable."""
    try:
        return int((msg.headers or {})["Nats-Sequence"])
    except (KeyError, ValueError):
        return None


def _headers(raw: bytes) -> dict[str, str]:
    """The headers of a leader get's message (``NATS/1.0\r\nName: value\r\n...``)."""
    out: dict[str, str] = {}
    for line in raw.decode(errors="replace").split("\r\n")[1:]:
        name, sep, value = line.partition(":")
        if sep:
            out[name.strip()] = value.strip()
    return out


def _import_nats(key: str) -> Any:
    try:
        import nats
        import nats.js.api
        import nats.js.errors
    except ImportError as exc:  # pragma: no cover - exercised without the extra
        raise ConfigError(key, f"the nats bus needs nats-py: {INSTALL_HINT} ({exc})") from None
    return nats


def _name(prefix: str, what: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", prefix) + "_" + what


class OldServer(ConnectionError):
    """The NATS server is older than :data:`MIN_SERVER`."""


def _check_version(version: Any) -> None:
    """Refuse a server older than :data:`MIN_SERVER` at connect, before anything is created on it: an old
    server fails later and obscurely (a stream update it refuses, a batched get it answers with one message)."""
    found = (version.major, version.minor, version.patch)
    if found < MIN_SERVER:
        want = ".".join(map(str, MIN_SERVER[:2]))
        raise OldServer(f"nats-server {'.'.join(map(str, found))} is too old: wirehub needs {want} or newer "
                        "(per-message TTLs, batched direct gets, stream RePublish)")


def startup_error(exc: BaseException, opts: NatsOptions, key: str) -> str | None:
    """A connection failure that a config key explains, as ``"<key>: what to fix (cause)"``; else None."""
    text, seen = "", exc
    chain: BaseException | None = exc
    while chain is not None:
        text += f" / {type(chain).__name__}: {chain}"
        seen, chain = chain, chain.__cause__ or chain.__context__
    low, cause = text.lower(), f"{type(seen).__name__}: {str(seen)[:200]}"
    if isinstance(seen, OldServer):
        return f"{key}.servers: {seen}"
    if "certificate verify failed" in low:
        return f"{key}.tls_ca_file: the server's TLS certificate was refused ({cause})"
    if "authorization violation" in low or "authentication" in low:
        who = "token" if opts.token else "credentials" if opts.credentials else "password" if opts.user else "user"
        return f"{key}.{who}: the NATS server refused the credentials ({cause})"
    if isinstance(seen, OSError) and seen.filename is not None:
        for name in ("tls_ca_file", "tls_cert_file", "tls_key_file", "credentials"):
            if getattr(opts, name) and str(seen.filename) == getattr(opts, name):
                return f"{key}.{name}: cannot read {seen.filename!r} ({cause})"
    if "wrong version number" in low or "record layer failure" in low:
        return f"{key}.servers: the server does not speak TLS there, or it does and the URL is nats:// ({cause})"
    return None


class _Wrong(Exception):
    """Another writer was first: Nats-Expected-Last-Subject-Sequence did not match, or a publish with the
    same Nats-Msg-Id is still being stored (DUPLICATE_IN_PROCESS)."""


class _Refused(Exception):
    """JetStream answered the publish with an error: the message was not stored."""


class NatsBus(Supervised):
    """The bus; also holds the connection that history, presence and state use."""

    #: history publishes of a room take its lock in the order they were started (see publish)
    ordered_handoff = True

    log = log

    def __init__(self, opts: NatsOptions, key: str) -> None:
        super().__init__(heartbeat_interval=opts.heartbeat_interval, heartbeat_timeout=opts.heartbeat_timeout,
                         max_backoff=opts.max_backoff, op_timeout=opts.op_timeout,
                         connect_timeout=opts.connect_timeout,
                         refresh_interval=opts.presence_interval or opts.presence_ttl / 3)
        self.opts = opts
        self.config_key = key
        self.nats = _import_nats(key)
        nerr = self.nats.errors
        jerr = self.nats.js.errors
        self.errors: tuple[type[BaseException], ...] = (
            nerr.ConnectionClosedError, nerr.StaleConnectionError, nerr.OutboundBufferLimitError,
            nerr.ConnectionReconnectingError, nerr.ConnectionDrainingError, nerr.NoServersError, OSError,
        )
        self.soft: tuple[type[BaseException], ...] = (nerr.Error, jerr.Error)
        self.prefix = opts.subject_prefix
        self.stream = _name(opts.subject_prefix, "rooms")
        self.epoch = ""
        self.nc: Any = None
        self.js: Any = None
        self.state_kv: Any = None
        self.presence: NatsPresence | None = None
        #: followed room -> its live delivery on this connection (messages of an older one are dropped)
        self._followed: dict[str, _Live] = {}
        #: followed room -> its subscription, once its baseline is known (see position)
        self._subs: dict[str, Any] = {}
        #: subscription id -> room (nats-py names a full subscription by its sid)
        self._by_sid: dict[int, str] = {}
        #: connected to a cluster: a subscription's baseline is a probe through the stream (see _barrier)
        self._clustered = False
        self._barrier_subject = f"{self.prefix}.r.{BARRIER}.{uuid.uuid4().hex[:12]}"
        self._barrier_next: asyncio.Future[int] | None = None
        self._barrier_seen = 0
        self._barrier_waiters: list[tuple[int, asyncio.Future[None]]] = []
        #: gap fills and barriers under way (cancelled with the connection)
        self._tasks: set[asyncio.Task[Any]] = set()
        #: per room subscription: messages nats-py queues before it drops one (then the room is read again)
        self.pending_msgs_limit = 100_000
        #: followed rooms not read since the stream's leader changed (the upkeep reads them, paced)
        self._unverified: set[str] = set()
        #: counters for tests and operators: gaps filled from the stream, RePublish put back
        self.gap_fills = 0
        self.republish_restored = 0
        #: room -> its history publishes' lock and how many publishes hold or wait for it
        self._locks: dict[str, tuple[asyncio.Lock, list[int]]] = {}
        #: room -> (stream seq, offset) of its newest history message, as far as this replica knows
        self._last: collections.OrderedDict[str, tuple[int, int]] = collections.OrderedDict()
        #: the stream's duplicate_window in seconds as this replica set it (0: the server's default, 2 min)
        self._dedupe_window = 0.0
        self._stream_config: Any = None
        #: replicas > 1: time.monotonic() of the last JetStream write a quorum acknowledged
        self._quorum_at = 0.0
        self._probe: asyncio.Future[None] | None = None
        self._probe_error = "no answer"
        self._probe_subject = f"{self.prefix}.q.{uuid.uuid4().hex[:12]}"
        #: JetStream writes of presence (their acks on one inbox; see nats_acks)
        self.acks: Acks | None = None
        #: followed room -> its newest history messages, from its consumer (see nats_tail)
        self.tails = Tails(opts.history_size, opts.history_ttl)
        #: room -> the reads of this loop iteration waiting for one direct get of its newest message
        self._newest: dict[str, list[asyncio.Future[tuple[int, int, bool]]]] = {}
        #: followed room -> (stream seq, offset, broker time in epoch seconds) of its newest history
        #: message seen by its live consumer, a publish ack, or a position read after the consumer started
        self._heads: dict[str, tuple[int, int, float]] = {}
        #: followed rooms whose position is known without asking (``_heads``; absent there: empty)
        self._known: set[str] = set()
        #: room -> the position read under way (the joins of one loop iteration share it)
        self._asking: dict[str, asyncio.Future[tuple[int, int, bool, float]]] = {}

    async def start(self, handler: BusHandler) -> None:
        try:
            await super().start(handler)
        except BusUnavailable as exc:
            hint = startup_error(exc, self.opts, self.config_key)
            if hint is None:
                raise
            log.error("cannot start the nats bus: %s", hint)
            raise BusUnavailable(hint) from exc

    def subject(self, room: str, kind: str = "h") -> str:
        return f"{self.prefix}.r.{encode_room(room)}.{kind}"

    # -- connection ----------------------------------------------------------------------------------

    def _tls(self) -> ssl.SSLContext | None:
        o = self.opts
        if not (o.tls_ca_file or o.tls_cert_file or any(s.startswith("tls://") for s in o.servers)):
            return None
        for path in (o.tls_ca_file, o.tls_cert_file, o.tls_key_file):
            if path:
                open(path, "rb").close()  # an OSError naming the file (ssl's own errors do not)
        ctx = ssl.create_default_context(cafile=o.tls_ca_file)
        if o.tls_cert_file:
            ctx.load_cert_chain(o.tls_cert_file, o.tls_key_file)
        return ctx

    async def _open(self) -> None:
        o, api = self.opts, self.nats.js.api
        conn: dict[str, Any] = {}

        async def on_error(exc: Exception) -> None:
            if isinstance(exc, self.nats.errors.SlowConsumerError) and conn.get("nc") is self.nc:
                # a room's subscription or a presence copy lost messages: each reads itself again
                self._slow(exc.sid)
                if self.presence is not None:
                    self.presence.dropped(exc.sub)
                return
            log.debug("nats: %s", exc)

        async def on_lost() -> None:
            if self.nc is not None and conn.get("nc") is self.nc:
                self._fail("disconnected from NATS")

        kwargs: dict[str, Any] = {
            "servers": list(o.servers),
            "allow_reconnect": False,  # we reconnect (and resubscribe) ourselves; nothing is buffered meanwhile
            "connect_timeout": o.connect_timeout,
            "max_reconnect_attempts": 1,  # the first connect tries each server once (0 would retry forever)
            "reconnect_time_wait": 0.05,
            "error_cb": on_error,
            "disconnected_cb": on_lost,
            "closed_cb": on_lost,
            "name": "wirehub",
            "ping_interval": 600,  # the watchdog pings; nats-py's own ping would notice in minutes
        }
        if o.token:
            kwargs["token"] = o.token
        if o.user:
            kwargs["user"], kwargs["password"] = o.user, o.password
        if o.credentials:
            kwargs["user_credentials"] = o.credentials
        tls = self._tls()
        if tls is not None:
            kwargs["tls"] = tls
        nc = self.nats.NATS()
        conn["nc"] = self.nc = nc  # so that _teardown closes it even when connect fails half-way
        await nc.connect(**kwargs)
        _check_version(nc.connected_server_version)
        js = self.js = nc.jetstream(timeout=o.op_timeout)
        acks = Acks(nc, o.op_timeout)
        await acks.start()
        self.acks = acks
        storage = api.StorageType.MEMORY if o.storage == "memory" else api.StorageType.FILE
        config = api.StreamConfig(
            name=self.stream, subjects=[f"{self.prefix}.r.*.*"], max_msgs_per_subject=max(1, o.history_size),
            max_age=o.history_ttl, storage=storage, num_replicas=o.replicas, discard=api.DiscardPolicy.OLD,
            allow_direct=True, duplicate_window=self._dedupe_window, max_consumers=o.max_consumers,
            republish=self._republish(),  # live room delivery (see the module's docstring)
        )
        self._stream_config = config
        try:
            info = await js.add_stream(config)
        except self.nats.js.errors.BadRequestError:
            info = await js.update_stream(config)
        created = getattr(info, "created", None) or (await js.stream_info(self.stream)).created
        self.epoch = hashlib.sha1(f"{self.stream}@{created}".encode()).hexdigest()[:12]
        if o.replicas > 1:
            probes = api.StreamConfig(name=_name(self.prefix, "quorum"), subjects=[f"{self.prefix}.q.*"],
                                      max_msgs_per_subject=1, max_age=60.0, storage=api.StorageType.MEMORY,
                                      num_replicas=o.replicas, discard=api.DiscardPolicy.OLD)
            try:
                await js.add_stream(probes)
            except self.nats.js.errors.BadRequestError:
                await js.update_stream(probes)
            self._quorum_at = time.monotonic()
        self._last.clear()
        self._heads, self._known = {}, set()
        if self.presence is not None:
            await self.presence.open(storage)
        self.state_kv = await self._bucket(_name(self.prefix, "state"), None, storage)
        self._followed, self._subs, self._by_sid = {}, {}, {}
        info = nc._server_info
        self._clustered = o.replicas > 1 or bool(info.get("cluster") or info.get("connect_urls"))
        self._barrier_seen, self._barrier_waiters = 0, []
        self._unverified = set()
        if self._clustered:
            await nc.subscribe(f"{self.prefix}.{LIVE}.{BARRIER}.{self._barrier_subject.rpartition('.')[2]}",
                               cb=self._barrier_cb)
            await nc.subscribe(f"$JS.EVENT.ADVISORY.STREAM.LEADER_ELECTED.{self.stream}", cb=self._leader_cb)
        rooms = sorted(self._rooms)
        for i in range(0, len(rooms), 256):  # the subscriptions of a batch share one barrier
            done = await asyncio.gather(*(self._consume(room) for room in rooms[i:i + 256]), return_exceptions=True)
            failed = next((r for r in done if isinstance(r, BaseException)), None)
            if failed is not None:
                raise failed  # after all of the batch ended: none is left running on a torn-down connection

    async def _bucket(self, name: str, ttl: float | None, storage: Any) -> Any:
        js = self.js
        try:
            kv = await js.create_key_value(bucket=name, history=1, ttl=ttl, storage=storage,
                                           replicas=self.opts.replicas)
        except self.nats.js.errors.BadRequestError:
            kv = await js.key_value(name)  # exists with another config (e.g. a changed TTL)
        # KV configs have no consumer limit: set it on the bucket's stream (nats-server 2.15+ defaults to 1000)
        config = (await js.stream_info(f"KV_{name}")).config
        if config.max_consumers != self.opts.max_consumers:
            await js.update_stream(dataclasses.replace(config, max_consumers=self.opts.max_consumers))
        return kv

    # -- live room delivery (RePublish + core subscriptions) -------------------------------------------

    def _republish(self) -> Any:
        return self.nats.js.api.RePublish(src=f"{self.prefix}.r.>", dest=f"{self.prefix}.{LIVE}.>")

    async def _consume(self, room: str) -> None:
        """Subscribe to the room's republished messages; return once every message stored from now on
        reaches this replica (the baseline is known)."""
        acks = self.acks
        if acks is None:
            raise ConnectionError("not connected")
        st = _Live()
        self._followed[room] = st
        tail = self.tails.start(room)

        async def on_msg(msg: Any) -> None:
            if self._followed.get(room) is st:
                st.received += 1
                self._receive(room, st, msg)

        enc = encode_room(room)
        st.sub = await self.nc.subscribe(f"{self.prefix}.{LIVE}.{enc}.*", cb=on_msg,
                                         pending_msgs_limit=self.pending_msgs_limit)
        self._by_sid[st.sub._id] = room
        try:
            if self._clustered:
                base = await self._barrier(acks)
            else:
                # sent after the SUB on the same connection: every message stored after this answer is
                # republished to a subscription the server already has
                req = b'{"last_by_subj":"%s.r.%s.*"}' % (self.prefix.encode(), enc.encode())
                got = await acks.get(f"$JS.API.DIRECT.GET.{self.stream}", req)
                base = 0 if got is None else int((got.headers or {})["Nats-Sequence"])
        except AckRefused as exc:
            raise BusUnavailable(f"subscribe: {exc}") from exc
        if self._followed.get(room) is not st:
            return  # left (or the connection went) meanwhile
        st.base = st.seq = base
        self._subs[room] = st.sub
        if tail is not None:
            tail.ready = True
        if st.lost:  # a message was dropped before the baseline was known: it may be newer
            self._start_fill(room, st, None)
        else:
            self._release(room, st)

    async def _barrier_cb(self, msg: Any) -> None:
        self._on_barrier(msg)

    async def _barrier(self, acks: Acks) -> int:
        """In a cluster, the stream's leader may sit on another node, which learns of a new subscription a
        little later. One probe per loop iteration, stored in the stream after the subscriptions were sent:
        its republished copy comes back only once the leader's node knows them (the SUB and the probe went
        the same route), and everything stored after it reaches them. Its sequence is the baseline."""
        loop = asyncio.get_running_loop()
        fut = self._barrier_next
        if fut is None or fut.done():
            fut = self._barrier_next = loop.create_future()
            loop.call_soon(self._send_barrier, acks, fut)
        return await asyncio.shield(fut)

    def _send_barrier(self, acks: Acks, fut: asyncio.Future[int]) -> None:
        if self._barrier_next is fut:
            self._barrier_next = None
        task = asyncio.ensure_future(self._probe_republish(acks))
        self._tasks.add(task)

        def done(t: asyncio.Task[int]) -> None:
            self._tasks.discard(t)
            if fut.done():
                return
            exc = ConnectionError("disconnected from NATS") if t.cancelled() else t.exception()
            if exc is None:
                fut.set_result(t.result())
            else:
                fut.set_exception(exc)
                fut.exception()  # retrieved: every subscriber may have gone

        task.add_done_callback(done)

    async def _probe_republish(self, acks: Acks) -> int:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.op_timeout
        seq = await acks.publish(self._barrier_subject, b"")
        if await self._republished(seq, self.op_timeout / 4):
            return seq
        # slow, or stored while the stream had no RePublish (an older replica's update; then that probe never
        # comes back, even once the upkeep put the setting back): check it, and probe again (the
        # subscriptions were sent before either probe)
        await self._assert_republish()
        seq = await acks.publish(self._barrier_subject, b"")
        if await self._republished(seq, deadline - loop.time()):
            return seq
        raise BusUnavailable(f"subscribe: the stream did not republish within {self.op_timeout:g}s")

    async def _republished(self, seq: int, timeout: float) -> bool:
        """Whether the barrier probe at stream sequence ``seq`` came back within ``timeout``."""
        if self._barrier_seen >= seq:
            return True
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._barrier_waiters.append((seq, fut))
        try:
            await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            return False
        return True

    def _on_barrier(self, msg: Any) -> None:
        try:
            seq = int((msg.headers or {})["Nats-Sequence"])
        except (KeyError, ValueError):
            return
        self._barrier_seen = max(self._barrier_seen, seq)
        waiting = []
        for target, fut in self._barrier_waiters:
            if target <= seq:
                if not fut.done():
                    fut.set_result(None)
            elif not fut.done():
                waiting.append((target, fut))
        self._barrier_waiters = waiting

    def _receive(self, room: str, st: _Live, msg: Any) -> None:
        """One republished message of ``room``, in stream order (one publisher: the stream's leader)."""
        if st.held is not None:
            st.held.append(msg)
            return
        hdr = msg.headers or {}
        try:
            seq, last = int(hdr["Nats-Sequence"]), int(hdr.get("Nats-Last-Sequence", 0))
        except (KeyError, ValueError):
            log.warning("room %r: republished message without a readable sequence (%r)", room, hdr)
            return
        kind = msg.subject[msg.subject.rfind(".") + 1:]
        done = st.kinds.get(kind, st.base)
        if seq <= done:
            return  # delivered already, or stored before this replica followed the room
        if st.verify:  # a message the old leader stored and never republished comes first
            st.verify = False
            st.held = [msg]
            self._start_fill(room, st, None)
            return
        if last > done:  # the previous message of this subject never came: fetch it (and what followed)
            st.held = [msg]
            self._start_fill(room, st, kind)
            return
        self._accept(room, st, seq, kind, hdr, msg.data, _stamp(hdr.get("Nats-Time-Stamp", "")))

    def _accept(self, room: str, st: _Live, seq: int, kind: str, hdr: Any, data: bytes, at: float) -> None:
        st.kinds[kind] = seq
        if seq > st.seq:
            st.seq = seq
        offset = None
        if kind == "h":
            offset = int(hdr.get(HDR_OFFSET, 0)) or None
            if offset is not None:
                self._remember(room, seq, offset)
                self._head(room, seq, offset, at)
                self.tails.add(room, seq, offset, data, HDR_START in hdr, at)
        elif kind != "e":
            return
        self._deliver(room, data, offset)

    def _release(self, room: str, st: _Live) -> None:
        held, st.held = st.held, None
        for msg in held or ():
            self._receive(room, st, msg)  # a new gap holds the rest again

    def _start_fill(self, room: str, st: _Live, kind: str | None) -> None:
        """Hold the room's live messages and read what this replica missed from the stream's leader."""
        if st.held is None:
            st.held = []
        if st.filling:
            st.lost = True  # the running fill reads on to the end once more
            return
        st.filling = True
        task = asyncio.ensure_future(self._fill(room, st, kind))
        self._tasks.add(task)

        def done(t: asyncio.Task[None]) -> None:
            self._tasks.discard(t)
            if not t.cancelled() and t.exception() is not None and self._followed.get(room) is st:
                # the gap cannot be filled: the reconnect path resubscribes and the members recover
                self._fail(f"room {room!r}: missed messages could not be read: {t.exception()}")

        task.add_done_callback(done)

    async def _fill(self, room: str, st: _Live, kind: str | None) -> None:
        self.gap_fills += 1
        enc = encode_room(room)
        if kind is not None and st.kinds.get(kind, st.base) < st.seq:
            # a subject's gap found after a newer message of the room's other subject was delivered
            log.warning("room %r: messages of %r missed before %d found late; delivered out of order",
                        room, kind, st.seq)
            await self._fetch(room, st, f"{self.prefix}.r.{enc}.{kind}", st.kinds.get(kind, st.base) + 1, st.seq)
        while True:
            st.lost = False
            # up to the newest message held meanwhile (the held ones follow it): a busy room's fill ends
            await self._fetch(room, st, f"{self.prefix}.r.{enc}.*", st.seq + 1, None, upto_held=True)
            if not st.lost or self._followed.get(room) is not st:
                break
        st.filling = False
        if self._followed.get(room) is st:
            self._release(room, st)

    async def _fetch(self, room: str, st: _Live, subject: str, start: int, stop: int | None, *,
                     upto_held: bool = False) -> None:
        """Deliver the stored messages of ``subject`` from stream sequence ``start`` (up to ``stop``, or with
        ``upto_held`` up to the newest held message once there is one) that this replica has not delivered,
        in order; leader reads (a direct get may answer from a lagging replica)."""
        api = f"$JS.API.STREAM.MSG.GET.{self.stream}"
        while self._followed.get(room) is st:
            if upto_held and stop is None and st.held and st.received > st.need:
                stop = _sequence(st.held[-1])  # newer than every dropped message
            if stop is not None and start > stop:
                return
            acks = self.acks
            if acks is None:
                return
            try:
                answer = await acks.request(api, json.dumps({"seq": start, "next_by_subj": subject}).encode())
            except AckRefused as exc:
                if exc.code == NO_MESSAGE:
                    return
                raise
            msg = answer["message"]
            seq = int(msg["seq"])
            if stop is not None and seq > stop:
                return
            if self._followed.get(room) is not st:
                return
            kind = msg["subject"].rpartition(".")[2]
            if seq > st.kinds.get(kind, st.base):
                hdr = _headers(base64.b64decode(msg.get("hdrs") or ""))
                self._accept(room, st, seq, kind, hdr, base64.b64decode(msg.get("data") or ""),
                             _stamp(msg.get("time", "")))
            start = seq + 1

    async def _leader_cb(self, msg: Any) -> None:
        """The stream has a new leader: a message the old one stored but did not republish is missed by
        every replica, and ``Nats-Last-Sequence`` shows it only at the next message of the same subject.
        Each followed room is read from the stream before its next message is delivered (so in order),
        and the upkeep reads the rooms that stay quiet (:data:`VERIFY_PER_UPKEEP` at a time)."""
        log.info("stream %s has a new leader: the followed rooms are read again", self.stream)
        self._verify_all()

    def _verify_all(self) -> None:
        """Read every followed room from the stream before its next message, and the quiet ones from the
        upkeep, :data:`VERIFY_PER_UPKEEP` at a time (not all at once: tens of thousands of reads would
        time out together and fail the connection)."""
        for room, st in self._followed.items():
            if st.seq >= 0:
                st.verify = True
                self._unverified.add(room)

    def _verify_quiet(self) -> None:
        busy = []
        for _ in range(min(VERIFY_PER_UPKEEP, len(self._unverified))):
            room = self._unverified.pop()
            st = self._followed.get(room)
            if st is None or not st.verify:
                continue
            if st.held is not None:
                busy.append(room)  # a fill that began before the reason to verify: the next upkeep reads it
                continue
            st.verify = False
            self._start_fill(room, st, None)
        self._unverified.update(busy)

    def _slow(self, sid: int) -> None:
        """nats-py dropped a message of a full subscription (its pending limit): read the room again from
        the stream. Called from the reader before it takes the next message, so nothing newer is
        delivered before the fill holds the room."""
        room = self._by_sid.get(sid)
        st = self._followed.get(room) if room is not None else None
        if room is None or st is None:
            return
        if not (st.filling or st.lost):  # once per fill, not per dropped message
            log.warning("room %r: this replica fell behind its subscription; reading it from the stream", room)
        # the queued messages came before the dropped one: a message received after them came after it
        st.need = st.received + st.sub._pending_queue.qsize()
        if st.seq < 0:
            st.lost = True  # before the baseline: _consume fills once it is known
        else:
            self._start_fill(room, st, None)

    async def _assert_republish(self) -> bool:
        """Put the stream's RePublish back when it is missing (a replica of an older version updated the
        stream without it); True when it was missing. Messages stored meanwhile were not republished:
        each followed room is read again from its last delivered message (:meth:`_verify_all`).

        Through :attr:`acks` (timers, no ``asyncio.wait_for``: Python 3.11's can swallow the cancellation
        that closes the bus, and the upkeep would then run on)."""
        acks = self.acks
        if acks is None:
            raise ConnectionError("not connected")
        try:
            info = await acks.request(f"$JS.API.STREAM.INFO.{self.stream}", b"")
            want = self._republish()
            rp = info.get("config", {}).get("republish") or {}
            if (rp.get("src"), rp.get("dest")) == (want.src, want.dest):
                return False
            log.warning("stream %s: RePublish was %r; restoring it and reading the followed rooms again",
                        self.stream, rp or None)
            await acks.request(f"$JS.API.STREAM.UPDATE.{self.stream}",
                               json.dumps(self._stream_config.as_dict()).encode())
        except AckRefused as exc:
            raise BusUnavailable(f"stream {self.stream}: {exc}") from exc
        self.republish_restored += 1
        self._verify_all()
        return True

    def _remember(self, room: str, seq: int, offset: int) -> None:
        cur = self._last.get(room)
        if cur is None or seq > cur[0]:
            self._last[room] = (seq, offset)
            self._last.move_to_end(room)
            while len(self._last) > 10_000:
                self._last.popitem(last=False)

    async def _teardown(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            self._probe = None
        nc, self.nc = self.nc, None
        self.js = self.state_kv = None
        self._followed, self._subs, self._by_sid = {}, {}, {}
        self._barrier_next = None
        for fut in (w for _, w in self._barrier_waiters):
            if not fut.done():
                fut.set_exception(ConnectionError("disconnected from NATS"))
        self._barrier_waiters = []
        tasks, self._tasks = list(self._tasks), set()
        for task in tasks:
            task.cancel()
        self._heads, self._known = {}, set()
        self.tails.clear()
        if self.acks is not None:
            self.acks.fail_all(ConnectionError("disconnected from NATS"))
            self.acks = None
        if nc is not None:
            await safe_close(log, "nats connection")(nc.close())

    async def _roundtrip(self) -> None:
        nc = self.nc
        if nc is None:
            raise ConnectionError("not connected")
        await nc.flush(timeout=self.heartbeat_timeout)
        if self.opts.replicas > 1:
            self._check_quorum()

    def _check_quorum(self) -> None:
        """Start one probe write (unless one is under way) and raise once no write reached a quorum for
        ``quorum_timeout`` seconds. The probe runs beside the heartbeat, so a slow quorum (an election,
        a busy cluster) never makes the PING/PONG late."""
        if self._probe is None or self._probe.done():
            self._probe = asyncio.ensure_future(self._probe_quorum())
        silent = time.monotonic() - self._quorum_at
        if silent > self.opts.quorum_timeout:
            raise ConnectionError(f"no JetStream quorum for {silent:.1f}s ({self._probe_error})")

    async def _probe_quorum(self) -> None:
        js = self.js
        if js is None:
            return
        try:
            await js.publish(self._probe_subject, b"", timeout=self.opts.op_timeout)
        except (TimeoutError, self.nats.errors.Error, self.nats.js.errors.Error) as exc:
            self._probe_error = f"{type(exc).__name__}: {exc}"[:200]
            return
        self._quorum_at = time.monotonic()

    async def _refresh(self) -> None:
        if self.presence is not None:
            await self.presence.upkeep()  # first: its heartbeat is due now
        self._verify_quiet()
        # an older replica's (re)start updates the stream without RePublish: put it back
        try:
            await self._assert_republish()
        except (BusUnavailable, TimeoutError, ConnectionError) as exc:
            log.info("upkeep: the stream's RePublish was not checked: %s: %s", type(exc).__name__, exc)

    async def close(self) -> None:
        if self.presence is not None:
            await self.presence.close()
        await super().close()

    async def call(self, what: str, op: Any) -> Any:
        return await self._call(what, op, self.errors, soft=self.soft)

    # -- Bus -------------------------------------------------------------------------------------------

    async def last(self, room: str) -> tuple[int, int, bool]:
        """(stream seq, offset, is run start) of the room's newest history message; (0, 0, False)."""
        seq, offset, start, _ = await self._last_msg(room)
        return seq, offset, start

    async def _last_msg(self, room: str) -> tuple[int, int, bool, float]:
        """:meth:`last` and the message's broker time (epoch seconds; ``inf`` when there is none)."""
        js, stream, subject = self.js, self.stream, self.subject(room)
        not_found = self.nats.js.errors.NotFoundError

        async def get() -> tuple[int, int, bool, float]:
            try:
                msg = await js.get_last_msg(stream, subject, direct=True)
            except not_found:
                return 0, 0, False, float("inf")
            hdr = msg.headers or {}
            at = msg.time.timestamp() if msg.time is not None else 0.0
            return int(msg.seq), int(hdr.get(HDR_OFFSET, 0)), HDR_START in hdr, at

        return await self.call("history", get)  # type: ignore[no-any-return]

    async def newest(self, room: str) -> tuple[int, int, bool]:
        """:meth:`last` for a history read: one direct get (through :attr:`acks`, no task or timer of its
        own) for every read of ``room`` that began in this loop iteration. It is sent after all of them
        began, so each gets an answer at least as new as its own start."""
        self._check()
        loop = asyncio.get_running_loop()
        readers = self._newest.get(room)
        if readers is None:
            readers = self._newest[room] = []
            loop.call_soon(self._ask_newest, room, readers)
        fut: asyncio.Future[tuple[int, int, bool]] = loop.create_future()
        readers.append(fut)
        return await fut

    def _ask_newest(self, room: str, readers: list[asyncio.Future[tuple[int, int, bool]]]) -> None:
        if self._newest.get(room) is readers:
            del self._newest[room]
        task = asyncio.ensure_future(self._get_newest(room))

        def done(t: asyncio.Task[tuple[int, int, bool]]) -> None:
            exc = BusUnavailable("history: cancelled") if t.cancelled() else t.exception()
            for fut in readers:
                if fut.done():
                    continue
                if exc is not None:
                    fut.set_exception(exc)
                    fut.exception()  # retrieved: its reader may have gone
                else:
                    fut.set_result(t.result())

        task.add_done_callback(done)

    async def _get_newest(self, room: str) -> tuple[int, int, bool]:
        subject, req = f"$JS.API.DIRECT.GET.{self.stream}", b'{"last_by_subj":"%s"}' % self.subject(room).encode()
        msg = await self._via_acks("history", lambda acks: acks.get(subject, req))
        if msg is None:
            return 0, 0, False
        hdr = msg.headers or {}
        try:
            return int(hdr["Nats-Sequence"]), int(hdr.get(HDR_OFFSET, 0)), HDR_START in hdr
        except (KeyError, ValueError) as exc:
            raise BusUnavailable(f"history: unreadable direct get answer {hdr!r:.100}") from exc

    async def position(self, room: str) -> int:
        """The offset of the room's newest history message. While this replica follows the room
        (its consumer runs), it is the newest one the consumer delivered or a publish acknowledged,
        no round trip: every later message reaches the room's members through the consumer anyway.
        Otherwise one read, shared by every caller of the same moment."""
        self._check()
        if room in self._known:
            head = self._heads.get(room)
            if head is None:
                return 0  # empty when the consumer started, and no message since
            # trusted while the message is far from its max_age (an expired room restarts its offsets)
            if time.time() - head[2] < self.opts.history_ttl / 2:
                return head[1]
            self._known.discard(room)
        fut = self._asking.get(room)
        if fut is None:
            fut = self._asking[room] = asyncio.ensure_future(self._last_msg(room))
            sub = self._subs.get(room)  # the consumer the answer is newer than
            fut.add_done_callback(lambda f: self._asked(room, sub, f))
        return (await asyncio.shield(fut))[1]

    def _asked(self, room: str, sub: Any, fut: asyncio.Future[tuple[int, int, bool, float]]) -> None:
        if self._asking.get(room) is fut:
            del self._asking[room]
        if fut.cancelled() or fut.exception() is not None:
            return
        # asked after the room's consumer started: the consumer delivers everything newer
        if sub is not None and self._subs.get(room) is sub:
            seq, offset, _, at = fut.result()
            if seq:
                self._head(room, seq, offset, at)
            self._known.add(room)

    def _head(self, room: str, seq: int, offset: int, at: float) -> None:
        cur = self._heads.get(room)
        if cur is None or seq > cur[0]:
            self._heads[room] = (seq, offset, at)

    async def write(self, what: str, subject: str, payload: bytes, headers: dict[str, str] | None = None) -> int:
        """A JetStream write (a KV put or purge) acknowledged by the stream: its sequence."""
        answer = await self.request(what, subject, payload, headers)
        try:
            return int(answer["seq"])
        except (KeyError, TypeError, ValueError) as exc:
            raise BusUnavailable(f"{what}: unreadable acknowledgement {answer!r:.100}") from exc

    async def request(self, what: str, subject: str, payload: bytes, headers: dict[str, str] | None = None, *,
                      absent: int = 0) -> dict[str, Any]:
        """A JetStream write or API request through :attr:`acks`: the JSON answer, ``{}`` for the
        error code ``absent``. Errors as :meth:`call`'s (BusUnavailable; a broken connection also
        fails the bus)."""
        answer = await self._via_acks(what, lambda acks: acks.request(subject, payload, headers), absent)
        return {} if answer is None else answer

    async def _via_acks(self, what: str, op: Callable[[Acks], Awaitable[T]], absent: int = 0) -> T | None:
        """``op(acks)``; None for the error code ``absent``; errors as :meth:`request`'s."""
        self._check()
        acks = self.acks
        if acks is None:
            raise BusUnavailable("the broker is unreachable")
        try:
            return await op(acks)
        except TimeoutError:
            log.info("%s: no answer from the broker within %gs", what, self.op_timeout)
            raise BusUnavailable(f"{what}: no answer from the broker within {self.op_timeout:g}s") from None
        except AckRefused as exc:
            if absent and exc.code == absent:
                return None
            log.info("%s failed: %s", what, exc)
            raise BusUnavailable(f"{what}: {exc}") from exc
        except self.errors as exc:
            self._fail(f"{what}: {type(exc).__name__}: {exc}")
            raise BusUnavailable(f"{what}: {type(exc).__name__}: {exc}") from exc
        except self.soft as exc:
            log.info("%s failed: %s: %s", what, type(exc).__name__, exc)
            raise BusUnavailable(f"{what}: {type(exc).__name__}: {exc}") from exc

    async def publish(self, room: str, payload: bytes, *, history: bool = False, dedupe_key: str | None = None,
                      dedupe_window: float = 0.0) -> int | None:
        self._check()
        js, stream = self.js, self.stream
        if not history:
            subject = self.subject(room, "e")
            try:
                await self.call("publish", lambda: js.publish(subject, payload, stream=stream))
            except BusUnavailable as exc:
                raise PublishOutcomeUnknown(str(exc)) from exc
            return None
        msg_id = None
        if dedupe_key is not None and dedupe_window > 0:
            msg_id = f"{encode_room(room)}.{dedupe_key}"  # keys are per room; the stream's are not
        # ordered_handoff: a room's history publishes queue for its lock (FIFO) in the order they were
        # started, before anything here suspends; each is written once the one before was acknowledged
        held = self._locks.get(room)
        if held is None:
            held = self._locks[room] = (asyncio.Lock(), [0])
        lock, users = held
        users[0] += 1
        try:
            async with lock:
                if msg_id is not None:
                    await self._ensure_dedupe_window(dedupe_window)
                return await self._publish_history(room, payload, msg_id)
        finally:
            # dropped with its last user: "not locked" alone is also true while the next waiter is woken but
            # not yet running, and a new lock then would let a later publish overtake it
            users[0] -= 1
            if not users[0] and self._locks.get(room) is held:
                del self._locks[room]

    async def _ensure_dedupe_window(self, window: float) -> None:
        """JetStream dedupes ``Nats-Msg-Id`` within the stream's ``duplicate_window`` (at most its
        ``max_age``): set it to ``window`` once, when it differs."""
        window = min(window, self.opts.history_ttl)
        if window == self._dedupe_window:
            return
        config = dataclasses.replace(self._stream_config, duplicate_window=window)
        js = self.js
        await self.call("publish", lambda: js.update_stream(config))
        self._stream_config, self._dedupe_window = config, window

    async def _publish_history(self, room: str, payload: bytes, msg_id: str | None = None) -> int:
        js, stream, subject = self.js, self.stream, self.subject(room)
        api_error = self.nats.js.errors.APIError

        async def send(headers: dict[str, str]) -> Any:
            try:
                return await js.publish(subject, payload, stream=stream, headers=headers)
            except api_error as exc:
                if exc.err_code in WRONG_LAST_SEQUENCE or exc.err_code == DUPLICATE_IN_PROCESS:
                    raise _Wrong() from None  # retried after a short wait
                raise _Refused(f"{type(exc).__name__}: {exc}") from exc

        for attempt in range(100):
            known = self._last.get(room)
            if known is None:
                seq, top, _ = await self.last(room)
            else:
                seq, top = known
            headers = {EXPECTED_LAST_SUBJECT_SEQ: str(seq)}
            if seq == 0:
                info = await self.call("publish", lambda: js.stream_info(stream))
                offset = int(info.state.last_seq) + 1
                headers[HDR_START] = "1"
            else:
                offset = top + 1
            headers[HDR_OFFSET] = str(offset)
            if msg_id is not None:
                headers[MSG_ID] = msg_id
            try:
                ack = await self.call("publish", lambda h=headers: send(h))  # type: ignore[misc]
            except _Wrong:
                self._last.pop(room, None)
                await asyncio.sleep(0.001 * min(attempt, 20))
                continue
            except _Refused as exc:
                raise BusUnavailable(f"publish to {room!r} refused: {exc}") from exc
            except BusUnavailable as exc:  # sent, and no answer: it may have been stored
                raise PublishOutcomeUnknown(str(exc)) from exc
            if ack.duplicate:  # JetStream kept the first one: ack.seq is its sequence
                return await self._offset_of(int(ack.seq))
            self._remember(room, int(ack.seq), offset)
            if room in self._subs:
                self._head(room, int(ack.seq), offset, time.time())
            return offset
        raise BusUnavailable(f"publish to {room!r}: too many concurrent writers")

    async def _offset_of(self, seq: int) -> int:
        """The offset of the message at stream sequence ``seq``; 0 when it is gone (trimmed)."""
        js, stream = self.js, self.stream
        not_found = self.nats.js.errors.NotFoundError

        async def get() -> int:
            try:
                msg = await js.get_msg(stream, seq, direct=True)
            except not_found:
                return 0
            return int((msg.headers or {}).get(HDR_OFFSET, 0))

        try:
            return await self.call("publish", get)  # type: ignore[no-any-return]
        except BusUnavailable as exc:  # the duplicate was answered: published once, offset unknown
            raise PublishOutcomeUnknown(str(exc)) from exc

    async def subscribe(self, room: str) -> None:
        self._check()
        self._rooms.add(room)
        try:
            await self.call("subscribe", lambda: self._consume(room))
        except BaseException:
            self._rooms.discard(room)
            sub = self._stop(room)
            if sub is not None:
                task = asyncio.ensure_future(_quietly(sub.unsubscribe()))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            self._heads.pop(room, None)
            self.tails.drop(room)
            raise

    async def unsubscribe(self, room: str) -> None:
        if room not in self._rooms:
            return
        self._rooms.discard(room)
        self._heads.pop(room, None)
        self._known.discard(room)
        self.tails.drop(room)
        sub = self._stop(room)
        if sub is not None and self._healthy:
            with contextlib.suppress(BusUnavailable):
                await self.call("unsubscribe", sub.unsubscribe)

    def _stop(self, room: str) -> Any:
        """Forget the room's live delivery; its subscription (None if it has none), to unsubscribe."""
        self._subs.pop(room, None)
        st = self._followed.pop(room, None)
        if st is None or st.sub is None:
            return None
        self._by_sid.pop(st.sub._id, None)
        return st.sub


async def _quietly(op: Awaitable[Any]) -> None:
    """An unsubscribe nobody waits for (a failed subscribe's): its failure changes nothing."""
    with contextlib.suppress(Exception):
        await op
