"""YAML config -> frozen dataclasses.

One loader serves the core and every plugin: a plugin describes its own block as a frozen dataclass
and calls :func:`parse_block`, so its errors name the dotted key the same way the core's do
(``auth.jwt.leeway: expected a number, got 'soon'``). Defaults live in the dataclasses, once.

String values may be references, resolved at load:

- ``$env:NAME``   the environment variable NAME; an error if it is unset
- ``$env?:NAME``  the same, but unset means "no value" (``null``; dropped from lists)
- ``$file:PATH`` / ``$file?:PATH``  a file's content, trailing newline stripped (Kubernetes secrets)
- ``$$...``       a literal string starting with ``$``

A reference's string is coerced to the type of the key it fills: ``port: $env:PORT`` with
``PORT=8081`` is the integer 8081; booleans take ``true/false/yes/no/1/0`` (any case); a list key
takes a comma-separated string (items stripped, empty items dropped). A literal YAML value is not
coerced (``port: "8081"`` stays an error). Command-line and environment overrides of ``serve``
(:func:`load_config`'s ``overrides``) are coerced the same way.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, get_args, get_origin

import yaml

T = TypeVar("T")

ENV_CONFIG = "WIREHUB_CONFIG"
_MISSING_OPTIONAL = object()


class ConfigError(Exception):
    """A config value that is wrong; ``key`` is the dotted path to it (``""`` for the whole file)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}" if key else message)
        self.key = key
        self.message = message


class Reference(str):
    """A string that came from outside the YAML text (``$env:``/``$file:`` or a command-line or environment
    override): coerced to the type of its key, and ``origin`` (``$env:PORT``, ``--port``) is named in errors."""

    origin: str

    def __new__(cls, value: str, origin: str) -> Reference:
        self = super().__new__(cls, value)
        self.origin = origin
        return self


_TRUE, _FALSE = frozenset({"true", "yes", "1"}), frozenset({"false", "no", "0"})
_INT = re.compile(r"[+-]?[0-9]+")


def _from_reference(tp: Any, value: Reference, key: str) -> Any:
    """``value`` as ``tp`` (bool, int, float or a tuple of them); ConfigError naming ``key`` if it does not parse."""
    text = value.strip()
    if tp is bool:
        if text.lower() in _TRUE | _FALSE:
            return text.lower() in _TRUE
        raise ConfigError(key, f"expected true or false (or yes/no, 1/0), got {str(value)!r}")
    if tp is int:
        if _INT.fullmatch(text):
            return int(text)
        raise ConfigError(key, f"expected an integer, got {str(value)!r}")
    if tp is float:
        try:
            number = float(text)
        except ValueError:
            number = math.nan
        if math.isfinite(number):
            return number
        raise ConfigError(key, f"expected a number, got {str(value)!r}")
    # a list key: comma-separated items, each coerced as a reference of the item type
    return [Reference(item.strip(), value.origin) for item in value.split(",") if item.strip()]


def _join(key: str, name: str | int) -> str:
    if isinstance(name, int):
        return f"{key}[{name}]"
    return f"{key}.{name}" if key else name


