"""Tic-tac-toe rules as a wirehub plugin: ``wirehub_validate_update`` judges every update of a game room.

The room's state::

    {"board": ["", "", "", "", "", "", "", "", ""],   # cells 0-8, row by row: "", "X" or "O"
     "turn": "X",                                    # whose move it is
     "players": {"X": null, "O": null},              # user ids; a mark is claimed by its first move
     "winner": null,                                 # null while playing, then "X", "O" or "draw"
     "moves": 0}

A client sends exactly one of:

- a move: ``[{"op": "replace", "path": "/board/4", "value": "X"}]`` (its own mark, in its turn, on an
  empty cell, while nobody has won). The first user to play X owns X, the next other user owns O.
- a new game, once this one is over: ``[{"op": "replace", "path": "/winner", "value": null}]``, by
  one of the players.

Anything else is refused with a reason the client sees (``error rejected``). An accepted update is
rewritten into the full patch every member receives: the cell, the turn, the move count, the
player claiming a mark and, when the move ends the game, the winner. A room without state (the
game endpoint's ``initial_state`` not set) starts a new game with its first move.

The rules apply to the rooms matching ``extensions.tictactoe.rooms`` (glob patterns; default
every room of every game endpoint).
"""

from __future__ import annotations

import copy
import fnmatch
import re
from collections.abc import Mapping
from typing import Any

from wirehub import Config, ConfigError, Identity, UpdateRejected, hookimpl

NEW_GAME: dict[str, Any] = {
    "board": [""] * 9,
    "turn": "X",
    "players": {"X": None, "O": None},
    "winner": None,
    "moves": 0,
}
LINES = ((0, 1, 2), (3, 4, 5), (6, 7, 8), (0, 3, 6), (1, 4, 7), (2, 5, 8), (0, 4, 8), (2, 4, 6))
MOVE_HELP = 'a move is [{"op": "replace", "path": "/board/<0-8>", "value": "X" or "O"}]'
_CELL = re.compile(r"/board/([0-8])")

#: rooms judged by default: only those named for the game, so installing the plugin leaves other
#: game rooms (the demo page's board, say) alone
DEFAULT_ROOMS = ("ttt-*",)
# One process hosts one app; wirehub_configure sets this once at startup.
_rooms: tuple[str, ...] = DEFAULT_ROOMS


def new_game(players: Mapping[str, Any] | None = None) -> dict[str, Any]:
    game = copy.deepcopy(NEW_GAME)
    if players is not None:
        game["players"] = dict(players)
    return game


def winner(board: list[str]) -> str | None:
    """"X" or "O" with three in a line, "draw" on a full board, else None."""
    for a, b, c in LINES:
        if board[a] and board[a] == board[b] == board[c]:
            return board[a]
    return "draw" if all(board) else None


def judge(state: Any, patch: list[Any], user: str) -> list[Any]:
    """The patch to apply for ``user``'s update ``patch`` on ``state``; raises UpdateRejected."""
    prefix: list[Any] = []
    if not isinstance(state, dict) or "board" not in state:
        state = new_game()
        prefix = [{"op": "replace", "path": "", "value": new_game()}]
    if len(patch) != 1 or patch[0].get("op") != "replace":
        raise UpdateRejected(MOVE_HELP)
    op = patch[0]
    players: dict[str, Any] = state["players"]
    if op.get("path") == "/winner" and op.get("value") is None:
        if state["winner"] is None:
            raise UpdateRejected("the game is not over")
        if user not in players.values():
            raise UpdateRejected("only a player may start a new game")
        return [{"op": "replace", "path": "", "value": new_game(players)}]
    cell = _CELL.fullmatch(str(op.get("path")))
    mark = op.get("value")
    if cell is None or mark not in ("X", "O"):
        raise UpdateRejected(MOVE_HELP)
    if state["winner"] is not None:
        raise UpdateRejected("the game is over")
    turn = state["turn"]
    other = "O" if turn == "X" else "X"
    if mark != turn:
        raise UpdateRejected(f"it is {turn}'s turn")
    if players.get(turn) is None:
        if players.get(other) == user:
            raise UpdateRejected(f"you play {other}")
    elif players[turn] != user:
        raise UpdateRejected(f"{turn} is played by {players[turn]}")
    i = int(cell.group(1))
    board = list(state["board"])
    if board[i]:
        raise UpdateRejected(f"cell {i} is taken")
    board[i] = mark
    out = [*prefix,
           {"op": "replace", "path": f"/board/{i}", "value": mark},
           {"op": "replace", "path": "/turn", "value": other},
           {"op": "replace", "path": "/moves", "value": state["moves"] + 1}]
    if players.get(turn) is None:
        out.append({"op": "replace", "path": f"/players/{turn}", "value": user})
    result = winner(board)
    if result is not None:
        out.append({"op": "replace", "path": "/winner", "value": result})
    return out


def applies_to(room: str) -> bool:
    return any(fnmatch.fnmatchcase(room, pattern) for pattern in _rooms)


@hookimpl
def wirehub_configure(config: Config) -> None:
    global _rooms
    block = config.extensions.get("tictactoe") or {}
    if not isinstance(block, Mapping) or set(block) - {"rooms"}:
        raise ConfigError("extensions.tictactoe", "expected a mapping with one key: rooms (glob patterns)")
    rooms = block.get("rooms", list(DEFAULT_ROOMS))
    if not isinstance(rooms, list) or not all(isinstance(r, str) and r for r in rooms):
        raise ConfigError("extensions.tictactoe.rooms", f"expected a list of glob patterns, got {rooms!r}")
    _rooms = tuple(rooms)


@hookimpl
def wirehub_validate_update(room: str, state: Any, patch: list[Any], identity: Identity) -> list[Any] | None:
    if not applies_to(room):
        return None
    return judge(state, patch, identity.user)
