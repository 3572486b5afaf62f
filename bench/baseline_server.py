"""The naive baseline: a minimal Tornado WebSocket server, written the way the Tornado docs suggest.

- ``/ws/echo``: every JSON text comes back as ``{"echo": <it>}`` (``json.loads`` + ``write_message``).
- ``/ws/chat``: the same message shapes as wirehub's chat endpoint (``welcome`` on open,
  ``join {room}`` -> ``joined``, ``publish {room, data, id}`` -> ``ack {id, offset}`` to the sender
  and ``message {room, from, data, offset, ts}`` to every other member), broadcast with a
  ``for c in clients: c.write_message(msg)`` loop; the message is JSON-encoded once, Tornado
  frames it again for every recipient.

Tornado's defaults everywhere (no pings, no compression, 10 MiB message limit) except the listen
backlog, which is set like wirehub's (``--backlog``, default 1024) so that the connection burst of
the idle scenario measures the server, not SYN drops at Tornado's default backlog of 128.

    python bench/baseline_server.py --port 8081 [--backlog 1024]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import time
import uuid
from collections import defaultdict
from typing import Any

from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets
from tornado.web import Application
from tornado.websocket import WebSocketHandler

ROOMS: defaultdict[str, set[ChatHandler]] = defaultdict(set)
OFFSETS: defaultdict[str, int] = defaultdict(int)


class EchoHandler(WebSocketHandler):
    def on_message(self, message: str | bytes) -> None:
        try:
            obj = json.loads(message)
        except ValueError:
            self.write_message({"op": "error", "code": "bad_json", "message": "frame is not valid JSON"})
            return
        self.write_message({"echo": obj})


class ChatHandler(WebSocketHandler):
    def open(self, *args: str, **kwargs: str) -> None:
        self.id = uuid.uuid4().hex[:16]
        self.user = "guest-" + self.id[:8]
        self.rooms: set[str] = set()
        self.write_message({"op": "welcome", "v": 1, "session": self.id, "user": self.user, "node": "baseline"})

    def on_message(self, message: str | bytes) -> None:
        try:
            req: dict[str, Any] = json.loads(message)
            op, room = req["op"], req["room"]
        except (ValueError, KeyError, TypeError):
            self.write_message({"op": "error", "code": "bad_request", "message": "bad request"})
            return
        if op == "join":
            ROOMS[room].add(self)
            self.rooms.add(room)
            self.write_message({"op": "joined", "id": req.get("id"), "room": room, "offset": OFFSETS[room],
                                "epoch": "baseline", "recovered": False, "presence": []})
        elif op == "publish":
            if room not in self.rooms:
                self.write_message({"op": "error", "id": req.get("id"), "code": "not_joined",
                                    "message": "join the room first"})
                return
            OFFSETS[room] += 1
            offset = OFFSETS[room]
            msg = json.dumps({"op": "message", "room": room, "from": self.user, "data": req.get("data"),
                              "offset": offset, "ts": time.time()}, separators=(",", ":"))
            for c in ROOMS[room]:
                if c is not self:
                    c.write_message(msg)
            self.write_message({"op": "ack", "id": req.get("id"), "offset": offset})
        else:
            self.write_message({"op": "error", "id": req.get("id"), "code": "unknown_op", "message": op})

    def on_close(self) -> None:
        for room in getattr(self, "rooms", ()):
            ROOMS[room].discard(self)


def make_app() -> Application:
    return Application([(r"/ws/echo", EchoHandler), (r"/ws/chat", ChatHandler)])


async def serve(port: int, host: str, backlog: int) -> None:
    server = HTTPServer(make_app())
    server.add_sockets(bind_sockets(port, host, backlog=backlog))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"baseline listening on {host}:{port}", flush=True)
    await stop.wait()
    server.stop()


def main() -> None:
    p = argparse.ArgumentParser(description="naive Tornado baseline for wirehub's benchmarks")
    p.add_argument("--port", type=int, default=8081)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--backlog", type=int, default=1024)
    args = p.parse_args()
    asyncio.run(serve(args.port, args.host, args.backlog))


if __name__ == "__main__":
    main()