def resolve_references(value: Any, key: str = "") -> Any:
    """Replace ``$env:``/``$file:`` references in a YAML tree; see the module docstring."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            resolved = resolve_references(v, _join(key, str(k)))
            out[k] = None if resolved is _MISSING_OPTIONAL else resolved
        return out
    if isinstance(value, Reference):  # an override: already outside the YAML text, never resolved again
        return value
    if isinstance(value, list):
        items = [resolve_references(v, _join(key, i)) for i, v in enumerate(value)]
        return [v for v in items if v is not _MISSING_OPTIONAL]
    if not isinstance(value, str) or not value.startswith("$"):
        return value
    if value.startswith("$$"):
        return value[1:]
    kind, sep, ref = value[1:].partition(":")
    if not sep or kind not in ("env", "env?", "file", "file?"):
        return value
    optional = kind.endswith("?")
    if not ref:
        raise ConfigError(key, f"reference {value!r} names nothing")
    if kind.startswith("env"):
        if ref in os.environ:
            return Reference(os.environ[ref], value)
        if optional:
            return _MISSING_OPTIONAL
        raise ConfigError(key, f"environment variable {ref} is not set (referenced as {value!r})")
    try:
        return Reference(Path(ref).read_text().rstrip("\n"), value)
    except OSError as exc:
        if optional:
            return _MISSING_OPTIONAL
        raise ConfigError(key, f"cannot read {ref} (referenced as {value!r}): {exc.strerror}") from None


def _type_name(tp: Any) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    if tp in names:
        return names[tp]
    origin = get_origin(tp)
    if origin is tuple:
        return f"a list of {_type_name(get_args(tp)[0])[2:]}s"
    if origin in (Mapping, dict) or tp is Mapping:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return str(tp)


def _with_origin(exc: ConfigError, value: Any, key: str) -> ConfigError:
    """``exc`` naming where ``value`` came from, when it is a :class:`Reference` and the error is about it."""
    if not isinstance(value, Reference) or exc.key != key:
        return exc
    suffix = f" (from {value.origin})"
    return exc if exc.message.endswith(suffix) else ConfigError(key, exc.message + suffix)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    try:
        return _coerce_value(tp, value, key)
    except ConfigError as exc:
        raise _with_origin(exc, value, key) from None


def _coerce_value(tp: Any, value: Any, key: str) -> Any:
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None:
            return None
        last: ConfigError | None = None
        for arg in args:
            try:
                return _coerce(arg, value, key)
            except ConfigError as exc:
                last = exc
        assert last is not None
        raise last
    if tp is Any:
        return value
    if isinstance(value, Reference) and (tp in (bool, int, float) or origin is tuple):
        value = _from_reference(tp, value, key)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return parse_block(tp, value, key)
    if origin is tuple:
        if not isinstance(value, list):
            raise ConfigError(key, f"expected {_type_name(tp)}, got {value!r}")
        item_tp = get_args(tp)[0]
        return tuple(_coerce(item_tp, v, _join(key, i)) for i, v in enumerate(value))
    if origin in (Mapping, dict) or tp is Mapping:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping, got {value!r}")
        return types.MappingProxyType(dict(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(key, f"expected a number, got {value!r}")
        if not math.isfinite(value):  # YAML's .nan/.inf: a comparison with NaN is always false, so no bound holds
            raise ConfigError(key, f"expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"expected a string, got {value!r}")
        return str(value)  # a plain str, also for a Reference
    raise TypeError(f"config type {tp!r} at {key} is not supported")


def _check_constraints(f: dataclasses.Field[Any], value: Any, key: str) -> None:
    meta = f.metadata
    if value is None:
        return
    if "choices" in meta and value not in meta["choices"]:
        choices = ", ".join(map(str, meta["choices"]))
        raise ConfigError(key, f"{value!r} is not one of: {choices}")
    if "min" in meta and value < meta["min"]:
        raise ConfigError(key, f"must be at least {meta['min']}, got {value!r}")
    if "max" in meta and value > meta["max"]:
        raise ConfigError(key, f"must be at most {meta['max']}, got {value!r}")


def parse_block(cls: type[T], data: Any, key: str) -> T:
    """Build the frozen dataclass ``cls`` from a YAML mapping, naming ``key`` in every error.

    Unknown keys are errors (a typo must not silently become a default). Field metadata may carry
    ``choices``, ``min`` and ``max``; a field without a default is required. ``None`` stands for
    an absent or empty block.
    """
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(key, f"expected a mapping, got {data!r}")
    assert dataclasses.is_dataclass(cls)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(map(str, data)) - set(fields))
    if unknown:
        raise ConfigError(_join(key, unknown[0]), f"unknown key; valid keys are: {', '.join(sorted(fields))}")
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        sub = _join(key, name)
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(sub, "is required")
            continue
        raw = data[name]
        value = _coerce(hints[name], raw, sub)
        try:
            _check_constraints(f, value, sub)
        except ConfigError as exc:
            raise _with_origin(exc, raw, sub) from None
        kwargs[name] = value
    return cls(**kwargs)


def opt(default: Any, **meta: Any) -> Any:
    """A dataclass field with a default and validation metadata (``choices``, ``min``, ``max``)."""
    if isinstance(default, list | dict | tuple) and not isinstance(default, tuple):
        raise TypeError("use a tuple or MappingProxyType default")
    return field(default=default, metadata=meta)


# --------------------------------------------------------------------------------------- the core's blocks

#: the smallest ``server.admission_lag`` other than 0: below it the loop's jitter alone would keep deferring
MIN_ADMISSION_LAG = 0.005


@dataclass(frozen=True)
class ServerConfig:
    #: loopback unless a config says otherwise: a laptop run is not reachable from the LAN;
    #: the container and Kubernetes configs bind 0.0.0.0 explicitly
    host: str = "127.0.0.1"
    port: int = opt(8080, min=0, max=65535)
    #: listen backlog; Tornado's default of 128 drops handshakes in a connection burst
    backlog: int = opt(1024, min=1)
    #: replica name in welcome frames and presence; default: $POD_NAME, else the hostname
    node_id: str | None = None
    #: exact Origin values allowed to upgrade; empty = same origin only; "*" = any
    allowed_origins: tuple[str, ...] = ()
    #: largest accepted client frame in bytes; larger -> close 1009
    max_message_size: int = opt(65536, min=125)
    #: seconds between server pings (0 = off); 25 s as Socket.IO's pingInterval and Centrifugo
    ping_interval: float = opt(25.0, min=0)
    #: seconds after a ping with no frame back (a pong or any other) before the drop; at most ping_interval
    ping_timeout: float = opt(15.0, min=0)
    #: bytes queued to one client before it is closed with 4008 (slow consumer)
    send_queue_bytes: int = opt(1048576, min=1024)
    #: trust X-Forwarded-For / X-Real-Ip (behind a proxy or ingress)
    xheaders: bool = False
    #: open connections allowed per user and per client IP on one replica (0 = unlimited); over -> 429
    max_connections_per_user: int = opt(0, min=0)
    max_connections_per_ip: int = opt(0, min=0)
    #: requests (frames with an op) per second per session on chat, game and every OpHandler endpoint
    #: (token bucket, 0 = unlimited), the burst saved up, and refusals in a row before close 4029 (0 = never)
    op_rate: float = opt(50.0, min=0)
    op_burst: int = opt(100, min=1)
    op_rate_close_after: int = opt(50, min=0)
    #: open TCP connections on this replica; 0 = the file limit less fd_reserve. At the cap, the connection
    #: waiting longest for a request head is closed; if none is, the new one gets HTTP 503
    max_connections: int = opt(0, min=0)
    #: file descriptors kept for the bus, files and listening sockets when max_connections is derived
    fd_reserve: int = opt(128, min=0)
    #: seconds from the accept to a connection's first complete request head; then it is closed
    header_timeout: float = opt(10.0, min=0.1)
    #: event-loop lag (seconds, the mean over 0.2 s) above which new connections wait in a queue, served a slice
    #: per pass of the loop, so that open sessions go first (service/overload.py); 0 = off (the default: see
    #: docs/operations.md for what it did and did not buy in the reconnect-storm benchmark). At least
    #: MIN_ADMISSION_LAG
    admission_lag: float = opt(0.0, min=0)
    #: seconds of each pass of the loop that new connections from that queue may take (at least one is served)
    admission_slice: float = opt(0.001, min=0.0005, max=1.0)
    #: seconds a keep-alive connection may wait for (and take to send) its next request head; keep it above
    #: the idle timeout of a proxy's upstream connections (ingress-nginx and AWS ALB: 60 s)
    idle_timeout: float = opt(75.0, min=0.1)
    #: seconds for a request body (POST /api/publish)
    body_timeout: float = opt(30.0, min=0.1)
    #: bytes of request line and headers; larger -> HTTP 431
    max_header_size: int = opt(65536, min=1024)
    #: serve the demo page at / (the JS client at /static/wirehub.js is always served)
    demo_page: bool = True
    #: serve GET /api/plugins (plugin names, sources and versions)
    plugin_listing: bool = True
    #: nesting levels allowed in client JSON (frames, publish API bodies); deeper -> bad_json / 400.
    #: At most 256: Python's parser and copies recurse once per level
    max_json_depth: int = opt(32, min=2, max=256)
    #: seconds between two log lines of the same error that clients can trigger (the rest are counted)
    error_log_interval: float = opt(10.0, min=0)
    #: the event loop: uvloop (libuv, less CPU per connection and message), asyncio (the standard
    #: library's), or auto = uvloop when it is installed, else asyncio
    event_loop: str = opt("auto", choices=("auto", "asyncio", "uvloop"))
    #: worker processes in this pod, each a full replica on the same port (service/workers.py); 0 = the CPUs
    #: this process may use (affinity and cgroup quota). More than one needs a bus that spans processes
    processes: int = opt(1, min=0, max=256)
    #: how the workers share the port: ``reuseport`` (a listening socket per worker, SO_REUSEPORT: the
    #: kernel spreads connections evenly) or ``shared`` (one socket bound before the fork, accepted by all)
    process_listen: str = opt("reuseport", choices=("reuseport", "shared"))
    #: seconds a worker's event loop may go without running (its heartbeat, every 0.25 s) before the others'
    #: /healthz and /readyz answer 503 naming it and the supervisor kills and restarts it. Ignored with one process
    worker_stall_timeout: float = opt(5.0, min=1.0)

    #: the cyclic garbage collector while serving (service/gc_policy.py): generation 0 is collected every this
    #: many allocations (CPython's default: 700; a join storm's members were rescanned every few joins)
    gc_threshold0: int = opt(50_000, min=700)
    #: freeze the objects that survive a full collection, so later full collections skip them (sessions that
    #: stay); cycles among them are collected at the first full collection gc_thaw_interval s after the last
    gc_freeze_survivors: bool = False
    gc_thaw_interval: float = opt(600.0, min=1.0)


@dataclass(frozen=True)
class DrainConfig:
    #: seconds from SIGTERM to exit; keep below Kubernetes' terminationGracePeriodSeconds
    grace: float = opt(20.0, min=0)
    #: sessions closed per batch, and seconds between batches
    batch_size: int = opt(500, min=1)
    batch_interval: float = opt(0.1, min=0)
    #: clients are told to reconnect after a random delay in [0, reconnect_jitter] seconds
    reconnect_jitter: float = opt(5.0, min=0)


@dataclass(frozen=True)
class LoggingConfig:
    level: str = opt("info", choices=("debug", "info", "warning", "error"))
    format: str = opt("text", choices=("text", "json"))
    access_log: bool = True


#: when a config does not set ``api.keys``: one key from the environment, if it is set there
DEFAULT_API_KEYS = ("$env?:WIREHUB_API_KEY",)


@dataclass(frozen=True)
class ApiConfig:
    #: bearer keys accepted by POST /api/publish; empty = the publish API answers 503
    #: (unset in the file: DEFAULT_API_KEYS, i.e. $WIREHUB_API_KEY when that variable is set)
    keys: tuple[str, ...] = ()
    max_body: int = opt(65536, min=64)
    #: seconds a publish's idempotency key is remembered (API and chat publish): a retry with the same
    #: key within it is delivered once, on any replica (NATS: at most the bus's history_ttl)
    idempotency_window: float = opt(120.0, min=1, max=86400)


@dataclass(frozen=True)
class MetricsConfig:
    enabled: bool = True


@dataclass(frozen=True)
class PluginsConfig:
    #: plugins registered after the entry points: module paths, or ``module:attr`` (an object or a class)
    load: tuple[str, ...] = ()
    #: plugin names (module path or entry-point name) never registered
    block: tuple[str, ...] = ()


@dataclass(frozen=True)
class PluginChoice:
    """A ``{plugin: NAME, NAME: {...options}}`` block: the chosen name and its own options."""

    plugin: str
    options: Mapping[str, Any]
    key: str  # dotted key of the options block, for the plugin's own errors


@dataclass(frozen=True)
class EndpointConfig:
    path: str
    handler: str
    options: Mapping[str, Any] = field(default_factory=lambda: types.MappingProxyType({}))


@dataclass(frozen=True)
class Config:
    server: ServerConfig
    drain: DrainConfig
    logging: LoggingConfig
    auth: PluginChoice
    bus: PluginChoice
    endpoints: tuple[EndpointConfig, ...]
    api: ApiConfig
    metrics: MetricsConfig
    plugins: PluginsConfig
    #: free-form blocks for third-party plugins, by plugin name (read in wirehub_configure)
    extensions: Mapping[str, Any]
    source: str = "<defaults>"

    @property
    def node_id(self) -> str:
        import socket

        return self.server.node_id or os.environ.get("POD_NAME") or socket.gethostname()


_SECTIONS: dict[str, type] = {
    "server": ServerConfig,
    "drain": DrainConfig,
    "logging": LoggingConfig,
    "api": ApiConfig,
    "metrics": MetricsConfig,
    "plugins": PluginsConfig,
}
_TOP_LEVEL = (*_SECTIONS, "auth", "bus", "endpoints", "extensions")
_DEFAULT_CHOICE = {"auth": "anonymous", "bus": "memory"}
#: buses whose rooms live in one process: refused with ``server.processes`` other than 1
PROCESS_LOCAL_BUSES = frozenset({"memory"})
DEFAULT_ENDPOINTS = (
    {"path": "/ws/echo", "handler": "echo"},
    {"path": "/ws/chat", "handler": "chat"},
    {"path": "/ws/game", "handler": "game"},
)


def _parse_choice(section: str, data: Any) -> PluginChoice:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(section, f"expected a mapping like {{plugin: NAME}}, got {data!r}")
    name = data.get("plugin", _DEFAULT_CHOICE[section])
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{section}.plugin", f"expected a plugin name, got {name!r}")
    for other, block in data.items():
        if other != "plugin" and block is not None and not isinstance(block, dict):
            raise ConfigError(f"{section}.{other}", f"expected the options mapping of plugin {other!r}")
    options = data.get(name) or {}
    return PluginChoice(plugin=str(name), options=types.MappingProxyType(dict(options)), key=f"{section}.{name}")


def _parse_endpoints(data: Any) -> tuple[EndpointConfig, ...]:
    if data is None:
        data = list(DEFAULT_ENDPOINTS)
    if not isinstance(data, list):
        raise ConfigError("endpoints", f"expected a list of {{path, handler, options}}, got {data!r}")
    endpoints = tuple(parse_block(EndpointConfig, item, f"endpoints[{i}]") for i, item in enumerate(data))
    seen: set[str] = set()
    for i, ep in enumerate(endpoints):
        if not ep.path.startswith("/") or "?" in ep.path or "(" in ep.path or "*" in ep.path.removesuffix("/*"):
            raise ConfigError(f"endpoints[{i}].path", f"expected a plain absolute path like /ws/chat (or a prefix "
                              f"like /ws/yjs/*), got {ep.path!r}")
        if ep.path in seen:
            raise ConfigError(f"endpoints[{i}].path", f"{ep.path!r} is used by two endpoints")
        seen.add(ep.path)
    return endpoints


def config_from_dict(raw: Any, source: str = "<dict>") -> Config:
    """Validate a YAML tree (references not yet resolved) into a :class:`Config`."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError("", f"{source}: the top level must be a mapping, got {type(raw).__name__}")
    for k in raw:
        if k not in _TOP_LEVEL:
            raise ConfigError(str(k), f"unknown top-level key; valid keys are: {', '.join(sorted(_TOP_LEVEL))}")
    api = raw.get("api")
    if api is None or (isinstance(api, dict) and "keys" not in api):
        raw = {**raw, "api": {**(api or {}), "keys": list(DEFAULT_API_KEYS)}}
    data = resolve_references(raw)
    sections: dict[str, Any] = {name: parse_block(cls, data.get(name), name) for name, cls in _SECTIONS.items()}
    server: ServerConfig = sections["server"]
    if 0 < server.admission_lag < MIN_ADMISSION_LAG:
        raise ConfigError("server.admission_lag", f"{server.admission_lag:g} is below {MIN_ADMISSION_LAG:g} s, "
                          f"the loop's own jitter; use 0 to turn admission control off")
    if server.ping_interval and server.ping_timeout > server.ping_interval:
        raise ConfigError("server.ping_timeout", f"{server.ping_timeout:g} is longer than server.ping_interval "
                          f"({server.ping_interval:g}); a ping must time out before the next one is sent")
    bus = _parse_choice("bus", data.get("bus"))
    if server.processes != 1 and bus.plugin in PROCESS_LOCAL_BUSES:
        raw_server = data.get("server")
        raise _with_origin(ConfigError(
            "server.processes", f"{server.processes} worker processes cannot share the {bus.plugin} bus (bus.plugin: "
            f"{bus.plugin}), which lives inside one process; use bus.plugin redis or nats, or server.processes: 1"),
            raw_server.get("processes") if isinstance(raw_server, dict) else None, "server.processes")
    extensions = data.get("extensions") or {}
    if not isinstance(extensions, dict):
        raise ConfigError("extensions", f"expected a mapping of plugin name -> options, got {extensions!r}")
    return Config(
        auth=_parse_choice("auth", data.get("auth")),
        bus=bus,
        endpoints=_parse_endpoints(data.get("endpoints")),
        extensions=types.MappingProxyType(extensions),
        source=source,
        **sections,
    )


