"""A join in the upgrade URL answered in the upgrade's own ``send`` (issue 11): on the lean path the 101, the
``welcome`` and the ``joined`` replies of joins that did not suspend (the memory bus) leave in ONE ``send``
system call, in the protocol's order; a join that suspends (a slow authorize hook, as a Redis or NATS join
does) gets its reply in a later ``send``, after the 101 and the welcome. Counted on the server's socket."""

from __future__ import annotations

import asyncio
import json
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from tests.plugins_for_tests import slow_authorize
from tests.test_upgrade_head import closed, exchange, text_frame, upgrade_head
from wirehub import upgrade
from wirehub.testing import LiveServer, unique_room

Start = Callable[..., Awaitable[LiveServer]]
CHAT = "/ws/chat"


class _CountingSocket:
    """The server side of a connection, each ``send`` recorded (everything else passed through)."""

    def __init__(self, sock: Any, sends: list[bytes]) -> None:
        self._sock = sock
        self.sends = sends

    def send(self, data: Any, *args: Any) -> int:
        sent = int(self._sock.send(data, *args))
        self.sends.append(bytes(memoryview(data)[:sent]))
        return sent

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


@pytest.fixture
def server_sends(monkeypatch: pytest.MonkeyPatch) -> list[list[bytes]]:
    """The ``send`` calls on each connection the lean path opens from now on (one list per connection), from
    the 101 on: the stream's socket is wrapped where the session is opened on it."""
    connections: list[list[bytes]] = []
    original = upgrade._open

    def counting_open(app: Any, target: Any, identity: Any, remote_ip: str, stream: Any, *args: Any,
                      **kw: Any) -> None:
        sends: list[bytes] = []
        connections.append(sends)
        stream.socket = _CountingSocket(stream.socket, sends)
        original(app, target, identity, remote_ip, stream, *args, **kw)

    monkeypatch.setattr(upgrade, "_open", counting_open)
    return connections


def _split(data: bytes) -> tuple[bytes, list[dict[str, Any]]]:
    """A server's bytes: the HTTP head, then its unmasked frames as JSON (all whole)."""
    head, sep, rest = data.partition(b"\r\n\r\n")
    assert sep, data[:200]
    frames = []
    while rest:
        size, at = rest[1] & 0x7F, 2
        if size == 126:
            size, at = int.from_bytes(rest[2:4], "big"), 4
        elif size == 127:
            size, at = int.from_bytes(rest[2:10], "big"), 10
        frames.append(json.loads(rest[at:at + size]))
        rest = rest[at + size:]
    return head + sep, frames


def _chat(options: dict[str, Any] | None = None, **more: Any) -> dict[str, Any]:
    return {"endpoints": [{"path": CHAT, "handler": "chat", "options": options or {}}], **more}


def _url(*rooms: str) -> str:
    joins = [("join", json.dumps({"room": r, "id": i})) for i, r in enumerate(rooms)]
    return CHAT + "?" + urllib.parse.urlencode(joins)


async def _opened(connections: list[list[bytes]], n: int) -> list[bytes]:
    """The sends of the ``n``-th connection the lean path opened (1 = the first), once it is open."""
    for _ in range(200):
        if len(connections) >= n:
            return connections[n - 1]
        await asyncio.sleep(0.01)
    raise AssertionError(f"{len(connections)} connections opened, not {n}")


async def _settled(sends: list[bytes], n: int) -> None:
    for _ in range(100):
        if len(sends) >= n:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)  # and no more than that after a few more loop iterations


@pytest.mark.parametrize("limit", [100, 0])
async def test_the_101_the_welcome_and_the_url_joins_replies_leave_in_one_send(
        wirehub_server: Start, server_sends: list[list[bytes]], limit: int) -> None:
    """Presence events off, as in a big room (with events on, the room's ``presence.join`` broadcast, the joiner's
    copy included, leaves with the fan-out's flush, a loop iteration later)."""
    server = await wirehub_server(_chat({"presence_limit": limit, "presence_events": False}))
    big, other = unique_room(), unique_room()
    earlier = []
    for i in range(3):  # the room has members already, and the first page holds them (with limit 100)
        _, w = await exchange(server, upgrade_head(_url(big)))
        earlier.append(w)
        await _settled(await _opened(server_sends, i + 1), 1)
    _, writer = await exchange(server, upgrade_head(_url(big, other)))
    sends = await _opened(server_sends, 4)
    await _settled(sends, 1)
    assert len(sends) == 1, [s[:40] for s in sends]
    head, frames = _split(sends[0])
    assert head.startswith(b"HTTP/1.1 101 ")
    assert [(f["op"], f.get("room"), f.get("id")) for f in frames] == [
        ("welcome", None, None), ("joined", big, 0), ("joined", other, 1)]
    assert frames[0]["joins"] == 2
    assert frames[1]["count"]["users"] >= 1 and len(frames[1]["presence"]) == (frames[1]["count"]["users"] if limit
                                                                                else 0)
    writer.write(text_frame(b'{"op":"ping","id":"p"}'))  # the next reply is a send of its own
    await _settled(sends, 2)
    assert len(sends) == 2 and [f["op"] for f in _split(b"\r\n\r\n" + sends[1])[1]] == ["pong"]
    for w in (*earlier, writer):
        await closed(w)


async def test_an_idle_connection_gets_its_101_and_welcome_in_one_send(
        wirehub_server: Start, server_sends: list[list[bytes]]) -> None:
    server = await wirehub_server(_chat())
    _, writer = await exchange(server, upgrade_head(CHAT))
    sends = await _opened(server_sends, 1)
    await _settled(sends, 1)
    assert len(sends) == 1
    head, frames = _split(sends[0])
    assert head.startswith(b"HTTP/1.1 101 ") and [f["op"] for f in frames] == ["welcome"] and "joins" not in frames[0]
    await closed(writer)


async def test_a_url_join_that_suspends_is_answered_in_a_later_send_after_the_welcome(
        wirehub_server: Start, server_sends: list[list[bytes]], monkeypatch: pytest.MonkeyPatch) -> None:
    """As on Redis or NATS: the 101 and the welcome are not held back for the join, whose reply follows."""
    monkeypatch.setattr(slow_authorize, "DELAY", 2.0)  # well after the first send, however loaded the machine
    server = await wirehub_server(_chat(plugins={"load": ["tests.plugins_for_tests.slow_authorize"]}))
    slow = "slow-" + unique_room()
    _, writer = await exchange(server, upgrade_head(_url(slow)))
    sends = await _opened(server_sends, 1)
    await _settled(sends, 1)
    assert len(sends) == 1
    head, frames = _split(sends[0])
    assert head.startswith(b"HTTP/1.1 101 ") and [f["op"] for f in frames] == ["welcome"] and frames[0]["joins"] == 1
    for _ in range(1000):  # the hook's 2 s
        if len(sends) >= 2:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)
    assert len(sends) == 2
    assert [(f["op"], f.get("room")) for f in _split(b"\r\n\r\n" + sends[1])[1]] == [("joined", slow)]
    await closed(writer)
