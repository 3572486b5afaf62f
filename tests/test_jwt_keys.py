"""JWT keys: PEM public keys of every type, config errors, HMAC rotation, and a JWKS URL served by a real
local Tornado server (up, rotated, failing, down and slow)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import jwt
import pytest
import tornado.web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import NameOID
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets

from tests.plugins_for_tests.jwt_probe import OLD_SECRET, PATH, SECRET, UPGRADE_HEADERS, server_config, token
from wirehub.app import Wirehub
from wirehub.builtins.auth.jwt import JwtAuthenticator, parse_jwks
from wirehub.config import ConfigError, config_from_dict
from wirehub.plugins import build_plugin_manager
from wirehub.testing import LiveServer, free_port

Start = Callable[..., Awaitable[LiveServer]]


def pem(public_key: Any) -> bytes:
    return bytes(public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))


def write(tmp_path: Path, name: str, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


async def reason_of(server: LiveServer, bearer: str) -> tuple[int, str]:
    response = await server.http(PATH, headers={**UPGRADE_HEADERS, "Authorization": f"Bearer {bearer}"})
    return response.code, json.loads(response.body)["reason"]


async def user_of(server: LiveServer, bearer: str) -> str:
    client = await server.ws(PATH, headers={"Authorization": f"Bearer {bearer}"})
    welcome = await client.recv()
    client.close()
    return str(welcome["user"])


def jwt_factory() -> Callable[[dict[str, Any]], JwtAuthenticator]:
    """The factory registered as "jwt" (through the plugin host, as the app finds it)."""
    factory = build_plugin_manager().authenticators()["jwt"].factory

    def make(options: dict[str, Any]) -> JwtAuthenticator:
        return cast(JwtAuthenticator, factory(options, "auth.jwt"))
    return make


# -- PEM public keys ------------------------------------------------------------------------------------------

KEY_TYPES: dict[str, tuple[Callable[[], Any], str]] = {
    "RS256": (lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048), "RS256"),
    "PS384": (lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048), "PS384"),
    "ES256": (lambda: ec.generate_private_key(ec.SECP256R1()), "ES256"),
    "ES384": (lambda: ec.generate_private_key(ec.SECP384R1()), "ES384"),
    "ES512": (lambda: ec.generate_private_key(ec.SECP521R1()), "ES512"),
    "Ed25519": (ed25519.Ed25519PrivateKey.generate, "EdDSA"),
    "Ed448": (ed448.Ed448PrivateKey.generate, "EdDSA"),
}


@pytest.mark.parametrize("kind", sorted(KEY_TYPES))
async def test_pem_public_keys_verify_and_other_keys_do_not(kind: str, tmp_path: Path,
                                                            wirehub_server: Start) -> None:
    make, alg = KEY_TYPES[kind]
    private, stranger = make(), make()
    key_file = write(tmp_path, "k.pem", pem(private.public_key()))
    server = await wirehub_server(server_config(algorithms=[alg], secret=None, public_keys=[{"file": key_file}]))
    assert await user_of(server, token("alice", key=private, alg=alg)) == "alice"
    assert await reason_of(server, token("alice", key=stranger, alg=alg)) == (401, "bad_signature")
    assert await reason_of(server, token("alice", key=SECRET)) == (401, "bad_signature")  # HS256 not allowed


async def test_a_certificate_and_inline_pem_and_kids(tmp_path: Path, wirehub_server: Start) -> None:
    a = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    b = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "issuer.test")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(a.public_key())
            .serial_number(1).not_valid_before(datetime.datetime(2020, 1, 1))
            .not_valid_after(datetime.datetime(2100, 1, 1)).sign(a, hashes.SHA256()))
    server = await wirehub_server(server_config(algorithms=["RS256", "ES256"], secret=None, public_keys=[
        {"file": write(tmp_path, "cert.pem", cert.public_bytes(serialization.Encoding.PEM)), "kid": "a"},
        {"pem": pem(b.public_key()).decode(), "kid": "b"},
    ]))
    assert await user_of(server, token("alice", key=a, alg="RS256", headers={"kid": "a"})) == "alice"
    assert await user_of(server, token("bob", key=b, alg="ES256", headers={"kid": "b"})) == "bob"
    assert await user_of(server, token("carol", key=b, alg="ES256")) == "carol"  # no kid: every ES256 key
    assert await reason_of(server, token(key=a, alg="RS256", headers={"kid": "b"})) == (401, "unknown_key")
    assert await reason_of(server, token(key=b, alg="ES256", headers={"kid": "c"})) == (401, "unknown_key")


# -- config errors name the dotted key --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pems(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    tmp = tmp_path_factory.mktemp("pems")
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    p256 = ec.generate_private_key(ec.SECP256R1())
    return {
        "p256": write(tmp, "p256.pem", pem(p256.public_key())),
        "private": write(tmp, "private.pem", p256.private_bytes(serialization.Encoding.PEM,
                                                                serialization.PrivateFormat.PKCS8,
                                                                serialization.NoEncryption())),
        "rsa1024": write(tmp, "rsa1024.pem", pem(small.public_key())),
        "junk": write(tmp, "junk.pem", b"-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----\n"),
    }


CONFIG_ERRORS: list[tuple[str, dict[str, Any], str, str]] = [
    ("algorithms unset", {"secret": SECRET}, "auth.jwt.algorithms", "is required"),
    ("algorithms empty", {"algorithms": [], "secret": SECRET}, "auth.jwt.algorithms", "at least one"),
    ("alg none", {"algorithms": ["none"]}, "auth.jwt.algorithms[0]", "'none' is refused"),
    ("alg NONE among others", {"algorithms": ["HS256", "NONE"], "secret": SECRET}, "auth.jwt.algorithms[1]",
     "'none' is refused"),
    ("unknown alg", {"algorithms": ["HS257"], "secret": SECRET}, "auth.jwt.algorithms[0]", "not supported"),
    ("HS without a secret", {"algorithms": ["HS256"]}, "auth.jwt.secret", "is required for HS256"),
    ("short secret", {"algorithms": ["HS256"], "secret": "short"}, "auth.jwt.secret", "at least 32"),
    ("HS512 needs 64 bytes", {"algorithms": ["HS512"], "secret": SECRET}, "auth.jwt.secret", "at least 64"),
    ("short previous secret", {"algorithms": ["HS256"], "secret": SECRET, "previous_secret": "x",
                               "previous_secret_until": 0}, "auth.jwt.previous_secret", "at least 32"),
    ("secret without HS", {"algorithms": ["ES256"], "secret": SECRET, "public_keys": [{"file": "{p256}"}]},
     "auth.jwt.secret", "no HMAC algorithm"),
    ("HS on a public key", {"algorithms": ["HS256", "ES256"], "secret": SECRET,
                            "public_keys": [{"file": "{p256}", "algorithms": ["HS256"]}]},
     "auth.jwt.public_keys[0].algorithms[0]", "can't be mixed"),
    ("alg that does not fit the key", {"algorithms": ["ES256", "RS256"],
                                       "public_keys": [{"file": "{p256}", "algorithms": ["RS256"]}],
                                       "jwks_url": "https://idp.test/jwks"},
     "auth.jwt.public_keys[0].algorithms[0]", "does not fit"),
    ("no configured alg fits the key", {"algorithms": ["ES384"], "public_keys": [{"file": "{p256}"}]},
     "auth.jwt.public_keys[0].file", "none of algorithms fits"),
    ("asymmetric alg without a key", {"algorithms": ["RS256"]}, "auth.jwt.algorithms", "RS256 has no key"),
    ("public key without asymmetric alg", {"algorithms": ["HS256"], "secret": SECRET,
                                           "jwks_url": "https://idp.test/jwks"},
     "auth.jwt.jwks_url", "no asymmetric algorithm"),
    ("private key", {"algorithms": ["ES256"], "public_keys": [{"file": "{private}"}]},
     "auth.jwt.public_keys[0].file", "is a private key"),
    ("small RSA key", {"algorithms": ["RS256"], "public_keys": [{"file": "{rsa1024}"}]},
     "auth.jwt.public_keys[0].file", "at least 2048"),
    ("not a PEM", {"algorithms": ["ES256"], "public_keys": [{"file": "{junk}"}]},
     "auth.jwt.public_keys[0].file", "not a PEM public key"),
    ("missing file", {"algorithms": ["ES256"], "public_keys": [{"file": "/nonexistent/k.pem"}]},
     "auth.jwt.public_keys[0].file", "cannot read"),
    ("file and pem", {"algorithms": ["ES256"], "public_keys": [{"file": "{p256}", "pem": "x"}]},
     "auth.jwt.public_keys[0]", "exactly one of file"),
    ("plain http JWKS", {"algorithms": ["RS256"], "jwks_url": "http://idp.example.com/jwks"},
     "auth.jwt.jwks_url", "https://"),
    ("previous secret without until", {"algorithms": ["HS256"], "secret": SECRET, "previous_secret": OLD_SECRET},
     "auth.jwt.previous_secret_until", "is required"),
    ("until is not a time", {"algorithms": ["HS256"], "secret": SECRET, "previous_secret": OLD_SECRET,
                             "previous_secret_until": "next week"}, "auth.jwt.previous_secret_until", "ISO 8601"),
    ("until without previous", {"algorithms": ["HS256"], "secret": SECRET, "previous_secret_until": 0},
     "auth.jwt.previous_secret_until", "without previous_secret"),
    ("unknown source", {"algorithms": ["HS256"], "secret": SECRET, "sources": ["query", "body"]},
     "auth.jwt.sources[1]", "not one of"),
    ("duplicate source", {"algorithms": ["HS256"], "secret": SECRET, "sources": ["query", "query"]},
     "auth.jwt.sources[1]", "twice"),
    ("typo in a key", {"algorithms": ["HS256"], "secrets": SECRET}, "auth.jwt.secrets", "unknown key"),
    ("leeway not a number", {"algorithms": ["HS256"], "secret": SECRET, "leeway": "soon"}, "auth.jwt.leeway",
     "expected a number"),
    ("empty audience", {"algorithms": ["HS256"], "secret": SECRET, "audience": ["a", ""]}, "auth.jwt.audience[1]",
     "must not be empty"),
]


@pytest.mark.parametrize(("name", "options", "key", "message"), CONFIG_ERRORS, ids=[c[0] for c in CONFIG_ERRORS])
def test_config_errors_name_the_key(name: str, options: dict[str, Any], key: str, message: str,
                                    pems: dict[str, str]) -> None:
    options = json.loads(json.dumps(options).replace("{p256}", pems["p256"]).replace("{private}", pems["private"])
                         .replace("{rsa1024}", pems["rsa1024"]).replace("{junk}", pems["junk"]))
    with pytest.raises(ConfigError) as err:
        jwt_factory()(options)
    assert err.value.key == key, str(err.value)
    assert message in err.value.message


def test_config_is_checked_when_the_app_is_built(monkeypatch: pytest.MonkeyPatch) -> None:
    def config(jwt_options: dict[str, Any]) -> Any:
        return config_from_dict({"auth": {"plugin": "jwt", "jwt": jwt_options},
                                 "endpoints": [{"path": "/ws/echo", "handler": "echo"}]})

    with pytest.raises(ConfigError) as err:
        Wirehub.build(config({"algorithms": ["HS256", "none"]}))
    assert str(err.value).startswith("auth.jwt.algorithms[1]: 'none' is refused")
    monkeypatch.delenv("WIREHUB_JWT_SECRET", raising=False)
    with pytest.raises(ConfigError) as err:
        config({"algorithms": ["HS256"], "secret": "$env:WIREHUB_JWT_SECRET"})
    assert err.value.key == "auth.jwt.secret"
    monkeypatch.setenv("WIREHUB_JWT_SECRET", SECRET)
    app = Wirehub.build(config({"algorithms": ["HS256"], "secret": "$env:WIREHUB_JWT_SECRET"}))
    assert app.authenticator.describe().startswith("auth jwt: ")


# -- HMAC secret rotation -----------------------------------------------------------------------------------------


async def test_previous_secret_is_accepted_until_the_configured_time(wirehub_server: Start) -> None:
    until = time.time() + 1.5
    server = await wirehub_server(server_config(previous_secret=OLD_SECRET, previous_secret_until=until))
    old_session = await server.ws(PATH, headers={"Authorization": f"Bearer {token('old', key=OLD_SECRET)}"})
    assert (await old_session.recv())["user"] == "old"
    assert await user_of(server, token("new")) == "new"
    await asyncio.sleep(until - time.time() + 0.1)
    assert await reason_of(server, token("old", key=OLD_SECRET)) == (401, "bad_signature")
    assert await user_of(server, token("new")) == "new"
    # the rotation disconnects nobody: the session opened with the old secret goes on
    assert (await old_session.request({"op": "ping"}))["op"] == "pong"


@pytest.mark.parametrize("until", ["2099-01-01T00:00:00Z", "2099-01-01 00:00:00+00:00", 4070908800,
                                   "2099-01-01"])
def test_rotation_end_accepts_iso_and_unix_times(until: Any) -> None:
    auth = jwt_factory()({"algorithms": ["HS256"], "secret": SECRET, "previous_secret": OLD_SECRET,
                          "previous_secret_until": until})
    assert "previous_secret until 2099-01-01T00:00:00+00:00" in auth.describe()


def test_rotation_end_from_a_yaml_timestamp(tmp_path: Path) -> None:
    from wirehub.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text(f"auth:\n  plugin: jwt\n  jwt:\n    algorithms: [HS256]\n    secret: {SECRET}\n"
                    f"    previous_secret: {OLD_SECRET}\n    previous_secret_until: 2099-01-01T00:00:00Z\n")
    config = load_config(path)
    assert "until 2099-01-01T00:00:00+00:00" in jwt_factory()(dict(config.auth.options)).describe()


# -- JWKS --------------------------------------------------------------------------------------------------------


@dataclass
class Jwks:
    """A JWKS endpoint on a real local Tornado server."""

    document: Any = field(default_factory=lambda: {"keys": []})
    status: int = 200
    delay: float = 0.0
    hits: int = 0
    port: int = 0
    release: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/.well-known/jwks.json"


class JwksHandler(tornado.web.RequestHandler):
    def initialize(self, jwks: Jwks) -> None:
        self.jwks = jwks

    async def get(self) -> None:
        self.jwks.hits += 1
        if self.jwks.delay:
            # "slow": answers after the client's timeout, or when the test ends
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.jwks.release.wait(), self.jwks.delay)
        self.set_status(self.jwks.status)
        self.set_header("Content-Type", "application/json")
        body = self.jwks.document
        self.finish(body if isinstance(body, str) else json.dumps(body))


@pytest.fixture
async def jwks() -> AsyncIterator[Jwks]:
    state = Jwks()
    sockets = bind_sockets(0, "127.0.0.1")
    state.port = sockets[0].getsockname()[1]
    server = HTTPServer(tornado.web.Application([(r"/.well-known/jwks.json", JwksHandler, {"jwks": state})]))
    server.add_sockets(sockets)
    yield state
    state.release.set()
    server.stop()
    await asyncio.sleep(0.05)
    await server.close_all_connections()


def jwk(private: Any, kid: str | None, **extra: Any) -> dict[str, Any]:
    maker = RSAAlgorithm if isinstance(private, rsa.RSAPrivateKey) else ECAlgorithm
    out: dict[str, Any] = maker.to_jwk(private.public_key(), as_dict=True)
    if kid is not None:
        out["kid"] = kid
    out.update(extra)
    return out


@pytest.fixture(scope="module")
def rsa_pair() -> tuple[Any, Any]:
    return tuple(rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in range(2))  # type: ignore[return-value]


def jwks_config(url: str, **extra: Any) -> dict[str, Any]:
    return server_config(algorithms=["RS256", "ES256"], secret=None, jwks_url=url, **extra)


async def test_jwks_keys_verify_and_a_rotated_in_kid_is_fetched_once(jwks: Jwks, rsa_pair: tuple[Any, Any],
                                                                     wirehub_server: Start) -> None:
    k1, k2 = rsa_pair
    e1 = ec.generate_private_key(ec.SECP256R1())
    jwks.document = {"keys": [jwk(k1, "k1"), jwk(e1, "e1", use="sig", alg="ES256")]}
    server = await wirehub_server(jwks_config(jwks.url, jwks_refetch_interval=0))
    assert await user_of(server, token("alice", key=k1, alg="RS256", headers={"kid": "k1"})) == "alice"
    assert await user_of(server, token("erin", key=e1, alg="ES256", headers={"kid": "e1"})) == "erin"
    assert await user_of(server, token("nokid", key=k1, alg="RS256")) == "nokid"
    assert jwks.hits == 1  # cached

    # an unknown kid: one refetch per request, then unknown_key
    assert await reason_of(server, token(key=k2, alg="RS256", headers={"kid": "k2"})) == (401, "unknown_key")
    assert jwks.hits == 2
    # the provider rotates k2 in: the next token with kid k2 triggers a refetch and is accepted
    jwks.document = {"keys": [jwk(k1, "k1"), jwk(k2, "k2")]}
    assert await user_of(server, token("bob", key=k2, alg="RS256", headers={"kid": "k2"})) == "bob"
    assert jwks.hits == 3
    # a known kid with the wrong key is a bad signature, not a fetch
    assert await reason_of(server, token(key=k1, alg="RS256", headers={"kid": "k2"})) == (401, "bad_signature")
    assert jwks.hits == 3


async def test_unknown_kids_cannot_hammer_the_jwks_endpoint(jwks: Jwks, rsa_pair: tuple[Any, Any],
                                                            wirehub_server: Start) -> None:
    k1, _ = rsa_pair
    jwks.document = {"keys": [jwk(k1, "k1")]}
    server = await wirehub_server(jwks_config(jwks.url, jwks_refetch_interval=60))
    assert await user_of(server, token(key=k1, alg="RS256", headers={"kid": "k1"})) == "alice"
    for i in range(5):
        assert await reason_of(server, token(key=k1, alg="RS256", headers={"kid": f"x{i}"})) == (401, "unknown_key")
    assert jwks.hits == 1


async def test_symmetric_and_unusable_jwks_entries_are_ignored(jwks: Jwks, rsa_pair: tuple[Any, Any],
                                                               wirehub_server: Start) -> None:
    k1, _ = rsa_pair
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    oct_key = {"kty": "oct", "kid": "o1", "k": jwt.utils.base64url_encode(b"k" * 40).decode()}
    jwks.document = {"keys": [oct_key, jwk(small, "small"), {"kty": "RSA", "kid": "broken", "n": "x", "e": "y"},
                              jwk(k1, "enc", use="enc"), jwk(k1, "k1"), "not-a-jwk"]}
    server = await wirehub_server(server_config(algorithms=["HS256", "RS256"], jwks_url=jwks.url))
    # an HS256 token signed with the JWKS' oct key never verifies: HMAC uses only auth.jwt.secret
    forged = token("mallory", key=b"k" * 40, headers={"kid": "o1"})
    assert await reason_of(server, forged) == (401, "bad_signature")
    with pytest.warns(jwt.warnings.InsecureKeyLengthWarning):
        weak = token(key=small, alg="RS256", headers={"kid": "small"})
    assert await reason_of(server, weak) == (401, "unknown_key")
    assert await reason_of(server, token(key=k1, alg="RS256", headers={"kid": "enc"})) == (401, "unknown_key")
    assert await user_of(server, token("alice", key=k1, alg="RS256", headers={"kid": "k1"})) == "alice"
    assert [k.kid for k in parse_jwks(jwks.document, frozenset({"RS256"}))] == ["k1"]


async def test_a_failing_jwks_refetch_keeps_the_cached_keys(jwks: Jwks, rsa_pair: tuple[Any, Any],
                                                            wirehub_server: Start) -> None:
    k1, _ = rsa_pair
    jwks.document = {"keys": [jwk(k1, "k1")]}
    server = await wirehub_server(jwks_config(jwks.url, jwks_cache_ttl=0, jwks_refetch_interval=0))
    assert await user_of(server, token(key=k1, alg="RS256", headers={"kid": "k1"})) == "alice"
    for status, document in ((500, {"error": "down"}), (200, "<html>not json</html>"), (200, {"no": "keys"})):
        jwks.status, jwks.document = status, document
        hits = jwks.hits
        assert await user_of(server, token(key=k1, alg="RS256", headers={"kid": "k1"})) == "alice"
        assert jwks.hits == hits + 1


async def test_a_jwks_endpoint_that_is_down_gives_unknown_key_quickly(rsa_pair: tuple[Any, Any],
                                                                      wirehub_server: Start) -> None:
    k1, _ = rsa_pair
    server = await wirehub_server(jwks_config(f"http://127.0.0.1:{free_port()}/jwks", jwks_timeout=2))
    started = time.monotonic()
    assert await reason_of(server, token(key=k1, alg="RS256", headers={"kid": "k1"})) == (401, "unknown_key")
    assert time.monotonic() - started < 1.0
    # an HMAC-less, kid-less token is refused the same way, and the failure is not retried at once
    assert await reason_of(server, token(key=k1, alg="RS256")) == (401, "unknown_key")
    assert time.monotonic() - started < 1.5


async def test_a_slow_jwks_endpoint_times_out_without_blocking_the_loop(jwks: Jwks, rsa_pair: tuple[Any, Any],
                                                                        wirehub_server: Start) -> None:
    k1, _ = rsa_pair
    jwks.document = {"keys": [jwk(k1, "k1")]}
    jwks.delay = 10.0
    timeout = 1.0  # a blocking fetch would hold the loop this long
    server = await wirehub_server(jwks_config(jwks.url, jwks_timeout=timeout))
    loop = asyncio.get_running_loop()
    gaps: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:  # measures how long the event loop is ever held
        last = loop.time()
        while not stop.is_set():
            await asyncio.sleep(0.01)
            gaps.append(loop.time() - last)
            last = loop.time()

    async def healthz_latency() -> float:
        await asyncio.sleep(0.1)  # while the JWKS fetch is pending
        t0 = loop.time()
        assert (await server.http("/healthz")).code == 200
        return loop.time() - t0

    tick = asyncio.ensure_future(ticker())
    started = loop.time()
    bearer = token(key=k1, alg="RS256", headers={"kid": "k1"})
    health_check = asyncio.ensure_future(healthz_latency())
    answers = await asyncio.gather(*(reason_of(server, bearer) for _ in range(5)))
    elapsed = loop.time() - started
    health = await health_check
    assert answers == [(401, "unknown_key")] * 5
    assert timeout * 0.9 <= elapsed < timeout + 1.5
    assert health < 0.5
    assert jwks.hits == 1  # one fetch for the five upgrades
    # within jwks_refetch_interval (default 10 s) the failure is not retried: refused at once
    t0 = loop.time()
    assert await reason_of(server, bearer) == (401, "unknown_key")
    assert loop.time() - t0 < 0.5 and jwks.hits == 1
    stop.set()
    await tick
    assert max(gaps) < 0.5, f"the event loop was blocked for {max(gaps):.3f}s"