#: ``source`` of a config built from the defaults alone (no file)
BUILTIN_SOURCE = "<built-in defaults>"


def _apply_overrides(raw: Any, overrides: Mapping[str, Reference]) -> Any:
    """``raw`` with each dotted key of ``overrides`` (``server.port``) set; the values stay References."""
    if raw is None:
        raw = {}
    if not overrides or not isinstance(raw, dict):
        return raw
    out = dict(raw)
    for dotted, value in overrides.items():
        section, _, name = dotted.partition(".")
        block = out.get(section)
        out[section] = {**(block if isinstance(block, dict) else {}), name: value}
    return out


def load_config(path: str | os.PathLike[str] | None = None, overrides: Mapping[str, Reference] | None = None) -> Config:
    """Load ``path``, else $WIREHUB_CONFIG, else the built-in defaults (the dataclasses' defaults, which
    config/wirehub.yaml lists); then set ``overrides`` (dotted key -> value, from ``serve``'s options and
    environment), validated like the file's values. Raises :class:`ConfigError`."""
    if not path:
        path = os.environ.get(ENV_CONFIG) or None
    if path is None:
        return config_from_dict(_apply_overrides({}, overrides or {}), source=BUILTIN_SOURCE)
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError("", f"cannot read config file {p}: {exc.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = ""
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError("", f"{p}: malformed YAML{where}: {problem}") from None
    return config_from_dict(_apply_overrides(raw, overrides or {}), source=str(p))
