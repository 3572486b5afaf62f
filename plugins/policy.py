"""The default access policy: an identity may use the rooms its ``rooms`` glob patterns match.

Registered first among the built-ins and marked ``trylast``, so any other plugin's
``wirehub_authorize`` answer comes before it.
"""

from __future__ import annotations

from wirehub import READ_ACTIONS, Identity, hookimpl


@hookimpl(trylast=True)
def wirehub_authorize(identity: Identity, action: str, room: str) -> bool:
    # ``read:`` patterns of the rooms claim grant the read actions only (docs/auth.md)
    return identity.may_access(room, write=action not in READ_ACTIONS)
