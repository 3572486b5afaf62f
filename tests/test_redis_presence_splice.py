"""The Redis presence's spliced JSON (entry infos and node index items, written per join without an encoder
call) is byte for byte what the encoder writes: a leave's SREM and a reaping replica's parse must find what
any replica, of this version or an older one, wrote."""

from __future__ import annotations

from typing import Any

import pytest

from wirehub import PresenceEntry
from wirehub.builtins.bus._presence_json import encode as _encode
from wirehub.builtins.bus.redis_presence import RedisPresence, _entry_json, _info_json
from wirehub.builtins.handlers.chat_presence import NameInfo, _info

INFOS: list[Any] = [{}, _info(""), NameInfo("Zoë \"q\" \\ \u2028 \U0001f600"), {"name": "a"}, {"name": ""},
                    {"name": "a", "x": 1}, {"name": 5}, {"other": "x"}, {"name": None}]


@pytest.mark.parametrize("info", INFOS)
def test_info_json_is_the_encoders(info: Any) -> None:
    assert _info_json(info) == _encode(dict(info))
    entry = PresenceEntry("u\u00e9\"", "s1", "node-1", info)
    assert _entry_json(entry) == _encode({"user": entry.user, "session": entry.session, "node": entry.node,
                                          "info": dict(info)})


@pytest.mark.parametrize(("room", "session"), [("lobby", "0123abcd"), ("r\u00e9\"\\/x\u2028", "s\n1\U0001f600")])
def test_index_item_is_the_encoders(room: str, session: str) -> None:
    assert RedisPresence._index_item(room, session) == _encode([room, session])
