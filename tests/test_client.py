"""The Python client (wirehub.client) and the `wirehub listen | send` helpers, against real servers.

Reconnects are forced the ways they happen in production: the server closes a session with a
close code (1001 + retry hint, 4001, 4003, 4008), and the server is drained and replaced by a new
process-equivalent (a fresh app on the same port, with a fresh memory history).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import jwt
import pytest
from tornado.netutil import bind_sockets

from tests.helpers import run_cli_async, wirehub_cmd
from wirehub.app import Wirehub
from wirehub.client import Client, ClientError, Subscription, backoff_delay, close_policy, parse_retry_ms
from wirehub.config import config_from_dict
from wirehub.protocol import CloseCode, close_reason
from wirehub.session import Session
from wirehub.testing import LiveServer, config_for_tests, free_port, unique_room

Start = Callable[..., Awaitable[LiveServer]]
SECRET = "k" * 40
JWT_CONFIG = {"auth": {"plugin": "jwt", "jwt": {"algorithms": ["HS256"], "secret": SECRET, "leeway": 0,
                                                "expiry_grace": 0}}}
FAST = {"backoff_min": 0.05, "backoff_max": 0.2, "ack_timeout": 5.0, "ping_interval": 0}


def mint(sub: str = "ann", rooms: tuple[str, ...] = ("*",), ttl: float = 600) -> str:
    return jwt.encode({"sub": sub, "rooms": list(rooms), "exp": int(time.time() + ttl)}, SECRET, algorithm="HS256")


async def eventually(cond: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"{what} not met within {timeout}s"
        await asyncio.sleep(0.02)


def sessions_of(server: LiveServer, user: str | None = None) -> list[Session]:
    return [s for s in server.app.sessions if user is None or s.identity.user == user]


@pytest.fixture
async def clients() -> AsyncIterator[Callable[..., Client]]:
    made: list[Client] = []

    def make(url: str, token: Any = None, **kwargs: Any) -> Client:
        client = Client(url, token, **{**FAST, **kwargs})
        made.append(client)
        return client

    yield make
    for client in made:
        await client.close()


# -- the pure parts ---------------------------------------------------------------------------------------------


def test_a_position_moves_forward_within_an_epoch_and_starts_over_with_a_new_one() -> None:
    client = Client("ws://127.0.0.1:9/ws/chat")
    sub = Subscription(client, "r", lambda m: None, offset=10, epoch="e1", own={9, 12})
    frames: list[dict[str, Any]] = []
    sub.on_message = frames.append
    client.rooms["r"] = sub
    client._on_frame({"op": "gap", "room": "r", "epoch": "e1", "offset": 4})  # an older offset: no move back
    assert sub.position == {"offset": 10, "epoch": "e1"}
    client._on_frame({"op": "message", "room": "r", "offset": 10, "data": "dup"})
    assert frames == []
    client._on_frame({"op": "gap", "room": "r", "epoch": "e2", "offset": 0})  # the broker lost e1
    assert sub.position == {"offset": 0, "epoch": "e2"} and sub.own == set()
    client._on_frame({"op": "message", "room": "r", "offset": 1, "data": "new epoch"})
    assert [f["data"] for f in frames] == ["new epoch"] and sub.position == {"offset": 1, "epoch": "e2"}
    Client._joined(sub, {"recovered": False, "offset": 0, "epoch": "e2"})  # not back to 0
    assert sub.position == {"offset": 1, "epoch": "e2"}
    Client._joined(sub, {"recovered": False, "offset": 5, "epoch": "e3"})
    assert sub.position == {"offset": 5, "epoch": "e3"}


def test_backoff_is_full_jitter_and_capped() -> None:
    assert backoff_delay(0, 0.5, 30, lambda: 0.999) < 0.5
    assert backoff_delay(3, 0.5, 30, lambda: 0.5) == pytest.approx(2.0)
    assert backoff_delay(50, 0.5, 30, lambda: 0.999) < 30
    assert backoff_delay(5, 0.5, 30, lambda: 0.0) == 0.0


def test_close_codes() -> None:
    assert parse_retry_ms(close_reason(CloseCode.GOING_AWAY, 1234)) == 1234
    assert parse_retry_ms("normal closure") is None
    going = close_policy(1001, "server going away; retry_ms=700", 5, 0.5, 30)
    assert (going.reconnect, going.delay, going.new_token) == (True, 0.7, False)
    assert close_policy(4008, "slow consumer; retry_ms=1000", 0, 0.5, 30).delay == 1.0
    assert close_policy(4003, "forbidden", 0, 0.5, 30).reconnect is False
    expired = close_policy(4001, "token expired", 0, 0.5, 30)
    assert expired.reconnect and expired.new_token and expired.delay < 0.5
    limited = [close_policy(4029, "rate limited; retry_ms=2000", 0, 0.5, 30).delay for _ in range(50)]
    assert min(limited) >= 2.0 and max(limited) < 2.0 + 4.0
    dropped = close_policy(None, None, 2, 0.5, 30)
    assert dropped.reconnect and dropped.delay < 2.0


# -- requests ---------------------------------------------------------------------------------------------------


async def test_join_publish_ack_presence_history(wirehub_server: Start, clients: Callable[..., Client]) -> None:
    server = await wirehub_server()
    room = unique_room()
    a, b = clients(server.ws_url("/ws/chat")), clients(server.ws_url("/ws/chat"))
    got_a: list[dict[str, Any]] = []
    got_b: list[dict[str, Any]] = []
    await a.connect()
    sub_a = await a.join(room, got_a.append)
    await b.join(room, got_b.append)  # connects by itself
    assert sub_a.recovered is False and sub_a.epoch
    offset = await a.publish(room, {"text": "hi"})
    assert offset >= 1
    await eventually(lambda: len(got_b) == 1)
    assert got_b[0]["data"] == {"text": "hi"} and got_b[0]["offset"] == offset
    assert got_b[0]["from"] == (a.welcome or {})["user"]
    assert got_a == []  # no echo of one's own message
    members = await a.presence(room)
    assert sorted(m["user"] for m in members) == sorted([(a.welcome or {})["user"], (b.welcome or {})["user"]])
    page = await b.history(room, limit=10)
    assert [m["data"] for m in page["messages"]] == [{"text": "hi"}] and page["complete"] is True
    with pytest.raises(ClientError) as err:
        await a.publish(unique_room(), "x")
    assert err.value.code == "not_joined"
    with pytest.raises(ClientError) as err:
        await a.join(room, got_a.append)
    assert err.value.code == "bad_request"
    await a.leave(room)
    assert room not in a.rooms


async def test_reconnect_after_going_away_recovers_exactly_once(wirehub_server: Start,
                                                                  clients: Callable[..., Client]) -> None:
    server = await wirehub_server()
    room = unique_room()
    listener, other = clients(server.ws_url("/ws/chat")), clients(server.ws_url("/ws/chat"))
    got: list[Any] = []
    joins: list[dict[str, Any]] = []
    closes: list[dict[str, Any]] = []
    listener.on("close", closes.append)
    await listener.join(room, lambda m: got.append(m["data"]), on_joined=joins.append)
    await other.join(room, lambda m: None)
    own = await listener.publish(room, "mine")
    await other.publish(room, "before")
    await eventually(lambda: got == ["before"])

    # The server sends 1001 with a 300 ms hint; meanwhile the room goes on.
    user = (listener.welcome or {})["user"]
    (session,) = sessions_of(server, user)
    started = time.monotonic()
    session.close(CloseCode.GOING_AWAY, close_reason(CloseCode.GOING_AWAY, 300))
    await eventually(lambda: listener.status == "reconnecting")
    await other.publish(room, "while away 1")
    await other.publish(room, "while away 2")
    await eventually(lambda: len(joins) == 2, what="the rejoin")
    assert time.monotonic() - started >= 0.29  # the hint was honoured
    assert closes[0]["code"] == 1001 and closes[0]["delay"] == pytest.approx(0.3)
    assert joins[1]["rejoin"] is True and joins[1]["recovered"] is True
    await other.publish(room, "after")
    await eventually(lambda: len(got) == 4)
    await asyncio.sleep(0.1)
    assert got == ["before", "while away 1", "while away 2", "after"]  # once each, in order
    assert listener.connections == 2
    # its own message was not handed back, and a publish after the reconnect works
    assert own not in [m for m in got]
    assert await listener.publish(room, "back") > own


async def test_a_join_that_a_dropped_connection_interrupts_completes_after_the_reconnect(
        wirehub_server: Start, clients: Callable[..., Client]) -> None:
    server = await wirehub_server()
    client = clients(server.ws_url("/ws/chat"))
    await client.connect()
    conn = client._conn
    assert conn is not None
    write = conn.write_message

    def write_then_drop(message: Any, binary: bool = False) -> Any:
        sent = write(message, binary)
        if '"op": "join"' in message:
            conn.protocol._abort()  # the TCP connection dies right after the join went out
        return sent

    conn.write_message = write_then_drop  # type: ignore[method-assign]
    room = unique_room()
    sub = await client.join(room, lambda m: None)
    assert sub.recovered is False and client.connections == 2
    assert await client.publish(room, "x") >= 1


async def test_requests_made_while_disconnected_wait_for_the_connection(
        wirehub_server: Start, clients: Callable[..., Client]) -> None:
    server = await wirehub_server()
    room = unique_room()
    client, other = clients(server.ws_url("/ws/chat")), clients(server.ws_url("/ws/chat"))
    await client.join(room, lambda m: None)
    seen: list[Any] = []
    await other.join(room, lambda m: seen.append(m["data"]))
    (session,) = sessions_of(server, (client.welcome or {})["user"])
    session.close(CloseCode.SLOW_CONSUMER, retry_ms=200)
    await eventually(lambda: client.status == "reconnecting")
    offset = await client.publish(room, "queued")  # sent once the room is rejoined
    assert offset >= 1
    await eventually(lambda: seen == ["queued"])


async def test_forbidden_stops_for_good(wirehub_server: Start, clients: Callable[..., Client]) -> None:
    server = await wirehub_server()
    client = clients(server.ws_url("/ws/chat"))
    await client.join(unique_room(), lambda m: None)
    (session,) = sessions_of(server, (client.welcome or {})["user"])
    session.close(CloseCode.FORBIDDEN)
    await eventually(lambda: client.status == "stopped")
    await asyncio.sleep(0.3)
    assert client.connections == 1 and not server.app.sessions
    with pytest.raises(ClientError) as err:
        await client.publish("x", 1)
    assert err.value.code == "stopped"


async def test_expired_token_is_replaced_then_refreshed(wirehub_server: Start,
                                                        clients: Callable[..., Client]) -> None:
    server = await wirehub_server(JWT_CONFIG)
    calls: list[str] = []

    async def get_token() -> str:
        calls.append("x")
        return mint(ttl=3 if len(calls) < 3 else 600)

    refreshed: list[dict[str, Any]] = []
    client = clients(server.ws_url("/ws/chat"), get_token, refresh_margin=1.5)
    client.on("refreshed", refreshed.append)
    room = unique_room()
    await client.join(room, lambda m: None)
    assert len(calls) == 1
    # 4001 from the server: a new token is fetched before reconnecting
    (session,) = sessions_of(server, "ann")
    session.close(CloseCode.TOKEN_EXPIRED)
    await eventually(lambda: client.connections == 2 and client.status == "open")
    assert len(calls) == 2
    # that token lives 3 s: the client refreshes it 1.5 s before expiry on the same connection
    await eventually(lambda: bool(refreshed), timeout=4, what="a refresh")
    assert len(calls) == 3 and refreshed[0]["expires_at"] > time.time() + 500
    await asyncio.sleep(2.0)  # past the first token's expiry: still the same connection
    assert client.connections == 2 and client.status == "open"
    assert await client.publish(room, "still authorised") >= 1


async def test_a_room_the_refreshed_token_drops_is_left_for_good(wirehub_server: Start,
                                                                  clients: Callable[..., Client]) -> None:
    server = await wirehub_server(JWT_CONFIG)
    calls: list[int] = []

    def get_token() -> str:
        calls.append(1)
        return mint("eve", ttl=3) if len(calls) == 1 else mint("eve", rooms=("keep-*",))

    client = clients(server.ws_url("/ws/chat"), get_token, refresh_margin=1.5)
    left: list[dict[str, Any]] = []
    client.on("left", left.append)
    keep, drop = unique_room("keep"), unique_room("drop")
    await client.join(keep, lambda m: None)
    await client.join(drop, lambda m: None)
    await eventually(lambda: bool(left), timeout=4, what="the left event")
    assert left[0]["room"] == drop and list(client.rooms) == [keep]
    (session,) = sessions_of(server, "eve")
    session.close(CloseCode.GOING_AWAY, close_reason(CloseCode.GOING_AWAY, 50))
    await eventually(lambda: client.connections == 2 and client.status == "open")
    assert list(client.rooms) == [keep]


async def test_refused_upgrade_fetches_a_new_token(wirehub_server: Start, clients: Callable[..., Client]) -> None:
    server = await wirehub_server(JWT_CONFIG)
    tokens = iter(["garbage", mint()])
    client = clients(server.ws_url("/ws/chat"), lambda: next(tokens))
    await client.connect(5)
    assert client.welcome is not None and client.welcome["user"] == "ann"
    assert client.last_close == (4401, "HTTP 401")


async def test_server_restart_on_the_same_port(clients: Callable[..., Client]) -> None:
    """A drained server is replaced by a new one: the client comes back by itself; with the memory
    bus the history is gone (a new epoch), which the rejoin reports as recovered false."""
    port = free_port()
    config = config_from_dict(config_for_tests({"server": {"port": port},
                                                "drain": {"grace": 2, "reconnect_jitter": 0.1}}), source="<test>")

    async def start() -> Wirehub:
        app = Wirehub.build(config)
        await app.start(bind_sockets(port, "127.0.0.1"))
        return app

    app = await start()
    url = f"ws://127.0.0.1:{port}/ws/chat"
    room = unique_room()
    got: list[Any] = []
    joins: list[dict[str, Any]] = []
    client, sender = clients(url), clients(url)
    try:
        await client.join(room, lambda m: got.append(m["data"]), on_joined=joins.append)
        await sender.join(room, lambda m: None)
        await sender.publish(room, "one")
        await eventually(lambda: got == ["one"])
        await app.drain()
        app = await start()
        await eventually(lambda: len(joins) == 2 and sender.status == "open", what="both back")
        assert joins[1]["recovered"] is False and joins[1]["epoch"] != joins[0]["epoch"]
        await sender.publish(room, "two")
        await eventually(lambda: got == ["one", "two"])
    finally:
        await client.close()
        await sender.close()
        await app.stop()


# -- the CLI helpers ------------------------------------------------------------------------------------------


async def run_cli(*args: str, timeout: float = 20.0) -> tuple[int, str, str]:
    return await run_cli_async(*args, env={"WIREHUB_TOKEN": ""}, timeout=timeout, cwd=None)


async def test_send_publishes_and_prints_the_ack(wirehub_server: Start, clients: Callable[..., Client]) -> None:
    server = await wirehub_server()
    room = unique_room()
    got: list[dict[str, Any]] = []
    member = clients(server.ws_url("/ws/chat"))
    await member.join(room, got.append)
    code, out, err = await run_cli("send", room, '{"text": "from the cli"}', "--url", server.ws_url("/ws/chat"))
    assert code == 0, err
    ack = json.loads(out)
    assert ack["room"] == room and ack["offset"] >= 1
    await eventually(lambda: len(got) == 1)
    assert got[0]["data"] == {"text": "from the cli"} and got[0]["offset"] == ack["offset"]

    code, out, err = await run_cli("send", room, "not json", "--url", server.ws_url("/ws/chat"))
    assert code == 2 and "not valid JSON" in err and out == ""


async def test_send_refusals_exit_1(wirehub_server: Start) -> None:
    server = await wirehub_server(JWT_CONFIG)
    url = server.ws_url("/ws/chat")
    code, _, err = await run_cli("send", "secret", '"x"', "--url", url, "--token", mint(rooms=("team-*",)))
    assert code == 1 and "forbidden" in err
    code, out, _ = await run_cli("send", "team-a", '"ok"', "--url", url, "--token", mint(rooms=("team-*",)))
    assert code == 0 and json.loads(out)["room"] == "team-a"


async def test_cli_without_a_valid_token_fails_fast_on_401(wirehub_server: Start) -> None:
    server = await wirehub_server(JWT_CONFIG)
    url = server.ws_url("/ws/chat")
    for args in (("send", "team-a", '"x"'), ("listen", "team-a"), ("send", "team-a", '"x"', "--token", "garbage")):
        started = asyncio.get_running_loop().time()
        code, _, err = await run_cli(*args, "--url", url, timeout=10)
        assert code == 1 and "HTTP 401" in err, (args, code, err)
        assert asyncio.get_running_loop().time() - started < 8


async def test_listen_prints_json_lines_and_survives_a_reconnect(wirehub_server: Start,
                                                                  clients: Callable[..., Client]) -> None:
    server = await wirehub_server()
    room = unique_room()
    proc = await asyncio.create_subprocess_exec(
        *wirehub_cmd("listen", room, "--url", server.ws_url("/ws/chat")),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env={**os.environ, "WIREHUB_TOKEN": ""})
    assert proc.stdout is not None and proc.stderr is not None
    try:
        line = await asyncio.wait_for(proc.stderr.readline(), 15)
        assert b"joined " + room.encode() in line, line
        sender = clients(server.ws_url("/ws/chat"))
        await sender.join(room, lambda m: None)
        first = await sender.publish(room, {"n": 1})
        frame = json.loads(await asyncio.wait_for(proc.stdout.readline(), 5))
        assert frame == {**frame, "op": "message", "room": room, "data": {"n": 1}, "offset": first}

        # force a reconnect: 1001 with a hint; messages published meanwhile are recovered
        (session,) = [s for s in server.app.sessions if room in s.rooms and s.identity.user != sender.welcome["user"]]  # type: ignore[index]
        session.close(CloseCode.GOING_AWAY, close_reason(CloseCode.GOING_AWAY, 200))
        await sender.publish(room, {"n": 2})
        await sender.publish(room, {"n": 3})
        rejoined = await asyncio.wait_for(_line_with(proc.stderr, b"rejoined"), 10)
        assert b"recovered true" in rejoined
        await sender.publish(room, {"n": 4})
        lines = [json.loads(await asyncio.wait_for(proc.stdout.readline(), 5)) for _ in range(3)]
        assert [f["data"]["n"] for f in lines] == [2, 3, 4]
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(proc.wait(), 10)
    rest = await proc.stdout.read()
    assert rest == b""  # nothing printed twice
    assert code == 0


async def _line_with(stream: asyncio.StreamReader, needle: bytes) -> bytes:
    while True:
        line = await stream.readline()
        if not line:
            raise EOFError(needle)
        if needle in line:
            return line


async def test_listen_exits_1_when_refused(wirehub_server: Start) -> None:
    server = await wirehub_server(JWT_CONFIG)
    code, out, err = await run_cli("listen", "secret", "--url", server.ws_url("/ws/chat"),
                                   "--token", mint(rooms=("team-*",)), timeout=20)
    assert code == 1 and out == "" and "forbidden" in err


# -- game rooms ---------------------------------------------------------------------------------------------------


async def test_game_rooms_converge_resync_on_a_gap_and_rejoin(wirehub_server: Start,
                                                              clients: Callable[..., Client]) -> None:
    server = await wirehub_server()
    room = unique_room("game")
    a, b = clients(server.ws_url("/ws/game")), clients(server.ws_url("/ws/game"))
    changes: list[dict[str, Any]] = []
    ga = await a.join_game(room, changes.append)
    gb = await b.join_game(room)
    assert ga.state == {} and ga.version == 0 and ga.resyncs == 0
    acks = await asyncio.gather(*(ga.update([{"op": "add", "path": f"/a{i}", "value": i}]) for i in range(4)),
                                *(gb.update([{"op": "add", "path": f"/b{i}", "value": i}]) for i in range(4)))
    top = max(acks)
    await eventually(lambda: ga.version == top and gb.version == top, what="both at the last version")
    assert ga.state == gb.state and len(ga.state) == 8
    assert changes and changes[-1]["version"] == top
    with pytest.raises(ClientError):
        await ga.update([{"op": "remove", "path": "/missing"}])

    # a patch that does not continue the version (as if some were lost on the way): resync
    a._on_frame({"op": "patch", "room": room, "from_version": top + 5, "version": top + 5,
                 "patch": [{"op": "add", "path": "/bogus", "value": 1}], "by": ["z"]})
    await eventually(lambda: ga.resyncs == 1 and ga._syncing is not None and ga._syncing.done())
    assert ga.state == gb.state and ga.version == top

    # a reconnect joins the room again, with the state published meanwhile
    (session,) = [s for s in server.app.sessions if s.identity.user == (a.welcome or {})["user"]]
    session.close(CloseCode.GOING_AWAY, close_reason(CloseCode.GOING_AWAY, 100))
    await eventually(lambda: a.status == "reconnecting")
    await gb.update([{"op": "add", "path": "/while_away", "value": True}])
    await eventually(lambda: a.connections == 2 and ga.version == gb.version, what="the rejoined state")
    assert ga.state == gb.state and ga.state["while_away"] is True
