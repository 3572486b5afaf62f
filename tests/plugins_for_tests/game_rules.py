"""Game rules for tests (loaded through ``plugins.load``).

- ``counter-*`` rooms: any update means "increment /n"; the rule computes the new value from the
  state it is given, so a commit that was not re-validated after a conflict would lose increments.
- ``rules-*`` rooms: writing ``/locked`` is refused; a string written to ``/name`` is lower-cased.
- ``readonly-*`` rooms: anyone may join, nobody may update.
- ``broken-*`` rooms: an update of ``/raise`` makes the rule raise, one of ``/invalid`` makes it return
  an invalid patch, one of ``/nan`` a patch with a NaN in it (all bugs of a rules plugin).
"""

from __future__ import annotations

from typing import Any

from wirehub import Identity, UpdateRejected, hookimpl


@hookimpl
def wirehub_validate_update(room: str, state: Any, patch: list[Any], identity: Identity) -> list[Any] | None:
    if room.startswith("counter-"):
        n = state.get("n", 0) if isinstance(state, dict) else 0
        return [{"op": "add", "path": "/n", "value": n + 1}]
    if room.startswith("broken-"):
        if patch[0].get("path") == "/raise":
            raise RuntimeError("a bug in a rules plugin")
        if patch[0].get("path") == "/invalid":
            return [{"op": "frobnicate", "path": "/x"}]
        if patch[0].get("path") == "/nan":
            return [{"op": "add", "path": "/nan", "value": float("nan")}]
        return None
    if room.startswith("rules-"):
        out = []
        for op in patch:
            if op.get("path", "").startswith("/locked"):
                raise UpdateRejected(f"{identity.user} may not touch /locked")
            if op.get("path") == "/name" and isinstance(op.get("value"), str):
                op = {**op, "value": op["value"].lower()}
            out.append(op)
        return out
    return None


@hookimpl
def wirehub_authorize(identity: Identity, action: str, room: str) -> bool | None:
    if room.startswith("readonly-") and action == "update":
        return False
    return None
