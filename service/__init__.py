"""wirehub: a real-time WebSocket service extended with pluggy plugins.

``import wirehub`` is the whole public surface for plugin authors: the hook marker, the contracts a
plugin implements or receives, the errors and codes it answers with, the config helpers, and the
building blocks the built-in handlers are made of. ``wirehub.testing`` (a pytest plugin, loaded
through the ``pytest11`` entry point) has the fixtures and contract suites. Everything else in the
package is internal and may change between releases.

The repository keeps its folders: ``service/`` is this package, ``plugins/`` is ``wirehub.builtins``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__version__ = "0.1.0"

# Submodules load in dependency order; none of them imports from this module, so this is the only
# place that sees them all.
from wirehub import inbound
from wirehub.app import Wirehub
from wirehub.auth import READ_ACTIONS, Authenticator, AuthError, Identity
from wirehub.bus import (
    Backend,
    Bus,
    BusHandler,
    BusUnavailable,
    DepartedListener,
    History,
    HistoryPage,
    Presence,
    PresenceCount,
    PresenceEntry,
    PresenceMember,
    PresencePage,
    PublishOutcomeUnknown,
    StateConflict,
    StateStore,
    ordered_handoff,
)
from wirehub.config import Config, ConfigError, opt, parse_block
from wirehub.handler import Handler, HandlerContext, Op, OpHandler, require_str
from wirehub.hookspecs import hookimpl
from wirehub.hub import Hub, split_envelope
from wirehub.inbound import JsonRejected, value_depth
from wirehub.plugins import (
    DROP,
    AuthFactory,
    BusFactory,
    HandlerFactory,
    PluginError,
    PluginFailed,
    UpdateRejected,
)
from wirehub.protocol import CloseCode, ErrorCode, ProtocolError, dumps, encode
from wirehub.rooms import (
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_ROOM_PATTERN,
    Outgoing,
    Recovery,
    RoomLimit,
    RoomRules,
    TokenBucket,
    fit,
    history_frame,
    parse_idempotency_key,
    parse_since,
    prepare_message,
    publish_message,
    publish_prepared,
    recover,
    start_publish,
    stored_frames,
)
from wirehub.session import OutFrame, Session


def memory_backend(options: Mapping[str, Any] | None = None, key: str = "bus.memory") -> Backend:
    """The built-in in-process backend (``bus.plugin: memory``) from its options block, validated under
    ``key``: for a bus plugin that wraps it (docs/plugin-tutorial.md) or a test that needs a backend."""
    from wirehub.builtins.bus.memory import create_backend  # lazily: the built-ins import this module

    return create_backend(options or {}, key)


__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "DEFAULT_ROOM_PATTERN",
    "DROP",
    "READ_ACTIONS",
    "AuthError",
    "AuthFactory",
    "Authenticator",
    "Backend",
    "Bus",
    "BusFactory",
    "BusHandler",
    "BusUnavailable",
    "CloseCode",
    "Config",
    "ConfigError",
    "DepartedListener",
    "ErrorCode",
    "Handler",
    "HandlerContext",
    "HandlerFactory",
    "History",
    "HistoryPage",
    "Hub",
    "Identity",
    "JsonRejected",
    "Op",
    "OpHandler",
    "OutFrame",
    "Outgoing",
    "PluginError",
    "PluginFailed",
    "Presence",
    "PresenceCount",
    "PresenceEntry",
    "PresenceMember",
    "PresencePage",
    "ProtocolError",
    "PublishOutcomeUnknown",
    "Recovery",
    "RoomLimit",
    "RoomRules",
    "Session",
    "StateConflict",
    "StateStore",
    "TokenBucket",
    "UpdateRejected",
    "Wirehub",
    "__version__",
    "dumps",
    "encode",
    "fit",
    "history_frame",
    "hookimpl",
    "inbound",
    "memory_backend",
    "opt",
    "ordered_handoff",
    "parse_block",
    "parse_idempotency_key",
    "parse_since",
    "prepare_message",
    "publish_message",
    "publish_prepared",
    "recover",
    "require_str",
    "split_envelope",
    "start_publish",
    "stored_frames",
    "value_depth",
]
