"""The default access policy: an identity may use the rooms its ``rooms`` glob patterns match.

Registered first among the built-ins and marked ``trylast``, so any other plugin's
``wirehub_authorize`` answer comes before it.
"""

from __future__ import annotations

from wirehub import READ_ACTIONS, Identity, hookimpl


@hookimpl(trylast=True)
def wirehub_authorize(identity: Identity, action: str, room: str) -> bool:
    rooms = identity.rooms
    if rooms and rooms[0] == "*":  # a guest's, on every join: what may_access answers first, without the call
        return True
    # ``read:`` patterns of the rooms claim grant the read actions only (docs/auth.md)
    return identity.may_access(room, write=action not in READ_ACTIONS)
