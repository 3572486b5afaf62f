"""The authenticator contract: who is connecting, decided before the WebSocket upgrade."""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from tornado.httputil import HTTPServerRequest


class AuthError(Exception):
    """Authentication failed: the upgrade is answered with ``status`` and a JSON body.

    ``reason`` is client-visible and comes from a fixed vocabulary (for JWT: missing, malformed,
    expired, not_yet_valid, bad_signature, bad_audience, bad_issuer, unknown_key). ``detail`` is
    for the server log only.
    """

    def __init__(self, status: int, reason: str, detail: str = "", error: str = "invalid_token") -> None:
        super().__init__(f"{status} {reason}: {detail}" if detail else f"{status} {reason}")
        self.status = status
        self.reason = reason
        self.detail = detail
        self.error = error


#: a ``rooms`` pattern with this prefix grants read access only (join, presence, history, subscribe)
READ_ONLY_PREFIX = "read:"
#: the ``wirehub_authorize`` actions that only read; any other action (publish, update) writes
READ_ACTIONS = frozenset(("join", "presence", "history", "subscribe"))


@dataclass(frozen=True)
class Identity:
    """Who a session belongs to.

    ``rooms`` are glob patterns (``lobby``, ``team-*``) of rooms this identity may join and
    publish to (the default ``wirehub_authorize`` policy); ``expires_at`` is a UNIX time after
    which the session must be refreshed or is closed with 4001 (None: never).
    """

    user: str
    name: str = ""
    rooms: tuple[str, ...] = ()
    claims: Mapping[str, Any] = field(default_factory=dict)
    expires_at: float | None = None
    anonymous: bool = False

    def may_access(self, room: str, *, write: bool = True) -> bool:
        """Does a pattern of :attr:`rooms` match ``room``? A pattern prefixed with ``read:``
        (``read:handbook-*``) grants read access only: it matches when ``write`` is False."""
        for pattern in self.rooms:
            if pattern == "*":  # a guest's, on every join: first, no other test
                return True
            if pattern.startswith(READ_ONLY_PREFIX):
                if not write and fnmatch.fnmatchcase(room, pattern[len(READ_ONLY_PREFIX):]):
                    return True
            elif fnmatch.fnmatchcase(room, pattern):
                return True
        return False


@runtime_checkable
class Authenticator(Protocol):
    """Turns an upgrade request into an :class:`Identity`. Registered by name through
    ``wirehub_register_authenticators``; built with ``factory(options, key)``."""

    async def authenticate(self, request: HTTPServerRequest) -> Identity:
        """Called once per upgrade request, before the 101. Raises :class:`AuthError` to refuse.

        Must not block the event loop (do network I/O asynchronously, with a timeout).
        """
        ...

    async def refresh(self, identity: Identity, token: str) -> Identity:
        """Called on a live session's ``refresh {token}``. Returns the extended identity (same
        ``user``) or raises :class:`AuthError`; the session then keeps its old expiry."""
        ...

    def describe(self) -> str:
        """One line for the startup log (e.g. "anonymous: anyone may connect")."""
        ...
