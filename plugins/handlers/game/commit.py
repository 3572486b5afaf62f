"""The write side of a game room on this replica: the group commit and the per-tick publishing.

Per room, per replica, one commit is in flight (a *group commit*): updates that arrive while a
commit is running wait in the room's :class:`_Committer` and are committed together in the next
one (at most ``max_batch``). A commit reads the state (or starts from the version this replica
wrote last, which its compare-and-set then confirms), runs every update through
``wirehub_validate_update`` against the state the earlier ones left, applies it with jsonpatch,
checks the size, and stores the result with ``compare_and_set``; on a conflict it re-reads and
re-validates everything (bounded retries, then ``error conflict``). Each committed version is an
entry ``[version, commit, parent_commit, ops, users]``; the committer publishes its entries at
most once per tick (the first one after a quiet tick immediately) as one bus message
``{"op": "commits", ...}``, which every replica's view (``view.py``) applies.

The handler (``handler.py``) owns the committers (``GameHandler.committers``): ``op_update``
queues an :class:`_Update` and starts :meth:`_Committer.run`; an update's answer other than an
ack is an :class:`_Outcome`.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import random
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import jsonpatch

from wirehub import BusUnavailable, ErrorCode, PluginFailed, Session, StateConflict, UpdateRejected, dumps
from wirehub.builtins.handlers.game.options import _APPLY_ERRORS, PatchTooLarge, _explain, apply_bounded, check_patch

if TYPE_CHECKING:
    from wirehub.builtins.handlers.game.handler import GameHandler

log = logging.getLogger("wirehub.game")


@dataclass(eq=False)
class _Update:
    session: Session
    patch: list[Any]
    future: asyncio.Future[int]


class _Outcome(Exception):
    """An update's final answer other than an ack."""

    def __init__(self, code: ErrorCode, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.extra = extra


@dataclass(eq=False)
class _Committer:
    """One room's writes on this replica: the queue, the commit task and the outbox."""

    handler: GameHandler = field(repr=False)
    room: str
    queue: list[_Update] = field(default_factory=list)
    task: asyncio.Task[None] | None = None
    outbox: list[list[Any]] = field(default_factory=list)
    epoch: str | None = None
    last_flush: float = -1e9
    flush_handle: asyncio.TimerHandle | None = None
    flushing: bool = False
    #: (version, epoch, commit, state) this replica wrote last: the base of the next commit, which
    #: then needs no read unless another replica wrote since (its compare-and-set says so)
    cache: tuple[int, str | None, str | None, Any] | None = None

    @property
    def idle(self) -> bool:
        return not self.queue and self.task is None and not self.outbox and not self.flushing and (
            self.flush_handle is None)

    # -- writes --------------------------------------------------------------------------------------

    async def run(self) -> None:
        """The room's commit task: commits the queue, ``max_batch`` updates at a time, until it is empty."""
        h = self.handler
        try:
            while self.queue and not h.closed:
                batch, self.queue = self.queue[: h.options.max_batch], self.queue[h.options.max_batch:]
                try:
                    await self._commit(batch)
                except Exception as exc:
                    if not isinstance(exc, BusUnavailable):
                        h.context.logs.exception(log, "room %s: commit failed", self.room)
                    outcome = (_Outcome(ErrorCode.UNAVAILABLE, "the state store is unavailable; retry")
                               if isinstance(exc, BusUnavailable) else _Outcome(ErrorCode.INTERNAL, "internal error"))
                    for u in batch:
                        if not u.future.done():
                            u.future.set_exception(outcome)
        finally:
            self.task = None
            for u in self.queue:
                if not u.future.done():
                    u.future.set_exception(_Outcome(ErrorCode.UNAVAILABLE, "the server is stopping"))
            self.queue.clear()
            self.forget()

    async def _commit(self, batch: list[_Update]) -> None:
        h = self.handler
        store = h.context.backend.state
        hooks = h.context.hooks
        todo = list(batch)
        # an attempt on the cached base is extra: max_retries counts attempts on fresh reads
        for attempt in range(h.options.max_retries + (self.cache is not None)):
            # A cached base may be older than some of these updates: judged on it, only what the
            # compare-and-set then confirms stands; refusals wait for that, or for a fresh read.
            fresh = self.cache is None
            if self.cache is not None:
                version, epoch, head, base = self.cache
                self.cache = None
            else:
                version, epoch, head, base = h.unwrap(await h.stored(h.key(self.room)))
            work = copy.deepcopy(base)
            accepted: list[tuple[_Update, list[Any]]] = []
            answered: list[tuple[_Update, _Outcome]] = []
            for u in todo:
                try:
                    patch = await hooks.validate_update(self.room, work, u.patch, u.session.identity)
                    if patch is not u.patch:
                        try:
                            check_patch(patch)
                            dumps(patch)  # members are sent it: strict JSON only (no NaN)
                        except ValueError as exc:
                            h.context.logs.error(log, "room %s: a rules plugin returned an invalid patch: %s",
                                                 self.room, exc)
                            raise _Outcome(ErrorCode.INTERNAL, "internal error") from None
                    try:
                        work = apply_bounded(work, patch, h.options.max_state_depth, h.options.max_state_bytes)
                    except PatchTooLarge as exc:
                        work = self._rebuild(base, accepted)
                        raise _Outcome(ErrorCode.TOO_LARGE, exc.message, **exc.extra) from None
                    except _APPLY_ERRORS:
                        work = self._rebuild(base, accepted)
                        raise _Outcome(ErrorCode.CONFLICT, f"the patch does not apply at version {version}: "
                                       f"{_explain(work, patch)}", version=version) from None
                    accepted.append((u, patch))
                except UpdateRejected as exc:
                    answered.append((u, _Outcome(ErrorCode.REJECTED, exc.reason)))
                except _Outcome as exc:
                    answered.append((u, exc))
                except PluginFailed:  # already reported (one rate-limited line naming the plugin, a metric)
                    work = self._rebuild(base, accepted)
                    answered.append((u, _Outcome(ErrorCode.INTERNAL, "internal error")))
                except Exception:
                    h.context.logs.exception(log, "room %s: a rules plugin failed on an update", self.room)
                    work = self._rebuild(base, accepted)
                    answered.append((u, _Outcome(ErrorCode.INTERNAL, "internal error")))
            if accepted:
                size = len(dumps(work).encode())
                if size > h.options.max_state_bytes:
                    work, accepted, too_large = self._fit(base, accepted)
                    answered.extend(too_large)
            if fresh:
                for u, outcome in answered:
                    if not u.future.done():
                        u.future.set_exception(outcome)
                if not accepted:
                    return
            elif not accepted:
                continue  # everything refused on a cached base: judge again on a fresh read
            new_epoch = epoch if version else uuid.uuid4().hex[:12]
            commit = uuid.uuid4().hex[:12]
            try:
                new_version = await store.compare_and_set(h.key(self.room), version,
                                                          {"e": new_epoch, "c": commit, "s": work})
            except StateConflict:
                h.conflicts.inc()
                retry = {id(u) for u, _ in accepted} | (set() if fresh else {id(u) for u, _ in answered})
                todo = [u for u in todo if id(u) in retry]
                # jittered backoff: replicas that lost the race do not collide again in step
                await asyncio.sleep(random.uniform(0, min(0.05, 0.002 * 2 ** attempt)))
                continue
            h.commits.inc()
            if not fresh:  # the base was current after all
                for u, outcome in answered:
                    if not u.future.done():
                        u.future.set_exception(outcome)
            if not h.bus_down:
                self.cache = (new_version, new_epoch, commit, work)
            ops = [op for _, patch in accepted for op in patch]
            users: list[str] = []
            for u, _ in accepted:
                if u.session.identity.user not in users:
                    users.append(u.session.identity.user)
            if self.epoch != new_epoch:
                self.flush_now()  # one bus message carries one epoch
                self.epoch = new_epoch
            self.outbox.append([new_version, commit, head if version else None, ops, users])
            for u, _ in accepted:
                if not u.future.done():
                    u.future.set_result(new_version)
            self._schedule_flush()
            return
        for u in todo:
            if not u.future.done():
                u.future.set_exception(_Outcome(ErrorCode.CONFLICT, "too many concurrent updates; retry"))

    @staticmethod
    def _rebuild(base: Any, accepted: list[tuple[_Update, list[Any]]]) -> Any:
        work = copy.deepcopy(base)
        for _, patch in accepted:
            work = jsonpatch.apply_patch(work, copy.deepcopy(patch), in_place=True)
        return work

    def _fit(self, base: Any, accepted: list[tuple[_Update, list[Any]]]
             ) -> tuple[Any, list[tuple[_Update, list[Any]]], list[tuple[_Update, _Outcome]]]:
        """Re-apply one by one, refusing the updates that take the state over the size limit."""
        limit = self.handler.options.max_state_bytes
        work = copy.deepcopy(base)
        kept: list[tuple[_Update, list[Any]]] = []
        refused: list[tuple[_Update, _Outcome]] = []
        for u, patch in accepted:
            candidate = jsonpatch.apply_patch(copy.deepcopy(work), copy.deepcopy(patch), in_place=True)
            size = len(dumps(candidate).encode())
            if size > limit:
                refused.append((u, _Outcome(ErrorCode.TOO_LARGE,
                                            f"the update would make the state {size} bytes; the limit is {limit}",
                                            max_bytes=limit)))
            else:
                work = candidate
                kept.append((u, patch))
        return work, kept, refused

    # -- publishing (at most once per tick per room) -------------------------------------------------

    def _schedule_flush(self) -> None:
        h = self.handler
        if self.flush_handle is not None or self.flushing or not self.outbox or h.closed:
            return
        delay = self.last_flush + h.options.tick - h.loop_time()
        if delay <= 0:
            self.flush_now()
        else:
            self.flush_handle = asyncio.get_running_loop().call_later(delay, self._flush_timer)

    def _flush_timer(self) -> None:
        self.flush_handle = None
        self.flush_now()

    def flush_now(self) -> None:
        """Publish the outbox now, as one bus message (one epoch), without waiting for the tick."""
        h = self.handler
        if not self.outbox or self.epoch is None:
            return
        entries, self.outbox = self.outbox, []
        self.last_flush = h.loop_time()
        if self.flush_handle is not None:
            self.flush_handle.cancel()
            self.flush_handle = None
        frame = dumps({"op": "commits", "room": self.room, "epoch": self.epoch, "entries": entries}).encode()
        self.flushing = True
        h.spawn(self._publish(frame))

    async def _publish(self, frame: bytes) -> None:
        h = self.handler
        try:
            await h.context.hub.publish(h.bus_room(self.room), frame)
            h.context.metrics.published.labels("game").inc()
        except BusUnavailable:
            # Committed but not broadcast: local members still get it; other replicas resync
            # after the outage (reconnect check, gap or verify).
            view = h.views.get(self.room)
            if view is not None and view.ready:
                view.on_bus(frame)
        finally:
            self.flushing = False
            if self.outbox:
                self._schedule_flush()
            self.forget()

    def forget(self) -> None:
        h = self.handler
        # kept for a tick after its last flush, so that the next commit still waits for the tick
        if self.idle and h.committers.get(self.room) is self and h.loop_time() - self.last_flush >= h.options.tick:
            del h.committers[self.room]
