"""The NATS presence's members values, spliced (no dict per entry's info, no encoder call per key), are byte
for byte what the encoder writes: every replica, of this version or an older one, parses what another wrote,
and a key rewritten with the same entries carries the same bytes."""

from __future__ import annotations

import json
from typing import Any

import pytest

from wirehub import PresenceEntry
from wirehub.builtins.bus.nats_buckets import encode_entries, parse_entries
from wirehub.builtins.handlers.chat_presence import NameInfo, _info

_encode = json.JSONEncoder(separators=(",", ":")).encode
INFOS: list[Any] = [{}, _info(""), NameInfo("Zoë \"q\" \\ \u2028 \U0001f600"), {"name": "a"}, {"name": ""},
                    {"name": "a", "x": 1}, {"name": 5}, {"other": "x"}, {"name": None}]


def _generic(node: str, entries: list[PresenceEntry]) -> bytes:
    return _encode({"n": node, "e": [[e.user, e.session, dict(e.info)] for e in entries]}).encode()


@pytest.mark.parametrize("info", INFOS)
def test_a_members_value_is_the_encoders(info: Any) -> None:
    entries = [PresenceEntry("u\u00e9\"", "s\n1\U0001f600", "n\u00f6de-1", info),
               PresenceEntry("guest-0a1b", "0123abcd", "n\u00f6de-1", NameInfo("guest-0a1b"))]
    data = encode_entries("n\u00f6de-1", entries)
    assert data == _generic("n\u00f6de-1", entries)
    assert [(e.user, e.session, e.node, dict(e.info)) for e in parse_entries(data)] == \
        [(e.user, e.session, e.node, dict(e.info)) for e in entries]


def test_an_empty_members_value_is_the_encoders() -> None:
    assert encode_entries("n1", []) == _generic("n1", [])
