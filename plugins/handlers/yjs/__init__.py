"""The yjs handler plugin: a y-websocket-compatible endpoint for collaborative editing.

An unmodified ``y-websocket`` ``WebsocketProvider`` connects to a prefix endpoint (``path:
/ws/yjs/*``) and edits a Yjs document together with everyone on that document, whichever replica
they reach. The CRDT work is pycrdt's (the ``yjs`` extra). The modules:

- ``handler.py``: :class:`YjsHandler`, the connection (name, policy, limits, message dispatch)
  and the maintenance loop (heartbeats, awareness expiry, compaction, idle unload);
- ``document.py``: one document on this replica (load, updates across replicas, members);
- ``store.py``: snapshots in the state store and compaction with compare-and-set;
- ``awareness.py``: awareness states across replicas, with their replica's TTL;
- ``wire.py``: the y-websocket message format and the bus frames;
- ``options.py``: :class:`YjsOptions`.

docs/collaboration.md is the user's guide.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from wirehub import ConfigError, Handler, HandlerContext, HandlerFactory, hookimpl, parse_block

if TYPE_CHECKING:
    from wirehub import Wirehub

__all__ = ["wirehub_register_handlers", "wirehub_shutdown"]


def _factory(options: Mapping[str, Any], key: str, context: HandlerContext) -> Handler:
    from wirehub.builtins.handlers.yjs.options import YjsOptions

    opts = parse_block(YjsOptions, options, key)
    try:
        re.compile(opts.document_pattern)
    except re.error as exc:
        raise ConfigError(f"{key}.document_pattern", f"not a regular expression: {exc}") from None
    if not re.fullmatch(r"[A-Za-z0-9_\-]+", opts.namespace):
        raise ConfigError(f"{key}.namespace", f"expected letters, digits, '_' or '-', got {opts.namespace!r}")
    path = context.endpoint.path
    if not path.endswith("/*"):
        raise ConfigError(key.removesuffix(".options") + ".path",
                          f"the yjs handler needs a prefix endpoint such as /ws/yjs/*, got {path!r}")
    cap = context.config.server.send_queue_bytes
    if opts.max_document_bytes * 2 > cap:
        raise ConfigError(f"{key}.max_document_bytes", f"{opts.max_document_bytes} must be at most half of "
                          f"server.send_queue_bytes ({cap}), so a new client's first sync fits in its send queue")
    history_size = context.config.bus.options.get("history_size")
    if isinstance(history_size, int) and history_size and opts.compact_every * 2 > history_size:
        raise ConfigError(f"{key}.compact_every", f"{opts.compact_every} must be at most half of "
                          f"{context.config.bus.key}.history_size ({history_size}), so the log is compacted "
                          "before the bus trims it")
    try:
        import pycrdt  # noqa: F401
    except ImportError:
        raise ConfigError(f"{key.removesuffix('.options')}.handler",
                          "the yjs handler needs pycrdt: pip install 'wirehub[yjs]'") from None
    from wirehub.builtins.handlers.yjs.handler import YjsHandler

    return YjsHandler(opts, context)


@hookimpl
def wirehub_register_handlers() -> Mapping[str, HandlerFactory]:
    return {"yjs": _factory}


@hookimpl
async def wirehub_shutdown(app: Wirehub) -> None:
    from wirehub.builtins.handlers.yjs.handler import YjsHandler

    for handler in app.handlers.values():
        if isinstance(handler, YjsHandler):
            await handler.close()
