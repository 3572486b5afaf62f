"""Hooks that raise on purpose (tests/adversarial/test_attack_plugin_errors.py).

- handler ``raising-open``: its ``on_open`` raises; ``raising-message``: its ``on_message`` raises;
- ``wirehub_authorize`` raises for rooms starting with ``boom-authz``, and has no opinion otherwise;
- ``wirehub_filter_message`` raises for the data ``"boom"``, and leaves anything else as it is;
- ``wirehub_session_opened`` raises for users whose name starts with ``boom`` (none by default);
- ``wirehub_validate_update`` raises for a patch that sets the value ``"boom"``;
- authenticator ``raising``: raises for a request with an ``X-Boom`` header, else the user named by
  ``X-User`` (default ``guest``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tornado.httputil import HTTPServerRequest

from wirehub import AuthError, HandlerContext, Identity, Session, hookimpl


class RaisingOpen:
    async def on_open(self, session: Session) -> None:
        raise RuntimeError("on_open broke on purpose")

    async def on_message(self, session: Session, data: str | bytes) -> None:
        return None

    async def on_close(self, session: Session) -> None:
        raise RuntimeError("on_close broke on purpose")


class RaisingMessage:
    async def on_open(self, session: Session) -> None:
        session.send({"op": "welcome"})

    async def on_message(self, session: Session, data: str | bytes) -> None:
        raise ValueError("on_message broke on purpose")

    async def on_close(self, session: Session) -> None:
        return None


@hookimpl
def wirehub_register_handlers() -> Mapping[str, Any]:
    def open_factory(options: Mapping[str, Any], key: str, context: HandlerContext) -> RaisingOpen:
        return RaisingOpen()

    def message_factory(options: Mapping[str, Any], key: str, context: HandlerContext) -> RaisingMessage:
        return RaisingMessage()

    return {"raising-open": open_factory, "raising-message": message_factory}


class RaisingAuthenticator:
    async def authenticate(self, request: HTTPServerRequest) -> Identity:
        if "X-Boom" in request.headers:
            raise RuntimeError("authenticate broke on purpose")
        return Identity(user=request.headers.get("X-User", "guest"), rooms=("*",))

    async def refresh(self, identity: Identity, token: str) -> Identity:
        raise AuthError(400, "unsupported")

    def describe(self) -> str:
        return "auth raising (tests only)"


@hookimpl
def wirehub_register_authenticators() -> Mapping[str, Any]:
    def factory(options: Mapping[str, Any], key: str) -> RaisingAuthenticator:
        return RaisingAuthenticator()

    return {"raising": factory}


@hookimpl
def wirehub_authorize(identity: Identity, action: str, room: str) -> bool | None:
    if room.startswith("boom-authz"):
        raise KeyError("authorize broke on purpose")
    return None


@hookimpl
async def wirehub_filter_message(session: Session | None, room: str, data: Any) -> Any:
    if data == "boom":
        raise ZeroDivisionError("filter broke on purpose")
    return None


@hookimpl
def wirehub_validate_update(room: str, state: Any, patch: list[Any], identity: Identity) -> list[Any] | None:
    if any(isinstance(op, dict) and op.get("value") == "boom" for op in patch):
        raise IndexError("validate_update broke on purpose")
    return None


@hookimpl
def wirehub_session_opened(session: Session) -> None:
    if session.identity.user.startswith("boom"):
        raise RuntimeError("session_opened broke on purpose")
