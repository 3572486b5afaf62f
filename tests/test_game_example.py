"""examples/tictactoe (its own package, with its own tests) run from the project's suite: the rules
plugin loaded through ``plugins.load`` into a real server, a whole game over real WebSockets."""

from __future__ import annotations

import asyncio
import configparser
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from tests.plugins_for_tests.game_client import GameClient
from wirehub.testing import LiveServer, unique_room

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "tictactoe"
if str(EXAMPLE) not in sys.path:
    sys.path.insert(0, str(EXAMPLE))

ServerFactory = Callable[..., Awaitable[LiveServer]]


def move(cell: int, mark: str) -> list[Any]:
    return [{"op": "replace", "path": f"/board/{cell}", "value": mark}]


def test_the_example_declares_its_entry_point() -> None:
    cfg = configparser.ConfigParser()
    cfg.read(EXAMPLE / "setup.cfg")
    assert cfg["options.entry_points"]["wirehub"].strip() == "tictactoe = wirehub_tictactoe.plugin"


async def test_a_game_of_tictactoe_through_a_real_server(wirehub_server: ServerFactory) -> None:
    from wirehub_tictactoe.plugin import new_game

    server = await wirehub_server({
        "plugins": {"load": ["wirehub_tictactoe.plugin"]},
        "endpoints": [{"path": "/ws/game", "handler": "game",
                       "options": {"tick": 0.01, "initial_state": new_game()}}],
    })
    x = await GameClient.connect(server.ws_url("/ws/game"), "x")
    o = await GameClient.connect(server.ws_url("/ws/game"), "o")
    watcher = await GameClient.connect(server.ws_url("/ws/game"), "watcher")
    try:
        room = unique_room("ttt")
        for c in (x, o, watcher):
            assert (await c.join(room))["state"] == new_game()
        assert (await x.update(room, move(4, "X")))["version"] == 1
        refused = await x.update(room, move(0, "X"))
        assert {k: refused[k] for k in ("op", "code", "message")} == {
            "op": "error", "code": "rejected", "message": "it is O's turn"}
        assert (await o.update(room, move(4, "O")))["message"] == "cell 4 is taken"
        assert (await watcher.update(room, move(0, "O")))["op"] == "ack"  # watcher claims O
        assert (await o.update(room, move(1, "X")))["message"] == "X is played by " + x.user
        for c, cell, mark in [(x, 3, "X"), (watcher, 1, "O"), (x, 5, "X")]:
            assert (await c.update(room, move(cell, mark)))["op"] == "ack"
        _version, state = await o.wait_version(room, 5)
        assert state["winner"] == "X" and state["players"] == {"X": x.user, "O": watcher.user}
        assert state["board"] == ["O", "O", "", "X", "X", "X", "", "", ""]
        assert (await x.update(room, move(8, "O")))["message"] == "the game is over"
        assert (await x.update(room, [{"op": "replace", "path": "/winner", "value": None}]))["op"] == "ack"
        _, state = await watcher.wait_version(room, 6)
        assert state == new_game({"X": x.user, "O": watcher.user})
    finally:
        await asyncio.gather(*(c.aclose() for c in (x, o, watcher)))
