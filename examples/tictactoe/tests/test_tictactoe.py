"""The tic-tac-toe rules: as a function, and through a real wirehub server loading the plugin."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import jsonpatch
import pytest
from wirehub_tictactoe.plugin import judge, new_game, winner

from wirehub import UpdateRejected
from wirehub.testing import LiveServer, WsClient, unique_room

PLUGIN = "wirehub_tictactoe.plugin"
ServerFactory = Callable[..., Awaitable[LiveServer]]


def move(cell: int, mark: str) -> list[Any]:
    return [{"op": "replace", "path": f"/board/{cell}", "value": mark}]


def play(state: Any, user: str, patch: list[Any]) -> Any:
    return jsonpatch.apply_patch(state, judge(state, patch, user))


# -- the rules as a function ---------------------------------------------------------------------------------


def test_winner_lines_and_draw() -> None:
    assert winner(["X", "X", "X", "", "", "", "", "", ""]) == "X"
    assert winner(["O", "", "", "", "O", "", "", "", "O"]) == "O"
    assert winner(["X", "O", "X", "X", "O", "O", "O", "X", "X"]) == "draw"
    assert winner(["X", "", "", "", "", "", "", "", ""]) is None


def test_a_whole_game() -> None:
    state = new_game()
    for user, cell, mark in [("ann", 0, "X"), ("bob", 4, "O"), ("ann", 1, "X"), ("bob", 8, "O"), ("ann", 2, "X")]:
        state = play(state, user, move(cell, mark))
    assert state["winner"] == "X" and state["players"] == {"X": "ann", "O": "bob"} and state["moves"] == 5
    with pytest.raises(UpdateRejected, match="the game is over"):
        judge(state, move(5, "O"), "bob")
    with pytest.raises(UpdateRejected, match="only a player may start a new game"):
        judge(state, [{"op": "replace", "path": "/winner", "value": None}], "eve")
    state = play(state, "bob", [{"op": "replace", "path": "/winner", "value": None}])
    assert state == new_game({"X": "ann", "O": "bob"})


@pytest.mark.parametrize(("user", "patch", "reason"), [
    ("bob", move(1, "X"), "it is O's turn"),
    ("ann", move(4, "O"), "you play X"),
    ("bob", move(9, "O"), "a move is"),
    ("bob", move(4, "Z"), "a move is"),
    ("bob", [{"op": "add", "path": "/board/4", "value": "O"}], "a move is"),
    ("bob", [{"op": "replace", "path": "/turn", "value": "X"}], "a move is"),
    ("bob", [*move(1, "O"), *move(2, "O")], "a move is"),
    ("bob", [{"op": "replace", "path": "/winner", "value": None}], "the game is not over"),
])
def test_illegal_updates_after_the_first_move(user: str, patch: list[Any], reason: str) -> None:
    state = play(new_game(), "ann", move(0, "X"))  # ann is X; O's turn
    with pytest.raises(UpdateRejected, match=reason):
        judge(state, patch, user)


def test_taken_cells_and_claimed_marks() -> None:
    state = play(play(new_game(), "ann", move(0, "X")), "bob", move(4, "O"))
    with pytest.raises(UpdateRejected, match="cell 4 is taken"):
        judge(state, move(4, "X"), "ann")
    with pytest.raises(UpdateRejected, match="X is played by ann"):
        judge(state, move(5, "X"), "eve")


def test_a_room_without_state_starts_a_game() -> None:
    state = play({}, "ann", move(4, "X"))
    assert state["board"][4] == "X" and state["turn"] == "O" and state["players"]["X"] == "ann"


# -- through a real server --------------------------------------------------------------------------------


async def connect(server: LiveServer) -> tuple[WsClient, str]:
    ws = await server.ws("/ws/game")
    welcome = await ws.recv()
    return ws, welcome["user"]


async def test_a_game_through_the_server(wirehub_server: ServerFactory) -> None:
    server = await wirehub_server({
        "plugins": {"load": [PLUGIN]},
        "endpoints": [{"path": "/ws/game", "handler": "game", "options": {"tick": 0.01}}],
        "extensions": {"tictactoe": {"rooms": ["ttt-*"]}},
    })
    (x, _), (o, o_user) = await connect(server), await connect(server)
    room = unique_room("ttt")
    for ws in (x, o):
        assert (await ws.request({"op": "join", "room": room}))["state"] == {}
    ack = await x.request({"op": "update", "room": room, "patch": move(4, "X")})
    assert ack["op"] == "ack" and ack["version"] == 1
    patch = await o.recv_op("patch")
    state = jsonpatch.apply_patch({}, patch["patch"])
    assert state["board"][4] == "X" and state["turn"] == "O"
    refused = await x.request({"op": "update", "room": room, "patch": move(0, "X")})
    assert refused["op"] == "error" and refused["code"] == "rejected" and refused["message"] == "it is O's turn"
    refused = await o.request({"op": "update", "room": room, "patch": move(4, "O")})
    assert refused["message"] == "cell 4 is taken"
    for ws, cell, mark in [(o, 0, "O"), (x, 3, "X"), (o, 1, "O"), (x, 5, "X")]:
        assert (await ws.request({"op": "update", "room": room, "patch": move(cell, mark)}))["op"] == "ack"
    final = await o.request({"op": "sync", "room": room})
    assert final["state"]["winner"] == "X" and final["state"]["players"]["O"] == o_user
    # rooms outside extensions.tictactoe.rooms are not judged
    other = unique_room("free")
    await x.request({"op": "join", "room": other})
    assert (await x.request({"op": "update", "room": other,
                             "patch": [{"op": "add", "path": "/anything", "value": 1}]}))["op"] == "ack"
    json.dumps(final)
