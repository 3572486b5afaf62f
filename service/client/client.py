"""The client: :class:`Client`, a :class:`~wirehub.client.connection.Connection` and the chat and game
rooms joined on it. See :mod:`wirehub.client`."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

from wirehub.client.connection import Connection, log
from wirehub.client.policy import Callback, ClientError
from wirehub.client.rooms import GameRoom, Subscription, apply_presence_event, take_presence_snapshot

#: most joins one upgrade URL carries (the rest are join frames), and its longest query of joins: well below
#: every server's max_rooms default (100) and the head limits of proxies
MAX_URL_JOINS = 20
MAX_URL_JOIN_CHARS = 4000


class Client(Connection):
    """One connection to one endpoint, kept alive, and the rooms joined on it. See :mod:`wirehub.client`."""

    async def _join_all(self) -> None:
        async def one(sub: Subscription) -> None:
            try:
                await self._join(sub, rejoin=sub.recovered is not None)
            except ClientError as exc:
                if exc.code != "disconnected":
                    self.rooms.pop(sub.room, None)
                    self._emit("error", exc)

        async def one_game(game: GameRoom) -> None:
            try:
                joined = self._url_joined.pop(game.room, None)
                if joined is not None:
                    reply = await self._url_reply(joined)
                else:
                    reply = await self.request({"op": "join", "room": game.room}, _internal=True)
                game._state(reply, resync=game.joined)
            except ClientError as exc:
                if exc.code != "disconnected":
                    self.games.pop(game.room, None)
                    self._emit("error", exc)

        await asyncio.gather(*(one(sub) for sub in list(self.rooms.values())),
                             *(one_game(game) for game in list(self.games.values())))

    def _url_join_items(self) -> list[dict[str, Any]]:
        """The rooms to rejoin (chat rooms with their position) for the upgrade URL, each with a request id
        whose reply is then awaited after the welcome instead of a join frame sent."""
        items: list[dict[str, Any]] = []
        chars = 0
        rooms: list[Subscription | GameRoom] = [*self.rooms.values(), *self.games.values()]
        for room in rooms[:MAX_URL_JOINS]:
            self._next_id += 1
            req_id = f"p{self._next_id}"
            item: dict[str, Any] = {"room": room.room, "id": req_id}
            if isinstance(room, Subscription) and room.position is not None:
                item["since"] = room.position
            chars += len(json.dumps(item)) + 6
            if chars > MAX_URL_JOIN_CHARS:
                break
            hook = (lambda r, sub=room: self._joined(sub, r)) if isinstance(room, Subscription) else None
            self._expect_reply(room.room, req_id, hook)
            items.append(item)
        return items

    async def _reload_members(self, sub: Subscription) -> None:
        """After a ``truncated`` diff the members known here may be stale (diffs were cut short, a replica died
        with some unsent, or the server missed events while its link to the bus was down): start again from the
        room's first page, then apply the diffs that came while it was read (each names users as they were when
        it was sent, so the later one wins)."""
        sub.reloading = []
        try:
            page = await self.presence_page(sub.room)
        except Exception as exc:  # disconnected, closed, refused: the next truncated diff tries again
            sub.reloading = None
            log.info("reloading the members of %s after a truncated diff failed: %s", sub.room, exc)
            return
        came, sub.reloading = sub.reloading or [], None
        if self.rooms.get(sub.room) is not sub:  # left meanwhile
            return
        count = sub.count  # the page's, read after those diffs were sent
        sub.members = {m["user"]: dict(m) for m in page.get("members") or ()}
        sub.cursor = page.get("cursor")
        for diff in came:
            apply_presence_event(sub, diff)
        sub.count = count
        if any(diff.get("truncated") is True for diff in came):
            self._spawn(self._reload_members(sub))

    def _dispatch(self, frame: dict[str, Any]) -> None:
        """A frame that is not a reply: a room's message, presence, gap, patch, state, left or error."""
        op = frame.get("op")
        room = frame.get("room")
        sub = self.rooms.get(room) if isinstance(room, str) else None
        if op == "message":
            if sub is not None:
                self._on_message(sub, frame)
        elif op in ("presence.join", "presence.leave", "presence.diff"):
            if sub is not None:
                apply_presence_event(sub, frame)
                if sub.reloading is not None:
                    sub.reloading.append(frame)
                elif op == "presence.diff" and frame.get("truncated") is True:
                    self._spawn(self._reload_members(sub))
            if sub is not None and sub.on_presence is not None:
                self._call(sub.on_presence, frame)
            self._emit("presence", frame)
        elif op == "gap":
            if sub is not None:
                if isinstance(frame.get("offset"), int):
                    sub._move(frame["offset"], frame.get("epoch"))
                else:  # a server before gap carried an offset: the next message sets it
                    sub.offset, sub.epoch = None, frame.get("epoch")
            self._emit("gap", frame)
        elif op == "patch":
            game = self.games.get(room) if isinstance(room, str) else None
            if game is not None:
                game._patch(frame)
        elif op == "state":
            game = self.games.get(room) if isinstance(room, str) else None
            if game is not None:
                game._state(frame, resync=True)
        elif op == "left":
            # the server left a room for us (a refreshed token no longer allows it): no rejoin
            if isinstance(room, str):
                self.rooms.pop(room, None)
                self.games.pop(room, None)
            self._emit("left", frame)
        elif op == "error":
            self._emit("error", ClientError(str(frame.get("code")), str(frame.get("message")), frame))

    def _on_message(self, sub: Subscription, frame: dict[str, Any]) -> None:
        offset = frame.get("offset")
        if isinstance(offset, int):
            if sub.offset is not None and offset <= sub.offset:
                return  # replayed twice
            sub.offset = offset
            if offset in sub.own:
                sub.own.discard(offset)
                return  # our own publish, replayed by a recovery
            sub.own = {o for o in sub.own if o > offset}
        self._call(sub.on_message, frame)

    # -- chat ------------------------------------------------------------------------------------------

    async def join(self, room: str, on_message: Callback, *, since: dict[str, Any] | None = None,
                   on_joined: Callback | None = None, on_presence: Callback | None = None) -> Subscription:
        """Join a chat room; ``on_message(frame)`` gets each ``message`` once, in order."""
        if room in self.rooms:
            raise ClientError("bad_request", f"already joined room {room!r}")
        sub = Subscription(self, room, on_message, on_joined, on_presence)
        if since is not None:
            sub.offset, sub.epoch = int(since["offset"]), str(since["epoch"])
        self.rooms[room] = sub
        try:
            if not self._ready.is_set():
                await self.connect(self.ack_timeout)
                if sub.recovered is not None:
                    return sub  # joined by the rejoin after the welcome
            try:
                await self._join(sub, rejoin=False)
            except ClientError as exc:
                if exc.code != "disconnected" or not self.auto_reconnect:
                    raise
                await self._await_rejoin(sub)  # the next connection joins every room in self.rooms
        except BaseException:
            if self.rooms.get(room) is sub:
                del self.rooms[room]
            raise
        return sub

    async def _await_rejoin(self, sub: Subscription) -> None:
        """Wait until the rejoin after a reconnect has joined ``sub`` (bounded by ack_timeout)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.ack_timeout
        joined = asyncio.Event()
        off = self.on("joined", lambda info: joined.set() if info["room"] == sub.room else None)
        try:
            while sub.recovered is None:
                if self._stopped:
                    raise self._stop_error or ClientError("closed", "the client was closed")
                if self.rooms.get(sub.room) is not sub:
                    raise ClientError("rejected", f"the rejoin of {sub.room!r} failed")
                if loop.time() > deadline:
                    raise ClientError("timeout", f"could not join {sub.room!r} within {self.ack_timeout} s")
                with contextlib.suppress(TimeoutError):  # wakes on the event; re-checks the rest twice a second
                    await asyncio.wait_for(joined.wait(), min(0.5, max(0.01, deadline - loop.time())))
        finally:
            off()

    async def _join(self, sub: Subscription, rejoin: bool) -> None:
        joined = self._url_joined.pop(sub.room, None)
        if joined is not None:  # joined by the upgrade URL: its reply follows the welcome
            reply = await self._url_reply(joined)
        else:
            body: dict[str, Any] = {"op": "join", "room": sub.room}
            if sub.position is not None:
                body["since"] = sub.position
            reply = await self.request(body, _internal=True, _on_reply=lambda r: self._joined(sub, r))
        sub.recovered = bool(reply.get("recovered"))
        sub.presence = list(reply.get("presence") or [])
        take_presence_snapshot(sub, reply)
        info = {"room": sub.room, "offset": reply.get("offset"), "epoch": sub.epoch, "recovered": sub.recovered,
                "rejoin": rejoin, "presence": sub.presence}
        self._emit("joined", info)
        if sub.on_joined is not None:
            self._call(sub.on_joined, info)

    @staticmethod
    def _joined(sub: Subscription, reply: dict[str, Any]) -> None:
        """The position after ``joined``, taken as the reply is read: the live messages that follow
        it may be handed to ``on_message`` before the awaiting ``_join`` resumes."""
        if reply.get("recovered") and sub.offset is not None and sub.epoch == reply.get("epoch"):
            return  # the replay that follows moves it
        sub._move(reply.get("offset"), reply.get("epoch"))

    async def leave(self, room: str) -> None:
        """Leave a chat or game room (no rejoin after a reconnect)."""
        had = self.rooms.pop(room, None) is not None or self.games.pop(room, None) is not None
        if had and self._ready.is_set():
            with contextlib.suppress(ClientError):
                await self.request({"op": "leave", "room": room})

    async def publish(self, room: str, data: Any, timeout: float | None = None) -> int:
        """Publish to a joined room; returns the message's offset from the server's ack."""
        reply = await self.request({"op": "publish", "room": room, "data": data}, timeout)
        offset = reply.get("offset")
        sub = self.rooms.get(room)
        if sub is not None and isinstance(offset, int) and (sub.offset is None or offset > sub.offset):
            sub.own.add(offset)
        return int(offset) if isinstance(offset, int) else -1

    async def presence(self, room: str) -> list[dict[str, Any]]:
        """The first page of members (``presence_limit`` of them); :meth:`presence_page` pages on."""
        reply = await self.request({"op": "presence", "room": room})
        return list(reply.get("members") or [])

    async def presence_page(self, room: str, *, after: str | None = None,
                            limit: int | None = None) -> dict[str, Any]:
        """``{members, count, cursor?}``: the members after ``after`` (a ``cursor`` of an earlier page or
        of ``Subscription.cursor``); no ``cursor`` in the reply means this was the last page."""
        body: dict[str, Any] = {"op": "presence", "room": room}
        if after is not None:
            body["after"] = after
        if limit is not None:
            body["limit"] = limit
        reply = await self.request(body)
        sub = self.rooms.get(room)
        if sub is not None and isinstance(reply.get("count"), dict):
            sub.count = dict(reply["count"])
        return reply

    async def presence_count(self, room: str) -> dict[str, int]:
        """``{users, connections}`` of the room, without the member list."""
        reply = await self.request({"op": "presence", "room": room, "count_only": True})
        count = {"users": int(reply["count"]["users"]), "connections": int(reply["count"]["connections"])}
        sub = self.rooms.get(room)
        if sub is not None:
            sub.count = dict(count)
        return count

    async def history(self, room: str, *, limit: int | None = None,
                      since: dict[str, Any] | None = None) -> dict[str, Any]:
        """``{messages, offset, epoch, complete}``: the newest ``limit`` messages or those after ``since``."""
        body: dict[str, Any] = {"op": "history", "room": room}
        if limit is not None:
            body["limit"] = limit
        if since is not None:
            body["since"] = since
        return await self.request(body)


    # -- game -------------------------------------------------------------------------------------------

    async def join_game(self, room: str, on_change: Callback | None = None) -> GameRoom:
        """Join a game room (on a ``/ws/game`` connection). ``on_change({state, version, resync,
        by?})`` runs after each change; after a reconnect the room is joined again (a fresh state)."""
        if room in self.games:
            raise ClientError("bad_request", f"already joined room {room!r}")
        game = GameRoom(self, room, on_change)
        self.games[room] = game
        try:
            if not self._ready.is_set():
                await self.connect(self.ack_timeout)
                if game.joined:
                    return game  # joined by the rejoin after the welcome
            game._state(await self.request({"op": "join", "room": room}), resync=False)
        except BaseException:
            if self.games.get(room) is game:
                del self.games[room]
            raise
        return game
