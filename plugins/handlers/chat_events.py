"""How a user's arrival and departure reach a chat room's members: the ``events`` of a presence rule.

- ``each``: a ``presence.join`` / ``presence.leave`` per user, each checked by a read after its publish;
- ``batched``: one ``presence.diff`` per room per interval from each replica;
- ``off``: nothing.

Replicas write presence and publish events independently, so two replicas' news about one user can reach
the bus in the other order than their writes (a user who left through A and came back through B). Both
modes therefore tell members how a user *is* when the news goes out, read with ``Presence.lookup``, and
read again after the publish: whatever changed meanwhile is told again. The last news of a user in the
room's bus order then comes from a replica that read after sending it, so it is right.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from wirehub import (
    BusUnavailable,
    Presence,
    PresenceCount,
    PresenceMember,
    PresencePage,
    PublishOutcomeUnknown,
    encode,
)
from wirehub.builtins.bus._roster import Roster

if TYPE_CHECKING:
    from wirehub import Hub, Session
    from wirehub.builtins.handlers.chat_presence import RoomPresence

log = logging.getLogger("wirehub.chat.presence")

#: the ``events`` of a presence rule: ``auto`` is ``each`` in a room of at most the chat's ``presence_each_max``
#: users and ``batched`` in a bigger one (:meth:`ChatPresence.mode`)
EVENTS = ("auto", "each", "batched", "off")
#: most joins and most leaves one presence.diff names: a reconnect storm of 20,000 users into a room
#: must not become a megabyte frame to every member (it would close them all as slow consumers)
MAX_DIFF_ITEMS = 500
#: diffs a closing replica sends in a row for the users who changed while its last one was on its way
CLOSING_ROUNDS = 3
#: the longest wait, in seconds, before a failed diff or check is tried again (the wait doubles)
RETRY_MAX = 30.0
#: tries of a diff or check that fails with an error other than the bus's before it is given up
GIVE_UP = 3
#: the first wait, in seconds, before a failed check of ``each`` events is tried again
CHECK_RETRY = 1.0
#: how long a closing replica waits for its diffs and checks, in seconds (within the drain's reserve for
#: shutdown, at most 2 s)
CLOSE_WAIT = 1.5
#: rooms whose count a :class:`StaleNotices` reads at once
NOTICE_BATCH = 100
#: seconds after a publish whose outcome is unknown (it may still land on the bus) to check its user again
UNSETTLED = 10.0

Lookup = Callable[[str, Sequence[str]], Awaitable[PresencePage]]


def join_item(member: PresenceMember) -> dict[str, str]:
    """A user in a ``presence.diff``'s ``joins``: id, and display name when known."""
    name = member.info.get("name")
    return {"user": member.user, "name": name} if name else {"user": member.user}


def count_item(count: PresenceCount) -> dict[str, int]:
    return {"users": count.users, "connections": count.connections}


def lookup_of(presence: Presence) -> Lookup:
    """The backend's ``lookup``; for a bus plugin written before it (or one that inherits the protocol's
    empty body) its ``members`` (O(n)) read through the memory bus's roster, with a warning once."""
    if getattr(type(presence), "lookup", None) not in (None, Presence.lookup):
        return presence.lookup
    warned = False

    async def by_members(room: str, users: Sequence[str]) -> PresencePage:
        nonlocal warned
        if not warned:
            warned = True
            log.warning("the bus's presence has no lookup(room, users): presence events read each room's whole "
                        "membership (members) to check the users they name")
        roster = Roster()  # the memory bus's: the same members and count as a backend's lookup
        for entry in await presence.members(room):
            roster.add(entry)
        return PresencePage(roster.lookup(users), None, roster.count())

    return by_members


class EventMode(Protocol):
    """How a user's arrival (first connection) and departure (last connection) reach the members."""

    async def joined(self, room: str, rule: RoomPresence, user: str, name: str, origin: Session | None) -> None: ...

    async def left(self, room: str, rule: RoomPresence, user: str, origin: Session | None) -> None: ...

    async def departed(self, room: str, rule: RoomPresence, users: Sequence[str]) -> None:
        """Users whose last connection was on a replica that died (the backend's ``on_departed``)."""
        ...

    def restored(self, room: str, rule: RoomPresence, users: Sequence[str]) -> None:
        """Users of this replica whose entries it wrote again (the backend's ``on_restored``)."""
        ...

    async def close(self) -> None: ...


