"""Property-based tests (Hypothesis) of the inbound JSON decoder and of every op's request checks.

Issue 12 (defects 4 and 5): random and mutated frames — valid requests with fields replaced by random
JSON values, random nesting, NaN and Infinity literals, huge integers, wrong types, broken text — never
get ``internal``, never make a handler raise (nothing is logged at ERROR), and every frame the server
sends is strict JSON (a parser that refuses NaN and Infinity reads it). The op tests go over a real
WebSocket to a real server (echo, chat and game endpoints); the decoder tests call it directly.
"""

from __future__ import annotations

import itertools
import json
import logging
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wirehub import inbound
from wirehub.protocol import MAX_ID_INT, ProtocolError, dumps, parse_request, valid_id
from wirehub.testing import LiveServer, WsClient

ECHO, CHAT, GAME = "/ws/echo", "/ws/chat", "/ws/game"
ROOMS = ("lobby", "r1", "r-2")

# -- strategies ------------------------------------------------------------------------------------------

_scalars = (st.none() | st.booleans() | st.integers() | st.integers(min_value=-(2**80), max_value=2**80)
            | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12)
            | st.sampled_from(['"', "\\", "[", "{", "]}", "\\u0000", "\U0001f600", "/", "~1", "-"]))
json_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
#: what a mutation puts in a field: any JSON value, or a literal spliced into the text
_LITERALS = ("NaN", "Infinity", "-Infinity", "1e400", "-0", "1" * 30, "9" * 5000, '"\\ud800"', '"\\udfff x"')
_MARK = "\u0001wirehub-literal-{}\u0001"


def nested(value: Any, depth: int) -> Any:
    for _ in range(depth):
        value = [value]
    return value


field_values = (json_values
                | st.builds(nested, json_values, st.integers(min_value=1, max_value=80))
                | st.sampled_from(range(len(_LITERALS))).map(lambda i: _MARK.format(i)))

ids = st.none() | st.integers() | st.text(max_size=70) | st.floats() | st.booleans() | st.just(MAX_ID_INT + 1)
rooms = st.sampled_from(ROOMS) | st.text(max_size=10)
pointers = st.sampled_from(["", "/", "/a", "/a/0", "/items/-", "/n", "/x~1y", "a", "/a/b/c/d/e"])
patch_ops = st.fixed_dictionaries(
    {"op": st.sampled_from(["add", "remove", "replace", "move", "copy", "test", "bogus"]), "path": pointers},
    optional={"value": json_values, "from": pointers},
)

_since = st.fixed_dictionaries({"offset": st.integers(), "epoch": st.text(max_size=8)})
CHAT_REQUESTS: list[Any] = [
    st.fixed_dictionaries({"op": st.just("join"), "room": rooms}, optional={"since": _since, "id": ids}),
    st.fixed_dictionaries({"op": st.just("leave"), "room": rooms}, optional={"id": ids}),
    st.fixed_dictionaries({"op": st.just("publish"), "room": rooms, "data": json_values},
                          optional={"id": ids, "echo": st.booleans()}),
    st.fixed_dictionaries({"op": st.just("presence"), "room": rooms}, optional={"id": ids}),
    st.fixed_dictionaries({"op": st.just("history"), "room": rooms},
                          optional={"id": ids, "limit": st.integers(), "since": json_values}),
]
GAME_REQUESTS: list[Any] = [
    st.fixed_dictionaries({"op": st.just("join"), "room": rooms}, optional={"id": ids}),
    st.fixed_dictionaries({"op": st.just("leave"), "room": rooms}, optional={"id": ids}),
    st.fixed_dictionaries({"op": st.just("update"), "room": rooms, "patch": st.lists(patch_ops, max_size=4)},
                          optional={"id": ids}),
    st.fixed_dictionaries({"op": st.just("sync"), "room": rooms}, optional={"id": ids}),
]
COMMON_REQUESTS: list[Any] = [
    st.fixed_dictionaries({"op": st.just("ping")}, optional={"id": ids}),
    st.fixed_dictionaries({"op": st.just("refresh"), "token": st.text(max_size=20)}, optional={"id": ids}),
    st.fixed_dictionaries({"op": st.text(max_size=10)}, optional={"id": ids}),
]


