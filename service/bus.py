"""The backend contracts: Bus, History, Presence and StateStore, and their guarantees.

A bus plugin registers a factory that returns a :class:`Backend`: one bus plus the history,
presence and state stores of the same broker (memory, Redis, NATS). Every implementation passes
the contract suites in :mod:`wirehub.testing`.

Payloads are opaque bytes to a backend. The hub owns their format.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


class BusUnavailable(Exception):
    """The broker cannot be reached: the operation did not happen (never "maybe happened")."""


class PublishOutcomeUnknown(BusUnavailable):
    """A publish was handed to the broker but no answer came (timeout, connection lost while
    waiting): it may or may not have been stored and delivered. Callers must not report it as
    "not published"; a retry with the same ``dedupe_key`` within the window is delivered at most once.
    """


class StateConflict(Exception):
    """compare_and_set lost a race: the stored version is not the expected one."""


class BusHandler(Protocol):
    """What a bus pushes inbound messages to (the hub implements it)."""

    def on_bus_message(self, room: str, payload: bytes, offset: int | None) -> None:
        """One message published to ``room`` on any replica, in the room's bus order.

        ``offset`` is the history offset when the message was published with ``history=True``,
        else ``None``. Called on the event loop; must not block and must not raise.
        """

    def on_bus_state(self, healthy: bool) -> None:
        """The bus went up (``True``) or down (``False``). Called on every transition.

        After a reconnect, ``on_bus_state(True)`` comes after every room is resubscribed and
        before any message received on the new connection is pushed.

        A handler may also have ``on_bus_rooms_resumed(rooms: list[str])``: a bus whose rooms are
        spread over several brokers (the redis bus on a Redis Cluster) calls it when only these
        rooms' subscriptions were interrupted and are back, before it pushes anything newer for them;
        the handler then repairs them from history as after an outage.
        """


@runtime_checkable
class Bus(Protocol):
    """Publish/subscribe across replicas.

    Guarantees every implementation keeps:

    - at-most-once fan-out: a published message reaches each subscribed replica once or, during a
      broker outage, not at all (history is how a client finds out, never a silent duplicate);
    - one order per room: all replicas receive one room's messages in the same order, and a
      message published with ``history=True`` has a larger offset than every earlier one;
    - ``publish`` raises :class:`BusUnavailable` rather than buffering without bound or reporting
      a message it did not hand to the broker as published; :class:`BusUnavailable` itself means the
      message was not published, :class:`PublishOutcomeUnknown` (a subclass) that it may have been;
    - idempotent publish: a history publish with a ``dedupe_key`` that an earlier publish to the same
      room used within ``dedupe_window`` seconds is not stored or delivered again, on any replica,
      and returns the earlier message's offset (0 when the backend no longer knows it);
    - ``healthy`` is False while the broker is unreachable; the bus reconnects with capped
      backoff and resubscribes every room by itself, then reports ``on_bus_state(True)``.

    Optional capability, declared by a class attribute ``ordered_handoff = True`` (absent or False: not
    claimed; see :func:`ordered_handoff`; not a member of this Protocol, so buses without it still match):

    - ordered hand-off: publishes to one room whose ``publish`` coroutines were *started* (stepped to
      their first suspension, with ``coro.send(None)``, maybe outside any task) in some order get their
      offsets and are delivered in that order, whenever each is answered. So the part of ``publish``
      before its first suspension must fix the message's place (append it to one ordered write buffer
      or queue) and must not depend on the current task (no ``asyncio.timeout`` there). The chat
      handler pipelines a session's publishes (``publish_pipeline``) only on a bus that claims it;
      with any other, it waits for each answer before it reads the next frame.
    """

    @property
    def healthy(self) -> bool: ...

    async def start(self, handler: BusHandler) -> None:
        """Connect and begin pushing messages to ``handler``. Raises BusUnavailable if it cannot."""

    async def close(self) -> None:
        """Disconnect; idempotent. No handler call happens after it returns."""

    async def publish(self, room: str, payload: bytes, *, history: bool = False, dedupe_key: str | None = None,
                      dedupe_window: float = 0.0) -> int | None:
        """Send ``payload`` to every subscriber of ``room`` on every replica (this one included).

        With ``history=True`` the message is also appended to the room's history, atomically with
        the publish so that history order equals delivery order, and its offset is returned
        (``None`` otherwise). Raises BusUnavailable when the broker did not take the message, and
        PublishOutcomeUnknown when it may have.

        ``dedupe_key`` (history publishes only; a non-empty string of at most 128 printable ASCII
        characters) makes the publish idempotent for ``dedupe_window`` seconds, across replicas: a
        second publish to ``room`` with the same key returns the first one's offset and delivers
        nothing. The check and the append are atomic (a Lua script on Redis, JetStream's
        ``Nats-Msg-Id`` on NATS).
        """

    async def subscribe(self, room: str) -> None:
        """Start receiving ``room``; when it returns, every later publish is delivered."""

    async def unsubscribe(self, room: str) -> None:
        """Stop receiving ``room``; idempotent."""


def ordered_handoff(bus: object) -> bool:
    """Does ``bus`` claim the ordered hand-off of :class:`Bus` (a third-party bus without the attribute: no)?"""
    return getattr(bus, "ordered_handoff", False) is True


@dataclass(frozen=True)
class HistoryPage:
    """What :meth:`History.read` returns.

    ``complete`` is False when messages after ``after`` were lost (trimmed by count or age, or
    the epoch changed): the client must treat the page as a fresh start, not a recovery.
    """

    epoch: str
    top: int  # offset of the newest message in history (0 when empty)
    messages: Sequence[tuple[int, bytes]]
    complete: bool


@runtime_checkable
class History(Protocol):
    """Per-room message history, bounded by count and age, shared by all replicas.

    Offsets are positive integers increasing by publish order within one epoch. ``epoch`` is an
    opaque string that changes whenever the room's history was lost (broker restart without
    persistence, flush, expiry of the whole room), so that (offset, epoch) names one message.
    Messages are appended through :meth:`Bus.publish` with ``history=True``.
    """

    async def read(self, room: str, after: int | None, limit: int) -> HistoryPage:
        """Up to ``limit`` messages with offset > ``after``, oldest first.

        ``after=None`` returns the newest ``limit`` messages. ``complete`` is False when
        ``after`` is older than the oldest retained message, or newer than ``top``
        (an offset from another epoch). Raises BusUnavailable.
        """
        ...

    async def position(self, room: str) -> tuple[int, str]:
        """``(top, epoch)`` of the room now; ``top`` is 0 for an empty history."""
        ...


@runtime_checkable
class HistoryUsage(Protocol):
    """Optional, for a History held in the replica's own memory: exported as metrics
    (``wirehub_history_bytes``, ``wirehub_history_rooms_evicted_total``)."""

    @property
    def bytes_held(self) -> int:
        """Bytes of history this replica holds now."""
        ...

    @property
    def rooms_evicted(self) -> int:
        """Rooms whose history was dropped to stay under the byte cap, since start."""
        ...


@dataclass(frozen=True, slots=True)
class PresenceEntry:
    """One connection in a room."""

    user: str
    session: str
    node: str
    info: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class PresenceMember:
    """One user in a room: all their connections there."""

    user: str
    connections: int
    #: the info of one of their connections (the first one that joined), e.g. ``{"name": ...}``
    info: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class PresenceCount:
    """A room's totals: distinct users, and their connections."""

    users: int = 0
    connections: int = 0


