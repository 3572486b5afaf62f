"""Every ``wirehub_*`` hook, grouped by the lifecycle stage that calls it.

Each spec's docstring is its contract: when it is called, what each argument is, what the return
value (and ``None``) means, and whether it may raise. A hookimpl may be a plain function or an
``async def``; :class:`wirehub.plugins.Hooks` is the one place that calls hooks and awaits results.
Hookimpls may declare any subset of the arguments (pluggy passes only those they name).

docs/plugins.md has one entry per hook here; a test keeps the two in step.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from wirehub.app import Wirehub
    from wirehub.auth import Identity
    from wirehub.config import Config
    from wirehub.plugins import AuthFactory, BusFactory, HandlerFactory, RouteSpec
    from wirehub.session import Session

PROJECT = "wirehub"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# -- 1. registries: called once while the app is assembled (and by check-config and `plugins`) ------


@hookspec
def wirehub_register_buses() -> Mapping[str, BusFactory] | None:
    """Offer bus backends by name, for ``bus.plugin`` in the config.

    Return a mapping ``name -> factory``; ``factory(options, key)`` gets the plugin's own options
    block (a read-only mapping) and its dotted config key, validates the options (raising
    :class:`wirehub.config.ConfigError` naming ``key``), does no I/O, and returns a
    :class:`wirehub.bus.Backend`. Return ``None`` to offer nothing. Two plugins offering one name
    is a startup error. Must not raise otherwise.
    """


@hookspec
def wirehub_register_authenticators() -> Mapping[str, AuthFactory] | None:
    """Offer authenticators by name, for ``auth.plugin`` in the config.

    Return ``name -> factory``; ``factory(options, key)`` validates its options block like a
    bus factory and returns a :class:`wirehub.auth.Authenticator`. ``None`` offers nothing.
    """


@hookspec
def wirehub_register_handlers() -> Mapping[str, HandlerFactory] | None:
    """Offer WebSocket message handlers by name, for ``endpoints[].handler`` in the config.

    Return ``name -> factory``; ``factory(options, key, context)`` gets the endpoint's
    ``options`` block, its dotted key and a :class:`wirehub.handler.HandlerContext` (hub, backend,
    hooks, metrics, config), validates the options, does no I/O and returns a
    :class:`wirehub.handler.Handler`. One handler instance serves every session of its endpoint.
    ``None`` offers nothing.
    """


# -- 2. configuration and startup ------------------------------------------------------------------------


@hookspec
def wirehub_configure(config: Config) -> None:
    """Called once after the config is loaded and validated, before anything starts.

    ``config.extensions`` holds free-form blocks for third-party plugins, by plugin name: read
    and validate yours here, raising :class:`wirehub.config.ConfigError` with its dotted key
    (``extensions.myplugin.limit``). The return value is ignored.
    """


@hookspec
def wirehub_routes(app: Wirehub) -> list[RouteSpec] | None:
    """Add plain HTTP routes on the service's port.

    Called once while the Tornado application is built. Return a list of
    ``(path_pattern, RequestHandlerClass, init_kwargs)`` tuples, or ``None``. Paths must not
    collide with the core's (``/healthz``, ``/readyz``, ``/metrics``, ``/api/*``, endpoint paths);
    a collision is a startup error. Collaborators reach a handler through ``init_kwargs``.
    """


@hookspec
def wirehub_startup(app: Wirehub) -> None:
    """Called once after the bus has started and before the port accepts connections.

    May be async. Raising aborts the startup (the process exits non-zero with the error).
    The return value is ignored.
    """


@hookspec
def wirehub_shutdown(app: Wirehub) -> None:
    """Called once after every session is closed and before the bus is closed.

    May be async. Exceptions are reported (log line + metric) and do not stop other plugins' shutdown.
    """


# -- 3. sessions ---------------------------------------------------------------------------------------------


@hookspec
def wirehub_session_opened(session: Session) -> None:
    """Called after a WebSocket session is accepted and its handler's ``on_open`` ran, before the joins
    of its upgrade URL and its first frame are handled.

    May be async. An exception is reported and closes the session with 1011. The return value is ignored.
    """


@hookspec
def wirehub_session_closed(session: Session, code: int | None, reason: str | None) -> None:
    """Called once when a session ended, after its handler's ``on_close`` and after it left
    every room. ``code`` and ``reason`` are the close code and reason (sent by either side;
    ``None`` when the connection dropped without a close frame).

    May be async. Exceptions are reported; the session is released all the same. The return value is ignored.
    """


# -- 4. policy: called per request -----------------------------------------------------------------------


@hookspec(firstresult=True)
def wirehub_authorize(identity: Identity, action: str, room: str) -> bool | None:
    """May ``identity`` perform ``action`` (``"join"``, ``"publish"``, ``"update"``,
    ``"presence"``, ``"history"``, ``"subscribe"``) on ``room``?

    Return ``True`` to allow, ``False`` to refuse (the client gets ``error forbidden``), or
    ``None`` for no opinion; the first non-``None`` answer wins. The built-in policy runs last
    and allows what the identity's ``rooms`` patterns match. May be async. An exception refuses
    the request with ``error internal`` and is logged.
    """


@hookspec
def wirehub_filter_message(session: Session | None, room: str, data: Any) -> Any:
    """Inspect or rewrite a message before it is published to ``room``.

    ``session`` is the publishing session, or ``None`` for the HTTP publish API. ``data`` is the
    message's JSON value. Return ``None`` to leave it unchanged, a new JSON value to replace it
    (later filters see the replacement), or :data:`wirehub.plugins.DROP` to refuse it: the
    publisher then gets ``error rejected``. May be async. An exception refuses the message with
    ``error internal`` (nothing is published) and is reported.
    """


@hookspec
def wirehub_validate_update(room: str, state: Any, patch: list[Any], identity: Identity) -> list[Any] | None:
    """Game rules: judge a JSON Patch ``patch`` about to be applied to ``room``'s ``state``.

    Called for every update, and again after a compare-and-set conflict with the newer state.
    Return ``None`` to accept the patch as is, or a corrected patch (later rules see it). Raise
    :class:`wirehub.plugins.UpdateRejected` with a client-visible reason to refuse it: the client
    gets ``error rejected``. Must not mutate ``state``. May be async. Any other exception refuses
    the update with ``error internal`` and is reported.
    """
