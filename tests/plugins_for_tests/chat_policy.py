"""Policy hooks for the chat tests: a moderation filter and an authorize rule.

- ``wirehub_filter_message``: ``{"text": ...}`` has "darn" masked; ``{"spam": true}`` is dropped;
  messages from the HTTP API (``session=None``) get ``"via": "api"`` added.
- ``wirehub_authorize``: rooms ``readonly-*`` may be joined but not published to; rooms ``vip-*``
  are for users whose id starts with ``vip``. Anything else: no opinion (the default policy decides).
- Both raise for ``boom`` (the room ``boom-*``, the data ``{"boom": true}``): a plugin bug.
"""

from __future__ import annotations

from typing import Any

from wirehub import DROP, Identity, Session, hookimpl


@hookimpl
def wirehub_filter_message(session: Session | None, room: str, data: Any) -> Any:
    if isinstance(data, dict):
        if data.get("boom") is True:
            raise RuntimeError("filter bug")
        if data.get("spam") is True:
            return DROP
        if isinstance(data.get("text"), str) and "darn" in data["text"]:
            data = {**data, "text": data["text"].replace("darn", "****")}
        if session is None:
            return {**data, "via": "api"}
        return data
    return None


@hookimpl
async def wirehub_authorize(identity: Identity, action: str, room: str) -> bool | None:
    if room.startswith("boom-"):
        raise RuntimeError("policy bug")
    if room.startswith("readonly-") and action == "publish":
        return False
    if room.startswith("vip-"):
        return identity.user.startswith("vip")
    return None