class NoEvents:
    async def joined(self, room: str, rule: RoomPresence, user: str, name: str, origin: Session | None) -> None:
        return None

    async def left(self, room: str, rule: RoomPresence, user: str, origin: Session | None) -> None:
        return None

    async def departed(self, room: str, rule: RoomPresence, users: Sequence[str]) -> None:
        """A dead replica's users whose last connection it held (reported by the backend)."""
        for user in users:
            await self.left(room, rule, user, None)

    def restored(self, room: str, rule: RoomPresence, users: Sequence[str]) -> None:
        """This replica's users whose entries it wrote again (the backend's ``on_restored``): declared dead in a
        stall, their departure may have been told to the members."""
        return None

    async def close(self) -> None:
        return None


def _retry_after(first: float, failures: int) -> float:
    """The wait before the next try after ``failures`` failures in a row: ``first``, doubling, at most RETRY_MAX."""
    return min(first * 2.0 ** (failures - 1), RETRY_MAX)


Told = tuple[bool, "Session | None"]


class EachEvent(NoEvents):
    """``presence.join`` / ``presence.leave`` per user, through the bus so members on every replica get
    them; not to the session that caused them (the joiner has the list in ``joined``).

    Each event is checked by a read after its publish, off the join's and leave's path: in the next loop
    iteration, one ``lookup`` per room for the users told about since (at once: the later the read, the
    likelier it sees a change whose own event followed this one, and repeats it). A user the read has
    otherwise than this replica told last (another replica's event about them overtook this one on the bus,
    or this one was not sent: the bus down) gets an event of how they are now, with the room's ``count``, to
    every member, checked the same way; a user with a newer event of this replica, sent or on its way, is
    left to that one's check. A join whose session is still in the room here needs no read. A check that
    fails is tried again after 1, 2, 4, ... s (at most RETRY_MAX), at once when the bus comes back; an
    error that is not the bus's gives the room's checks up after :data:`GIVE_UP` tries. A publish whose
    outcome is unknown may still land later: its user is checked again :data:`UNSETTLED` seconds after. A
    closing replica tries each check once more and stops. A dead replica's departures are followed by a
    ``presence.diff`` that names nobody and says ``truncated``: what it wrote and had not told is lost, so
    members reload; so is a room whose entries this replica wrote again (declared dead in a stall, the members
    were told its users left).
    """

    def __init__(self, hub: Hub, lookup: Lookup) -> None:
        self.hub = hub
        self._lookup = lookup
        #: room -> user -> in the room as this replica last told the members (or, when that publish failed,
        #: as they knew before), and for a join the session that made it, waiting for the check
        self._told: dict[str, dict[str, Told]] = {}
        #: rooms told about since their check last started: the next loop iteration starts theirs
        self._ready: set[str] = set()
        self._scheduled: asyncio.Handle | None = None
        #: the check in progress per room (one at a time: its read comes after the publishes it checks)
        self._checking: dict[str, asyncio.Task[None]] = {}
        #: (room, user) -> this replica's events about them on their way to the bus: a check leaves them be
        self._sending: dict[tuple[str, str], int] = {}
        #: the second checks of publishes whose outcome was unknown (cancelled when closing)
        self._unsettled: set[asyncio.TimerHandle] = set()
        #: rooms whose check failed (logged once until one succeeds)
        self._failing: set[str] = set()
        self._closed = False
        #: set when closing: wakes the checks waiting to try again
        self._closing = asyncio.Event()

        async def count(room: str) -> PresenceCount:
            return (await lookup(room, ())).count

        async def publish(room: str, frame: bytes) -> None:
            await hub.publish(room, frame)

        #: to every member: their lists may be stale (a dead replica's untold events, a stalled one's users back)
        self._stale = StaleNotices(hub, count, publish, drop_when_down=False)

    async def joined(self, room: str, rule: RoomPresence, user: str, name: str, origin: Session | None) -> None:
        event: dict[str, Any] = {"op": "presence.join", "room": room, "user": user}
        if name:
            event["name"] = name
        await self._tell(room, user, True, encode(event), origin)

    async def left(self, room: str, rule: RoomPresence, user: str, origin: Session | None) -> None:
        await self._tell(room, user, False, encode({"op": "presence.leave", "room": room, "user": user}), origin)

    async def departed(self, room: str, rule: RoomPresence, users: Sequence[str]) -> None:
        try:
            for i, user in enumerate(users):
                try:
                    await self.left(room, rule, user, None)
                except BusUnavailable:
                    for rest in users[i + 1:]:  # not told either: the check tells them once the bus is back
                        self._check(room, rest, (True, None))
                    raise
        finally:
            self._stale.tell([room])  # what the dead replica wrote and had not told (or checked) is lost: reload

    def restored(self, room: str, rule: RoomPresence, users: Sequence[str]) -> None:
        # the members may have been told they left (the replica that reaped them): one notice per room, not an
        # event per user (a broker that lost everyone's entries has every replica write them all again)
        self._stale.tell([room])

    async def _tell(self, room: str, user: str, present: bool, frame: bytes, origin: Session | None) -> None:
        key = (room, user)
        sending = self._sending
        sending[key] = sending.get(key, 0) + 1
        try:
            await self.hub.publish(room, frame, origin=origin)
        except asyncio.CancelledError:  # sent or not (it may land later yet): the members may know the opposite
            if not self._closed:
                self._check_later(room, user, present, self._check(room, user, (not present, None)))
            raise
        except Exception as exc:
            if not self._closed:  # not sent, or not known to be: the members knew the opposite
                told = self._check(room, user, (not present, None))
                if isinstance(exc, PublishOutcomeUnknown):  # it may land later yet: then check it as told
                    self._check_later(room, user, present, told)
            raise
        finally:
            left = sending.pop(key) - 1
            if left:
                sending[key] = left
        self._check(room, user, (present, origin))

    def _check_later(self, room: str, user: str, present: bool, told: Told) -> None:
        handle: asyncio.TimerHandle

        def due() -> None:
            self._unsettled.discard(handle)
            if self._closed:
                return
            if (room, user) in self._sending:  # another event of theirs on its way: after it
                self._check_later(room, user, present, told)
            elif self._told.get(room, {}).get(user, told) is told:  # no newer event of theirs waits for its check
                self._check(room, user, (present, None))  # (one already checked: a correction at most repeats it)

        handle = asyncio.get_running_loop().call_later(UNSETTLED, due)
        self._unsettled.add(handle)

    def _check(self, room: str, user: str, told: Told) -> Told:
        users = self._told.get(room)
        if users is None:
            users = self._told[room] = {}
        users[user] = told
        self._soon(room)  # closed too: an event sent after close() gets one try
        return told

    def _soon(self, room: str) -> None:
        """Start ``room``'s check in the next loop iteration."""
        self._ready.add(room)
        if self._scheduled is None:
            self._scheduled = asyncio.get_running_loop().call_soon(self._due)

    def _due(self) -> None:
        """Start the check of the rooms told about, but those whose check is in progress (theirs go on)."""
        self._scheduled = None
        ready, self._ready = self._ready, set()
        for room in ready:
            task = self._checking.get(room)
            if task is not None and not task.done():
                continue
            told = self._told.get(room)
            if told is not None and self._settle(room, told):
                task = self._checking[room] = asyncio.ensure_future(self._check_room(room))
                task.add_done_callback(functools.partial(self._checked, room))

    def _settle(self, room: str, told: dict[str, Told]) -> bool:
        """Drop the joins whose session is still in the room here (its entry is there, so the user is in the
        room, as told: no read); whether any user is left to read."""
        is_member = self.hub.is_member
        for user, (present, origin) in list(told.items()):
            if present and origin is not None and is_member(room, origin):
                del told[user]
        if not told and self._told.get(room) is told:
            del self._told[room]
        return bool(told)

    def _checked(self, room: str, task: asyncio.Task[None]) -> None:
        if self._checking.get(room) is task:
            del self._checking[room]
        if room in self._told and not self._closed:
            self._soon(room)

    async def _check_room(self, room: str) -> None:
        failures = rounds = 0
        while (told := self._told.pop(room, None)) is not None:
            if not self._settle(room, told):
                continue
            try:
                await self._correct(room, told)
            except Exception as exc:
                failures += 1
                for user, value in told.items():  # a newer event of a user is what to check
                    self._told.setdefault(room, {}).setdefault(user, value)
                if not self._failed(room, failures, exc):
                    return
                await self._pause(_retry_after(CHECK_RETRY, failures), exc)
                continue
            self._failing.discard(room)
            rounds += 1
            if not self._closed or rounds >= CLOSING_ROUNDS:
                return  # what was told meanwhile: in the next round (closing: at once, there is no next)

    async def _correct(self, room: str, told: dict[str, Told]) -> None:
        """Read ``told``'s users and tell the members how each one whose news was wrong is now."""
        found = await self._lookup(room, list(told))
        present = {m.user: m for m in found.members}
        for user, (was, _) in told.items():
            if (user in present) == was or user in self._told.get(room, ()) or (room, user) in self._sending:
                continue  # right, or a newer event of this replica about them is checked (or on its way)
            member = present.get(user)
            event: dict[str, Any] = {"op": "presence.leave", "room": room, "user": user} if member is None else \
                {"op": "presence.join", "room": room, **join_item(member)}
            event["count"] = count_item(found.count)
            await self._tell(room, user, member is not None, encode(event), None)  # checked the same way

    async def _pause(self, delay: float, exc: Exception) -> None:
        """Until a failed check is due again: ``delay`` s, or until the replica closes or (the bus down) the
        bus is back up."""
        await _wake_or_wait(self.hub, delay, isinstance(exc, BusUnavailable), self._closing)

    def _failed(self, room: str, failures: int, exc: Exception) -> bool:
        """Log a failed check (once per room until one succeeds); whether to try it again. Given up (closing,
        or an error that is not the bus's :data:`GIVE_UP` times), everything pending for the room is dropped:
        a try more would fail the same way."""
        bus = isinstance(exc, BusUnavailable)
        if room not in self._failing:
            self._failing.add(room)
            if bus:
                log.warning("room %s: presence events could not be checked (the bus is down): checked once it is "
                            "back", room)
            else:
                log.error("room %s: presence events could not be checked%s", room,
                          "" if self._closed else ": tried again later", exc_info=exc)
        if not self._closed and (bus or failures < GIVE_UP):
            return True
        dropped = self._told.pop(room, {})
        if not self._closed:
            log.error("room %s: gave up checking the presence events of %d users after %d tries", room,
                      len(dropped), failures)
        self._failing.discard(room)
        return False

    async def close(self) -> None:
        """Check what was told and not checked yet (a draining replica's leaves) at once, a failed check once
        more, and wait for them (at most :data:`CLOSE_WAIT` s)."""
        self._closed = True
        self._closing.set()
        if self._scheduled is not None:
            self._scheduled.cancel()
            self._scheduled = None
        for handle in self._unsettled:
            handle.cancel()
        self._unsettled.clear()
        # every room with something told: a check that ended in this iteration has not started its room's next
        # (its callback comes later and, closed, starts none); one still running goes on in its closing rounds
        self._ready.update(self._told)
        self._due()
        checks = _finish(list(self._checking.values())) if self._checking else asyncio.sleep(0)
        await asyncio.gather(checks, self._stale.close())


