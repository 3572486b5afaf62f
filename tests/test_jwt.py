"""JWT auth against a real server: token sources, the attack matrix, logs, refresh and 4001, limits."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlencode

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from tornado.httpclient import HTTPClientError

from tests.plugins_for_tests.jwt_probe import (
    PATH,
    SECRET,
    UPGRADE_HEADERS,
    b64,
    claims,
    raw_token,
    server_config,
    token,
)
from wirehub.testing import LiveServer, WsClient, ws_connect

Start = Callable[..., Awaitable[LiveServer]]
AUD, ISS = "wirehub", "https://issuer.test"


async def refused(server: LiveServer, *, query: dict[str, str] | None = None,
                  headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    """An upgrade request that must be refused: (status, JSON body)."""
    path = PATH + (f"?{urlencode(query)}" if query else "")
    response = await server.http(path, headers={**UPGRADE_HEADERS, **(headers or {})})
    assert response.headers.get("Content-Type", "").startswith("application/json"), response.headers
    assert "Sec-WebSocket-Accept" not in response.headers
    return response.code, json.loads(response.body)


async def probe(server: LiveServer, **kwargs: Any) -> tuple[WsClient, dict[str, Any]]:
    """Connect to the probe endpoint; returns the client and its welcome frame."""
    client = await server.ws(PATH, **kwargs)
    welcome = await client.recv()
    assert welcome["op"] == "welcome", welcome
    return client, welcome


# -- keys for the matrix -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rsa_keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """An RSA key pair (public half as PEM in a file) and a second, unrelated private key."""
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_pem = private.public_key().public_bytes(serialization.Encoding.PEM,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo)
    path = tmp_path_factory.mktemp("jwt") / "rsa.pem"
    path.write_bytes(public_pem)
    return {"private": private, "other": other, "public_pem": public_pem, "file": str(path)}


def matrix_config(rsa_keys: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return server_config(algorithms=["HS256", "RS256"], audience=AUD, issuer=ISS,
                         public_keys=[{"file": rsa_keys["file"], "kid": "rsa-1"}], **extra)


def good(**extra: Any) -> dict[str, Any]:
    return claims(**{"aud": AUD, "iss": ISS, **extra})


def signed(payload: dict[str, Any], key: Any = SECRET, alg: str = "HS256",
           headers: dict[str, Any] | None = None) -> str:
    return jwt.encode(payload, key, algorithm=alg, headers=headers)


def tampered(rsa_keys: dict[str, Any]) -> str:
    header, _, signature = signed(good()).split(".")
    return f"{header}.{b64(json.dumps(good(sub='mallory', rooms=['*'])).encode())}.{signature}"


def now() -> int:
    """The time when a token is made: a module-level constant would go stale in a long suite run."""
    return int(time.time())


# name -> (token maker, expected reason); every one is tried against a real server
ATTACKS: dict[str, tuple[Callable[[dict[str, Any]], str], str]] = {
    "alg none": (lambda k: raw_token({"alg": "none", "typ": "JWT"}, good()), "bad_signature"),
    "alg None, signed": (lambda k: raw_token({"alg": "None"}, good(), SECRET.encode()), "bad_signature"),
    "alg not configured (HS512)": (lambda k: signed(good(), SECRET * 2, "HS512"), "bad_signature"),
    "HS256 signed with the RSA public key as secret": (
        lambda k: raw_token({"alg": "HS256", "typ": "JWT"}, good(), k["public_pem"]), "bad_signature"),
    "HS256 with the RSA key's kid, signed with its PEM": (
        lambda k: raw_token({"alg": "HS256", "kid": "rsa-1"}, good(), k["public_pem"]), "bad_signature"),
    "tampered payload": (tampered, "bad_signature"),
    "another HMAC secret": (lambda k: signed(good(), "x" * 40), "bad_signature"),
    "RS256 from another RSA key": (lambda k: signed(good(), k["other"], "RS256", {"kid": "rsa-1"}), "bad_signature"),
    "expired": (lambda k: signed(good(exp=now() - 60)), "expired"),
    "nbf in the future": (lambda k: signed(good(nbf=now() + 300)), "not_yet_valid"),
    "iat in the future": (lambda k: signed(good(iat=now() + 300)), "not_yet_valid"),
    "wrong aud": (lambda k: signed(good(aud="someone-else")), "bad_audience"),
    "aud list without ours": (lambda k: signed(good(aud=["a", "b"])), "bad_audience"),
    "no aud": (lambda k: signed(claims(iss=ISS)), "bad_audience"),
    "wrong iss": (lambda k: signed(good(iss="https://evil.test")), "bad_issuer"),
    "no iss": (lambda k: signed(claims(aud=AUD)), "bad_issuer"),
    "no exp": (lambda k: signed(good(exp=None)), "malformed"),
    "exp not numeric": (lambda k: signed(good(exp="tomorrow")), "malformed"),
    "exp a numeric string": (lambda k: signed(good(exp=str(now() + 300))), "malformed"),
    "exp true": (lambda k: signed(good(exp=True)), "malformed"),
    "exp Infinity": (lambda k: raw_token({"alg": "HS256"}, good(exp=float("inf")), SECRET.encode()), "malformed"),
    "exp beyond year 9999": (lambda k: signed(good(exp=10**20)), "malformed"),
    "nbf not numeric": (lambda k: signed(good(nbf="now")), "malformed"),
    "unknown kid": (lambda k: signed(good(), k["private"], "RS256", {"kid": "rsa-9"}), "unknown_key"),
    "unknown crit header": (lambda k: signed(good(), headers={"crit": ["x-wirehub-never"], "x-wirehub-never": 1}),
                            "malformed"),
    "crit b64 (detached payload)": (lambda k: signed(good(), headers={"crit": ["b64"]}), "malformed"),
    "kid not a string": (lambda k: raw_token({"alg": "HS256", "kid": 5}, good(), SECRET.encode()), "malformed"),
    "no sub": (lambda k: signed(good(sub=None)), "malformed"),
    "sub not a string": (lambda k: signed(good(sub=42)), "malformed"),
    "sub with a newline (log injection)": (lambda k: signed(good(sub="alice\nadmin")), "malformed"),
    "rooms not a list": (lambda k: signed(good(rooms={"*": True})), "malformed"),
    "payload a JSON array": (lambda k: raw_token({"alg": "HS256"}, [1, 2], SECRET.encode()),  # type: ignore[arg-type]
                             "malformed"),
    "header not JSON": (lambda k: f"{b64(b'{nope')}.{b64(b'{}')}.{b64(b'sig')}", "malformed"),
    "garbage": (lambda k: "not-a-token", "malformed"),
    "garbage in three segments": (lambda k: "a.b.c", "malformed"),
    "10 KB garbage": (lambda k: "A" * 10_240, "malformed"),
    "10 KB of base64url segments": (lambda k: ".".join(["QUFB" * 853] * 3), "malformed"),
    "base64 padding and junk": (lambda k: "eyJhbGciOiJIUzI1NiJ9==.e30=.!!!!", "malformed"),
}


@pytest.mark.parametrize("case", sorted(ATTACKS))
async def test_attack_is_refused_before_the_upgrade(case: str, rsa_keys: dict[str, Any],
                                                    wirehub_server: Start) -> None:
    make, reason = ATTACKS[case]
    server = await wirehub_server(matrix_config(rsa_keys))
    bystander, _ = await probe(server, headers={"Authorization": f"Bearer {signed(good(sub='bob'))}"})
    status, body = await refused(server, query={"token": make(rsa_keys)})
    assert (status, body) == (401, {"error": "invalid_token", "reason": reason})
    assert (await bystander.request({"op": "ping"}))["op"] == "pong"


async def test_the_matrix_config_accepts_good_tokens(rsa_keys: dict[str, Any], wirehub_server: Start) -> None:
    server = await wirehub_server(matrix_config(rsa_keys))
    for t in (signed(good()), signed(good(), rsa_keys["private"], "RS256", {"kid": "rsa-1"}),
              signed(good(aud=["x", AUD]), rsa_keys["private"], "RS256")):
        client, welcome = await probe(server, headers={"Authorization": f"Bearer {t}"})
        assert welcome["user"] == "alice"
        client.close()


@pytest.mark.parametrize(("name", "make"), [
    ("no token at all", lambda: {}),
    ("empty query token", lambda: {"query": {"token": ""}}),
    ("empty bearer", lambda: {"headers": {"Authorization": "Bearer "}}),
    ("basic auth is not a token", lambda: {"headers": {"Authorization": "Basic YWxpY2U6cHc="}}),
    ("empty cookie", lambda: {"headers": {"Cookie": "wirehub_token="}}),
    ("bare bearer subprotocol", lambda: {"headers": {"Sec-WebSocket-Protocol": "wirehub.v1, bearer."}}),
    ("token in an unconfigured query parameter", lambda: {"query": {"access_token": token()}}),
])
async def test_missing_token(name: str, make: Callable[[], dict[str, Any]], wirehub_server: Start) -> None:
    server = await wirehub_server(server_config())
    assert await refused(server, **make()) == (401, {"error": "invalid_token", "reason": "missing"})


async def test_the_websocket_client_sees_401(wirehub_server: Start) -> None:
    server = await wirehub_server(server_config())
    with pytest.raises(HTTPClientError) as err:
        await ws_connect(server.ws_url(PATH + "?token=" + token(ttl=-10)))
    assert err.value.code == 401
    assert err.value.response is not None
    assert json.loads(err.value.response.body) == {"error": "invalid_token", "reason": "expired"}
    assert err.value.response.headers["WWW-Authenticate"] == 'Bearer realm="wirehub", error="invalid_token"'


# -- token sources --------------------------------------------------------------------------------------------


async def test_every_source_opens_a_session_with_the_claims(wirehub_server: Start) -> None:
    server = await wirehub_server(server_config())
    exp = int(time.time()) + 600
    t = token(name="Alice A.", exp=exp)
    ways: list[tuple[str, dict[str, Any]]] = [
        (f"{PATH}?token={t}", {}),
        (PATH, {"headers": {"Cookie": f"theme=dark; wirehub_token={t}"}}),
        (PATH, {"headers": {"Authorization": f"Bearer {t}"}}),
        (PATH, {"subprotocols": ["wirehub.v1", f"bearer.{t}"]}),
    ]
    for path, kwargs in ways:
        client = await server.ws(path, **kwargs)
        welcome = await client.recv()
        assert {k: welcome[k] for k in ("op", "user", "name", "expires_at")} == {
            "op": "welcome", "user": "alice", "name": "Alice A.", "expires_at": exp}
        me = await client.request({"op": "whoami"})
        assert me["rooms"] == ["lobby", "team-*"] and me["expires_at"] == exp
        client.close()


async def test_the_rooms_claim_decides_join_and_publish(wirehub_server: Start) -> None:
    server = await wirehub_server(server_config())
    client, _ = await probe(server, headers={"Authorization": f"Bearer {token(rooms=['lobby', 'team-blue-*'])}"})
    for room, action, allowed in (("lobby", "join", True), ("team-blue-1", "publish", True),
                                  ("team-red-1", "join", False), ("lobby-2", "publish", False)):
        reply = await client.request({"op": "may", "room": room, "action": action})
        assert reply["allowed"] is allowed, reply
    nobody, _ = await probe(server, headers={"Authorization": f"Bearer {token('nobody', rooms=[])}"})
    assert (await nobody.request({"op": "may", "room": "lobby"}))["allowed"] is False


async def test_subprotocol_token_is_never_echoed(wirehub_server: Start) -> None:
    server = await wirehub_server(server_config())
    t = token()
    client, welcome = await probe(server, subprotocols=["wirehub.v1", f"bearer.{t}"])
    assert client.conn.selected_subprotocol == "wirehub.v1"
    assert client.conn.headers is not None
    echoed = client.conn.headers.get_list("Sec-WebSocket-Protocol")
    assert echoed == ["wirehub.v1"]
    assert all(t not in value for _, value in client.conn.headers.get_all())
    assert welcome["user"] == "alice"


@pytest.mark.parametrize(("sources", "winner"), [
    (None, "q-user"),  # default: query, cookie, header, subprotocol
    (["cookie", "query"], "c-user"),
    (["header", "query"], "h-user"),
    (["subprotocol", "header"], "s-user"),
])
async def test_sources_are_tried_in_the_configured_order(sources: list[str] | None, winner: str,
                                                         wirehub_server: Start) -> None:
    server = await wirehub_server(server_config(sources=sources))
    client = await server.ws(
        f"{PATH}?token={token('q-user')}",
        headers={"Cookie": f"wirehub_token={token('c-user')}", "Authorization": f"Bearer {token('h-user')}"},
        subprotocols=["wirehub.v1", f"bearer.{token('s-user')}"],
    )
    assert (await client.recv())["user"] == winner


async def test_an_unlisted_source_is_ignored(wirehub_server: Start) -> None:
    server = await wirehub_server(server_config(sources=["header"]))
    assert (await refused(server, query={"token": token()}))[1]["reason"] == "missing"
    _, welcome = await probe(server, headers={"Authorization": f"Bearer {token()}"})
    assert welcome["user"] == "alice"


async def test_custom_query_parameter_and_cookie_names(wirehub_server: Start) -> None:
    server = await wirehub_server(server_config(query_param="jwt", cookie="sid"))
    _, welcome = await probe(server, headers={"Cookie": f"sid={token('cookie-user')}"})
    assert welcome["user"] == "cookie-user"
    client = await server.ws(f"{PATH}?jwt={token('query-user')}")
    assert (await client.recv())["user"] == "query-user"
    assert (await refused(server, headers={"Cookie": f"wirehub_token={token()}"}))[1]["reason"] == "missing"


async def test_a_token_without_rooms_gets_default_rooms(wirehub_server: Start) -> None:
    server = await wirehub_server(server_config(default_rooms=["lobby"]))
    client, _ = await probe(server, headers={"Authorization": f"Bearer {token(rooms=None)}"})
    assert (await client.request({"op": "whoami"}))["rooms"] == ["lobby"]
    client2, _ = await probe(server, headers={"Authorization": f"Bearer {token(rooms='a, b-*')}"})
    assert (await client2.request({"op": "whoami"}))["rooms"] == ["a", "b-*"]


# -- logs never carry a token -----------------------------------------------------------------------------------


async def test_query_string_tokens_never_reach_a_log_line(wirehub_server: Start, caplog: pytest.LogCaptureFixture,
                                                          capfd: pytest.CaptureFixture[str]) -> None:
    caplog.set_level(logging.DEBUG)
    for name in ("tornado.access", "tornado.application", "tornado.general", "asyncio"):
        caplog.set_level(logging.DEBUG, logger=name)
    server = await wirehub_server(server_config(expiry_grace=0))
    good_token, expired, other = token(), token(ttl=-60), token("mallory")
    bad_sig = token(key="y" * 40)
    secrets = [good_token, expired, other, bad_sig]

    client = await server.ws(f"{PATH}?token={good_token}")
    assert (await client.recv())["op"] == "welcome"
    assert (await client.request({"op": "refresh", "token": other}))["code"] == "forbidden"
    assert (await client.request({"op": "refresh", "token": expired}))["code"] == "forbidden"
    client.close()
    for t in (expired, bad_sig, other + "x"):
        assert (await refused(server, query={"token": t}))[0] == 401
    assert (await server.http(f"/nowhere?token={good_token}")).code == 404
    assert (await server.http(f"{PATH}?token={good_token}")).code == 426  # not an upgrade
    await asyncio.sleep(0.2)  # let the session-close log lines happen

    lines = []
    for record in caplog.records:
        lines.append(record.getMessage())
        lines.append(repr(record.args))
        if record.exc_info:
            lines.append(logging.Formatter().formatException(record.exc_info))
    out, err = capfd.readouterr()
    lines += [out, err]
    text = "\n".join(lines)
    assert "refused upgrade" in text and "session open" in text  # the capture works
    for t in secrets:
        for part in (t, t.split(".")[2]):  # the whole token, or its signature
            assert part not in text


# -- expiry, refresh and 4001 ----------------------------------------------------------------------------------


async def test_session_is_closed_with_4001_at_expiry_plus_grace(wirehub_server: Start) -> None:
    server = await wirehub_server(server_config(expiry_grace=0.5))
    exp = int(time.time()) + 2
    started = time.time()
    client, welcome = await probe(server, headers={"Authorization": f"Bearer {token(exp=exp)}"})
    assert welcome["expires_at"] == exp
    code, _ = await client.wait_closed(timeout=6)
    assert code == 4001
    assert time.time() >= exp + 0.5 - 0.05
    assert time.time() - started < 5


async def test_refresh_extends_the_session(wirehub_server: Start) -> None:
    server = await wirehub_server(server_config(expiry_grace=0.2))
    exp = int(time.time()) + 2
    client, _ = await probe(server, headers={"Authorization": f"Bearer {token(exp=exp)}"})
    new_exp = int(time.time()) + 600
    reply = await client.request({"op": "refresh", "token": token(exp=new_exp, rooms=["vip"])})
    assert reply["op"] == "refreshed" and reply["expires_at"] == new_exp
    await asyncio.sleep(max(0.0, exp + 0.2 - time.time()) + 0.6)
    me = await client.request({"op": "whoami"})
    assert me["expires_at"] == new_exp and me["rooms"] == ["vip"]


async def test_a_refresh_with_an_earlier_expiry_shortens_the_session(wirehub_server: Start) -> None:
    server = await wirehub_server(server_config(expiry_grace=0.2))
    client, _ = await probe(server, headers={"Authorization": f"Bearer {token(exp=int(time.time()) + 600)}"})
    short = int(time.time()) + 2
    reply = await client.request({"op": "refresh", "token": token(exp=short)})
    assert reply["expires_at"] == short
    code, _ = await client.wait_closed(timeout=6)
    assert code == 4001 and time.time() < short + 3


async def test_refused_refreshes_keep_the_old_expiry(wirehub_server: Start) -> None:
    server = await wirehub_server(server_config(expiry_grace=0.2))
    exp = int(time.time()) + 3
    client, _ = await probe(server, headers={"Authorization": f"Bearer {token(exp=exp)}"})
    cases = [
        (token("bob", ttl=600), "bad_sub"),
        (token(ttl=-60), "expired"),
        (token(ttl=600, key="z" * 40), "bad_signature"),
        (raw_token({"alg": "none"}, claims(ttl=600)), "bad_signature"),
        ("A" * 10_240, "malformed"),
        (token(ttl=600, exp="later"), "malformed"),
    ]
    for t, reason in cases:
        reply = await client.request({"op": "refresh", "token": t})
        assert reply["op"] == "error" and reply["code"] == "forbidden", reply
        assert reply["reason"] == reason
        assert t not in reply["message"]
    assert (await client.request({"op": "refresh", "token": ""}))["code"] == "bad_request"
    assert (await client.request({"op": "whoami"}))["expires_at"] == exp
    code, _ = await client.wait_closed(timeout=6)
    assert code == 4001
    assert time.time() >= exp + 0.2 - 0.05


# -- connection limits with JWT users ---------------------------------------------------------------------------


async def _connect_as(server: LiveServer, user: str) -> WsClient:
    client, welcome = await probe(server, headers={"Authorization": f"Bearer {token(user)}"})
    assert welcome["user"] == user
    return client


async def _eventually_admitted(server: LiveServer, user: str) -> WsClient:
    deadline = time.monotonic() + 3
    while True:
        try:
            return await _connect_as(server, user)
        except HTTPClientError as exc:
            if exc.code != 429 or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


async def test_connections_per_user_are_limited(wirehub_server: Start) -> None:
    server = await wirehub_server(server_config(server={"max_connections_per_user": 2}))
    first = await _connect_as(server, "alice")
    await _connect_as(server, "alice")
    response = await server.http(PATH, headers={**UPGRADE_HEADERS, "Authorization": f"Bearer {token('alice')}"})
    assert response.code == 429 and response.headers["Retry-After"]
    assert json.loads(response.body) == {"error": "too_many_connections", "reason": "too_many_connections_for_user"}
    await _connect_as(server, "bob")  # another user is not affected
    # a refused token does not take a slot, and alice's slot comes back when she disconnects
    assert (await refused(server, query={"token": token("alice", ttl=-60)}))[1]["reason"] == "expired"
    first.close()
    await _eventually_admitted(server, "alice")


async def test_connections_per_ip_are_limited(wirehub_server: Start) -> None:
    server = await wirehub_server(server_config(server={"max_connections_per_ip": 2}))
    first = await _connect_as(server, "alice")
    await _connect_as(server, "bob")
    response = await server.http(PATH, headers={**UPGRADE_HEADERS, "Authorization": f"Bearer {token('carol')}"})
    assert response.code == 429
    assert json.loads(response.body) == {"error": "too_many_connections", "reason": "too_many_connections_from_ip"}
    # a bad token is still answered 401 (authentication comes before the limit)
    assert (await refused(server, query={"token": "garbage"}))[0] == 401
    first.close()
    await _eventually_admitted(server, "carol")


async def test_the_plugin_registers_and_describes_itself(wirehub_server: Start) -> None:
    server = await wirehub_server(server_config())
    description = server.app.authenticator.describe()
    assert description.startswith("auth jwt: ") and SECRET not in description
    assert "HS256" in description and "query > cookie > header > subprotocol" in description
