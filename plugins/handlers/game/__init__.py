"""The game handler plugin: authoritative, versioned room state synced with batched JSON Patches.

This module is the plugin surface only: the ``game`` handler factory, which checks the endpoint's
options, and the two hooks (``wirehub_register_handlers``, ``wirehub_shutdown``). The handler
itself is split by concern, each module small enough to read in one sitting:

- ``handler.py``: :class:`GameHandler`, the ops (join, leave, sync, update), rate limit,
  membership, maintenance and idle expiry;
- ``view.py``: the read side, one view of each room per replica (version order, forwarding,
  slow members, resync and verify against the store);
- ``commit.py``: the write side, the group commit per room (rules, compare-and-set retries,
  batching) and the per-tick publishing of the committed versions;
- ``options.py``: :class:`GameOptions` and the structural checks of patches (:func:`check_patch`).

The state of a room lives in the backend's state store as ``{"e": epoch, "c": commit, "s": state}``
(the handler owns that wrapper): ``s`` is the room's JSON document, ``e`` names one lifetime of
the room (it changes when the store lost the room and it starts again at version 1) and ``c`` the
commit that wrote the current version. Versions are the store's compare-and-set versions.

Client frames (docs/protocol.md, "Game endpoint"): ``join {room}`` -> ``state``; ``leave
{room}`` -> ``left``; ``update {room, patch}`` -> ``ack {id, version}`` or ``error``; ``sync
{room}`` -> ``state``; events ``patch {room, from_version, version, patch, by}`` and ``state``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from wirehub import ConfigError, HandlerContext, HandlerFactory, dumps, hookimpl, parse_block
from wirehub.builtins.handlers.game.handler import GameHandler
from wirehub.builtins.handlers.game.options import GameOptions, check_patch

if TYPE_CHECKING:
    from wirehub import Wirehub

__all__ = ["GameHandler", "GameOptions", "check_patch", "wirehub_register_handlers", "wirehub_shutdown"]


def _factory(options: Mapping[str, Any], key: str, context: HandlerContext) -> GameHandler:
    opts = parse_block(GameOptions, options, key)
    if opts.initial_state is not None:
        try:
            json.dumps(opts.initial_state, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{key}.initial_state", f"must be a JSON value: {exc}") from None
    initial = {} if opts.initial_state is None else opts.initial_state
    if len(dumps(initial).encode()) > opts.max_state_bytes:
        raise ConfigError(f"{key}.initial_state", f"is larger than max_state_bytes ({opts.max_state_bytes})")
    cap = context.config.server.send_queue_bytes
    if opts.max_state_bytes + opts.slow_client_bytes > cap:
        raise ConfigError(f"{key}.slow_client_bytes",
                          f"slow_client_bytes + max_state_bytes ({opts.slow_client_bytes} + {opts.max_state_bytes}) "
                          f"must fit in server.send_queue_bytes ({cap}), so a fresh state never overflows it")
    try:
        re.compile(opts.room_pattern)
    except re.error as exc:
        raise ConfigError(f"{key}.room_pattern", f"not a regular expression: {exc}") from None
    if not re.fullmatch(r"[A-Za-z0-9_\-]+", opts.namespace):
        raise ConfigError(f"{key}.namespace", f"expected letters, digits, '_' or '-', got {opts.namespace!r}")
    return GameHandler(opts, context)


@hookimpl
def wirehub_register_handlers() -> Mapping[str, HandlerFactory]:
    return {"game": _factory}


@hookimpl
async def wirehub_shutdown(app: Wirehub) -> None:
    for handler in app.handlers.values():
        if isinstance(handler, GameHandler):
            await handler.close()
