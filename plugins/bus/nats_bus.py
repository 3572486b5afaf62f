"""The NATS bus (:mod:`wirehub.builtins.bus.nats`): the connection that history, presence and state share,
live room delivery, and history publishes that give each room consecutive offsets.

One order per room: the stream republishes every message it stores (``RePublish`` ``<p>.r.>`` to ``<p>.rl.>``;
one publisher, the stream's leader, in stream order, with ``Nats-Sequence`` and ``Nats-Last-Sequence``, the
previous stored sequence of the same subject) and each replica follows a room with one core subscription to
``<p>.rl.<r>.*``: no JetStream consumer per room. ``subscribe`` returns once its baseline is known (every
message stored later reaches the subscription; see ``_consume`` and ``_barrier`` in
:mod:`~wirehub.builtins.bus.nats_live`, which holds the live delivery). A message whose ``Nats-Last-Sequence``
is newer than the last one of its subject delivered, a drop nats-py reports (a full subscription), or a
RePublish found missing (an older replica updated the stream) makes the room's live messages wait while the
missed ones are read from the stream's leader and delivered in order; copies already delivered are dropped;
after a stream leader change (its advisory) each room is read again before its next message. So every replica
gets the room in stream order, without loss or duplicate while connected (the exception, a loss none of these
notices, found only after a newer message of the room's other subject and then delivered late: docs/buses.md).

Offsets: a per-room counter carried in the ``Wh-Off`` header. A history publish sends the next
offset with ``Nats-Expected-Last-Subject-Sequence`` set to the stream sequence of the room's last
history message; JetStream refuses it if another replica got there first, and the publisher
re-reads the room's last message and tries again. So offsets are consecutive in stream order.
A room's history publishes wait for the room's lock in order; its holder writes those queued behind it
in one atomic batch (nats-server 2.12+, the stream's ``allow_atomic``), the check on the first message, so
a room's publish rate is not one per round trip.
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
import zlib
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from wirehub import BusHandler, BusUnavailable, ConfigError, PublishOutcomeUnknown
from wirehub.builtins.bus._broker import encode_room, safe_close
from wirehub.builtins.bus.nats_acks import AckRefused, Acks, Dropped, Lanes
from wirehub.builtins.bus.nats_leaders import Leaders
from wirehub.builtins.bus.nats_live import HDR_OFFSET, HDR_START, LiveRooms, RoomStream
from wirehub.builtins.bus.nats_tail import Tails

if TYPE_CHECKING:
    from wirehub.builtins.bus.nats import NatsOptions
    from wirehub.builtins.bus.nats_presence import NatsPresence

log = logging.getLogger("wirehub.bus.nats")
T = TypeVar("T")

INSTALL_HINT = "pip install 'wirehub[nats]'"
EXPECTED_LAST_SUBJECT_SEQ = "Nats-Expected-Last-Subject-Sequence"
MSG_ID = "Nats-Msg-Id"
WRONG_LAST_SEQUENCE = (10071, 10164)
#: the first server with atomic batch publishes (``allow_atomic`` streams, ``Nats-Batch-*`` headers)
ATOMIC_SERVER = (2, 12, 0)
#: "atomic publish is disabled" on the stream (an older replica updated its config): the only refusal of a batch
#: that says the stream no longer takes batches; others (too many batches in flight, a message too large, a
#: batch the server timed out) refuse that batch alone
ATOMIC_DISABLED = 10174
#: history publishes of one room sent as one atomic batch at most (the server's limit is 1,000)
BATCH_MAX = 100
#: "duplicate message id is in process": a publish with the same Nats-Msg-Id is being stored (in a
#: cluster, replicated) right now; once it is, the retry is answered as a duplicate with its sequence
DUPLICATE_IN_PROCESS = 10158
#: the oldest nats-server wirehub runs on: per-message TTLs (presence purge markers) and batched direct gets
#: (presence copies) came in 2.11
MIN_SERVER = (2, 11, 0)
#: the room streams' settings this bus sets (with ``allow_atomic`` where nats-py has it): a stream that
#: differs only elsewhere (its dedupe window, the server's defaults) is not updated at start
STREAM_FIELDS = ("subjects", "max_msgs_per_subject", "max_age", "storage", "num_replicas", "discard",
                 "allow_direct", "max_consumers", "republish")


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
    if isinstance(seen, Layout):
        return f"{key}.room_streams: {seen}"
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


class Layout(ConnectionError):
    """The server's room streams are of another ``room_streams``."""


