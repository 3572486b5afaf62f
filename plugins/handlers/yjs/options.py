"""The yjs endpoint's options (docs/collaboration.md, "Options"; docs/configuration.md)."""

from __future__ import annotations

from dataclasses import dataclass

from wirehub import opt

#: chat's room names plus "/" (``team/notes``)
DEFAULT_DOCUMENT_PATTERN = r"^[A-Za-z0-9_\-.:@/]{1,128}$"


@dataclass(frozen=True)
class YjsOptions:
    #: prefix of a document's bus room and state key (two yjs endpoints with different
    #: namespaces have separate documents)
    namespace: str = "yjs"
    #: regular expression the document name (the URL path after the endpoint) must match in full
    document_pattern: str = DEFAULT_DOCUMENT_PATTERN
    #: largest document (its encoded Yjs state); an update taking it over -> close 4413
    max_document_bytes: int = opt(524288, min=1024)
    #: messages (updates and awareness) per second per connection, burst twice as many; 0 = unlimited
    messages_per_second: float = opt(100.0, min=0)
    #: seconds a document stays in memory after its last local member left; 0 = unloaded at once
    idle_unload: float = opt(30.0, min=0)
    #: updates in history past the snapshot that make the replica that published the last one compact
    compact_every: int = opt(100, min=1)
    #: seconds after which a replica holding a document with uncompacted updates compacts it anyway
    compact_interval: float = opt(60.0, min=0.1)
    #: seconds until the awareness states of a replica that stopped sending heartbeats are removed
    awareness_ttl: float = opt(30.0, min=0.3)
    #: documents loaded at once on one replica; a connection to one more -> close 1013
    max_documents: int = opt(10000, min=1)
    #: compare-and-set attempts of one compaction before it gives up (retried at the next trigger)
    max_retries: int = opt(20, min=1)
    #: per-endpoint override of server.max_message_size: the largest update a client may send (read by the core)
    max_message_size: int | None = opt(None, min=125)
