"""Rate-limited logging: a line that clients can trigger at will is written once per interval.

A bad frame must never make the server write more log than the client sent. Every log call on
a path a client can reach goes through :meth:`LogLimiter.log`: the first occurrence of each
(logger, message template) in an interval is written (a traceback included, if asked for); the
rest are counted, and the next line written for that key says how many were suppressed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable
from typing import Any

#: seconds between two lines of the same (logger, template) by default (``server.error_log_interval``)
DEFAULT_INTERVAL = 10.0
#: distinct keys remembered; templates are constants in the code, so this is only a safety net
_MAX_KEYS = 1024


class LogLimiter:
    """Writes each (logger, template) at most once per ``interval`` seconds, with a count of the rest."""

    def __init__(self, interval: float = DEFAULT_INTERVAL, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self._clock = clock
        #: key -> [time of the last line written, occurrences suppressed since]
        self._seen: dict[tuple[str, str, Hashable], list[float]] = {}

    def log(self, logger: logging.Logger, level: int, template: str, *args: Any, exc_info: Any = None,
            key: Hashable = None) -> bool:
        """Log ``template % args`` unless the same key was written within the interval; True if written.

        The key is (logger, template), and ``key`` too when given: e.g. (plugin, hook) for one template
        that names many plugins, each of which gets its own line per interval."""
        if not logger.isEnabledFor(level):
            return False
        seen_key = (logger.name, template, key)
        now = self._clock()
        seen = self._seen.get(seen_key)
        if seen is not None and now - seen[0] < self.interval:
            seen[1] += 1
            return False
        suppressed = int(seen[1]) if seen is not None else 0
        if seen is None and len(self._seen) >= _MAX_KEYS:
            self._seen.pop(next(iter(self._seen)))
        self._seen[seen_key] = [now, 0]
        if suppressed:
            template += " (%d more like this in the last %gs)"
            args = (*args, suppressed, self.interval)
        logger.log(level, template, *args, exc_info=exc_info)
        return True

    def exception(self, logger: logging.Logger, template: str, *args: Any) -> bool:
        """:meth:`log` at ERROR with the current exception's traceback (call from an ``except`` block)."""
        return self.log(logger, logging.ERROR, template, *args, exc_info=True)

    def error(self, logger: logging.Logger, template: str, *args: Any, key: Hashable = None) -> bool:
        return self.log(logger, logging.ERROR, template, *args, key=key)

    def warning(self, logger: logging.Logger, template: str, *args: Any, key: Hashable = None) -> bool:
        return self.log(logger, logging.WARNING, template, *args, key=key)
