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

    def __init__(self, load: int = 64) -> None:
        # Blocks of 64 to 128 pointers: an insert moves half a block, and at 512 (blocks up to 1,024)
        # that move was most of a join's add (1.9 against 1.3 us per add of 18,000 random ids).
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
            i = bisect.bisect_right(self._firsts, item) - 1  # _block_of, inlined: one call per join
            if i < 0:
                i = 0
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
    """Connections of one room, grouped per user, users kept sorted for paging.

    The first page (for the last ``limit`` read) is kept up to date by every change instead of being
    rebuilt: a join into a big room moves at most one user onto it, so the change costs a copy of
    ``limit`` pointers and one :class:`PresenceMember`, not ``limit`` of them.
    """

    __slots__ = ("_head", "_head_limit", "_head_users", "_order", "_sessions", "_users")

    def __init__(self) -> None:
        self._sessions: dict[str, PresenceEntry] = {}
        #: user -> their one connection's entry, or (connections, the info of their first connection:
        #: it represents the user) for two or more; most users of a big room have one, and the entry
        #: is kept anyway, so they cost no tuple
        self._users: dict[str, PresenceEntry | tuple[int, Mapping[str, Any]]] = {}
        self._order = SortedIds()
        #: the first page, the first ``_head_limit`` users with their connections (None: not read yet).
        #: A new list on every change, never changed in place: callers keep the one they got (and the
        #: chat endpoint tells by identity that its encoded copy still holds).
        self._head: list[PresenceMember] | None = None
        self._head_limit = 0
        #: the users of ``_head``, for the bisect (private: changed in place)
        self._head_users: list[str] = []

    def __len__(self) -> int:
        return len(self._sessions)

    def get(self, session: str) -> PresenceEntry | None:
        return self._sessions.get(session)

    def add(self, entry: PresenceEntry) -> bool:
        """Add (or replace) a connection; True when it is its user's first one. Idempotent."""
        sessions, user = self._sessions, entry.user
        old = sessions.get(entry.session)
        if old is not None:
            if old.user == user:
                sessions[entry.session] = entry
                return False
            self.remove(entry.session)
        sessions[entry.session] = entry
        found = self._users.get(user)
        if found is not None:
            n, info = _connections(found)
            self._users[user] = (n + 1, info)
            if self._head is not None:
                self._head_changed(user, n + 1, info)
            return False
        self._users[user] = entry
        self._order.add(user)
        # onto the first page when it sorts before its last user or the page is not full (a join into a big
        # room mostly is neither: no call)
        users = self._head_users
        if self._head is not None and (len(users) < self._head_limit or user < users[-1]):
            self._head_arrived(user, entry.info)
        return True

    def remove(self, session: str) -> str | None:
        """Remove a connection; its user when that was their last one. Idempotent."""
        entry = self._sessions.pop(session, None)
        if entry is None:
            return None
        user = entry.user
        n, info = _connections(self._users[user])
        if n > 1:
            self._users[user] = (n - 1, info)  # (1, info) too: which entry is left is not known here
            if self._head is not None:
                self._head_changed(user, n - 1, info)
            return None
        del self._users[user]
        self._order.remove(user)
        if self._head is not None:
            self._head_departed(user)
        return user

    # -- the first page, kept up to date --------------------------------------------------------------

    def _head_arrived(self, user: str, info: Mapping[str, Any]) -> None:
        """A new user who sorts before the first page's last user, or a page that is not full: onto it."""
        users = self._head_users
        full = len(users) == self._head_limit
        i = bisect.bisect_left(users, user)
        head = self._head
        assert head is not None
        if full:
            self._head = [*head[:i], PresenceMember(user, 1, info), *head[i:-1]]
            users.pop()
        else:
            self._head = [*head[:i], PresenceMember(user, 1, info), *head[i:]]
        users.insert(i, user)

    def _head_changed(self, user: str, connections: int, info: Mapping[str, Any]) -> None:
        """A user's connection count changed: their member on the first page, if there, is replaced."""
        users = self._head_users
        i = bisect.bisect_left(users, user)
        if i < len(users) and users[i] == user:
            head = list(self._head or ())
            head[i] = PresenceMember(user, connections, info)
            self._head = head

    def _head_departed(self, user: str) -> None:
        """A user left: off the first page, and the next user after it moves onto it."""
        users = self._head_users
        i = bisect.bisect_left(users, user)
        if i == len(users) or users[i] != user:
            return
        head = self._head
        assert head is not None
        last = users[-1]
        del users[i]
        moved = [*head[:i], *head[i + 1:]]
        if len(moved) + 1 == self._head_limit:  # it was full: the first user after it follows
            after, _ = self._order.after(last, 1)
            if after:
                moved.append(PresenceMember(after[0], *_connections(self._users[after[0]])))
                users.append(after[0])
        self._head = moved

    def head(self, limit: int) -> tuple[list[PresenceMember], str | None]:
        """The first ``limit`` (> 0) members and the cursor after them (None: no more). The same list
        while it holds (callers must not change it). Kept up to date for the last ``limit`` asked for."""
        if self._head is None or self._head_limit != limit:
            users, _ = self._order.after(None, limit)
            self._head = [PresenceMember(u, *_connections(self._users[u])) for u in users]
            self._head_users, self._head_limit = users, limit
        head = self._head
        return head, (head[-1].user if len(self._users) > len(head) and head else None)

    def lookup(self, users: Sequence[str]) -> list[PresenceMember]:
        """The members among ``users`` (present now), in the order given, each once."""
        found = self._users
        return [PresenceMember(u, *_connections(found[u])) for u in dict.fromkeys(users) if u in found]

    def has_user(self, user: str) -> bool:
        return user in self._users

    def users(self) -> int:
        """Distinct users (``len`` counts connections)."""
        return len(self._users)

    def count(self) -> PresenceCount:
        return PresenceCount(len(self._users), len(self._sessions))

    def page(self, after: str | None, limit: int) -> PresencePage:
        """Members after ``after``. The first page (``after`` None) is the same list while it holds
        (callers must not change it)."""
        if after is None and limit > 0:
            members, cursor = self.head(limit)
            return PresencePage(members, cursor, self.count())
        users, more = self._order.after(after, limit)
        members = [PresenceMember(u, *_connections(self._users[u])) for u in users]
        return PresencePage(members, users[-1] if more and users else None, self.count())

    def entries(self) -> list[PresenceEntry]:
        return list(self._sessions.values())


class Departures:
    """The ``on_departed`` (or ``on_restored``: ``hook``) listeners of one presence store."""

    def __init__(self, hook: str = "on_departed") -> None:
        self.hook = hook
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
                log.exception("%s listener failed for room %s", self.hook, room)
