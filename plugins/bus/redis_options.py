"""The redis bus's options: one Redis, a Redis Cluster or Redis behind Sentinel; TLS and credentials.

Every option is checked when the config is loaded (errors name the dotted key); a connection that a
wrong CA, certificate or password refuses fails the startup with an error naming the key to fix
(:func:`startup_error`).
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from wirehub import ConfigError, opt, parse_block

MODES = ("standalone", "cluster", "sentinel")


@dataclass(frozen=True)
class ClusterOptions:
    #: seed nodes, "host:port"; the client learns the others (and follows MOVED/ASK) from them
    nodes: tuple[str, ...] = ()


@dataclass(frozen=True)
class SentinelOptions:
    #: the sentinels, "host:port"
    nodes: tuple[str, ...] = ()
    #: the name the sentinels monitor the master under
    master_name: str = ""
    #: credentials of the sentinels themselves (the data nodes use bus.redis.username/password)
    username: str | None = None
    password: str | None = None


@dataclass(frozen=True)
class RedisOptions:
    #: standalone | cluster | sentinel
    mode: str = opt("standalone", choices=MODES)
    #: standalone: redis://[user:password@]host:port/db or rediss:// (TLS); use $env: for secrets
    url: str = "redis://127.0.0.1:6379/0"
    cluster: ClusterOptions = ClusterOptions()
    sentinel: SentinelOptions = SentinelOptions()
    #: overrides the URL's username/password when set (e.g. password: $env:REDIS_PASSWORD)
    username: str | None = None
    password: str | None = None
    #: TLS to every Redis node (and sentinel); a rediss:// URL turns it on too
    tls: bool = False
    #: CA bundle that signs the servers' certificates (default: the system's)
    tls_ca_file: str | None = None
    #: client certificate and key, for servers that require one (tls-auth-clients yes)
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    #: false turns certificate checks off (tests only: anyone on the path can then read the traffic)
    tls_verify: bool = True
    #: every key and channel starts with "<key_prefix>:"; replicas sharing rooms use the same one
    key_prefix: str = "wirehub"
    #: messages kept per room, and their maximum age in seconds
    history_size: int = opt(1000, min=0)
    history_ttl: float = opt(3600.0, min=1)
    #: a dead replica's presence entries are removed within presence_ttl + presence_interval seconds
    presence_ttl: float = opt(15.0, min=0.5)
    #: seconds between a replica's presence heartbeats (one round trip each); 0 = presence_ttl / 3
    presence_interval: float = opt(0.0, min=0)
    #: watchdog: a round trip through Redis every interval; down when one takes longer than timeout
    heartbeat_interval: float = opt(2.0, min=0.05)
    heartbeat_timeout: float = opt(6.0, min=0.05)
    #: longest wait for one command (publish, read, presence, state) before BusUnavailable
    op_timeout: float = opt(5.0, min=0.05)
    connect_timeout: float = opt(5.0, min=0.05)
    #: reconnect backoff doubles from 0.1 s up to this many seconds
    max_backoff: float = opt(5.0, min=0.1)
    #: connections in the command pool (per node in cluster mode; the subscriber connections are extra)
    max_connections: int = opt(64, min=2)

    @property
    def tls_on(self) -> bool:
        return self.tls or (self.mode == "standalone" and self.url.startswith("rediss:"))

    @property
    def failover(self) -> bool:
        """Cluster and sentinel: a replica may become the primary (and may have missed the newest writes)."""
        return self.mode != "standalone"


def _host_port(value: str, key: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(key, f"expected host:port, got {value!r}")
    return host.strip("[]"), int(port)


def parse_options(options: Mapping[str, Any], key: str) -> RedisOptions:
    opts = parse_block(RedisOptions, options, key)
    scheme = urlsplit(opts.url).scheme
    if scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(f"{key}.url", f"expected a redis://, rediss:// or unix:// URL, got scheme {scheme!r}")
    if not opts.key_prefix or any(c in opts.key_prefix for c in " {}"):
        raise ConfigError(f"{key}.key_prefix", f"expected a non-empty prefix without spaces or braces, "
                          f"got {opts.key_prefix!r}")
    if opts.heartbeat_timeout < opts.heartbeat_interval / 2:
        raise ConfigError(f"{key}.heartbeat_timeout", "must be at least half of heartbeat_interval")
    if opts.presence_interval >= opts.presence_ttl:
        raise ConfigError(f"{key}.presence_interval", f"must be less than presence_ttl ({opts.presence_ttl:g}), "
                          f"got {opts.presence_interval:g}")
    if opts.mode == "cluster":
        if not opts.cluster.nodes:
            raise ConfigError(f"{key}.cluster.nodes", "mode cluster needs at least one seed node (host:port)")
        for i, node in enumerate(opts.cluster.nodes):
            _host_port(node, f"{key}.cluster.nodes.{i}")
    if opts.mode == "sentinel":
        if not opts.sentinel.nodes:
            raise ConfigError(f"{key}.sentinel.nodes", "mode sentinel needs at least one sentinel (host:port)")
        for i, node in enumerate(opts.sentinel.nodes):
            _host_port(node, f"{key}.sentinel.nodes.{i}")
        if not opts.sentinel.master_name:
            raise ConfigError(f"{key}.sentinel.master_name", "mode sentinel needs the monitored master's name")
    for name in ("tls_ca_file", "tls_cert_file", "tls_key_file"):
        path = getattr(opts, name)
        if path is not None and not os.path.isfile(path):
            raise ConfigError(f"{key}.{name}", f"no such file: {path}")
    if (opts.tls_cert_file is None) != (opts.tls_key_file is None):
        raise ConfigError(f"{key}.tls_key_file" if opts.tls_key_file is None else f"{key}.tls_cert_file",
                          "tls_cert_file and tls_key_file go together")
    if opts.tls_on and (opts.tls_cert_file or opts.tls_ca_file):
        try:
            tls_context(opts)
        except (ssl.SSLError, OSError) as exc:
            bad = "tls_ca_file" if opts.tls_ca_file and "cert_file" not in str(exc) else "tls_cert_file"
            raise ConfigError(f"{key}.{bad}", f"cannot be loaded: {exc}") from None
    if opts.mode == "standalone" and opts.tls and scheme == "redis":
        raise ConfigError(f"{key}.url", "tls: true with a redis:// URL; use rediss://")
    return opts


def tls_context(opts: RedisOptions) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=opts.tls_ca_file)
    if not opts.tls_verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if opts.tls_cert_file and opts.tls_key_file:
        ctx.load_cert_chain(opts.tls_cert_file, opts.tls_key_file)
    return ctx


def connection_kwargs(opts: RedisOptions) -> dict[str, Any]:
    """redis-py keyword arguments for credentials and TLS (every mode, every node)."""
    kwargs: dict[str, Any] = {}
    if opts.username is not None:
        kwargs["username"] = opts.username
    if opts.password is not None:
        kwargs["password"] = opts.password
    if opts.tls_on:
        kwargs["ssl_ca_certs"] = opts.tls_ca_file
        kwargs["ssl_certfile"] = opts.tls_cert_file
        kwargs["ssl_keyfile"] = opts.tls_key_file
        kwargs["ssl_cert_reqs"] = "required" if opts.tls_verify else "none"
        kwargs["ssl_check_hostname"] = opts.tls_verify
        if opts.mode != "standalone":
            kwargs["ssl"] = True
    return kwargs


def startup_error(exc: BaseException, opts: RedisOptions, key: str) -> str | None:
    """A connection failure that a config key explains, as ``"<key>: what to fix (cause)"``; else None."""
    text = f"{type(exc).__name__}: {exc}"
    seen: BaseException | None = exc
    while seen is not None:
        text += f" / {seen}"
        seen = seen.__cause__ or seen.__context__
    low = text.lower()
    if "certificate verify failed" in low or "certificate_verify_failed" in low:
        return f"{key}.tls_ca_file: the server's TLS certificate was refused ({_short(exc)})"
    if any(s in low for s in ("wrongpass", "invalid password", "invalid username-password",
                              "authentication required", "noauth", "auth <password> called without")):
        who = "sentinel.password" if "no master found" in low else "password"
        return f"{key}.{who}: Redis refused the credentials ({_short(exc)})"
    if "no master found" in low:
        return (f"{key}.sentinel.master_name: no sentinel named a master for {opts.sentinel.master_name!r} "
                f"({_short(exc)})")
    if not opts.tls_on and ("connection reset by peer" in low or "connection closed by server" in low):
        return (f"{key}.tls: the server hung up on the first command; if it serves TLS on this port, use "
                f"rediss:// (standalone) or tls: true ({_short(exc)})")
    if "wrong version number" in low or "record layer failure" in low or ("unexpected eof" in low and opts.tls_on):
        return f"{key}.tls: the server does not speak TLS on this port, or it does and tls is off ({_short(exc)})"
    return None


def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc)[:200]}"
