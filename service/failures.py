"""Plugin failures: an exception out of any plugin hook is counted and logged once per interval.

:class:`PluginFailures` is the one place that reports them: ``wirehub_plugin_errors_total{plugin,hook}``
counts every one, and the log gets at most one line per ``(plugin, hook)`` every ``interval``
seconds (naming both, with how many were suppressed since the last line), so a client that can make
a plugin raise cannot make the replica write more log than it sends. The traceback goes to the
DEBUG level of the same logger.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

from wirehub.logs import DEFAULT_INTERVAL, LogLimiter


class _Counter(Protocol):
    def labels(self, *values: str) -> Any: ...


class PluginFailures:
    """Counts and logs exceptions raised by plugin hooks (see the module docstring)."""

    def __init__(self, logger: logging.Logger, interval: float = DEFAULT_INTERVAL) -> None:
        self.logger = logger
        self.limiter = LogLimiter(interval)
        self._counter: _Counter | None = None

    def bind(self, counter: _Counter) -> None:
        """Count into ``counter`` (labels ``plugin``, ``hook``); the app binds its metric once built."""
        self._counter = counter

    def report(self, plugin: str, hook: str, exc: BaseException) -> None:
        if self._counter is not None:
            self._counter.labels(plugin, hook).inc()
        logged = self.limiter.log(self.logger, logging.ERROR, "plugin %s: hook %s raised %s: %s",
                                  plugin, hook, type(exc).__name__, _short(exc), key=(plugin, hook))
        if logged:
            self.logger.debug("plugin %s: hook %s traceback", plugin, hook, exc_info=exc)


def _short(exc: BaseException, limit: int = 200) -> str:
    text = str(exc).replace("\n", " ")
    return text if len(text) <= limit else text[:limit] + "..."