@st.composite
def mutated(draw: st.DrawFn, requests: list[Any]) -> str:
    """A valid-looking request, then some of: fields replaced, dropped or added; the text broken."""
    request = dict(draw(st.one_of(requests)))
    for _ in range(draw(st.integers(min_value=0, max_value=3))):
        action = draw(st.sampled_from(["replace", "drop", "add"]))
        keys = sorted(request)
        if action == "replace" and keys:
            request[draw(st.sampled_from(keys))] = draw(field_values)
        elif action == "drop" and keys:
            request.pop(draw(st.sampled_from(keys)))
        else:
            request[draw(st.sampled_from(["id", "room", "data", "patch", "since", "limit", "token", "x"]))] = draw(
                field_values)
    text = json.dumps(request if draw(st.integers(0, 9)) else draw(field_values))
    for i, literal in enumerate(_LITERALS):
        text = text.replace(json.dumps(_MARK.format(i)), literal)
    how = draw(st.sampled_from(["as is"] * 6 + ["truncate", "wrap", "garbage"]))
    if how == "truncate" and text:
        text = text[: draw(st.integers(min_value=0, max_value=len(text) - 1))]
    elif how == "wrap":
        depth = draw(st.integers(min_value=1, max_value=3000))
        text = "[" * depth + text + "]" * depth
    elif how == "garbage":
        text = draw(st.text(max_size=60))
    return text


def strict(raw: str | bytes | None) -> dict[str, Any]:
    """Parse a frame the server sent with a parser that refuses NaN and Infinity."""
    assert isinstance(raw, str), f"the server sent {raw!r}"

    def refuse(name: str) -> None:
        raise AssertionError(f"the server sent {name}: {raw[:200]}")

    frame = json.loads(raw, parse_constant=refuse)
    assert isinstance(frame, dict), raw[:200]
    return frame


# -- the decoder, directly -------------------------------------------------------------------------------


@given(json_values, st.integers(min_value=2, max_value=40))
def test_the_decoder_reads_strict_json_within_the_limit_and_refuses_deeper(value: Any, limit: int) -> None:
    value = nested(value, limit // 3)
    text = json.dumps(value, ensure_ascii=False)
    depth = inbound.value_depth(value, 10**6)
    assert inbound.text_depth(text) == depth
    assert inbound.too_deep(text, limit) is (depth > limit)
    if depth <= limit:
        assert inbound.loads(text, limit) == value
        assert inbound.loads(text.encode(), limit) == value
    else:
        with pytest.raises(inbound.JsonRejected, match=f"deeper than {limit} levels"):
            inbound.loads(text, limit)


@given(st.text(alphabet='[]{}"\\ax', max_size=120), st.integers(min_value=1, max_value=40))
def test_the_fast_depth_check_agrees_with_the_exact_count_on_any_text(text: str, limit: int) -> None:
    # malformed bracket soup included: it may only ever err towards "too deep"
    exact = inbound.text_depth(text)
    assert inbound.too_deep(text, limit) is (exact > limit) or (inbound.too_deep(text, limit) and not _balanced(text))


def _balanced(text: str) -> bool:
    b = inbound._brackets(text)
    return b.count(b"[") == b.count(b"]") and inbound.text_depth(text) >= 0 and min(
        itertools.accumulate(1 if c == ord("[") else -1 for c in b), default=0) >= 0


@given(st.text(max_size=200) | st.binary(max_size=200) | st.builds(lambda d, t: "[" * d + t, st.integers(0, 5000),
                                                                    st.text(max_size=20)))
def test_the_decoder_refuses_or_returns_strict_json(data: str | bytes) -> None:
    try:
        value = inbound.loads(data)
    except inbound.JsonRejected as exc:
        assert exc.reason
        return
    # what it accepts can be sent back: strict, UTF-8, within the depth limit
    dumps(value).encode()
    assert inbound.value_depth(value, 10**6) <= inbound.DEFAULT_MAX_JSON_DEPTH


@given(st.sampled_from(["NaN", "Infinity", "-Infinity"]), json_values)
def test_nan_and_infinity_are_refused_anywhere(literal: str, value: Any) -> None:
    text = json.dumps({"op": "ping", "id": "x", "v": value, "bad": "MARK"}).replace('"MARK"', literal)
    with pytest.raises(ProtocolError) as caught:
        parse_request(text)
    assert caught.value.code == "bad_json" and literal.lstrip("-") in caught.value.message


@given(st.sampled_from([float("nan"), float("inf"), float("-inf")]), json_values)
def test_the_server_cannot_encode_nan_or_infinity(bad: float, value: Any) -> None:
    with pytest.raises(ValueError):
        dumps({"op": "pong", "ts": [value, {"x": bad}]})


@given(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=80) | json_values)
def test_the_id_rule(req_id: Any) -> None:
    text = json.dumps({"op": "ping", "id": req_id})
    ok = req_id is None or (isinstance(req_id, str) and len(req_id) <= 64) or (
        type(req_id) is int and abs(req_id) <= 2**53)
    assert valid_id(req_id) is (ok and req_id is not None)
    try:
        request = parse_request(text)
    except ProtocolError as exc:
        assert not ok and exc.code in ("bad_request", "bad_json")
    else:
        assert ok and request.get("id") == req_id