async def _finish(tasks: list[asyncio.Task[None]]) -> None:
    """Wait up to CLOSE_WAIT for ``tasks``, then cancel what is left (a try waiting out a bus outage)."""
    _, pending = await asyncio.wait(tasks, timeout=CLOSE_WAIT)
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.wait(pending)


def stale_diff(room: str, count: PresenceCount) -> bytes:
    """A ``presence.diff`` that names nobody and says ``truncated``: the members' list of ``room`` may be stale
    (they reload it), with the room's ``count``."""
    return encode({"op": "presence.diff", "room": room, "joins": [], "leaves": [], "count": count_item(count),
                   "truncated": True})


class StaleNotices:
    """:func:`stale_diff` notices, each with its room's count read first (``read``), handed to ``send``: to the
    members of every replica (``publish``) or of this one. One worker takes the rooms told about, in order,
    :data:`NOTICE_BATCH` reads at a time (a broker that lost every entry reports every room). A room whose read
    or send failed is tried again after 1, 2, 4, ... s (at most RETRY_MAX) of its own, at once when the bus comes
    back, while other rooms go on; with ``drop_when_down`` it is dropped instead when the bus is down (what tells
    it then comes again once it is back). An error that is not the bus's gives a room up after :data:`GIVE_UP`
    tries. A closing owner gets one more try of every room pending, within :data:`CLOSE_WAIT`."""

    def __init__(self, hub: Hub, read: Callable[[str], Awaitable[PresenceCount]],
                 send: Callable[[str, bytes], Awaitable[Any]], *, drop_when_down: bool) -> None:
        self.hub = hub
        self._read, self._send, self._drop_when_down = read, send, drop_when_down
        #: rooms to tell now, in order (a room told twice before its notice went out gets one)
        self._pending: dict[str, None] = {}
        #: rooms that failed: room -> (when to try again, loop time; failures in a row; at once when the bus is
        #: back: it failed while the bus was down)
        self._retry: dict[str, tuple[float, int, bool]] = {}
        self._worker: asyncio.Task[None] | None = None
        #: set by a tell and when closing: the worker looks again
        self._wake = asyncio.Event()
        self._closed = False

    def tell(self, rooms: Sequence[str]) -> None:
        if self._closed or not rooms:
            return
        self._pending.update(dict.fromkeys(rooms))
        self._wake.set()
        if self._worker is None or self._worker.done():
            self._worker = asyncio.ensure_future(self._work())

    async def _one(self, room: str) -> None:
        await self._send(room, stale_diff(room, await self._read(room)))

    def _due(self) -> list[str]:
        """The rooms to tell now: those told, then those due again (all of them when closing)."""
        now = asyncio.get_running_loop().time()
        rooms = dict(self._pending)
        self._pending.clear()
        up = self.hub.healthy
        for room, (at, _, on_up) in self._retry.items():
            if at <= now or self._closed or (on_up and up):
                rooms[room] = None
        return list(rooms)

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._wake.clear()
            rooms = self._due()
            if not rooms:
                if not self._retry or self._closed:
                    return
                delay = max(0.0, min(at for at, _, _ in self._retry.values()) - loop.time())
                await _wake_or_wait(self.hub, delay, True, self._wake)
                continue
            failed: dict[str, Exception] = {}
            for i in range(0, len(rooms), NOTICE_BATCH):
                chunk = rooms[i:i + NOTICE_BATCH]
                outcomes = await asyncio.gather(*(self._one(room) for room in chunk), return_exceptions=True)
                for room, outcome in zip(chunk, outcomes, strict=True):
                    if isinstance(outcome, Exception):
                        failed[room] = outcome
                    else:
                        self._retry.pop(room, None)
            if failed:
                self._failed(failed)

    def _failed(self, failed: dict[str, Exception]) -> None:
        """Schedule the rooms that failed again, or drop them; one log line per round."""
        now = asyncio.get_running_loop().time()
        dropped = given_up = first = 0
        error: Exception | None = None
        down = not self.hub.healthy
        for room, exc in failed.items():
            error = exc
            failures = self._retry.pop(room, (0.0, 0, False))[1] + 1
            bus = isinstance(exc, BusUnavailable)
            if self._closed or (bus and self._drop_when_down and down):
                dropped += 1
            elif not bus and failures >= GIVE_UP:
                given_up += 1
            else:
                first += failures == 1
                self._retry[room] = (now + _retry_after(CHECK_RETRY, failures), failures, bus and down)
        if given_up:
            log.error("%d rooms: gave up telling members their presence lists may be stale after %d tries", given_up,
                      GIVE_UP, exc_info=error)
        if dropped and self._closed:
            log.warning("%d rooms: members could not be told their presence lists may be stale (%s)", dropped, error)
        elif dropped:
            log.info("%d rooms: members who may hold stale presence lists are told once the bus is back", dropped)
        if first:  # (a room failing again is not logged again)
            log.warning("%d rooms: members could not be told their presence lists may be stale yet (%s): tried again "
                        "later", first, error)

    async def close(self) -> None:
        """One more try of every room pending (none after it fails), within :data:`CLOSE_WAIT`."""
        self._closed = True
        self._wake.set()
        if (self._pending or self._retry) and (self._worker is None or self._worker.done()):
            self._worker = asyncio.ensure_future(self._work())
        if self._worker is not None and not self._worker.done():
            await _finish([self._worker])


