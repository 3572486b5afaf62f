"""A bus ``uncertain``: the memory backend, except that a publish whose payload contains the JSON
string ``"uncertain"`` is carried out and then reported as :class:`PublishOutcomeUnknown`, as a
broker that stored the message but whose answer was lost, the first time for each dedupe key (its
retry gets an answer) (tests/test_idempotent_publish.py)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from wirehub import Backend, PublishOutcomeUnknown, hookimpl
from wirehub.builtins.bus.memory import MemoryBus, create_backend


class UncertainBus(MemoryBus):
    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.lost: set[str | None] = set()

    async def publish(self, room: str, payload: bytes, *, history: bool = False, dedupe_key: str | None = None,
                      dedupe_window: float = 0.0) -> int | None:
        offset = await super().publish(room, payload, history=history, dedupe_key=dedupe_key,
                                       dedupe_window=dedupe_window)
        if b'"uncertain"' in payload and dedupe_key not in self.lost:
            self.lost.add(dedupe_key)
            raise PublishOutcomeUnknown("publish: the answer was lost (test bus)")
        return offset


def _factory(options: Mapping[str, Any], key: str) -> Backend:
    backend = create_backend(options, key)
    backend.bus = UncertainBus(backend.history)  # type: ignore[arg-type]
    return backend


@hookimpl
def wirehub_register_buses() -> Mapping[str, Any]:
    return {"uncertain": _factory}
