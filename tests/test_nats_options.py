"""The nats bus's options, authentication and the missing-extra error."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from wirehub.brokers import BrokerProcess
from wirehub.builtins.bus.nats import create_backend
from wirehub.bus import BusUnavailable
from wirehub.config import ConfigError, load_config
from wirehub.testing import Recorder, free_port, unique_room

ROOT = Path(__file__).resolve().parent.parent


def test_the_example_config_reads_the_servers_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WIREHUB_NATS_URL", raising=False)
    with pytest.raises(ConfigError, match="WIREHUB_NATS_URL"):
        load_config(ROOT / "config" / "nats.yaml")
    monkeypatch.setenv("WIREHUB_NATS_URL", "tls://nats.example:4222")
    monkeypatch.setenv("WIREHUB_NATS_TOKEN", "t0ken")
    config = load_config(ROOT / "config" / "nats.yaml")
    assert config.bus.plugin == "nats"
    opts = create_backend(config.bus.options, config.bus.key).extra["options"]
    assert (opts.servers, opts.token, opts.subject_prefix) == (("tls://nats.example:4222",), "t0ken", "wirehub")


@pytest.mark.parametrize(("options", "key", "message"), [
    ({"servers": ["http://x"]}, "bus.nats.servers[0]", "nats:// or tls://"),
    ({"servers": []}, "bus.nats.servers", "at least one"),
    ({"subject_prefix": "a.*"}, "bus.nats.subject_prefix", "dot-separated"),
    ({"storage": "disk"}, "bus.nats.storage", "not one of"),
    ({"user": "u"}, "bus.nats.password", "required"),
    ({"tls_key_file": "k.pem"}, "bus.nats.tls_cert_file", "required"),
    ({"presence_ttl": 3, "presence_interval": 3}, "bus.nats.presence_interval", "less than presence_ttl"),
    ({"replicas": 2}, "bus.nats.replicas", "1, 3 or 5"),
    ({"replicas": 7}, "bus.nats.replicas", "at most"),
    ({"quorum_timeout": 0}, "bus.nats.quorum_timeout", "at least"),
    ({"room_streams": 0}, "bus.nats.room_streams", "at least"),
    ({"room_streams": 65}, "bus.nats.room_streams", "at most"),
])
def test_bad_options_name_their_key(options: dict[str, object], key: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        create_backend(options, "bus.nats")
    assert err.value.key == key and message in str(err.value)


def test_a_missing_client_library_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "nats", None)
    with pytest.raises(ConfigError, match=r"pip install 'wirehub\[nats\]'") as err:
        create_backend({}, "bus.nats")
    assert err.value.key == "bus.nats"


async def test_token_authentication(nats_server_factory: Callable[..., BrokerProcess]) -> None:
    server = nats_server_factory(token="t0ken")
    base = {"servers": [server.url], "storage": "memory", "connect_timeout": 1}
    wrong = create_backend({**base, "token": "nope"}, "bus.nats")
    with pytest.raises(BusUnavailable):
        await wrong.bus.start(Recorder())
    backend = create_backend({**base, "token": "t0ken"}, "bus.nats")
    recorder = Recorder()
    await backend.bus.start(recorder)
    try:
        room = unique_room()
        await backend.bus.subscribe(room)
        offset = await backend.bus.publish(room, b"hi", history=True)
        assert await recorder.wait_for(room, 1) == [b"hi"]
        page = await backend.history.read(room, 0, 10)
        assert page.complete and page.messages == [(offset, b"hi")]
    finally:
        await backend.bus.close()


async def test_an_unreachable_nats_fails_the_start() -> None:
    backend = create_backend({"servers": [f"nats://127.0.0.1:{free_port()}"], "connect_timeout": 0.5}, "bus.nats")
    with pytest.raises(BusUnavailable):
        await backend.bus.start(Recorder())
    with pytest.raises(BusUnavailable):
        await backend.bus.publish("room", b"x")
    await backend.bus.close()


async def test_more_rooms_than_the_servers_default_consumer_limit(
        nats_server_factory: Callable[..., BrokerProcess]) -> None:
    """nats-server 2.15+ allows 1000 consumers per stream unless the stream says otherwise. Followed rooms and
    presence copies take none any more (RePublish), but history scans and watches still do: the stream carries
    max_consumers, and a replica follows more rooms than the server's default limit."""
    server = nats_server_factory()
    backend = create_backend({"servers": [server.url], "storage": "memory", "max_consumers": 5000}, "bus.nats")
    recorder = Recorder()
    await backend.bus.start(recorder)
    try:
        rooms = [unique_room() for _ in range(1050)]
        for room in rooms:
            await backend.bus.subscribe(room)
        await backend.bus.publish(rooms[-1], b"last", history=True)
        assert await recorder.wait_for(rooms[-1], 1) == [b"last"]
        assert backend.extra["options"].max_consumers == 5000
        bus = backend.bus
        assert (await bus.js.stream_info(bus.stream)).config.max_consumers == 5000
    finally:
        await backend.bus.close()


async def test_a_server_older_than_2_11_fails_the_start_naming_the_key() -> None:
    """A server that introduces itself as 2.9 (the INFO line is all the client reads before the version check;
    old servers are not installable from the test extras) is refused at connect, naming bus.nats.servers."""
    import asyncio

    async def old_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b'INFO {"server_id":"old","version":"2.9.10","go":"go1.19","host":"127.0.0.1","port":0,'
                     b'"headers":true,"max_payload":1048576,"proto":1}\r\n')
        with contextlib.suppress(ConnectionError):
            while line := await reader.readline():
                if line.startswith(b"PING"):
                    writer.write(b"PONG\r\n")
                    await writer.drain()
        writer.close()

    server = await asyncio.start_server(old_server, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    backend = create_backend({"servers": [f"nats://127.0.0.1:{port}"], "connect_timeout": 2}, "bus.nats")
    try:
        with pytest.raises(BusUnavailable, match=r"bus\.nats\.servers: nats-server 2\.9\.10 is too old"):
            await backend.bus.start(Recorder())
    finally:
        await backend.bus.close()
        server.close()
        await server.wait_closed()
