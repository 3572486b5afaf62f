"""State on NATS: KV bucket ``<P>_state``, one key per room holding ``{"v": version, "d": document}``.

Compare-and-set is ``create`` (version 0) or ``update(last=revision)``, which JetStream applies only
if nobody wrote in between.
"""

from __future__ import annotations

import contextlib
import json
from typing import TYPE_CHECKING, Any

from wirehub import StateConflict
from wirehub.builtins.bus._broker import encode_room

if TYPE_CHECKING:
    from wirehub.builtins.bus.nats_bus import NatsBus


class NatsStateStore:
    def __init__(self, bus: NatsBus) -> None:
        self.bus = bus

    async def get(self, room: str) -> tuple[int, Any] | None:
        found = await self._entry(room)
        return None if found is None else (found[0], found[1])

    async def _entry(self, room: str) -> tuple[int, Any, int] | None:
        bus = self.bus
        bus._check()
        kv, not_found = bus.state_kv, bus.nats.js.errors.KeyNotFoundError

        async def get() -> tuple[int, Any, int] | None:
            try:
                entry = await kv.get(encode_room(room))
            except not_found:
                return None
            if not entry.value:
                return None
            d = json.loads(entry.value)
            return int(d["v"]), d["d"], int(entry.revision)

        return await bus.call("state", get)  # type: ignore[no-any-return]

    async def compare_and_set(self, room: str, expected_version: int, document: Any) -> int:
        bus = self.bus
        bus._check()
        kv, key = bus.state_kv, encode_room(room)
        wrong = bus.nats.js.errors.KeyWrongLastSequenceError
        value = json.dumps({"v": expected_version + 1, "d": document}, separators=(",", ":")).encode()
        if expected_version == 0:
            op: Any = lambda: kv.create(key, value)  # noqa: E731
        else:
            found = await self._entry(room)
            current = 0 if found is None else found[0]
            if found is None or current != expected_version:
                raise StateConflict(f"room {room!r} is at version {current}, not {expected_version}")
            revision = found[2]
            op = lambda: kv.update(key, value, last=revision)  # noqa: E731

        async def write() -> bool:
            try:
                await op()
            except wrong:
                return False
            return True

        if not await bus.call("state", write):
            found = await self._entry(room)
            current = 0 if found is None else found[0]
            raise StateConflict(f"room {room!r} is at version {current}, not {expected_version}")
        return expected_version + 1

    async def delete(self, room: str) -> None:
        bus = self.bus
        bus._check()
        kv, key = bus.state_kv, encode_room(room)
        not_found = bus.nats.js.errors.KeyNotFoundError

        async def delete() -> None:
            with contextlib.suppress(not_found):
                await kv.delete(key)

        await bus.call("state", delete)
