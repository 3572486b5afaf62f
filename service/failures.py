"""Plugin failures: an exception out of any plugin hook is counted and logged once per interval.

:class:`PluginFailures` is the one place that reports them: ``wirehub_plugin_errors_total{plugin,hook}``
counts every one, and the log gets at most one line per ``(plugin, hook)`` every ``interval``
seconds (naming both, with how many were suppressed since the last line), so a client that can make
a plugin raise cannot make the replica write more log than it sends. The traceback goes to the
DEBUG level of the same logger.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Protocol


class _Counter(Protocol):
    def labels(self, *values: str) -> Any: ...


class RateLimitedLog:
    """At most one record per key every ``interval`` seconds; the next one says how many were dropped.

    Minimal on purpose (a shared log rate limiter is coming in service/logs.py). The table is
    bounded: keys here are (plugin, hook) pairs, a fixed set per process.
    """

    def __init__(self, logger: logging.Logger, interval: float = 10.0) -> None:
        self.logger = logger
        self.interval = interval
        self._last: dict[Any, tuple[float, int]] = {}

    def log(self, key: Any, level: int, msg: str, *args: Any) -> bool:
        """Log ``msg % args`` unless ``key`` was logged within the interval; True when logged."""
        now = time.monotonic()
        last, suppressed = self._last.get(key, (float("-inf"), 0))
        if now - last < self.interval:
            self._last[key] = (last, suppressed + 1)
            return False
        self._last[key] = (now, 0)
        if suppressed:
            msg += " (%d more since the last report)"
            args = (*args, suppressed)
        self.logger.log(level, msg, *args)
        return True


class PluginFailures:
    """Counts and logs exceptions raised by plugin hooks (see the module docstring)."""

    def __init__(self, logger: logging.Logger, interval: float = 10.0) -> None:
        self.log = RateLimitedLog(logger, interval)
        self._counter: _Counter | None = None

    def bind(self, counter: _Counter) -> None:
        """Count into ``counter`` (labels ``plugin``, ``hook``); the app binds its metric once built."""
        self._counter = counter

    def report(self, plugin: str, hook: str, exc: BaseException) -> None:
        if self._counter is not None:
            self._counter.labels(plugin, hook).inc()
        logged = self.log.log((plugin, hook), logging.ERROR, "plugin %s: hook %s raised %s: %s",
                              plugin, hook, type(exc).__name__, _short(exc))
        if logged:
            self.log.logger.debug("plugin %s: hook %s traceback", plugin, hook, exc_info=exc)


def _short(exc: BaseException, limit: int = 200) -> str:
    text = str(exc).replace("\n", " ")
    return text if len(text) <= limit else text[:limit] + "..."
