"""The nats bus over TLS with credentials, against a real TLS-only ``nats-server`` (certificates made at
test time): mutual TLS with user/password read through $env and $file references; a wrong CA, a wrong
password, a wrong token, an unreadable file and a nats:// URL to a TLS port fail the start with an error
naming the config key to fix."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from wirehub.builtins.bus.nats import create_backend
from wirehub.bus import BusUnavailable
from wirehub.config import load_config
from wirehub.nats_cluster import CertFiles, NatsNode
from wirehub.testing import Recorder, unique_room


@pytest.fixture(scope="module")
def certs() -> Iterator[CertFiles]:
    c = CertFiles()
    yield c
    c.close()


@pytest.fixture(scope="module")
def tls_server(certs: CertFiles) -> Iterator[NatsNode]:
    node = NatsNode(tls=certs, verify_clients=True, user="wirehub", password="s3cret")
    node.start()
    yield node
    node.close()


@pytest.fixture(scope="module")
def token_server(certs: CertFiles) -> Iterator[NatsNode]:
    node = NatsNode(tls=certs, token="t0ken")
    node.start()
    yield node
    node.close()


async def test_mutual_tls_with_password_from_env_and_file_references(
        tls_server: NatsNode, certs: CertFiles, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = tmp_path / "nats-password"
    secret.write_text("s3cret\n")
    monkeypatch.setenv("NATS_URL", tls_server.url)
    monkeypatch.setenv("NATS_CA", certs.ca)
    config = {"bus": {"plugin": "nats", "nats": {
        "servers": ["$env:NATS_URL"], "user": "wirehub", "password": f"$file:{secret}", "storage": "memory",
        "tls_ca_file": "$env:NATS_CA", "tls_cert_file": certs.cert, "tls_key_file": certs.key}}}
    path = tmp_path / "wirehub.yaml"
    path.write_text(yaml.safe_dump(config))
    loaded = load_config(path)
    backend = create_backend(loaded.bus.options, loaded.bus.key)
    assert tls_server.url.startswith("tls://")
    recorder = Recorder()
    await backend.bus.start(recorder)
    try:
        room = unique_room()
        await backend.bus.subscribe(room)
        offset = await backend.bus.publish(room, b"over tls", history=True)
        assert await recorder.wait_for(room, 1) == [b"over tls"]
        assert (await backend.history.read(room, 0, 10)).messages == [(offset, b"over tls")]
    finally:
        await backend.bus.close()


def _base(server: NatsNode, certs: CertFiles) -> dict[str, Any]:
    return {"servers": [server.url], "storage": "memory", "connect_timeout": 2, "tls_ca_file": certs.ca,
            "tls_cert_file": certs.cert, "tls_key_file": certs.key}


async def _start_fails(options: dict[str, Any]) -> str:
    backend = create_backend(options, "bus.nats")
    try:
        with pytest.raises(BusUnavailable) as err:
            await backend.bus.start(Recorder())
    finally:
        await backend.bus.close()
    return str(err.value)


async def test_a_wrong_ca_names_tls_ca_file(tls_server: NatsNode, certs: CertFiles) -> None:
    other = CertFiles()  # an unrelated CA
    try:
        message = await _start_fails({**_base(tls_server, certs), "tls_ca_file": other.ca, "user": "wirehub",
                                      "password": "s3cret"})
    finally:
        other.close()
    assert message.startswith("bus.nats.tls_ca_file: the server's TLS certificate was refused"), message


async def test_a_wrong_password_names_password(tls_server: NatsNode, certs: CertFiles) -> None:
    message = await _start_fails({**_base(tls_server, certs), "user": "wirehub", "password": "wrong"})
    assert message.startswith("bus.nats.password: the NATS server refused the credentials"), message
    message = await _start_fails(_base(tls_server, certs))  # no credentials at all
    assert message.startswith("bus.nats.user: the NATS server refused the credentials"), message


async def test_a_wrong_token_names_token(token_server: NatsNode, certs: CertFiles) -> None:
    message = await _start_fails({**_base(token_server, certs), "token": "nope"})
    assert message.startswith("bus.nats.token: the NATS server refused the credentials"), message
    backend = create_backend({**_base(token_server, certs), "token": "t0ken"}, "bus.nats")
    await backend.bus.start(Recorder())
    await backend.bus.close()


async def test_an_unreadable_key_file_names_its_key(tls_server: NatsNode, certs: CertFiles, tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.pem")
    message = await _start_fails({**_base(tls_server, certs), "tls_key_file": missing, "user": "wirehub",
                                  "password": "s3cret"})
    assert message.startswith("bus.nats.tls_key_file: cannot read"), message