async def _wake_or_wait(hub: Hub, delay: float, bus: bool, closing: asyncio.Event) -> None:
    """``delay`` s, or less: until ``closing`` is set or (``bus``: the bus down) the bus is back up."""
    wakes: list[asyncio.Future[Any]] = [asyncio.ensure_future(closing.wait())]
    if bus and not hub.healthy:
        wakes.append(asyncio.ensure_future(hub.bus_up()))
    try:
        await asyncio.wait(wakes, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wake in wakes:
            wake.cancel()


@dataclass(eq=False)
class _Diff:
    interval: float
    #: the users whose first connection joined or last connection left here in the interval, in that order
    users: dict[str, None] = field(default_factory=dict)
    #: a client's list may be stale (``truncated``): it names a dead replica's users (that replica's unsent
    #: diffs are lost), or an earlier diff of the room was given up
    stale: bool = False
    #: sent even naming nobody: the room's count changed while the last diff was on its way
    recount: bool = False
    #: sends of it (or of what it was merged into) that failed in a row: the next waits longer
    failures: int = 0

    def merge(self, other: _Diff) -> None:
        self.users.update(other.users)
        self.stale |= other.stale
        self.recount |= other.recount
        self.failures = max(self.failures, other.failures)


class BatchedEvents(NoEvents):
    """One ``presence.diff`` per room per ``interval`` from this replica, naming the users whose first
    connection joined or last connection left on it in that interval.

    Each user a diff names is reported as the backend has them when the diff is sent (``lookup``, with the
    count): in ``joins`` when present, in ``leaves`` when gone, whatever happened in the interval. Replicas
    send on timers of their own, so one replica's diff about a user may reach members before another's
    about an earlier change of the same user (a user who left on A and came back on B): reported as they
    are at sending time, the later diff in the room's bus order is right. A change that came between the
    read and the publish may have gone out first in another replica's diff: a second read after the
    publish names such users again in this replica's next diff (at once while closing: there is no next),
    and sends the count again when it changed. A diff that failed is sent again with the next one.
    """

    def __init__(self, hub: Hub, lookup: Lookup) -> None:
        self.hub = hub
        self._pending: dict[str, _Diff] = {}
        self._timers: dict[str, asyncio.TimerHandle] = {}
        #: the send in progress per room: the next one of the room waits for it (diffs stay in order)
        self._sending: dict[str, asyncio.Task[None]] = {}
        self._closed = False
        #: rooms whose last send failed (logged once until one goes out)
        self._failing: set[str] = set()
        #: rooms whose diff was given up: their next one says truncated
        self._stale_rooms: set[str] = set()
        self._lookup = lookup

    def _diff(self, room: str, interval: float, delay: float | None = None) -> _Diff:
        diff = self._pending.get(room)
        if diff is None:
            diff = self._pending[room] = _Diff(interval)
            loop = asyncio.get_running_loop()
            self._timers[room] = loop.call_later(interval if delay is None else delay, self._due, room)
        return diff

    async def joined(self, room: str, rule: RoomPresence, user: str, name: str, origin: Session | None) -> None:
        self._diff(room, rule.interval).users[user] = None

    async def left(self, room: str, rule: RoomPresence, user: str, origin: Session | None) -> None:
        self._diff(room, rule.interval).users[user] = None

    async def departed(self, room: str, rule: RoomPresence, users: Sequence[str]) -> None:
        diff = self._diff(room, rule.interval)
        diff.stale = True
        diff.users.update(dict.fromkeys(users))

    def restored(self, room: str, rule: RoomPresence, users: Sequence[str]) -> None:
        self._diff(room, rule.interval).users.update(dict.fromkeys(users))

    def _due(self, room: str) -> None:
        self._timers.pop(room, None)
        diff = self._pending.pop(room, None)
        if diff is None or not (diff.users or diff.recount):
            return
        previous = self._sending.get(room)
        task = asyncio.ensure_future(self._send(room, diff, previous))
        self._sending[room] = task
        task.add_done_callback(lambda t: self._sending.pop(room, None) if self._sending.get(room) is t else None)

    async def _send(self, room: str, diff: _Diff, previous: asyncio.Task[None] | None) -> None:
        if previous is not None:
            await asyncio.wait([previous])
        for _ in range(CLOSING_ROUNDS):
            again = await self._send_one(room, diff)
            if again is None:
                return
            if not self._closed:
                # a failed one again after 2, 4, 8, ... intervals, at most RETRY_MAX (the bus down: until it is back)
                delay = _retry_after(diff.interval * 2, again.failures) if again.failures else None
                self._diff(room, diff.interval, delay).merge(again)
                return
            diff = again  # closing: no later diff of this replica would tell it

    async def _send_one(self, room: str, diff: _Diff) -> _Diff | None:
        """Publish ``diff``; what must go out again (None: nothing): the users whose state changed between
        its read and its publish, the count if it changed, or all of it when the publish failed."""
        named = list(itertools.islice(diff.users, MAX_DIFF_ITEMS))
        lookup = self._lookup
        published = False
        try:
            found = await lookup(room, named)
            present = {m.user: m for m in found.members}
            joins = [join_item(present[u]) for u in named if u in present]
            frame: dict[str, Any] = {"op": "presence.diff", "room": room, "joins": joins,
                                     "leaves": [u for u in named if u not in present], "count": count_item(found.count)}
            if len(diff.users) > MAX_DIFF_ITEMS or diff.stale or room in self._stale_rooms:
                frame["truncated"] = True
            await self.hub.publish(room, encode(frame))
            published = True
            after = await lookup(room, named)
        except Exception as exc:  # the bus down or an outcome unknown: told as they are then, with the next
            return self._failed(room, diff, named, published, exc)
        self._failing.discard(room)
        self._stale_rooms.discard(room)
        now = {m.user for m in after.members}
        moved = [u for u in named if (u in now) != (u in present)]
        if not moved and after.count == found.count:
            return None
        return _Diff(diff.interval, dict.fromkeys(moved), recount=after.count != found.count)

    def _failed(self, room: str, diff: _Diff, named: list[str], published: bool, exc: Exception) -> _Diff | None:
        """What goes out again after a failed send: all of it (nothing reached the members), or when only the
        read after the publish failed its users as they will be then. Logged once per room until one goes
        out; an error that is not the bus's is given up after :data:`GIVE_UP` tries (the next diff of the room
        then says ``truncated``)."""
        bus = isinstance(exc, BusUnavailable)
        if room not in self._failing:
            self._failing.add(room)
            what = "went out, the read after it failed" if published else "was not sent"
            if bus:
                log.warning("room %s: a presence.diff %s (the bus is down): sent again once it is back", room, what)
            else:
                log.error("room %s: a presence.diff %s: sent again later", room, what, exc_info=exc)
        again = _Diff(diff.interval, dict.fromkeys(named), recount=True) if published else diff
        again.failures = diff.failures + 1
        if not bus and again.failures >= GIVE_UP:
            log.error("room %s: gave up a presence.diff naming %d users after %d tries", room, len(again.users),
                      again.failures)
            self._failing.discard(room)
            self._stale_rooms.add(room)  # the room's next diff says truncated
            return None
        return again

    async def close(self) -> None:
        """Send what is pending now (a draining replica's leaves), then wait for the sends."""
        self._closed = True
        for timer in self._timers.values():
            timer.cancel()
        for room in list(self._pending):
            self._due(room)
        if self._sending:
            await _finish(list(self._sending.values()))


#: events mode name -> its implementation, built once per chat endpoint with the hub and the presence's
#: :func:`lookup_of`
EVENT_MODES: dict[str, Callable[[Hub, Lookup], EventMode]] = {
    "each": EachEvent,
    "batched": BatchedEvents,
    "off": lambda hub, lookup: NoEvents(),
}
