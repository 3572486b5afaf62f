"""What the client has joined: chat rooms (:class:`Subscription`, with their position and presence) and
game rooms (:class:`GameRoom`, with their state)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from wirehub.client.policy import Callback, ClientError

if TYPE_CHECKING:
    from wirehub.client.client import Client


@dataclass(eq=False)
class Subscription:
    """A joined chat room and the position this client has reached in it."""

    client: Client
    room: str
    on_message: Callback
    on_joined: Callback | None = None
    on_presence: Callback | None = None
    offset: int | None = None
    epoch: str | None = None
    #: whether the last (re)join recovered every missed message (None before the first join)
    recovered: bool | None = None
    presence: list[dict[str, Any]] = field(default_factory=list)
    #: presence of big rooms (docs/clients.md): the room's totals ``{users, connections}`` (None while
    #: unknown or with presence off), the cursor of joined's list (None: it listed everyone), and the
    #: members known here by user id, kept up to date by presence.join / presence.leave / presence.diff
    count: dict[str, int] | None = None
    cursor: str | None = None
    members: dict[str, dict[str, Any]] = field(default_factory=dict)
    own: set[int] = field(default_factory=set)
    #: while the members are reloaded (after a ``truncated`` diff): the diffs that came meanwhile
    reloading: list[dict[str, Any]] | None = None

    @property
    def position(self) -> dict[str, Any] | None:
        if self.offset is None or self.epoch is None:
            return None
        return {"offset": self.offset, "epoch": self.epoch}

    def _move(self, offset: Any, epoch: Any) -> None:
        """Take a position the server named: within an epoch it only moves forward (a message
        already handed to ``on_message`` is never asked for again); another epoch starts over."""
        new = offset if isinstance(offset, int) and not isinstance(offset, bool) else None
        if epoch != self.epoch:
            self.offset, self.epoch = new, epoch if isinstance(epoch, str) else None
            self.own = set()  # offsets of another epoch
        elif new is not None and (self.offset is None or new > self.offset):
            self.offset = new
            self.own = {o for o in self.own if o > new}

    async def publish(self, data: Any, timeout: float | None = None) -> int:
        return await self.client.publish(self.room, data, timeout=timeout)


def take_presence_snapshot(sub: Subscription, joined: dict[str, Any]) -> None:
    """The presence part of a ``joined`` reply: the first members, the count, the cursor."""
    sub.members = {m["user"]: dict(m) for m in sub.presence if isinstance(m, dict) and "user" in m}
    count = joined.get("count")
    sub.count = dict(count) if isinstance(count, dict) else None
    cursor = joined.get("cursor")
    sub.cursor = cursor if isinstance(cursor, str) else None


def apply_presence_event(sub: Subscription, frame: dict[str, Any]) -> None:
    """A presence.join / presence.leave / presence.diff applied to the member map and the count.

    Events may repeat what ``joined`` or an earlier event told: applying is idempotent, and a diff's
    ``count`` is the server's (authoritative). Single events adjust the count by one user: a join of a user
    not listed, a leave of one listed (or of any while the list is partial, fewer listed than counted); a
    repeated event carries the room's count, kept while the list is partial.
    """
    op, count = frame.get("op"), sub.count
    if op == "presence.diff":
        for user in frame.get("leaves") or ():
            sub.members.pop(user, None)
        for item in frame.get("joins") or ():
            sub.members[item["user"]] = {"connections": 1, **item}
        if isinstance(frame.get("count"), dict):
            sub.count = dict(frame["count"])
        return
    user = frame.get("user")
    if not isinstance(user, str):
        return
    # partial: fewer listed than counted (a big room's first page), so a user not listed may be in the room
    partial = count is not None and count["users"] > len(sub.members)
    old = sub.members.get(user)
    if op == "presence.join":
        if old is None and count is not None:
            count["users"] += 1
        sub.members[user] = {"connections": 1, **(old or {}), "user": user,
                             **({"name": frame["name"]} if frame.get("name") else {})}
    else:
        # a repeated leave (events are checked; one that crossed another is told again) counts once: an
        # unlisted user counts as gone only while the list is partial
        if count is not None and (old is not None or partial):
            count["users"] = max(0, count["users"] - 1)
        sub.members.pop(user, None)
    new = frame.get("count")
    if partial and isinstance(new, dict):  # a repeated event's count: the server's read, never below the listed
        users = max(new["users"], len(sub.members))
        sub.count = {"users": users, "connections": max(new["connections"], users)}


@dataclass(eq=False)
class GameRoom:
    """A joined game room: ``state`` and ``version`` follow the server, patch by patch.

    A ``patch`` whose ``from_version`` does not continue ``version`` (a gap), or that does not
    apply, triggers ``sync`` and a fresh ``state``; ``resyncs`` counts those.
    """

    client: Client
    room: str
    on_change: Callback | None = None
    state: Any = None
    version: int = 0
    resyncs: int = 0
    #: a state arrived (the first join happened)
    joined: bool = False
    _syncing: asyncio.Task[None] | None = None

    async def update(self, patch: list[dict[str, Any]], timeout: float | None = None) -> int:
        """Send a JSON Patch; returns the committed version (the ``patch`` event applies it)."""
        reply = await self.client.request({"op": "update", "room": self.room, "patch": patch}, timeout)
        return int(reply.get("version", 0))

    def sync(self) -> asyncio.Task[None]:
        if self._syncing is None or self._syncing.done():
            self._syncing = asyncio.ensure_future(self._sync())
        return self._syncing

    async def _sync(self) -> None:
        try:
            frame = await self.client.request({"op": "sync", "room": self.room})
        except ClientError as exc:
            self.client._emit("error", exc)
            return
        self._state(frame, resync=True)

    async def leave(self) -> None:
        await self.client.leave(self.room)

    def _state(self, frame: dict[str, Any], resync: bool) -> None:
        self.joined = True
        self.state = frame.get("state")
        self.version = int(frame.get("version", 0))
        if resync:
            self.resyncs += 1
        if self.on_change is not None:
            self.client._call(self.on_change, {"state": self.state, "version": self.version, "resync": resync})

    def _patch(self, frame: dict[str, Any]) -> None:
        import jsonpatch

        if self._syncing is not None and not self._syncing.done():
            return  # the state being fetched includes it
        version = int(frame.get("version", 0))
        if version <= self.version:
            return
        if int(frame.get("from_version", version)) != self.version + 1:
            self.sync()
            return
        try:
            self.state = jsonpatch.apply_patch(self.state, frame.get("patch") or [], in_place=False)
        except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException, TypeError, KeyError, IndexError):
            self.sync()
            return
        self.version = version
        if self.on_change is not None:
            self.client._call(self.on_change, {"state": self.state, "version": version, "by": frame.get("by"),
                                               "resync": False})
