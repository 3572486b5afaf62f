"""The plugin host: builds the pluggy manager and is the only caller of its hooks.

Registration order (fixed; later registrations are called first, as in pluggy):

1. built-ins, in :data:`BUILTIN_PLUGINS` order;
2. installed packages' entry points of group ``wirehub``;
3. module paths listed in ``plugins.load`` of the config;

skipping any name in ``plugins.block``; then ``check_pending()``, so a hookimpl with a misspelt
hook name fails at startup rather than never being called.

A plugin is a module of hook functions, an object whose methods are hookimpls, or a class of such
methods: an entry point or a ``plugins.load`` item names a module (``pkg.mod``) or an attribute of
one (``pkg.mod:MyPlugin``). A class is instantiated with no arguments once per plugin manager (so
once per server), which is where a plugin keeps what ``wirehub_configure`` parsed: on ``self``,
never in a module global shared by every server of the process.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING, Any, TypeAlias

import pluggy

from wirehub import hookspecs
from wirehub.config import ConfigError, PluginsConfig
from wirehub.failures import PluginFailures
from wirehub.protocol import ErrorCode, ProtocolError

if TYPE_CHECKING:
    from tornado.web import RequestHandler

    from wirehub.app import Wirehub
    from wirehub.auth import Authenticator, Identity
    from wirehub.bus import Backend
    from wirehub.config import Config
    from wirehub.handler import Handler, HandlerContext
    from wirehub.session import Session

log = logging.getLogger("wirehub.plugins")

ENTRY_POINT_GROUP = "wirehub"

BUILTIN_PLUGINS: tuple[str, ...] = (
    "wirehub.builtins.policy",
    "wirehub.builtins.auth.anonymous",
    "wirehub.builtins.auth.jwt",
    "wirehub.builtins.bus.memory",
    "wirehub.builtins.bus.redis",
    "wirehub.builtins.bus.nats",
    "wirehub.builtins.handlers.echo",
    "wirehub.builtins.handlers.chat",
    "wirehub.builtins.handlers.game",
    "wirehub.builtins.handlers.yjs",
)

BusFactory: TypeAlias = "Callable[[Mapping[str, Any], str], Backend]"
AuthFactory: TypeAlias = "Callable[[Mapping[str, Any], str], Authenticator]"
HandlerFactory: TypeAlias = "Callable[[Mapping[str, Any], str, HandlerContext], Handler]"
RouteSpec: TypeAlias = "tuple[str, type[RequestHandler], dict[str, Any]]"


class PluginError(Exception):
    """A plugin could not be loaded or is inconsistent; the message says which and why."""


class PluginFailed(ProtocolError):
    """A plugin hook raised: already logged and counted by :class:`PluginHost`; the client gets
    ``error internal`` (a :class:`ProtocolError`, so op handlers answer it without logging again)."""

    def __init__(self, plugin: str, hook: str) -> None:
        super().__init__(ErrorCode.INTERNAL, "internal error")
        self.plugin, self.hook = plugin, hook


class UpdateRejected(Exception):
    """Raised by ``wirehub_validate_update``: the client gets ``error rejected`` with ``reason``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Drop:
    def __repr__(self) -> str:
        return "DROP"


#: Returned by ``wirehub_filter_message`` to refuse a message.
DROP: Any = _Drop()


@dataclass(frozen=True)
class PluginInfo:
    name: str
    source: str  # "built-in", "entry point <dist> <version>" or "config"
    module: str
    hooks: tuple[str, ...]
    registers: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class Registered:
    factory: Callable[..., Any]
    plugin: str


def _load_module(path: str, what: str) -> ModuleType:
    try:
        return importlib.import_module(path)
    except Exception as exc:
        raise PluginError(f"{what}: cannot import plugin module {path!r}: {type(exc).__name__}: {exc}") from exc


