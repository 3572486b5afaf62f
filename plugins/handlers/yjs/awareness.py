"""Awareness (cursors, selections, user names) of one document across replicas.

y-protocols' awareness is a map ``clientID -> (clock, state)`` where a higher clock wins and a
``null`` state means "gone". This replica keeps that map for its document together with the
instance of wirehub that each client is connected to, so that:

- a connection that closes without saying goodbye gets its clients' states replaced by ``null``
  (clock + 1), as the y-websocket server does;
- the clients of a replica that died (no heartbeat for ``awareness_ttl``) are removed the same way
  by every other replica, for their own members.
"""

from __future__ import annotations

from dataclasses import dataclass

from wirehub.builtins.handlers.yjs.wire import AwarenessEntry

NULL = "null"


@dataclass
class _State:
    clock: int
    state: str
    instance: str  # the replica instance the client is connected to
    session: str  # its session there


class AwarenessMap:
    def __init__(self) -> None:
        self.states: dict[int, _State] = {}

    def apply(self, entries: list[AwarenessEntry], instance: str, session: str) -> list[AwarenessEntry]:
        """Merge ``entries`` (y-protocols' rule); returns those that changed something, to forward."""
        changed: list[AwarenessEntry] = []
        for e in entries:
            cur = self.states.get(e.client)
            if cur is None or cur.clock < e.clock or (cur.clock == e.clock and e.state == NULL and cur.state != NULL):
                if e.state == NULL:
                    self.states.pop(e.client, None)
                    if cur is None:
                        continue
                else:
                    self.states[e.client] = _State(e.clock, e.state, instance, session)
                changed.append(e)
        return changed

    def remove(self, predicate: str, *, by: str = "session") -> list[AwarenessEntry]:
        """Remove the clients of a session (``by="session"``) or of a replica instance
        (``by="instance"``); returns the ``null`` entries (clock + 1) that tell the others."""
        gone = [(client, s) for client, s in self.states.items() if getattr(s, by) == predicate]
        out = []
        for client, s in gone:
            del self.states[client]
            out.append(AwarenessEntry(client, s.clock + 1, NULL))
        return out

    def entries(self, instance: str | None = None) -> list[AwarenessEntry]:
        """Every known state (of one instance's clients when given)."""
        return [AwarenessEntry(c, s.clock, s.state) for c, s in self.states.items()
                if instance is None or s.instance == instance]

    def instances(self) -> set[str]:
        return {s.instance for s in self.states.values()}

    def nbytes(self) -> int:
        return sum(len(s.state) + 32 for s in self.states.values())
