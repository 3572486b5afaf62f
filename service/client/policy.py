"""What the client does after a close (the reconnect policy), and the errors it raises."""

from __future__ import annotations

import random
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from wirehub.protocol import CloseCode

TokenSource = str | Callable[[], "str | Awaitable[str | None] | None"] | None
Callback = Callable[[Any], Any]

_RETRY_RE = re.compile(r"(?:^|;)\s*retry_ms=(\d+)")


class ClientError(Exception):
    """A failed request. ``code`` is a server error code (``forbidden``, ``not_joined``, ...) or
    one of the client's own: ``timeout``, ``disconnected``, ``closed``, ``stopped``."""

    def __init__(self, code: str, message: str, frame: dict[str, Any] | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.frame = frame


def backoff_delay(attempt: int, base: float, cap: float, rand: Callable[[], float] = random.random) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(cap, base * 2**attempt))."""
    return float(rand() * min(cap, base * 2.0 ** min(attempt, 30)))


def parse_retry_ms(reason: str | None) -> int | None:
    """The ``retry_ms=N`` hint of a close reason, or None."""
    m = _RETRY_RE.search(reason or "")
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class ClosePolicy:
    reconnect: bool
    delay: float  # seconds
    new_token: bool


def close_policy(code: int | None, reason: str | None, attempt: int, base: float, cap: float) -> ClosePolicy:
    """What to do after the server closed with ``code`` (None: the connection just dropped)."""
    hint = parse_retry_ms(reason)
    if code == CloseCode.FORBIDDEN:
        return ClosePolicy(False, 0.0, False)
    if code == CloseCode.TOKEN_EXPIRED:
        return ClosePolicy(True, backoff_delay(min(attempt, 1), base, cap), True)
    if code in (CloseCode.GOING_AWAY, CloseCode.SLOW_CONSUMER):
        return ClosePolicy(True, hint / 1000 if hint is not None else backoff_delay(attempt, base, cap), False)
    if code == CloseCode.RATE_LIMITED:
        return ClosePolicy(True, (hint or 0) / 1000 + backoff_delay(attempt + 3, base, cap), False)
    return ClosePolicy(True, backoff_delay(attempt, base, cap), False)


def http_close(status: int) -> tuple[int | None, str]:
    """A refused upgrade as a close code for the policy: 403 stops, 429 backs off, else retry
    (``4401`` stands for a 401: fetch a new token)."""
    if status == 403:
        return CloseCode.FORBIDDEN, "HTTP 403"
    if status == 429:
        return CloseCode.RATE_LIMITED, "HTTP 429"
    if status == 401:
        return 4401, "HTTP 401"
    return None, f"HTTP {status}"
