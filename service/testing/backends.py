"""Started backends from a bus config block, for the contract suites: :class:`BackendFactory` and the
bus factories wirehub finds (:func:`find_buses`). Import them from :mod:`wirehub.testing`, whose
``bus_backends`` fixture makes one factory per test from the test's ``bus_config`` fixture."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any

from wirehub.bus import Backend
from wirehub.config import config_from_dict
from wirehub.plugins import PluginHost, Registered, build_plugin_manager
from wirehub.testing.contracts import BackendPair, Recorder

__all__ = ["IN_PROCESS_BUSES", "BackendFactory", "BusConfig", "BusRegistry", "find_buses"]

#: a config's ``bus:`` block, as in YAML: ``{"plugin": "redis", "redis": {"url": ..., "key_prefix": ...}}``
BusConfig = Mapping[str, Any]
#: bus name -> its factory ``(options, key) -> Backend`` (what ``wirehub_register_buses`` returns)
BusRegistry = Mapping[str, Callable[[Mapping[str, Any], str], Backend]]

#: buses whose state lives in the backend object: two replicas of one process are one backend
IN_PROCESS_BUSES = frozenset({"memory"})


def find_buses(plugins: Mapping[str, Any] | None = None) -> BusRegistry:
    """The bus factories of the built-in plugins, the installed entry points and ``plugins`` (a config's
    ``plugins:`` block, e.g. ``{"load": ["my_pkg.bus"]}``), as the server finds them."""
    config = config_from_dict({"plugins": dict(plugins or {})}, source="<test>")
    host: PluginHost = build_plugin_manager(config.plugins)
    return {name: registered.factory for name, registered in host.buses().items()}


class BackendFactory:
    """Started backends ("replicas") of one bus config block, each with a :class:`Recorder` of its own.

    Each :meth:`replica` is a new backend (its own connections) on the block's broker and key prefix, so
    replicas of one factory see each other's messages and presence; keyword options override the
    block's. :meth:`pair` is the ``backend_pair`` of the contract suites: two replicas, or, for a bus of
    :data:`IN_PROCESS_BUSES` (``one_process``), one backend twice. :meth:`close` (or ``async with``)
    closes every backend made. An unknown plugin or a block that is not one raises ConfigError, naming
    the key and, for a plugin, the valid names."""

    def __init__(self, bus: BusConfig, *, registry: BusRegistry | None = None,
                 one_process: bool | None = None) -> None:
        choice = config_from_dict({"bus": dict(bus)}, source="<test>").bus
        registry = find_buses() if registry is None else registry
        self.factory = PluginHost.pick({name: Registered(f, name) for name, f in registry.items()},
                                       choice.plugin, "bus.plugin", "bus")
        self.plugin, self.key, self.options = choice.plugin, choice.key, dict(choice.options)
        self.one_process = choice.plugin in IN_PROCESS_BUSES if one_process is None else one_process
        self.made: list[Backend] = []

    async def replica(self, **options: Any) -> tuple[Backend, Recorder]:
        """A new started backend with the block's options and ``options`` on top, and its recorder."""
        backend = self.factory({**self.options, **options}, self.key)
        recorder = Recorder()
        await backend.bus.start(recorder)
        self.made.append(backend)  # after start: a failed start has nothing to close
        return backend, recorder

    async def pair(self) -> BackendPair:
        """Two replicas on one broker; one backend twice for an in-process bus."""
        first = await self.replica()
        return (first, first) if self.one_process else (first, await self.replica())

    async def close(self) -> None:
        made, self.made = self.made, []
        for backend in made:
            await backend.bus.close()

    async def __aenter__(self) -> BackendFactory:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

