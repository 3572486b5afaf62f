"""The welcome frame: :meth:`OpHandler.on_open` splices the usual one from pre-encoded parts, and its bytes
must be exactly what ``dumps(handler.welcome(session))`` gives, for every identity a plugin may return."""

from __future__ import annotations

from typing import Any, cast

import pytest

from wirehub.auth import Identity
from wirehub.handler import HandlerContext, OpHandler
from wirehub.protocol import dumps
from wirehub.session import Session
from wirehub.testing import FakeTransport

IDENTITIES = [
    Identity(user="guest-1a2b3c4d", name="guest-1a2b3c4d"),
    Identity(user="alice"),  # no name: no "name" key
    Identity(user="alice", name="Alice Ünïcødé 名前 \U0001f600"),
    Identity(user='quo"te\\back\nslash\x00\x1f\u2028', name='also "quoted"'),
    Identity(user="bob", name="Bob", expires_at=1764158400.5),  # the general path: the expiry is in it
]


async def opened(handler: OpHandler, identity: Identity, node: str = "node-1") -> tuple[Session, bytes]:
    transport = FakeTransport()
    session = Session(transport, identity, endpoint="/ws/chat", node=node, max_queue_bytes=1 << 20)
    await handler.on_open(session)
    (payload,) = transport.texts()
    return session, payload


@pytest.mark.parametrize("identity", IDENTITIES, ids=lambda i: repr(i.user)[:12])
async def test_the_welcome_is_the_json_of_welcome(identity: Identity) -> None:
    handler = OpHandler(cast(HandlerContext, None))  # welcome needs no context
    session, payload = await opened(handler, identity, node='pod-"ü"')
    assert payload == dumps(handler.welcome(session)).encode()


async def test_a_subclass_welcome_is_sent_as_it_builds_it() -> None:
    class Extra(OpHandler):
        def welcome(self, session: Session) -> dict[str, Any]:
            return {**super().welcome(session), "extra": 1}

    handler = Extra(cast(HandlerContext, None))
    session, payload = await opened(handler, Identity(user="carol", name="Carol"))
    assert payload == dumps(handler.welcome(session)).encode() and payload.endswith(b',"extra":1}')