@dataclass(frozen=True, slots=True)
class PresencePage:
    """What :meth:`Presence.page` returns."""

    #: ordered by user id (codepoint order), each user once
    members: Sequence[PresenceMember]
    #: pass back as ``after`` to get the next page; None: this was the last page
    cursor: str | None
    #: the room's totals at the time of the read
    count: PresenceCount


#: a listener of :meth:`Presence.on_departed`: ``(room, users)``, sync or async
DepartedListener = Callable[[str, Sequence[str]], Awaitable[None] | None]


@runtime_checkable
class Presence(Protocol):
    """Who is in a room, across replicas.

    Entries are per connection; a user is present while any of their connections is, and is
    counted once (``users``) however many connections they have (``connections``).

    Guarantees every implementation keeps:

    - ``join``, ``leave`` and ``count`` are O(1) broker round trips and O(1) work in the room's
      size (a sorted insert into an in-memory list is a memmove, not a scan); ``page`` is
      O(limit + log n). ``members`` is O(n) and is kept for small rooms and tests.
    - Read your writes: a ``count``/``page``/``members`` on the replica that joined or left sees
      that change at once. Counts and pages are correct across replicas once their writes reach
      the broker.
    - Upkeep costs O(1) broker round trips per replica per interval, whatever the number of
      sessions and rooms: entries are written once at join and deleted at leave (never
      refreshed); each replica heartbeats ONE key for itself (its node, expiring after
      ``presence_ttl``) and checks for dead nodes in the same round trip. Upkeep runs on its own
      pooled connection or pipeline, so publishes never wait behind it.
    - Expiry: when a replica stops heartbeating (crashed, SIGKILLed, partitioned) its entries are
      removed within ``presence_ttl`` plus one upkeep interval by one live replica (an atomic
      claim), in batches, and the users whose LAST connection went with them are reported to
      :meth:`on_departed` listeners on that replica only. A replica that was only stalled, and finds its
      entries gone when it heartbeats again, writes them again and reports their users to
      :meth:`on_restored` listeners.
    - After the last connection of a room leaves, nothing of that room's presence is left in the
      broker (no keys, no KV values).
    """

    async def join(self, room: str, entry: PresenceEntry) -> bool:
        """Add a connection; True when its user was not present in ``room`` before. O(1)."""
        ...

    async def leave(self, room: str, session: str) -> str | None:
        """Remove a connection; returns its user when that was the user's last connection. O(1).
        Idempotent: an unknown session returns None."""
        ...

    async def count(self, room: str) -> PresenceCount:
        """The room's users and connections. O(1)."""
        ...

    async def page(self, room: str, after: str | None, limit: int) -> PresencePage:
        """Up to ``limit`` members with user id > ``after`` (None: from the start), ordered by user
        id. O(limit + log n). A user present for the whole scan appears exactly once across the
        pages of a scan; ``cursor`` is None on the last page."""
        ...

    async def lookup(self, room: str, users: Sequence[str]) -> PresencePage:
        """The room's count and those of ``users`` who are in it now (at least one connection, on any
        replica), in one read: a page of them in the order given (each once), ``cursor`` None. O(1) broker
        round trips and O(len(users)) work where the replica holds the room's members (NATS reads the whole
        room, as its ``count`` does, on a replica with no member of it). Read your writes, as ``page``;
        across replicas it sees every write acknowledged before it began. The chat's batched
        ``presence.diff`` reports the users it names as this gives them when it is sent, and each of its
        ``presence.join`` / ``presence.leave`` is checked against it after it was sent (so that several
        replicas' news, in whatever order, leaves a client's list right); a diff names at most 500 users,
        but any number must work. A bus plugin written before this method (or one that inherits this empty
        body) still works: the chat then reads ``members`` (O(n)) instead, with a warning. The contract
        suite checks it."""
        ...

    def on_departed(self, callback: DepartedListener) -> None:
        """Register a listener called, on exactly one live replica, with ``(room, users)`` for the
        users whose last connection was removed because its replica died (stopped heartbeating).
        A listener that raises is logged and does not stop the others."""
        ...

    def on_restored(self, callback: DepartedListener) -> None:
        """Register a listener called, on this replica, with ``(room, users)`` for the users whose entries it
        wrote again because the broker no longer had them: this replica was declared dead (a stall longer than
        ``presence_ttl``: another replica removed its entries and reported them to :meth:`on_departed`), or the
        broker lost its data. At least the users who had no connection left in ``room``; a user the broker still
        held through another connection may be reported too, and all of them when the backend cannot tell (the
        chat's answer is idempotent), but not the users of a replica whose entries were all still there. Called
        once their entries are written, per room, in batches. What a reaping of this replica's node still under
        way removes must be written again too (the built-in backends: a reaper checks the node before each batch;
        Redis writes once no claim of the node is held and again after any batch that removed some; NATS again
        for any of its keys another replica purged). A backend whose replicas cannot be declared dead (one
        process) never calls it; one written before this method (or one that inherits this empty body) leaves
        the chat's members believing such users gone until they come or go again. A listener that raises is
        logged and does not stop the others."""
        ...

    async def members(self, room: str) -> list[PresenceEntry]:
        """All live connections in ``room``, one entry per connection. O(n): small rooms, tests."""
        ...


@runtime_checkable
class StateStore(Protocol):
    """A versioned JSON document per room with compare-and-set, shared by all replicas."""

    async def get(self, room: str) -> tuple[int, Any] | None:
        """``(version, document)``, or None when the room has no state."""
        ...

    async def compare_and_set(self, room: str, expected_version: int, document: Any) -> int:
        """Store ``document`` as version ``expected_version + 1`` if the stored version is
        ``expected_version`` (0 = "no state yet"); return the new version.

        Raises :class:`StateConflict` when another writer got there first: re-read and retry.
        """
        ...

    async def delete(self, room: str) -> None:
        """Forget the room's state (idle expiry)."""
        ...


@dataclass
class Backend:
    """What a bus plugin's factory returns: one broker's bus and stores."""

    bus: Bus
    history: History
    presence: Presence
    state: StateStore
    name: str = "backend"
    extra: dict[str, Any] = field(default_factory=dict)
