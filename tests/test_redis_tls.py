"""TLS and credentials to Redis, against real TLS-only redis-server processes with certificates made
here: a standalone server and a cluster. A wrong CA or a wrong password fails the startup with an
error naming the config key to fix."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from wirehub.broker_clusters import REDIS7_HINT, RedisCluster, RedisNode, TlsFiles, find_redis7
from wirehub.builtins.bus.redis import create_backend
from wirehub.bus import BusUnavailable
from wirehub.config import load_config
from wirehub.testing import Recorder, unique_room

pytestmark = pytest.mark.skipif(find_redis7() is None, reason=REDIS7_HINT)

PASSWORD = "s3cret-" + uuid.uuid4().hex[:6]


@pytest.fixture(scope="module")
def other_ca() -> Iterator[TlsFiles]:
    files = TlsFiles()  # an unrelated CA: it signed nothing the servers present
    yield files
    files.close()


@pytest.fixture(scope="module")
def tls_server(tls: TlsFiles) -> Iterator[RedisNode]:
    node = RedisNode(tls=tls, password=PASSWORD, username="wirehub")
    node.start()
    yield node
    node.close()


async def roundtrip(options: dict[str, Any]) -> None:
    # generous: a TLS cluster's first connections (a handshake per node) took over 2 s on a loaded machine
    backend = create_backend({"key_prefix": f"t{uuid.uuid4().hex[:8]}", "connect_timeout": 10, **options}, "bus.redis")
    recorder = Recorder()
    await backend.bus.start(recorder)
    try:
        room = unique_room()
        await backend.bus.subscribe(room)
        assert await backend.bus.publish(room, b"over tls", history=True) == 1
        assert await recorder.wait_for(room, 1) == [b"over tls"]
        page = await backend.history.read(room, 0, 10)
        assert page.messages == [(1, b"over tls")]
    finally:
        await backend.bus.close()


async def failed_start(options: dict[str, Any]) -> str:
    backend = create_backend({"connect_timeout": 2, **options}, "bus.redis")
    with pytest.raises(BusUnavailable) as err:
        await backend.bus.start(Recorder())
    assert backend.bus.healthy is False
    await backend.bus.close()
    return str(err.value)


async def test_tls_with_a_username_and_password(tls_server: RedisNode, tls: TlsFiles) -> None:
    await roundtrip({"url": tls_server.url, "tls_ca_file": tls.ca, "username": "wirehub", "password": PASSWORD})


async def test_tls_with_a_client_certificate(tls_server: RedisNode, tls: TlsFiles) -> None:
    await roundtrip({"url": tls_server.url, "tls_ca_file": tls.ca, "tls_cert_file": tls.cert,
                     "tls_key_file": tls.key, "username": "wirehub", "password": PASSWORD})


async def test_a_wrong_ca_fails_the_start_naming_the_key(tls_server: RedisNode, other_ca: TlsFiles) -> None:
    message = await failed_start({"url": tls_server.url, "tls_ca_file": other_ca.ca, "password": PASSWORD,
                                  "username": "wirehub"})
    assert message.startswith("bus.redis.tls_ca_file: the server's TLS certificate was refused"), message


async def test_a_wrong_password_fails_the_start_naming_the_key(tls_server: RedisNode, tls: TlsFiles) -> None:
    message = await failed_start({"url": tls_server.url, "tls_ca_file": tls.ca, "username": "wirehub",
                                  "password": "wrong"})
    assert message.startswith("bus.redis.password: Redis refused the credentials"), message


async def test_plain_text_to_a_tls_port_names_the_tls_key(tls_server: RedisNode) -> None:
    message = await failed_start({"url": f"redis://127.0.0.1:{tls_server.port}/0", "password": PASSWORD})
    assert message.startswith("bus.redis.tls: the server hung up"), message


async def test_tls_cluster_with_a_password(tls: TlsFiles, other_ca: TlsFiles) -> None:
    """A TLS-only cluster (cluster bus and replication over TLS too) that requires a password."""
    cluster = RedisCluster(tls=tls, password=PASSWORD)
    cluster.start()
    try:
        base = {"mode": "cluster", "cluster": {"nodes": cluster.startup_nodes[:1]}, "tls": True,
                "tls_ca_file": tls.ca}
        await roundtrip({**base, "password": PASSWORD})
        assert (await failed_start({**base, "password": "wrong"})).startswith("bus.redis.password:")
        wrong_ca = {**base, "tls_ca_file": other_ca.ca, "password": PASSWORD}
        assert (await failed_start(wrong_ca)).startswith("bus.redis.tls_ca_file:")
    finally:
        cluster.close()


def test_secrets_come_from_the_environment_and_files(tmp_path: Path, tls: TlsFiles,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    secret = tmp_path / "redis-password"
    secret.write_text("from-a-file\n")
    monkeypatch.setenv("T_REDIS_NODES", "10.0.0.1:6379")
    path = tmp_path / "wirehub.yaml"
    path.write_text(f"""
bus:
  plugin: redis
  redis:
    mode: sentinel
    sentinel: {{nodes: [$env:T_REDIS_NODES], master_name: mymaster, password: $file:{secret}}}
    password: $file:{secret}
    tls: true
    tls_ca_file: {tls.ca}
""")
    config = load_config(path)
    opts = create_backend(config.bus.options, config.bus.key).extra["options"]
    assert opts.sentinel.nodes == ("10.0.0.1:6379",)
    assert opts.password == opts.sentinel.password == "from-a-file"
