"""The game endpoint's options and its checks of JSON Patches (no state, no I/O).

:class:`GameOptions` is the endpoint's ``options`` block (docs/protocol.md, "Game endpoint",
"Options"). :func:`check_patch` is the structural RFC 6902 check of a client's patch, made
before it reaches the rules or the store; :func:`_explain` says which op of a patch fails on a
state and why, for the ``conflict`` message. Kept apart from the handler so that the commit
path (``commit.py``) and the view (``view.py``) can share them without importing each other.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any

import jsonpatch
import jsonpointer

from wirehub import DEFAULT_ROOM_PATTERN, dumps, opt, value_depth

_OPS_NEEDING_VALUE = frozenset(("add", "replace", "test"))
_OPS_NEEDING_FROM = frozenset(("move", "copy"))
_ALL_OPS = _OPS_NEEDING_VALUE | _OPS_NEEDING_FROM | {"remove"}
_APPLY_ERRORS = (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException, TypeError, KeyError, IndexError,
                 ValueError, AttributeError)


@dataclass(frozen=True)
class GameOptions:
    #: seconds between batches: a replica publishes its commits of a room at most once per tick
    tick: float = opt(0.05, min=0.001, max=10)
    #: the state of a room that has none yet (any JSON value)
    initial_state: Any = None
    #: largest state of a room, in bytes of compact JSON; an update making it larger -> error too_large
    max_state_bytes: int = opt(65536, min=2)
    #: largest patch of one update, in bytes of compact JSON -> error too_large
    max_patch_bytes: int = opt(16384, min=2)
    #: deepest nesting of the state ([] or {} is 1); an update making it deeper -> error too_large.
    #: A stored state deeper than this is reset to initial_state when read (docs/protocol.md)
    max_state_depth: int = opt(32, min=1, max=200)
    #: updates (and syncs) per second per session, with a burst of as many; 0 = unlimited
    updates_per_second: float = opt(30.0, min=0)
    #: seconds a room's state is kept with no members anywhere and no updates; 0 = forever
    idle_expiry: float = opt(600.0, min=0)
    #: compare-and-set attempts of one commit before its updates get error conflict
    max_retries: int = opt(20, min=1)
    #: updates committed together at most (one version)
    max_batch: int = opt(256, min=1)
    #: seconds a view waits for a missing version before it reloads the state from the store
    gap_timeout: float = opt(1.0, min=0.01)
    #: seconds between checks of each view against the store (a lost last message); 0 = only on reconnect
    verify_interval: float = opt(5.0, min=0)
    #: bytes queued to a member above which it skips patches and later gets a fresh state
    slow_client_bytes: int = opt(262144, min=1024)
    #: prefix of the bus room, presence room and state key (two game endpoints with different
    #: namespaces have separate rooms)
    namespace: str = "game"
    #: regular expression a room name must match in full (the chat endpoint's default)
    room_pattern: str = DEFAULT_ROOM_PATTERN
    #: per-endpoint override of server.max_message_size (read by the core)
    max_message_size: int | None = opt(None, min=125)


def check_patch(patch: Any) -> list[Any]:
    """Structural RFC 6902 checks that do not depend on the state; raises ValueError with the reason."""
    if not isinstance(patch, list) or not patch:
        raise ValueError("the patch must be a non-empty list of operations")
    for i, op in enumerate(patch):
        if not isinstance(op, dict):
            raise ValueError(f"op {i}: an operation must be an object")
        name = op.get("op")
        if name not in _ALL_OPS:
            raise ValueError(f"op {i}: unknown op {name!r}; valid: {', '.join(sorted(_ALL_OPS))}")
        for member in ("path", "from") if name in _OPS_NEEDING_FROM else ("path",):
            pointer = op.get(member)
            if not isinstance(pointer, str):
                raise ValueError(f"op {i} ({name}): {member!r} must be a JSON Pointer string")
            try:
                jsonpointer.JsonPointer(pointer)
            except jsonpointer.JsonPointerException as exc:
                raise ValueError(f"op {i} ({name}): {member} {pointer!r} is not a JSON Pointer: {exc}") from None
        if name in _OPS_NEEDING_VALUE and "value" not in op:
            raise ValueError(f"op {i} ({name}): 'value' is missing")
    return patch


_NOTHING = object()


def _segments(pointer: str) -> int:
    """Nesting levels a JSON Pointer goes down (``""`` is the root: 0)."""
    return pointer.count("/")


def apply_bounded(state: Any, patch: list[Any], max_depth: int, max_bytes: int) -> Any:
    """Apply ``patch`` to ``state`` in place, op by op, refusing what would nest or grow it unboundedly.

    Every op that puts a value somewhere (add, replace, move, copy) is checked before it runs:
    the levels of its path plus the depth of the value must stay within ``max_depth``, so a state
    within the limit stays within it without a walk of the whole state. ``copy`` is the only op
    that can multiply the state's size (each can double it): the values one patch copies may add
    up to ``max_bytes`` at most. Raises :class:`PatchTooLarge`, or what jsonpatch raises when an
    op does not apply (``_APPLY_ERRORS``). A failed op may leave ``state`` partly patched.
    """
    copied = 0
    for op in patch:
        name = op["op"]
        if name in ("add", "replace"):
            value: Any = op["value"]
        elif name in _OPS_NEEDING_FROM:
            value = jsonpointer.resolve_pointer(state, op["from"])
        else:
            value = _NOTHING
        if value is not _NOTHING:
            depth = _segments(op["path"]) + value_depth(value, max_depth)
            if depth > max_depth:
                raise PatchTooLarge(f"the update would nest the state {depth} levels deep; the limit is {max_depth}",
                                    max_depth=max_depth)
            if name == "copy" and isinstance(value, dict | list):
                copied += len(dumps(value))
                if copied > max_bytes:
                    raise PatchTooLarge(f"the update copies over {max_bytes} bytes; the state's limit",
                                        max_bytes=max_bytes)
        state = jsonpatch.apply_patch(state, [copy.deepcopy(op)], in_place=True)
    return state


class PatchTooLarge(Exception):
    """An update refused by :func:`apply_bounded` (answered ``too_large``)."""

    def __init__(self, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        self.extra = extra


def _explain(state: Any, patch: list[Any]) -> str:
    """Which op of ``patch`` fails on ``state``, and why (for the client's error message)."""
    work = copy.deepcopy(state)
    for i, op in enumerate(patch):
        where = f"op {i} ({op.get('op')} {op.get('path')})"
        try:
            work = jsonpatch.apply_patch(work, [copy.deepcopy(op)], in_place=True)
        except jsonpatch.JsonPatchTestFailed:
            try:
                actual = dumps(jsonpointer.resolve_pointer(work, op["path"]))
            except jsonpointer.JsonPointerException:
                actual = "missing"
            if len(actual) > 60:
                actual = actual[:57] + "..."
            return f"{where}: test failed: the value is {actual}, not {dumps(op.get('value'))[:60]}"
        except _APPLY_ERRORS as exc:
            # jsonpointer names the parent's whole value ("member 'x' not found in {...}"): cut it
            reason = re.sub(r" in [\[{].*$", "", str(exc), flags=re.S)[:200]
            return f"{where}: {reason or type(exc).__name__}"
    return "it failed"