class _Wrong(Exception):
    """Another writer was first: Nats-Expected-Last-Subject-Sequence did not match, or a publish with the
    same Nats-Msg-Id is still being stored (DUPLICATE_IN_PROCESS)."""


class _Refused(Exception):
    """JetStream answered the publish with an error: the message was not stored."""


def _commit(subject: str, payload: bytes, headers: dict[str, str], acks: Acks) -> Awaitable[dict[str, Any]]:
    """An atomic batch's last message, which commits it: the stream's acknowledgement of the batch."""
    return acks.request(subject, payload, headers)


class _Queued:
    """A history publish waiting for its room's lock; ``answer`` is set when an earlier holder wrote it."""

    __slots__ = ("answer", "msg_id", "payload", "sent", "taken")

    def __init__(self, payload: bytes, msg_id: str | None) -> None:
        self.payload, self.msg_id, self.taken = payload, msg_id, False
        #: handed to the broker (its outcome is unknown if no answer comes); one never sent was not stored
        self.sent = False
        self.answer: asyncio.Future[int] = asyncio.get_running_loop().create_future()


class NatsBus(LiveRooms):
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
        #: the room streams; a room's is ``streams[crc32(its base64url name) % room_streams]``
        self.streams = [RoomStream(self.prefix, _name(self.prefix, "rooms"), i, opts.room_streams)
                        for i in range(opts.room_streams)]
        #: the first room stream's name (the only one with room_streams 1)
        self.stream = self.streams[0].name
        self.nc: Any = None
        self.js: Any = None
        self.state_kv: Any = None
        self.presence: NatsPresence | None = None
        self._init_live()
        #: room -> its history publishes' lock and how many publishes hold or wait for it
        self._locks: dict[str, tuple[asyncio.Lock, list[int]]] = {}
        #: room -> its history publishes waiting for the lock, in order: the holder takes those behind it
        self._waiting: dict[str, collections.deque[_Queued]] = {}
        #: the stream takes atomic batches (nats-server 2.12+, allow_atomic set by this replica)
        self._atomic = False
        #: history writes sent (one per message, or one per atomic batch): tests and operators
        self.history_writes = 0
        #: room -> (stream seq, offset) of its newest history message, as far as this replica knows
        self._last: collections.OrderedDict[str, tuple[int, int]] = collections.OrderedDict()
        #: replicas > 1: time.monotonic() of the last JetStream write a quorum acknowledged
        self._quorum_at = 0.0
        self._probe: asyncio.Future[None] | None = None
        self._probe_error = "no answer"
        self._probe_subject = f"{self.prefix}.q.{uuid.uuid4().hex[:12]}"
        #: JetStream writes of presence (their acks on one inbox; see nats_acks)
        self.acks: Acks | None = None
        #: the followed rooms' and presence copies' subscriptions, through one dispatcher (nats_acks.Lanes)
        self.lanes: Lanes | None = None
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
        #: where the room streams' leaders sit (nats_leaders): spread at connect and again from the upkeep
        self.leaders = Leaders(self)

    async def start(self, handler: BusHandler) -> None:
        try:
            await super().start(handler)
        except BusUnavailable as exc:
            hint = startup_error(exc, self.opts, self.config_key)
            if hint is None:
                raise
            log.error("cannot start the nats bus: %s", hint)
            raise BusUnavailable(hint) from exc

    def stream_of(self, room: str) -> RoomStream:
        """The stream that holds ``room``: a hash of its name every replica computes alike (crc32, not
        Python's ``hash``, which differs per process)."""
        streams = self.streams
        if len(streams) == 1:
            return streams[0]
        return streams[zlib.crc32(encode_room(room).encode()) % len(streams)]

    def subject(self, room: str, kind: str = "h") -> str:
        return f"{self.prefix}.{self.stream_of(room).token}.{encode_room(room)}.{kind}"

    def epoch_of(self, room: str) -> str:
        """The epoch of the room's history: its stream's."""
        return self.stream_of(room).epoch

    @property
    def epoch(self) -> str:
        """The first room stream's epoch (every room's with room_streams 1)."""
        return self.streams[0].epoch

    @property
    def _stream_config(self) -> Any:
        return self.streams[0].config

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
                acks = self.acks
                if acks is not None and acks.owns(exc.sid):
                    # an answer was lost, and nothing says whose: every request under way fails now (a gap
                    # fill asks again in smaller batches) rather than one waiting for its timeout
                    if acks.pending():  # once per overflow, not per dropped message
                        log.warning("nats: the acks inbox overflowed; failing the %d requests under way",
                                    acks.pending())
                    acks.fail_all(Dropped("an answer was dropped: the acks inbox overflowed"))
                    return
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
        self.lanes = Lanes(nc)
        storage = api.StorageType.MEMORY if o.storage == "memory" else api.StorageType.FILE
        listed = await self._check_layout(acks)
        version = nc.connected_server_version
        self._atomic = ((version.major, version.minor, version.patch) >= ATOMIC_SERVER
                        and "allow_atomic" in {f.name for f in dataclasses.fields(api.StreamConfig)})
        for rs in self.streams:
            config = api.StreamConfig(
                name=rs.name, subjects=[f"{self.prefix}.{rs.token}.*.*"], max_msgs_per_subject=max(1, o.history_size),
                max_age=o.history_ttl, storage=storage, num_replicas=o.replicas, discard=api.DiscardPolicy.OLD,
                allow_direct=True, duplicate_window=rs.dedupe_window, max_consumers=o.max_consumers,
                republish=self._republish(rs),  # live room delivery (see the module's docstring)
            )
            if self._atomic:  # a room's waiting history publishes go as one batch (see publish)
                config = dataclasses.replace(config, allow_atomic=True)
            try:
                info = await js.add_stream(config)
            except self.nats.js.errors.BadRequestError:  # it exists with another configuration
                config, info = await self._update_stream(config)
            # the dedupe window the publishes set (api.idempotency_window; the server's default otherwise): kept,
            # so that neither this start nor the next keyed publish updates the stream (every update advisory
            # makes every replica read its followed rooms again)
            window = getattr(getattr(info, "config", None), "duplicate_window", None)
            if window:
                config = dataclasses.replace(config, duplicate_window=window)
                rs.dedupe_window = float(window)
            rs.config = config
            # batches only where the stream says it took allow_atomic: a 2.11 leader of a cluster mid-upgrade
            # drops the field (and would store a batch's messages one by one, unchecked)
            self._atomic = self._atomic and bool(getattr(getattr(info, "config", None), "allow_atomic", False))
            created = getattr(info, "created", None) or (await js.stream_info(rs.name)).created
            rs.epoch = hashlib.sha1(f"{rs.name}@{created}".encode()).hexdigest()[:12]
        if listed:  # again: replicas of two counts starting together on an empty server both passed the first
            await self._check_layout(acks)
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
        await self._open_live(nc)
        self.leaders.connected(acks)  # room_streams > 1 on a cluster: their leaders spread over the nodes

    async def _update_stream(self, config: Any) -> tuple[Any, Any]:
        """Update a room stream that exists with another configuration, keeping its dedupe window; not when
        only that window differs (an update is an advisory every replica acts on). (config, stream info)."""
        js = self.js
        stored = await js.stream_info(config.name)
        config = dataclasses.replace(config, duplicate_window=stored.config.duplicate_window or 0.0)
        fields = (*STREAM_FIELDS, "allow_atomic") if getattr(config, "allow_atomic", None) else STREAM_FIELDS
        if all(getattr(stored.config, f, None) == getattr(config, f) for f in fields):
            return config, stored
        return config, await js.update_stream(config)

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

    async def _check_layout(self, acks: Acks) -> bool:
        """Refuse a server whose room streams are of another ``room_streams``: a room would then live in two
        streams (two orders, two histories). Changing it is a migration (docs/buses.md). Checked before the
        streams are made and again after: of two replicas of different counts that both passed the first
        check, each sees the other's streams at the second (both refuse: nothing is served in two layouts).
        False when the streams could not be listed (not checked)."""
        want = {rs.name for rs in self.streams}
        pattern = re.compile(re.escape(_name(self.prefix, "rooms")) + r"(_\d+of\d+)?")
        found: list[str] = []
        offset = 0
        while True:
            try:
                answer = await acks.request("$JS.API.STREAM.NAMES",
                                            json.dumps({"subject": f"{self.prefix}.>", "offset": offset}).encode())
            except (AckRefused, TimeoutError) as exc:  # e.g. a user allowed its streams only, not the listing
                log.warning("room streams not checked against room_streams (stream names: %s: %s)",
                            type(exc).__name__, exc)
                return False
            names = answer.get("streams") or []
            found += [n for n in names if pattern.fullmatch(n)]
            offset += len(names)
            if not names or offset >= int(answer.get("total") or 0):
                break
        other = sorted(set(found) - want)
        if other:
            raise Layout(f"room_streams is {len(self.streams)} but the server holds the room streams "
                         f"{', '.join(other)} of another room_streams: set it back, or migrate (docs/buses.md, "
                         f"\"Changing room_streams\")")
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
        self._teardown_live()
        self._heads, self._known = {}, set()
        self.tails.clear()
        if self.acks is not None:
            self.acks.fail_all(ConnectionError("disconnected from NATS"))
            self.acks = None
        if self.lanes is not None:
            self.lanes.close()
            self.lanes = None
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
        # a node that returned leads nothing until the leaders are spread again (beside the upkeep)
        self.leaders.upkeep()
        # an older replica's (re)start updates the streams without RePublish: put it back
        await self._check_republish()

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
        js, stream, subject = self.js, self.stream_of(room).name, self.subject(room)
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
        subject = f"$JS.API.DIRECT.GET.{self.stream_of(room).name}"
        req = b'{"last_by_subj":"%s"}' % self.subject(room).encode()
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
        js, stream = self.js, self.stream_of(room).name
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
        # started, before anything here suspends; each is written once the one before was acknowledged, and
        # the holder writes the room's publishes waiting behind it in the same atomic batch (their lock turn
        # then only returns the answer), so a room's publish rate is not one per round trip
        held = self._locks.get(room)
        if held is None:
            held = self._locks[room] = (asyncio.Lock(), [0])
        lock, users = held
        users[0] += 1
        me = _Queued(payload, msg_id)
        waiting = self._waiting.setdefault(room, collections.deque())
        waiting.append(me)
        try:
            async with lock:
                if me.answer.done():  # written in an earlier holder's batch
                    return me.answer.result()  # type: ignore[no-any-return]
                taken = self._take(waiting, me)
                if len(taken) == 1:
                    if msg_id is not None:
                        await self._ensure_dedupe_window(self.stream_of(room), dedupe_window)
                    return await self._publish_history(room, payload, msg_id)
                return await self._publish_taken(room, taken)
        finally:
            if not me.taken:  # cancelled while it waited: not written
                with contextlib.suppress(ValueError):
                    waiting.remove(me)
            # dropped with its last user: "not locked" alone is also true while the next waiter is woken but
            # not yet running, and a new lock then would let a later publish overtake it
            users[0] -= 1
            if not users[0] and self._locks.get(room) is held:
                del self._locks[room]
                if self._waiting.get(room) is waiting:
                    del self._waiting[room]

    def _take(self, waiting: collections.deque[_Queued], me: _Queued) -> list[_Queued]:
        """``me`` (the head of the room's waiting publishes) and, on a stream that takes atomic batches, those
        behind it up to the first with a dedupe key (it goes alone) or :data:`BATCH_MAX`."""
        me.taken = True
        taken = [me]
        if waiting and waiting[0] is me:  # always, as the lock is FIFO; else the rest waits its turns
            waiting.popleft()
        else:
            waiting.remove(me)
            return taken
        if not self._atomic or me.msg_id is not None:
            return taken
        while waiting and len(taken) < BATCH_MAX and waiting[0].msg_id is None:
            nxt = waiting.popleft()
            nxt.taken = True
            taken.append(nxt)
        return taken

    async def _publish_taken(self, room: str, taken: list[_Queued]) -> int:
        """Write ``taken`` (the first is the caller's) and answer the others; the caller's offset."""
        try:
            offsets = await self._publish_batch(room, taken)
            if offsets is None:  # one by one, each answered as its own lock turn would have been
                return await self._publish_each(room, taken)
        except BaseException as exc:  # each its own exception object (one raised in several tasks chains tracebacks)
            for q in taken[1:]:
                if q.answer.done():
                    continue
                if not q.sent:  # never handed to the broker: not stored
                    q.answer.set_exception(BusUnavailable(f"publish: not sent ({type(exc).__name__})"))
                elif isinstance(exc, BusUnavailable):
                    q.answer.set_exception(type(exc)(str(exc)))
                else:  # cancelled (a shutdown) while its batch was out: maybe stored
                    q.answer.set_exception(PublishOutcomeUnknown(f"publish: {type(exc).__name__}"))
            raise
        for q, offset in zip(taken[1:], offsets[1:], strict=True):
            if not q.answer.done():
                q.answer.set_result(offset)
        return offsets[0]

    async def _publish_each(self, room: str, taken: list[_Queued]) -> int:
        """``taken`` one by one, each answered with its own outcome (one refused or lost does not answer the
        others); the caller's (the first's) offset, or its error."""
        first: int | BusUnavailable = 0
        for i, q in enumerate(taken):
            q.sent = True
            try:
                outcome: int | BusUnavailable = await self._publish_history(room, q.payload)
            except BusUnavailable as exc:
                outcome = exc
            if i == 0:
                first = outcome
            elif not q.answer.done():
                if isinstance(outcome, BusUnavailable):
                    q.answer.set_exception(outcome)
                else:
                    q.answer.set_result(outcome)
        if isinstance(first, BusUnavailable):
            raise first
        return first

    async def _publish_batch(self, room: str, taken: list[_Queued]) -> list[int] | None:
        """The room's next messages as one atomic batch: stored together at consecutive offsets after the
        room's last, or not at all (``Nats-Expected-Last-Subject-Sequence`` on the first: another writer was
        first, so the room's last is read again and the batch sent again). None for a room without a retained
        message (a new run), a stream that stopped taking batches (an older replica updated it) or a batch the
        stream refused for another reason (too many in flight, too large): the caller writes them one by one."""
        subject, payloads = self.subject(room), [q.payload for q in taken]
        for attempt in range(100):
            known = self._last.get(room)
            seq, top = known if known is not None else (await self.last(room))[:2]
            if seq == 0 or not self._atomic:
                return None
            nc, batch, n = self.nc, uuid.uuid4().hex, len(payloads)
            if nc is None:
                raise BusUnavailable("the broker is unreachable")
            for q in taken:
                q.sent = True
            try:
                for i, payload in enumerate(payloads[:-1], 1):
                    part = {"Nats-Batch-Id": batch, "Nats-Batch-Sequence": str(i), HDR_OFFSET: str(top + i)}
                    if i == 1:
                        part[EXPECTED_LAST_SUBJECT_SEQ] = str(seq)
                    await nc.publish(subject, payload, headers=part)
            except self.errors as exc:  # nothing committed: the server drops a batch that is not
                self._fail(f"publish: {type(exc).__name__}: {exc}")
                raise BusUnavailable(f"publish: {type(exc).__name__}: {exc}") from exc
            commit = {"Nats-Batch-Id": batch, "Nats-Batch-Sequence": str(n), HDR_OFFSET: str(top + n),
                      "Nats-Batch-Commit": "1"}
            self.history_writes += 1
            try:
                answer = await self._via_acks("publish", functools.partial(_commit, subject, payloads[-1], commit))
            except BusUnavailable as exc:
                cause = exc.__cause__
                if isinstance(cause, Dropped):  # the answer was lost (the acks inbox overflowed), not a refusal
                    raise PublishOutcomeUnknown(str(exc)) from exc
                if isinstance(cause, AckRefused):  # refused whole: nothing stored
                    for q in taken:
                        q.sent = False
                if isinstance(cause, AckRefused) and cause.code in WRONG_LAST_SEQUENCE:
                    self._last.pop(room, None)
                    await asyncio.sleep(0.001 * min(attempt, 20))
                    continue
                if isinstance(cause, AckRefused):
                    if cause.code == ATOMIC_DISABLED:
                        log.info("atomic publish to %r refused (%s): one by one from now on", room, cause)
                        self._atomic = False
                    else:
                        log.info("atomic publish to %r refused (%s): this batch one by one", room, cause)
                    return None
                raise PublishOutcomeUnknown(str(exc)) from exc  # sent, and no answer: it may have been stored
            last = int((answer or {}).get("seq", 0))
            if not last:
                raise PublishOutcomeUnknown(f"publish to {room!r}: unreadable acknowledgement {answer!r:.100}")
            self._remember(room, last, top + n)
            if room in self._subs:
                self._head(room, last, top + n, time.time())
            return [top + i for i in range(1, n + 1)]
        raise BusUnavailable(f"publish to {room!r}: too many concurrent writers")

    async def _ensure_dedupe_window(self, rs: RoomStream, window: float) -> None:
        """JetStream dedupes ``Nats-Msg-Id`` within the stream's ``duplicate_window`` (at most its
        ``max_age``): set it to ``window`` once, when it differs."""
        window = min(window, self.opts.history_ttl)
        if window == rs.dedupe_window:
            return
        config = dataclasses.replace(rs.config, duplicate_window=window)
        js = self.js
        await self.call("publish", lambda: js.update_stream(config))
        rs.config, rs.dedupe_window = config, window

    async def _publish_history(self, room: str, payload: bytes, msg_id: str | None = None) -> int:
        js, stream, subject = self.js, self.stream_of(room).name, self.subject(room)
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
            self.history_writes += 1
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
                return await self._offset_of(stream, int(ack.seq))
            self._remember(room, int(ack.seq), offset)
            if room in self._subs:
                self._head(room, int(ack.seq), offset, time.time())
            return offset
        raise BusUnavailable(f"publish to {room!r}: too many concurrent writers")

    async def _offset_of(self, stream: str, seq: int) -> int:
        """The offset of the message at sequence ``seq`` of ``stream``; 0 when it is gone (trimmed)."""
        js = self.js
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

async def _quietly(op: Awaitable[Any]) -> None:
    """An unsubscribe nobody waits for (a failed subscribe's): its failure changes nothing."""
    with contextlib.suppress(Exception):
        await op
