"""One room's presence in memory, with O(1) join/leave/count and O(limit + log n) pages.

Used by the memory backend (the room itself) and by the NATS backend (a replica's live copy of a
room). Per member it keeps a session -> entry dict item, a user -> entry dict item (a
(connections, info) tuple for a user with several connections) and one pointer in a blocked
sorted list of user ids (:class:`SortedIds`: an insert or removal bisects the blocks, then moves
at most one block of pointers, so it costs the same in a room of 5 as in one of 50,000). Also the
listeners of ``on_departed``.
"""

from __future__ import annotations

import bisect
import inspect
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from wirehub import DepartedListener, PresenceCount, PresenceEntry, PresenceMember, PresencePage

log = logging.getLogger("wirehub.presence")


class SortedIds:
    """Strings in sorted order, in blocks of at most ``2 * load``: O(log n) search, O(load) insert
    and remove (one block's memmove), O(log n + k) for k items from a position."""

    __slots__ = ("_blocks", "_firsts", "_len", "_load")

    def __init__(self, load: int = 512) -> None:
        self._load = load
        self._blocks: list[list[str]] = []
        self._firsts: list[str] = []  # the first item of each block, for the bisect over blocks
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def _block_of(self, item: str) -> int:
        return max(0, bisect.bisect_right(self._firsts, item) - 1)

    def add(self, item: str) -> None:
        if not self._blocks:
            self._blocks.append([item])
            self._firsts.append(item)
        else:
            i = self._block_of(item)
            block = self._blocks[i]
            bisect.insort(block, item)
            self._firsts[i] = block[0]
            if len(block) > 2 * self._load:
                half = block[self._load:]
                del block[self._load:]
                self._blocks.insert(i + 1, half)
                self._firsts.insert(i + 1, half[0])
        self._len += 1

    def remove(self, item: str) -> None:
        i = self._block_of(item)
        block = self._blocks[i]
        j = bisect.bisect_left(block, item)
        if j == len(block) or block[j] != item:
            raise ValueError(item)
        del block[j]
        self._len -= 1
        if block:
            self._firsts[i] = block[0]
        else:
            del self._blocks[i]
            del self._firsts[i]

    def after(self, item: str | None, limit: int) -> tuple[list[str], bool]:
        """Up to ``limit`` items greater than ``item`` (all when None), and whether more follow."""
        if limit <= 0 or not self._blocks:
            return [], False
        if item is None:
            i, j = 0, 0
        else:
            i = self._block_of(item)
            j = bisect.bisect_right(self._blocks[i], item)
        out: list[str] = []
        while i < len(self._blocks):
            block = self._blocks[i]
            taken = block[j:j + limit - len(out)]
            out += taken
            if len(out) == limit:  # blocks are never empty: a next block means more items
                return out, j + len(taken) < len(block) or i + 1 < len(self._blocks)
            i, j = i + 1, 0
        return out, False


def _connections(user: PresenceEntry | tuple[int, Mapping[str, Any]]) -> tuple[int, Mapping[str, Any]]:
    """A :attr:`Roster._users` value as (connections, info)."""
    return (1, user.info) if isinstance(user, PresenceEntry) else user


class Roster:
    """Connections of one room, grouped per user, users kept sorted for paging."""

    __slots__ = ("_head", "_last", "_order", "_sessions", "_users")

    def __init__(self) -> None:
        self._sessions: dict[str, PresenceEntry] = {}
        #: user -> their one connection's entry, or (connections, the info of their first connection:
        #: it represents the user) for two or more; most users of a big room have one, and the entry
        #: is kept anyway, so they cost no tuple
        self._users: dict[str, PresenceEntry | tuple[int, Mapping[str, Any]]] = {}
        self._order = SortedIds()
        #: the first page last read, (limit, members): every join reads it, and in a big room a join
        #: rarely changes it; dropped by a change to a user on it (or when it was not full)
        self._head: tuple[int, list[PresenceMember]] | None = None
        #: the members of the last first page built, by user (reused by the next one)
        self._last: dict[str, PresenceMember] | None = None

    def _touch(self, user: str) -> None:
        """``user`` arrived, left or changed their connection count: drop the head if it shows it."""
        head = self._head
        if head is not None and (len(head[1]) < head[0] or user <= head[1][-1].user):
            self._head = None

    def __len__(self) -> int:
        return len(self._sessions)

    def get(self, session: str) -> PresenceEntry | None:
        return self._sessions.get(session)

    def add(self, entry: PresenceEntry) -> bool:
        """Add (or replace) a connection; True when it is its user's first one. Idempotent."""
        old = self._sessions.get(entry.session)
        if old is not None:
            if old.user == entry.user:
                self._sessions[entry.session] = entry
                return False
            self.remove(entry.session)
        self._sessions[entry.session] = entry
        found = self._users.get(entry.user)
        self._touch(entry.user)
        if found is not None:
            n, info = _connections(found)
            self._users[entry.user] = (n + 1, info)
            return False
        self._users[entry.user] = entry
        self._order.add(entry.user)
        return True

    def remove(self, session: str) -> str | None:
        """Remove a connection; its user when that was their last one. Idempotent."""
        entry = self._sessions.pop(session, None)
        if entry is None:
            return None
        n, info = _connections(self._users[entry.user])
        self._touch(entry.user)
        if n > 1:
            self._users[entry.user] = (n - 1, info)  # (1, info) too: which entry is left is not known here
            return None
        del self._users[entry.user]
        self._order.remove(entry.user)
        return entry.user

    def has_user(self, user: str) -> bool:
        return user in self._users

    def count(self) -> PresenceCount:
        return PresenceCount(len(self._users), len(self._sessions))

    def page(self, after: str | None, limit: int) -> PresencePage:
        """Members after ``after``. The first page (``after`` None) is the same list while it holds
        (callers must not change it)."""
        if after is None and limit > 0:
            head = self._head
            if head is None or head[0] != limit:
                first, _ = self._order.after(None, limit)
                head = self._head = (limit, self._members(first))
            members = head[1]
            more = len(self._users) > len(members)
            return PresencePage(members, members[-1].user if more and members else None, self.count())
        users, more = self._order.after(after, limit)
        members = [PresenceMember(u, *_connections(self._users[u])) for u in users]
        return PresencePage(members, users[-1] if more and users else None, self.count())

    def _members(self, users: list[str]) -> list[PresenceMember]:
        """The first page's members; those of the last first page that did not change are reused (a join
        into a big room moves one user onto it), so a new page costs about one new member."""
        old = self._last
        members = []
        for u in users:
            n, info = _connections(self._users[u])
            m = old.get(u) if old else None
            if m is None or m.connections != n or m.info is not info:
                m = PresenceMember(u, n, info)
            members.append(m)
        # kept for a page worth it: a small room's page is cheap to rebuild, and small rooms are many
        self._last = {m.user: m for m in members} if len(members) >= 16 else None
        return members

    def entries(self) -> list[PresenceEntry]:
        return list(self._sessions.values())


class Departures:
    """The ``on_departed`` listeners of one presence store."""

    def __init__(self) -> None:
        self._listeners: list[DepartedListener] = []

    def add(self, callback: DepartedListener) -> None:
        self._listeners.append(callback)

    async def report(self, room: str, users: Sequence[str]) -> None:
        if not users:
            return
        for callback in list(self._listeners):
            try:
                result = callback(room, list(users))
                if inspect.isawaitable(result):
                    await result
            except Exception:
                log.exception("on_departed listener failed for room %s", room)