# -- every op over a real WebSocket ----------------------------------------------------------------------

_sentinels = itertools.count(1)


async def exchange(ws: WsClient, text: str, sentinel: dict[str, Any], done: Any) -> list[dict[str, Any]]:
    """Send ``text``, then ``sentinel``; every frame up to the sentinel's answer, each parsed strictly."""
    await ws.send(text)
    await ws.send(sentinel)
    frames = []
    while True:
        raw = await ws.recv_raw(timeout=10)
        if raw is None:  # only the documented close for a client over the per-op rate limit is allowed
            assert ws.close_code == 4029, (ws.close_code, ws.close_reason, text[:300])
            return frames
        frame = strict(raw)
        frames.append(frame)
        if done(frame):
            return frames


def no_internal(frames: list[dict[str, Any]], sent: str) -> None:
    for frame in frames:
        assert not (frame.get("op") == "error" and frame.get("code") == "internal"), (sent[:300], frame)


@pytest.fixture
async def server(wirehub_server: Any) -> LiveServer:
    return await wirehub_server({
        "endpoints": [
            {"path": ECHO, "handler": "echo"},
            {"path": CHAT, "handler": "chat", "options": {"publish_rate": 100000, "publish_burst": 100000}},
            {"path": GAME, "handler": "game", "options": {"tick": 0.01, "updates_per_second": 0,
                                                         "initial_state": {"a": [{"b": 1}], "n": 0, "items": []}}},
        ],
    })


_PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                               HealthCheck.too_slow])


class _Sockets:
    """One connection per endpoint for all of a test's examples (reopened if a frame closed it)."""

    def __init__(self, server: LiveServer) -> None:
        self.server = server
        self.open: dict[str, WsClient] = {}

    async def get(self, path: str) -> WsClient:
        ws = self.open.get(path)
        if ws is None or ws.close_code is not None:
            ws = self.open[path] = await self.server.ws(path, welcome=path != ECHO)
        return ws


@pytest.fixture
def sockets(server: LiveServer) -> _Sockets:
    return _Sockets(server)


async def check_ops(caplog: pytest.LogCaptureFixture, path: str, text: str, sockets: _Sockets) -> None:
    ws = await sockets.get(path)
    n = next(_sentinels)
    if path == ECHO:
        frames = await exchange(ws, text, {"sentinel": n}, lambda f: f.get("echo") == {"sentinel": n})
    else:
        sid = f"sentinel-{n}"
        frames = await exchange(ws, text, {"op": "ping", "id": sid}, lambda f: f.get("id") == sid)
    no_internal(frames, text)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, (text[:300], [r.getMessage() for r in errors])


@given(text=mutated(COMMON_REQUESTS))
@_PROPERTY
async def test_echo_frames_never_get_internal_or_invalid_json(sockets: _Sockets, caplog: pytest.LogCaptureFixture,
                                                             text: str) -> None:
    await check_ops(caplog, ECHO, text, sockets)


@given(text=mutated(CHAT_REQUESTS + COMMON_REQUESTS))
@settings(_PROPERTY, max_examples=250)
async def test_chat_requests_never_get_internal_or_invalid_json(sockets: _Sockets,
                                                               caplog: pytest.LogCaptureFixture, text: str) -> None:
    await check_ops(caplog, CHAT, text, sockets)


@given(text=mutated(GAME_REQUESTS + COMMON_REQUESTS))
@settings(_PROPERTY, max_examples=250)
async def test_game_requests_never_get_internal_or_invalid_json(sockets: _Sockets,
                                                               caplog: pytest.LogCaptureFixture, text: str) -> None:
    await check_ops(caplog, GAME, text, sockets)

