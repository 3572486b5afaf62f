"""The cyclic garbage collector while a replica serves (``server.gc_*``, docs/operations.md "Garbage collection").

Once the app has started, what startup built (modules, plugins, config) is frozen out of every collection
(``gc.freeze``) and generation 0 is collected every ``gc_threshold0`` allocations (CPython's 700 made a join
storm rescan its members every few joins).

A full (generation-2) collection walks every tracked object: on a dense replica that is every session's
objects (0.2-0.54 s at 9,000-10,000 sessions, bench/README.md "Follow-up (branch storm)"), while every
session waits. With ``gc_freeze_survivors`` the objects that survive a full collection are
frozen at its end, so the next full collections walk only what was allocated since. Frozen objects are still
freed by reference counting; only reference cycles among them wait: the first full collection at least
``gc_thaw_interval`` seconds after the last thaw unfreezes everything first and so walks (and frees) it all.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import Any

from wirehub.config import ServerConfig


class CollectorPolicy:
    """Applies ``server.gc_*`` to this process's collector; :meth:`close` undoes the callback."""

    def __init__(self, server: ServerConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.threshold0 = server.gc_threshold0
        self.freeze_survivors = server.gc_freeze_survivors
        self.thaw_interval = server.gc_thaw_interval
        self._clock = clock
        self._thawed_at = 0.0
        self._thawing = False
        #: full collections that froze their survivors, and those that first unfroze everything (tests, probes)
        self.freezes = 0
        self.thaws = 0

    def start(self) -> None:
        gc.collect()
        gc.freeze()
        _, gen1, gen2 = gc.get_threshold()
        gc.set_threshold(self.threshold0, gen1, gen2)
        if self.freeze_survivors:
            self._thawed_at = self._clock()
            gc.callbacks.append(self._on_collection)

    def close(self) -> None:
        if self._on_collection in gc.callbacks:
            gc.callbacks.remove(self._on_collection)

    def _on_collection(self, phase: str, info: dict[str, Any]) -> None:
        if info["generation"] != 2:
            return
        if phase == "start":
            # unfrozen before the walk, so that this collection frees the cycles among them
            self._thawing = self._clock() - self._thawed_at >= self.thaw_interval
            if self._thawing:
                gc.unfreeze()
            return
        if self._thawing:
            self._thawed_at = self._clock()
            self.thaws += 1
        gc.freeze()  # the survivors of this collection: the next full ones skip them
        self.freezes += 1
