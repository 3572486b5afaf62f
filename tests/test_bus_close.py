"""close() returns even when the bus's upkeep swallowed the cancellation (Python 3.11's ``asyncio.wait_for``
does when the awaited operation finishes at the same moment): before, the upkeep loop ran on and close()
waited for it forever (seen as teardowns that hung in the NATS suites, on main too)."""

from __future__ import annotations

import asyncio
import uuid

from tests.helpers import bus_options
from wirehub.brokers import BrokerProcess
from wirehub.builtins.bus.nats import NatsBus, create_backend
from wirehub.testing import Recorder


async def test_close_returns_when_the_upkeep_swallows_its_cancellation(nats_server: BrokerProcess) -> None:
    backend = create_backend(bus_options("nats", nats_server, f"cl{uuid.uuid4().hex[:6]}", presence_interval=0.05),
                             "bus.nats")
    bus = backend.bus
    assert isinstance(bus, NatsBus)
    swallowed: list[int] = []
    upkeep = bus._refresh

    async def stubborn() -> None:
        try:
            await asyncio.sleep(0.5)
        except asyncio.CancelledError:
            if not swallowed:
                swallowed.append(1)  # what wait_for does when its operation finished as it was cancelled
                return
            raise
        await upkeep()

    bus._refresh = stubborn  # type: ignore[method-assign]
    await bus.start(Recorder())
    await asyncio.sleep(0.2)  # the upkeep is in its sleep
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    closing = asyncio.ensure_future(bus.close())
    done, _ = await asyncio.wait([closing], timeout=5)
    assert done, "close() did not return"
    assert loop.time() - t0 < 3  # the second cancellation stops it (cancel_and_wait)
    assert swallowed == [1]
