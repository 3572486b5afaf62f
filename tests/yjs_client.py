"""A y-websocket client in Python for the tests: pycrdt for the document, lib0 framing from the
handler's own wire module (the same bytes a ``WebsocketProvider`` sends; tests/js/yjs checks the
real provider)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pycrdt

from wirehub.builtins.handlers.yjs import wire
from wirehub.testing import LiveServer, WsClient


class YClient:
    """One connection to a yjs endpoint, editing a pycrdt ``Doc`` with a text named ``text``."""

    def __init__(self, conn: WsClient, client_id: int | None = None) -> None:
        self.conn = conn
        self.doc: pycrdt.Doc[Any] = pycrdt.Doc(client_id=client_id)
        self.text = self.doc.get("text", type=pycrdt.Text)
        self.synced = asyncio.Event()
        self.denied: list[str] = []
        self.awareness: dict[int, Any] = {}
        self.outbox: list[bytes] = []
        self.doc.observe(self._on_update)
        self._reader = asyncio.ensure_future(self._read())
        self._applying = False

    @classmethod
    async def connect(cls, server: LiveServer, path: str, **kwargs: Any) -> YClient:
        """Connect to ``path`` on ``server`` (which closes the connection after the test) and send sync step 1."""
        client = cls(await server.ws(path, **kwargs))
        await client.conn.send(wire.sync_step1(client.doc.get_state()))
        return client

    def _on_update(self, event: Any) -> None:
        if not self._applying:
            self.outbox.append(wire.sync_update(event.update))

    async def flush(self) -> None:
        out, self.outbox = self.outbox, []
        for message in out:
            await self.conn.send(message)

    async def insert(self, index: int, text: str) -> None:
        self.text.insert(index, text)
        await self.flush()

    async def set_awareness(self, client: int, clock: int, state: Any) -> None:
        body = wire.encode_awareness([wire.AwarenessEntry(client, clock, json.dumps(state))])
        await self.conn.send(wire.awareness_message(body))

    async def _read(self) -> None:
        while True:
            msg = await self.conn.conn.read_message()
            if msg is None:
                return
            assert isinstance(msg, bytes), msg
            r = wire.Reader(msg)
            kind = r.uint()
            if kind == wire.MESSAGE_SYNC:
                step, body = r.uint(), r.blob()
                if step == wire.SYNC_STEP1:
                    await self.conn.send(wire.sync_step2(self.doc.get_update(body)))
                else:
                    self._applying = True
                    try:
                        self.doc.apply_update(body)
                    finally:
                        self._applying = False
                    if step == wire.SYNC_STEP2:
                        self.synced.set()
            elif kind == wire.MESSAGE_AWARENESS:
                for e in wire.decode_awareness(r.blob()):
                    if e.state == "null":
                        self.awareness.pop(e.client, None)
                    else:
                        self.awareness[e.client] = json.loads(e.state)
            elif kind == wire.MESSAGE_AUTH:
                r.uint()
                self.denied.append(r.string())

    async def wait_closed(self, timeout: float = 5.0) -> tuple[int | None, str | None]:
        """Until the server closed the connection: (close code, reason)."""
        await asyncio.wait_for(asyncio.shield(self._reader), timeout)
        return self.conn.close_code, self.conn.close_reason

    async def close(self) -> None:
        self._reader.cancel()
        self.conn.conn.close()


async def eventually(check: Any, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        if check():
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)