def _load_object(spec: str, what: str) -> object:
    """``pkg.mod`` (the module) or ``pkg.mod:attr.sub`` (an attribute of it), as entry points name objects."""
    path, _, attr = spec.partition(":")
    obj: object = _load_module(path, what)
    for part in filter(None, attr.split(".")):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise PluginError(f"{what}: module {path!r} has no attribute {attr!r}") from None
    return obj


def _instantiate(plugin: object, name: str, source: str) -> object:
    """A class becomes its instance (the plugin's state lives there); a module or an object stays as is."""
    if not inspect.isclass(plugin):
        return plugin
    try:
        return plugin()
    except Exception as exc:
        raise PluginError(f"plugin {name!r} ({source}): {plugin.__qualname__}() raised "
                          f"{type(exc).__name__}: {exc}") from exc


def build_plugin_manager(config: PluginsConfig | None = None) -> PluginHost:
    """Build the plugin manager and its host; see the module docstring for the order."""
    config = config or PluginsConfig()
    blocked = set(config.block)
    pm = PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    sources: dict[str, str] = {}
    classes: dict[type, str] = {}  # a class named twice (entry point and plugins.load) is instantiated once

    def register(plugin: object, name: str, source: str) -> None:
        if name in blocked:
            log.info("plugin %s (%s) is blocked by plugins.block", name, source)
            return
        if pm.is_registered(plugin) or (inspect.isclass(plugin) and plugin in classes):
            first = classes.get(plugin) if inspect.isclass(plugin) else pm.get_name(plugin)  # type: ignore[call-overload]
            log.info("plugin %s (%s) is already registered as %s", name, source, first)
            return
        if pm.has_plugin(name):
            raise PluginError(f"plugin {name!r} ({source}) is already registered ({sources[name]})")
        if inspect.isclass(plugin):
            classes[plugin] = name
            plugin = _instantiate(plugin, name, source)
        try:
            pm.register(plugin, name=name)
        except pluggy.PluginValidationError as exc:
            raise PluginError(f"plugin {name!r} ({source}) is invalid: {exc}") from exc
        sources[name] = source

    for path in BUILTIN_PLUGINS:
        if path not in blocked:
            register(_load_module(path, "built-in"), path, "built-in")
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in blocked or ep.value in blocked:
            continue
        dist = f" {ep.dist.name} {ep.dist.version}" if ep.dist is not None else ""
        try:
            plugin = ep.load()
        except Exception as exc:
            raise PluginError(f"entry point {ep.name} = {ep.value}: cannot load: {type(exc).__name__}: {exc}") from exc
        register(plugin, ep.name, f"entry point{dist}")
    for i, path in enumerate(config.load):
        try:
            plugin = _load_object(path, f"plugins.load[{i}]")
        except PluginError as exc:
            raise ConfigError(f"plugins.load[{i}]", str(exc).split(": ", 1)[1]) from exc
        register(plugin, path, "config")
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        plugin_name = pm.get_name(exc.plugin) or "?"
        raise PluginError(
            f"plugin {plugin_name!r} ({sources.get(plugin_name, '?')}) implements an unknown hook: {exc}. "
            "Every hook name starts with wirehub_; see docs/plugins.md for the list."
        ) from exc
    return PluginHost(pm, sources)


class PluginManager(pluggy.PluginManager):
    """pluggy's, counting the changes to its registered plugins (:attr:`generation`): a plan worked out from
    the implementations of a hook holds while the count is the same (``authorize_now`` per join and publish
    then asks for no copy of the implementations' list). Every change goes through ``register``,
    ``unregister`` (``set_blocked`` unregisters) or ``add_hookspecs`` (a spec added after its implementations)."""

    generation = 0

    def register(self, plugin: object, name: str | None = None) -> str | None:
        try:
            return super().register(plugin, name)
        finally:
            self.generation += 1

    def unregister(self, plugin: object | None = None, name: str | None = None) -> Any | None:
        try:
            return super().unregister(plugin, name)
        finally:
            self.generation += 1

    def add_hookspecs(self, module_or_class: ModuleType | type) -> None:
        try:
            super().add_hookspecs(module_or_class)
        finally:
            self.generation += 1


