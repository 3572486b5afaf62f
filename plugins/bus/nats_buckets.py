"""The members keys of NATS presence: one key holds a batch of one replica's connections in a room.

A join storm writes one KV message per room, node and loop iteration instead of one per join: the joins
of an iteration fill a new key ``<room>.<node>.<tag><n>`` (``tag``: random per replica process, so
replicas never write each other's keys) of at most :data:`BUCKET` entries, written once. A key is only
ever rewritten by its replica, with its whole remaining state (a leave: the value without the
connection, a purge when none is left), so a write is idempotent and a retry is "write the current
state". Its cost is O(:data:`BUCKET`), never O(members of the room).

Value: ``{"n": node, "e": [[user, session, info], ...]}`` (compact JSON); a value of the single-entry
format of earlier versions (``{"user", "session", "node", "info"}``) is read as one entry.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Generator
from typing import Any

from wirehub import PresenceEntry
from wirehub.builtins.bus._presence_json import info_json as _info_json
from wirehub.builtins.bus._presence_json import string as _string

#: connections per members key: a leave rewrites its key, so this bounds a leave's write (and every
#: replica's parse of it); a join storm's iteration with more joins fills several keys
BUCKET = 64
#: header of an own write: its id, so the live copy knows the echo of each write of this replica
HDR_WRITE = "Wh-W"

def encode_entries(node: str, entries: list[PresenceEntry]) -> bytes:
    """``_encode({"n": node, "e": [[user, session, info], ...]})``, spliced: the same bytes without a dict per
    entry's info (a chat member's is a name-only mapping, not a dict) and a list per entry."""
    items = ",".join([f"[{_string(e.user)},{_string(e.session)},{_info_json(e.info)}]" for e in entries])
    return f'{{"n":{_string(node)},"e":[{items}]}}'.encode()


def parse_entries(data: bytes) -> list[PresenceEntry]:
    """The entries of a members value (ValueError, KeyError, TypeError when it is not one)."""
    d = json.loads(data)
    if "user" in d:  # the single-entry format of earlier versions
        return [PresenceEntry(d["user"], d["session"], d["node"], d.get("info") or {})]
    node = d["n"]
    return [PresenceEntry(user, session, node, info or {}) for user, session, info in d["e"]]


class Write:
    """One write of a key's state by this replica. Its joins and leaves are decided at its echo in the room's
    live copy (every earlier write of every replica applied there, no later one): so of two leaves of one
    user, on any replicas, exactly one reports the user, and of two first joins exactly one is first."""

    __slots__ = ("done", "firsts", "joins", "left", "timer")

    def __init__(self) -> None:
        #: (session, the leave's future: the user when it was their last connection)
        self.left: list[tuple[str, asyncio.Future[str | None]]] = []
        #: set with the stream sequence once the broker acknowledged the write
        self.done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.timer: asyncio.TimerHandle | None = None
        #: a key's first write: the entries it wrote (added to the copy at its echo, not before) ...
        self.joins: list[PresenceEntry] | None = None
        #: ... and, set there, the sessions among them that are their user's first connection
        self.firsts: asyncio.Future[set[str]] | None = None


class Joined(asyncio.Future[None]):
    """The one future the joins of a key wait for (no future per join). A joiner's cancellation must not
    cancel it for the others: it takes effect when the key's write is answered (within ``op_timeout``)."""

    def cancel(self, msg: Any = None) -> bool:
        return False

    # Many joins await this one future, and the server starts each op eagerly (service/websocket.py: the
    # coroutine runs until it first yields, and a Task takes the yielded future later). A Task resets
    # ``_asyncio_future_blocking`` when it takes the future; asyncio's own future would then look, to the
    # next joiner's Task, as if it had been yielded without ``await``. So the flag stays set.
    @property  # type: ignore[override]
    def _asyncio_future_blocking(self) -> bool:
        return True

    @_asyncio_future_blocking.setter
    def _asyncio_future_blocking(self, value: bool) -> None:
        pass

    def __await__(self) -> Generator[Any, None, None]:
        if not self.done():
            yield self  # the Task waits until it is done
        return self.result()

    __iter__ = __await__


class Bucket:
    """A members key of this replica: the entries it should hold, and its writes under way."""

    __slots__ = ("entries", "firsts", "joined", "key", "next", "pending", "room", "unsettled", "writes")

    def __init__(self, room: str, key: str) -> None:
        self.room = room
        self.key = key
        self.entries: list[PresenceEntry] = []
        #: its entries are joins not written yet (the key of this loop iteration's joins)
        self.pending = True
        #: set when the key's first write was answered: its joins' outcome
        self.joined = Joined()
        #: the sessions of that write that are their user's first connection (read by the joins when
        #: ``joined`` is set, then dropped)
        self.firsts: set[str] | None = None
        #: write id -> a write sent and not echoed yet
        self.writes: dict[str, Write] = {}
        #: the write the next flush sends (leaves waiting for it); None: none scheduled
        self.next: Write | None = None
        #: a write failed or timed out: upkeep writes the current state again
        self.unsettled = False

    def take(self, session: str) -> PresenceEntry | None:
        for i, e in enumerate(self.entries):
            if e.session == session:
                del self.entries[i]
                return e
        return None

    def idle(self) -> bool:
        """Nothing to keep it for: no entry, no write under way or scheduled, nothing to retry."""
        return not self.entries and not self.writes and self.next is None and not self.unsettled and not self.pending


def fail(fut: asyncio.Future[Any], exc: Exception) -> None:
    if not fut.done():
        fut.set_exception(exc)
        fut.exception()  # retrieved: nobody may be waiting any more (a cancelled joiner)
