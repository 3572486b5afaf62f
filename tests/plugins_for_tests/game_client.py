"""A game-endpoint test client that keeps its own copy of every joined room, as a real client would.

It applies ``patch`` frames in version order with the documented rule (a client at version v
applies a frame whose ``from_version`` is v + 1, ignores one whose ``version`` is at most v, and
sends ``sync`` on anything else) and replaces its copy with every ``state`` frame. A background
reader handles every frame; requests wait for the reply carrying their id.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from typing import Any

import jsonpatch

from wirehub.testing import WsClient, ws_connect

_ids = itertools.count(1)


class GameClient:
    def __init__(self, ws: WsClient, name: str = "") -> None:
        self.ws = ws
        self.name = name
        self.rooms: dict[str, tuple[int, Any]] = {}
        self.frames: list[dict[str, Any]] = []  # every event frame (no id), in order
        self.replies: list[dict[str, Any]] = []  # every frame with an id, in order
        self.top_ack = 0  # the highest version an ack named
        self.patch_frames = 0
        self.state_frames = 0
        self.gaps = 0
        self.welcome: dict[str, Any] | None = None
        self.closed: tuple[int | None, str | None] | None = None
        self._waiting: dict[Any, asyncio.Future[dict[str, Any]]] = {}
        self._changed = asyncio.Event()
        self._reading = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._reading.set()
        self._reader = asyncio.ensure_future(self._read())

    @classmethod
    async def connect(cls, url: str, name: str = "") -> GameClient:
        client = cls(await ws_connect(url), name)
        await client.wait_for(lambda: client.welcome is not None)
        return client

    @property
    def user(self) -> str:
        assert self.welcome is not None
        return str(self.welcome["user"])

    async def _read(self) -> None:
        while True:
            await self._reading.wait()
            raw = await self.ws.conn.read_message()
            if raw is None:
                self.closed = (self.ws.close_code, self.ws.close_reason)
                for fut in self._waiting.values():
                    if not fut.done():
                        fut.set_exception(ConnectionError(f"closed: {self.closed}"))
                self._changed.set()
                return
            msg = json.loads(raw)
            self.handle(msg)
            waiting = self._waiting.pop(msg["id"], None) if msg.get("id") is not None else None
            if waiting is not None and not waiting.done():
                waiting.set_result(msg)
            self._changed.set()

    def handle(self, msg: dict[str, Any]) -> None:
        op = msg.get("op")
        if msg.get("id") is None:
            self.frames.append(msg)
        else:
            self.replies.append(msg)
        if op == "ack":
            self.top_ack = max(self.top_ack, msg["version"])
        if op == "welcome":
            self.welcome = msg
        elif op == "state":
            self.state_frames += 1
            self.rooms[msg["room"]] = (msg["version"], msg["state"])
        elif op == "patch":
            self.patch_frames += 1
            room = msg["room"]
            if room not in self.rooms:
                return
            version, state = self.rooms[room]
            if msg["version"] <= version:
                return
            if msg["from_version"] != version + 1:
                self.gaps += 1
                task = asyncio.ensure_future(self.send({"op": "sync", "room": room, "id": f"gap-{next(_ids)}"}))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
                return
            self.rooms[room] = (msg["version"], jsonpatch.apply_patch(state, msg["patch"]))

    async def send(self, obj: dict[str, Any]) -> None:
        await self.ws.send(obj)

    async def request(self, obj: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
        req_id = obj.get("id") or f"r{next(_ids)}"
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[req_id] = fut
        await self.ws.send({**obj, "id": req_id})
        return await asyncio.wait_for(fut, timeout)

    async def join(self, room: str) -> dict[str, Any]:
        return await self.request({"op": "join", "room": room})

    async def update(self, room: str, patch: list[Any]) -> dict[str, Any]:
        return await self.request({"op": "update", "room": room, "patch": patch})

    async def sync(self, room: str) -> dict[str, Any]:
        return await self.request({"op": "sync", "room": room})

    async def wait_for(self, predicate: Any, timeout: float = 10.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate():
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise AssertionError(f"{self.name}: condition not met in {timeout}s; rooms={self.rooms}")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(remaining, 0.2))

    async def wait_version(self, room: str, version: int, timeout: float = 10.0) -> Any:
        await self.wait_for(lambda: self.rooms.get(room, (-1, None))[0] >= version, timeout)
        return self.rooms[room]

    def pause(self) -> None:
        """Stop reading: the connection's flow control pushes back to the server."""
        self._reading.clear()

    def resume(self) -> None:
        self._reading.set()

    def close(self) -> None:
        self._reader.cancel()
        self.ws.close()

    async def aclose(self, timeout: float = 2.0) -> None:
        """Close and wait for the closing handshake (then the socket is closed for sure)."""
        self.ws.close()
        self._reading.set()
        with contextlib.suppress(TimeoutError, asyncio.CancelledError, ConnectionError):
            await asyncio.wait_for(self._reader, timeout)  # ends when the server's close arrives
        stream = self.ws.conn.stream
        if stream is not None and not stream.closed():
            stream.close()