def _hook_name(hook: str) -> str:
    """The hook's short name for logs and metric labels: ``wirehub_authorize`` -> ``authorize``."""
    return hook.removeprefix("wirehub_")


#: the arguments of ``wirehub_authorize``, in the hookspec's order
_AUTHORIZE_ARGS = ("identity", "action", "room")


def _call(impl: pluggy.HookImpl, kwargs: Mapping[str, Any]) -> Any:
    return impl.function(*[kwargs[name] for name in impl.argnames])


async def _resolve(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


class PluginHost:
    """The plugin manager plus the typed facade over its hooks (the only caller of ``pm.hook``)."""

    def __init__(self, pm: pluggy.PluginManager, sources: Mapping[str, str]) -> None:
        self.pm = pm
        self.sources = dict(sources)
        #: every exception out of a hook is reported here (log line + metric), see service/failures.py
        self.failures = PluginFailures(log)
        #: :meth:`_authorizers`: the implementations it was worked out for, and what it worked out
        self._authorize_impls: list[pluggy.HookImpl] | None = None
        self._authorize_plan: list[tuple[pluggy.HookImpl, Callable[..., Any], bool]] = []
        #: the :attr:`PluginManager.generation` the plan was checked at (None: not yet, or not counted)
        self._authorize_generation: int | None = None
        #: the plan's function when it is one implementation taking ``(identity, action, room)`` in order (the
        #: built-in policy alone) and the plan is checked by generation: called with no loop (None: the loop)
        self._authorize_only: Callable[..., Any] | None = None

    def _failed(self, impl: pluggy.HookImpl, hook: str, exc: BaseException) -> PluginFailed:
        name = _hook_name(hook)
        self.failures.report(impl.plugin_name, name, exc)
        return PluginFailed(impl.plugin_name, name)

    async def _await(self, impl: pluggy.HookImpl, hook: str, kwargs: Mapping[str, Any]) -> Any:
        """One hookimpl's result; any exception is reported and becomes :class:`PluginFailed`."""
        try:
            return await _resolve(_call(impl, kwargs))
        except Exception as exc:
            raise self._failed(impl, hook, exc) from exc

    def _impls(self, hook: str) -> list[pluggy.HookImpl]:
        # pluggy calls the last registered (and tryfirst) implementation first
        return list(reversed(getattr(self.pm.hook, hook).get_hookimpls()))

    def _sync_results(self, hook: str, **kwargs: Any) -> list[tuple[str, Any]]:
        out = []
        for impl in self._impls(hook):
            try:
                result = _call(impl, kwargs)
            except (ConfigError, PluginError):
                raise
            except Exception as exc:
                self._failed(impl, hook, exc)
                raise PluginError(
                    f"plugin {impl.plugin_name!r}: {hook} raised {type(exc).__name__}: {exc}"
                ) from exc
            if inspect.isawaitable(result):
                raise PluginError(f"plugin {impl.plugin_name!r}: {hook} must not be async")
            if result is not None:
                out.append((impl.plugin_name, result))
        return out

    # -- registries ---------------------------------------------------------------------------------

    def _registry(self, hook: str) -> dict[str, Registered]:
        registry: dict[str, Registered] = {}
        for plugin_name, mapping in reversed(self._sync_results(hook)):
            if not isinstance(mapping, Mapping):
                raise PluginError(f"plugin {plugin_name!r}: {hook} must return a mapping of name -> factory")
            for name, factory in mapping.items():
                if name in registry:
                    raise PluginError(
                        f"{hook}: name {name!r} is registered by both {registry[name].plugin!r} and {plugin_name!r}"
                    )
                registry[name] = Registered(factory, plugin_name)
        return registry

    def buses(self) -> dict[str, Registered]:
        return self._registry("wirehub_register_buses")

    def authenticators(self) -> dict[str, Registered]:
        return self._registry("wirehub_register_authenticators")

    def handlers(self) -> dict[str, Registered]:
        return self._registry("wirehub_register_handlers")

    @staticmethod
    def pick(registry: Mapping[str, Registered], name: str, key: str, kind: str) -> Callable[..., Any]:
        """The factory registered as ``name``, or a ConfigError listing the valid names."""
        if name not in registry:
            valid = ", ".join(sorted(registry)) or "(none)"
            raise ConfigError(key, f"{name!r} is not a registered {kind}; choose one of: {valid}")
        return registry[name].factory

    def describe(self) -> list[PluginInfo]:
        """Every registered plugin, its source, hooks and registered names (for ``wirehub plugins``)."""
        registers: dict[str, dict[str, list[str]]] = {}
        for kind, hook in (("buses", "buses"), ("authenticators", "authenticators"), ("handlers", "handlers")):
            for name, reg in getattr(self, hook)().items():
                registers.setdefault(reg.plugin, {}).setdefault(kind, []).append(name)
        infos = []
        for name, plugin in self.pm.list_name_plugin():
            if plugin is None:
                continue
            hooks = tuple(sorted(caller.name for caller in self.pm.get_hookcallers(plugin) or []))
            module = getattr(plugin, "__name__", type(plugin).__module__)
            regs = {k: tuple(sorted(v)) for k, v in registers.get(name, {}).items()}
            infos.append(PluginInfo(name, self.sources.get(name, "?"), module, hooks, regs))
        return infos

    # -- lifecycle ------------------------------------------------------------------------------------

    def configure(self, config: Config) -> None:
        self._sync_results("wirehub_configure", config=config)

    def routes(self, app: Wirehub) -> list[tuple[str, RouteSpec]]:
        out: list[tuple[str, RouteSpec]] = []
        for plugin_name, specs in self._sync_results("wirehub_routes", app=app):
            for spec in specs:
                if not (isinstance(spec, tuple) and len(spec) == 3):
                    raise PluginError(f"plugin {plugin_name!r}: wirehub_routes items must be (path, handler, kwargs)")
                out.append((plugin_name, spec))
        return out

    async def startup(self, app: Wirehub) -> None:
        """Raises PluginError naming the plugin (the startup is aborted)."""
        for impl in self._impls("wirehub_startup"):
            try:
                await self._await(impl, "wirehub_startup", {"app": app})
            except PluginFailed as exc:
                cause = exc.__cause__
                raise PluginError(
                    f"plugin {impl.plugin_name!r}: wirehub_startup raised {type(cause).__name__}: {cause}"
                ) from cause

    async def _notify(self, hook: str, **kwargs: Any) -> bool:
        """Every implementation, even after one failed; False when any raised (reported)."""
        ok = True
        for impl in self._impls(hook):
            try:
                await self._await(impl, hook, kwargs)
            except PluginFailed:
                ok = False
        return ok

    async def shutdown(self, app: Wirehub) -> None:
        await self._notify("wirehub_shutdown", app=app)

    async def session_opened(self, session: Session) -> bool:
        """False when a plugin raised: the caller closes the session with 1011."""
        return await self._notify("wirehub_session_opened", session=session)

    async def session_closed(self, session: Session, code: int | None, reason: str | None) -> None:
        await self._notify("wirehub_session_closed", session=session, code=code, reason=reason)

    # -- policy ----------------------------------------------------------------------------------------

    async def authorize(self, identity: Identity, action: str, room: str) -> bool:
        """The first non-None answer of ``wirehub_authorize``; False when nobody answers.
        Raises PluginFailed (as every per-request hook here) when an implementation raised."""
        answer = self.authorize_now(identity, action, room)
        return answer if answer is True or answer is False else await answer

    def authorize_now(self, identity: Identity, action: str, room: str) -> bool | Awaitable[bool]:
        """:meth:`authorize` without a coroutine while the implementations answer synchronously (the
        built-in policy does): the answer, or an awaitable of it from the first implementation that
        returned an awaitable on. Called per join and publish, so it skips the per-call wrappers."""
        only = self._authorize_only
        if only is not None and self.pm.generation == self._authorize_generation:  # type: ignore[attr-defined]
            try:
                answer = only(identity, action, room)
            except Exception as exc:
                raise self._failed(self._authorize_plan[0][0], "wirehub_authorize", exc) from exc
            if answer is True or answer is False:
                return answer
            if answer is None:  # nobody else to ask
                return False
            if inspect.isawaitable(answer):
                return self._authorize_rest(self._authorize_plan[0][0], answer, [],
                                            {"identity": identity, "action": action, "room": room})
            return bool(answer)
        plan = self._authorizers()
        for i, (impl, function, in_order) in enumerate(plan):
            try:
                answer = function(identity, action, room) if in_order else _call(
                    impl, {"identity": identity, "action": action, "room": room})
            except Exception as exc:
                raise self._failed(impl, "wirehub_authorize", exc) from exc
            if answer is None:
                continue
            if answer is True or answer is False:
                return answer
            if inspect.isawaitable(answer):
                return self._authorize_rest(impl, answer, [p[0] for p in plan[i + 1:]],
                                            {"identity": identity, "action": action, "room": room})
            return bool(answer)
        return False

    def _authorizers(self) -> list[tuple[pluggy.HookImpl, Callable[..., Any], bool]]:
        """The ``wirehub_authorize`` implementations in call order, each with its function and whether it
        takes ``(identity, action, room)`` in that order (then it is called without a kwargs dict);
        worked out again only when the registered implementations change (a plugin (un)registered)."""
        generation = getattr(self.pm, "generation", None)  # None: another PluginManager, compared by its list
        if generation is not None and generation == self._authorize_generation:
            return self._authorize_plan
        impls = self.pm.hook.wirehub_authorize.get_hookimpls()
        if impls != self._authorize_impls:
            self._authorize_impls = impls
            self._authorize_plan = [(impl, impl.function, tuple(impl.argnames) == _AUTHORIZE_ARGS)
                                    for impl in reversed(impls)]
        self._authorize_generation = generation
        plan = self._authorize_plan
        self._authorize_only = plan[0][1] if generation is not None and len(plan) == 1 and plan[0][2] else None
        return plan

    async def _authorize_rest(self, impl: pluggy.HookImpl, pending: Awaitable[Any], rest: list[pluggy.HookImpl],
                              kwargs: Mapping[str, Any]) -> bool:
        """:meth:`authorize_now` from an implementation that answered with an awaitable on."""
        try:
            answer = await pending
        except Exception as exc:
            raise self._failed(impl, "wirehub_authorize", exc) from exc
        if answer is not None:
            return bool(answer)
        for impl in rest:
            answer = await self._await(impl, "wirehub_authorize", kwargs)
            if answer is not None:
                return bool(answer)
        return False

    async def filter_message(self, session: Session | None, room: str, data: Any) -> Any:
        """``data`` after every ``wirehub_filter_message`` in turn, or :data:`DROP`."""
        for impl in self._impls("wirehub_filter_message"):
            kwargs = {"session": session, "room": room, "data": data}
            result = await self._await(impl, "wirehub_filter_message", kwargs)
            if result is DROP:
                return DROP
            if result is not None:
                data = result
        return data

    async def validate_update(self, room: str, state: Any, patch: list[Any], identity: Identity) -> list[Any]:
        """``patch`` after every ``wirehub_validate_update``; raises UpdateRejected."""
        for impl in self._impls("wirehub_validate_update"):
            kwargs = {"room": room, "state": state, "patch": patch, "identity": identity}
            try:
                result = await _resolve(_call(impl, kwargs))
            except UpdateRejected:
                raise
            except Exception as exc:
                raise self._failed(impl, "wirehub_validate_update", exc) from exc
            if result is not None:
                patch = result
        return patch
