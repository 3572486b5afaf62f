"""The compact JSON of presence entries, shared by the Redis and NATS backends: what ``json.dumps`` with
``separators=(",", ":")`` writes, with the usual infos (none, or only a string name) spliced."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

#: one encoder (json.dumps with options builds a new one per call)
encode: Callable[[Any], str] = json.JSONEncoder(separators=(",", ":")).encode

#: how ``encode`` writes a string (``ensure_ascii`` on), quotes included
string: Callable[[str], str] = json.encoder.encode_basestring_ascii  # type: ignore[attr-defined]


def info_json(info: Mapping[str, Any]) -> str:
    """``encode(dict(info))``; none, or only a string name (a chat member's), spliced: an encoder call per
    join was a tenth of a Redis join's instructions in the replica. Raises TypeError (ValueError for a
    circular one) for an info JSON cannot hold."""
    if not info:
        return "{}"
    if len(info) == 1 and type(name := info.get("name")) is str:
        return f'{{"name":{string(name)}}}'
    return encode(dict(info))
