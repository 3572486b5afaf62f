"""Logs: one line per session open/close (user, endpoint, code, duration), JSON lines when configured, and
never a token or a message body, in a real ``wirehub serve`` process."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from tornado.websocket import websocket_connect

from tests.helpers import ServerProcess, write_config
from wirehub.cli import JsonFormatter, TextFormatter, redact
from wirehub.testing import free_port

TOKEN = "eyJhbGciOiJIUzI1NiJ9.SECRET-QUERY-TOKEN.sig"
HEADER_TOKEN = "SECRET-HEADER-TOKEN"
PROTOCOL_TOKEN = "SECRET-SUBPROTOCOL-TOKEN"
BODY = "SECRET-MESSAGE-BODY-42"
API_KEY = "SECRET-API-KEY-0123456789"
API_BODY = "SECRET-API-PUBLISH-BODY"


async def _run_session(tmp_path: Path, fmt: str) -> str:
    """Start ``wirehub serve`` with ``logging.format: fmt``, run one echo session that carries credentials
    in the query string, a header and a subprotocol, then SIGTERM it; return everything it logged."""
    port = free_port()
    config = {
        "server": {"host": "127.0.0.1", "port": port, "ping_interval": 0, "node_id": "log-node"},
        "logging": {"level": "debug", "format": fmt, "access_log": True},
        "endpoints": [{"path": "/ws/echo", "handler": "echo"}, {"path": "/ws/chat", "handler": "chat"}],
        "api": {"keys": [API_KEY]},
    }
    log_path = tmp_path / "wirehub.log"
    server = ServerProcess(write_config(tmp_path / "wirehub.yaml", config), port, log=log_path,
                           unset_env=("WIREHUB_CONFIG",), cwd=tmp_path).start()
    try:
        base = f"127.0.0.1:{port}"
        await server.wait_ready()
        # An unknown path with a token: the access log must show the path only.
        await AsyncHTTPClient().fetch(f"http://{base}/nope?token={TOKEN}", raise_error=False)
        request = HTTPRequest(f"ws://{base}/ws/echo?token={TOKEN}&room=lobby",
                              headers={"Authorization": f"Bearer {HEADER_TOKEN}"})
        conn = await websocket_connect(request, subprotocols=["wirehub.v1", f"bearer.{PROTOCOL_TOKEN}"])
        try:
            await conn.write_message(json.dumps({"text": BODY}))
            assert json.loads(await asyncio.wait_for(conn.read_message(), 5) or "{}") == {"echo": {"text": BODY}}
            await conn.write_message(BODY)  # not JSON: an error frame, and still nothing logged of it
            assert json.loads(await asyncio.wait_for(conn.read_message(), 5) or "{}")["code"] == "bad_json"
            await asyncio.sleep(0.05)
        finally:
            conn.close(1000)
        # A chat publish and an API publish: message bodies and the API key stay out of the log.
        chat = await websocket_connect(f"ws://{base}/ws/chat?token={TOKEN}")
        try:
            await chat.write_message(json.dumps({"op": "join", "room": "lobby", "id": "j"}))
            await chat.write_message(json.dumps({"op": "publish", "room": "lobby", "data": BODY, "id": "p"}))
            published = await AsyncHTTPClient().fetch(
                f"http://{base}/api/publish", method="POST", raise_error=False,
                headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
                body=json.dumps({"room": "lobby", "data": API_BODY}))
            assert published.code == 200, published.body
            frames: list[str] = []
            while not any(API_BODY in f for f in frames):
                frame = await asyncio.wait_for(chat.read_message(), 5)
                assert isinstance(frame, str)
                frames.append(frame)
            assert any('"op":"ack"' in f.replace(" ", "") for f in frames), frames
        finally:
            chat.close(1000)
        deadline = time.monotonic() + 5
        while log_path.read_text().count("session close") < 2:
            assert time.monotonic() < deadline, log_path.read_text()
            await asyncio.sleep(0.05)
        server.proc.send_signal(signal.SIGTERM)
        assert await asyncio.get_running_loop().run_in_executor(None, server.proc.wait, 15) == 0
    finally:
        server.kill()
    return log_path.read_text()


def _assert_no_secrets(text: str) -> None:
    for secret in (TOKEN, "SECRET-QUERY-TOKEN", HEADER_TOKEN, PROTOCOL_TOKEN, BODY, API_KEY, API_BODY):
        assert secret not in text, f"{secret!r} was logged"


async def test_json_logs_have_session_lines_and_no_secrets(tmp_path: Path) -> None:
    text = await _run_session(tmp_path, "json")
    _assert_no_secrets(text)
    lines = text.splitlines()
    entries = [json.loads(line) for line in lines]  # every line is one JSON object
    for entry in entries:
        assert {"ts", "level", "logger", "msg"} <= set(entry)
    opened, _ = [e for e in entries if e.get("event") == "session_open"]
    closed, chat_closed = [e for e in entries if e.get("event") == "session_close"]
    assert chat_closed["endpoint"] == "/ws/chat" and chat_closed["code"] == 1000
    assert opened["user"].startswith("guest") and opened["endpoint"] == "/ws/echo" and opened["session"]
    assert closed["user"] == opened["user"] and closed["session"] == opened["session"]
    assert closed["endpoint"] == "/ws/echo" and closed["code"] == 1000
    assert isinstance(closed["duration"], float) and 0 <= closed["duration"] < 30
    access = [e["msg"] for e in entries if e["logger"] == "wirehub.access"]
    assert any("/nope" in m for m in access) and any("/ws/echo" in m for m in access)
    assert any("POST /api/publish" in m for m in access)
    assert not any("?" in m for m in access), access


async def test_text_logs_have_session_lines_and_no_secrets(tmp_path: Path) -> None:
    text = await _run_session(tmp_path, "text")
    _assert_no_secrets(text)
    opened, _ = [line for line in text.splitlines() if "session open" in line]
    closed, _ = [line for line in text.splitlines() if "session close" in line]
    assert "user=guest" in opened and "endpoint=/ws/echo" in opened
    assert "endpoint=/ws/echo" in closed and "code=1000" in closed and "duration=" in closed
    assert not text.lstrip().startswith("{")


def _record(msg: str, *args: Any, exc: bool = False, **extra: Any) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise RuntimeError(f"failed for GET /ws/chat?token={TOKEN}")
        except RuntimeError:
            exc_info = sys.exc_info()
    record = logging.LogRecord("tornado.application", logging.ERROR, __file__, 1, msg, args, exc_info)
    record.__dict__.update(extra)
    return record


@pytest.mark.parametrize("formatter", [JsonFormatter(), TextFormatter()], ids=["json", "text"])
def test_formatters_redact_credentials_that_reach_them(formatter: logging.Formatter) -> None:
    """Defence in depth: Tornado logs a failing request's full URI; the token in it is masked."""
    record = _record("Uncaught exception GET %s (%s)", f"/ws/chat?room=a&token={TOKEN}", "127.0.0.1", exc=True,
                     header=f"Authorization: Bearer {HEADER_TOKEN}")
    text = formatter.format(record)
    _assert_no_secrets(text)
    assert "token=[redacted]" in text and "room=a" in text
    if isinstance(formatter, JsonFormatter):
        entry = json.loads(text)
        assert entry["header"] == "Authorization: Bearer [redacted]"
        assert "RuntimeError" in entry["exc"]


def test_redact_keeps_ordinary_text() -> None:
    assert redact("session open abc user=alice endpoint=/ws/chat") == "session open abc user=alice endpoint=/ws/chat"
    assert redact("/api/publish?key=k123&x=1") == "/api/publish?key=[redacted]&x=1"
    assert redact(f"subprotocols wirehub.v1, bearer.{PROTOCOL_TOKEN}") == "subprotocols wirehub.v1, bearer.[redacted]"
