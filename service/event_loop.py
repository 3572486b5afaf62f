"""The event loop a replica runs on (``server.event_loop``): uvloop when it is importable, else asyncio's own.

uvloop (libuv) does the per-callback work of the loop in C: the poll, the ready queue and the timers. The
server's code is the same on both loops (Tornado runs on any asyncio loop); docs/connection-cost.md, "The
event loop", has what uvloop saves per connection.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
from collections.abc import Callable

from wirehub.config import ConfigError, ServerConfig

#: the values of ``server.event_loop``
EVENT_LOOPS: tuple[str, ...] = next(f for f in dataclasses.fields(ServerConfig)
                                    if f.name == "event_loop").metadata["choices"]
#: how to get uvloop (a dependency of wirehub on CPython outside Windows, so normally there)
UVLOOP_HINT = "pip install uvloop"

LoopFactory = Callable[[], asyncio.AbstractEventLoop]


def _uvloop_factory() -> LoopFactory | None:
    try:
        uvloop = importlib.import_module("uvloop")
    except ImportError:
        return None
    factory: LoopFactory = uvloop.new_event_loop
    return factory


def pick_loop(choice: str, key: str = "server.event_loop") -> tuple[str, LoopFactory]:
    """The name (``uvloop`` or ``asyncio``) and factory of the loop that ``choice`` names; ``auto`` is uvloop
    when importable. Raises :class:`ConfigError` naming ``key`` for ``uvloop`` when uvloop cannot be imported."""
    if choice not in EVENT_LOOPS:
        raise ConfigError(key, f"{choice!r} is not one of: {', '.join(EVENT_LOOPS)}")
    if choice == "asyncio":
        return "asyncio", asyncio.new_event_loop
    factory = _uvloop_factory()
    if factory is not None:
        return "uvloop", factory
    if choice == "uvloop":
        raise ConfigError(key, f"uvloop cannot be imported (it runs on CPython on Linux and macOS): {UVLOOP_HINT}, "
                          f"or set {key}: auto or asyncio")
    return "asyncio", asyncio.new_event_loop


def loop_name(loop: asyncio.AbstractEventLoop) -> str:
    """``uvloop`` or ``asyncio``: which loop ``loop`` is (another loop class reports its module)."""
    module = type(loop).__module__
    if module.startswith("uvloop"):
        return "uvloop"
    if module.startswith("asyncio"):
        return "asyncio"
    return module
