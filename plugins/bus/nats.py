"""The NATS backend: bus and history on one JetStream stream, presence and state in JetStream KV.

``bus: {plugin: nats, nats: {servers: [nats://...], subject_prefix: wirehub, ...}}``; needs
``pip install 'wirehub[nats]'`` (nats-py, imported only when the backend is built).

Layout (``<p>`` = ``subject_prefix``, ``<r>`` = the room name in base64url, so any room name is one valid
subject token; with ``room_streams: N`` > 1 the rooms are hashed over the streams ``<P>_rooms_<i>of<N>``,
whose subject tokens are ``r<i>of<N>`` and ``rl<i>of<N>``): the stream ``<P>_rooms`` captures ``<p>.r.*.*``; a
room's history messages go to ``<p>.r.<r>.h`` and its messages without history to ``<p>.r.<r>.e``. Both are
stored (``max_msgs_per_subject = history_size``, ``max_age = history_ttl``), so both get a place in the
stream's single sequence, and republished by the stream to ``<p>.rl.<r>.h`` / ``.e``, which the replicas
following the room subscribe to (``<p>.r.~.<id>``: a replica's subscription barriers, not a room).

This module holds the options, their checks and the factory; the parts, one per contract:

- :mod:`~wirehub.builtins.bus.nats_bus`: the connection (shared by the others), one order per room,
  offsets, epoch, failures;
- :mod:`~wirehub.builtins.bus.nats_live`: live room delivery (RePublish following, gap fills, reads
  again after a leader change), a part of the bus class;
- :mod:`~wirehub.builtins.bus.nats_leaders`: the room streams' leaders spread over a cluster's nodes, at
  connect and again after a node returns (the install's check every minute, two in a row before a move);
- :mod:`~wirehub.builtins.bus.nats_history`: history read back from the stream, or from the tail of a
  followed room (:mod:`~wirehub.builtins.bus.nats_tail`: its subscription's newest history messages);
- :mod:`~wirehub.builtins.bus.nats_presence`: buckets ``<P>_members``, ``<P>_nodes``, ``<P>_claims``
  (entries written at join in keys of up to 64 per room, node and loop iteration
  (:mod:`~wirehub.builtins.bus.nats_buckets`), a key rewritten without a leaving one, one heartbeat put
  per replica per ``presence_interval``, a dead replica's entries removed within ``presence_ttl`` +
  ``presence_interval``);
- :mod:`~wirehub.builtins.bus.nats_state`: KV bucket ``<P>_state`` with compare-and-set;
- :mod:`~wirehub.builtins.bus.nats_acks`: presence writes and leader reads, their answers on one inbox
  subscription per connection (no task and timer per write).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from wirehub import Backend, BusFactory, ConfigError, hookimpl, opt, parse_block
from wirehub.builtins.bus.nats_bus import NatsBus
from wirehub.builtins.bus.nats_history import NatsHistory
from wirehub.builtins.bus.nats_presence import NatsPresence
from wirehub.builtins.bus.nats_state import NatsStateStore

__all__ = ["NatsBus", "NatsHistory", "NatsOptions", "NatsStateStore", "create_backend",
           "wirehub_register_buses"]

_SUBJECT_PREFIX = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")


@dataclass(frozen=True)
class NatsOptions:
    #: nats:// or tls:// URLs of the cluster's servers
    servers: tuple[str, ...] = ("nats://127.0.0.1:4222",)
    #: one of: token, user + password, credentials (a .creds file with JWT and NKey seed)
    token: str | None = None
    user: str | None = None
    password: str | None = None
    credentials: str | None = None
    #: TLS: a CA bundle (implies TLS), and a client certificate + key for mutual TLS
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    #: subjects start with "<subject_prefix>."; stream and buckets are named after it
    subject_prefix: str = "wirehub"
    #: streams the rooms are hashed over (by name), each with its own leader: one orders every publish of
    #: the install. Changing it on an install that has streams is a migration (docs/buses.md)
    room_streams: int = opt(1, min=1, max=64)
    #: JetStream storage and replicas of the stream and buckets (replicas > 1 needs a cluster)
    storage: str = opt("file", choices=("file", "memory"))
    replicas: int = opt(1, min=1, max=5)
    history_size: int = opt(1000, min=0)
    history_ttl: float = opt(3600.0, min=1)
    #: a dead replica's presence entries are removed within presence_ttl + presence_interval seconds
    presence_ttl: float = opt(15.0, min=0.5)
    #: seconds between a replica's presence heartbeats (one KV put each); 0 = presence_ttl / 3
    presence_interval: float = opt(0.0, min=0)
    heartbeat_interval: float = opt(2.0, min=0.05)
    heartbeat_timeout: float = opt(6.0, min=0.05)
    #: replicas > 1: the bus is down when no write reached a JetStream quorum for this many seconds (longer
    #: than a leader election after a node's death, ~5 s, so one dead node of three does not count)
    quorum_timeout: float = opt(15.0, min=0.5)
    #: consumers allowed on the stream and on each bucket: rooms need none (live delivery is republished),
    #: and per room with local members (presence). nats-server 2.15+ limits a stream to 1000 by default
    max_consumers: int = opt(1_000_000, min=1000)
    op_timeout: float = opt(5.0, min=0.05)
    connect_timeout: float = opt(5.0, min=0.05)
    max_backoff: float = opt(5.0, min=0.1)


def create_backend(options: Mapping[str, Any], key: str) -> Backend:
    opts = parse_block(NatsOptions, options, key)
    if not opts.servers:
        raise ConfigError(f"{key}.servers", "name at least one server URL")
    for i, server in enumerate(opts.servers):
        if not re.match(r"^(nats|tls|ws|wss)://", server):
            raise ConfigError(f"{key}.servers[{i}]", f"expected a nats:// or tls:// URL, got {server!r}")
    if not _SUBJECT_PREFIX.match(opts.subject_prefix):
        raise ConfigError(f"{key}.subject_prefix", f"expected dot-separated tokens of letters, digits, - and _, "
                          f"got {opts.subject_prefix!r}")
    if opts.user and opts.password is None:
        raise ConfigError(f"{key}.password", "is required with user")
    if opts.tls_key_file and not opts.tls_cert_file:
        raise ConfigError(f"{key}.tls_cert_file", "is required with tls_key_file")
    if opts.heartbeat_timeout < opts.heartbeat_interval / 2:
        raise ConfigError(f"{key}.heartbeat_timeout", "must be at least half of heartbeat_interval")
    if opts.replicas not in (1, 3, 5):
        raise ConfigError(f"{key}.replicas", f"expected 1, 3 or 5 (a JetStream quorum needs an odd count), "
                          f"got {opts.replicas}")
    if opts.presence_interval >= opts.presence_ttl:
        raise ConfigError(f"{key}.presence_interval", f"must be less than presence_ttl ({opts.presence_ttl:g}), "
                          f"got {opts.presence_interval:g}")
    bus = NatsBus(opts, key)
    presence = NatsPresence(bus, opts.presence_ttl)
    bus.presence = presence
    return Backend(bus=bus, history=NatsHistory(bus), presence=presence, state=NatsStateStore(bus), name="nats",
                   extra={"options": opts})


@hookimpl
def wirehub_register_buses() -> Mapping[str, BusFactory]:
    return {"nats": create_backend}
