"""``wirehub serve | check-config | plugins | token | listen | send | plugin new``; the only place that exits.

Exit codes: 0 success, 1 runtime failure, 2 bad config or plugin (the message names the dotted key).
Output into a closed pipe (``wirehub plugins | head -1``) ends the command quietly with exit 1, as
Python's own docs recommend (no SIGPIPE default handler: sockets must keep raising EPIPE).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wirehub import __version__
from wirehub.config import Config, ConfigError, Reference, load_config
from wirehub.gc_policy import CollectorPolicy
from wirehub.plugins import PluginError
from wirehub.scaffold import ScaffoldError, create

if TYPE_CHECKING:
    from wirehub.workers import Heartbeats, MetricsShare

log = logging.getLogger("wirehub")

EXIT_OK, EXIT_FAILURE, EXIT_CONFIG = 0, 1, 2


#: query parameters, headers and subprotocols that carry credentials; their values never reach a log line
_SECRETS = (
    re.compile(r"(?i)([?&;](?:access_token|token|jwt|api_key|apikey|key|password|secret)=)[^&\s\"'#]+"),
    re.compile(r"(?i)(\bbearer[ .])[A-Za-z0-9._~+/=-]+"),
)
#: attributes every LogRecord has; anything else on a record came from ``extra=`` and is a field
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


def redact(text: str) -> str:
    """``text`` with the values of token-like query parameters and bearer credentials replaced."""
    for pattern in _SECRETS:
        text = pattern.sub(r"\1[redacted]", text)
    return text


class TextFormatter(logging.Formatter):
    """``TIME LEVEL LOGGER: message``, credentials redacted (defence in depth: nothing should log them)."""

    def __init__(self, worker: int | None = None) -> None:
        where = "" if worker is None else f" [worker {worker}]"
        super().__init__(f"%(asctime)s %(levelname)s %(name)s{where}: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts``, ``level``, ``logger``, ``msg``, then the record's ``extra=`` fields
    (the session open/close lines carry ``event``, ``session``, ``user``, ``endpoint``, ``code``,
    ``duration``), and ``exc`` for a traceback. Credentials are redacted as in the text format."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": redact(record.getMessage()),
        }
        for key, value in vars(record).items():
            if key not in _RECORD_ATTRS and key not in entry:
                entry[key] = redact(value) if isinstance(value, str) else value
        if record.exc_info:
            entry["exc"] = redact(self.formatException(record.exc_info))
        elif record.exc_text:
            entry["exc"] = redact(record.exc_text)
        if record.stack_info:
            entry["stack"] = redact(self.formatStack(record.stack_info))
        return json.dumps(entry, ensure_ascii=False, default=str)


class _WorkerField(logging.Filter):
    """Puts the worker index on every record (``worker`` in JSON lines, ``[worker N]`` in text)."""

    def __init__(self, worker: int) -> None:
        super().__init__()
        self.worker = worker

    def filter(self, record: logging.LogRecord) -> bool:
        record.worker = self.worker
        return True


def setup_logging(level: str, fmt: str, worker: int | None = None) -> None:
    """Log to stderr as ``fmt`` (``text`` or ``json``) from ``level`` up, replacing any earlier handler;
    ``worker``: the index of this worker process (``server.processes`` > 1), on every line."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter(worker))
    if worker is not None:
        handler.addFilter(_WorkerField(worker))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Tornado's own access log prints full URIs (query strings carry tokens); ours replaces it.
    logging.getLogger("tornado.access").disabled = True


def _fail(message: str, code: int) -> int:
    print(f"wirehub: {message}", file=sys.stderr)
    return code


# -- serve -----------------------------------------------------------------------------------------------------


#: ``serve`` options that override a config key: (option, dest, environment variable, dotted key)
SERVE_OVERRIDES = (
    ("--host", "host", "WIREHUB_HOST", "server.host"),
    ("--port", "port", "WIREHUB_PORT", "server.port"),
    ("--node-id", "node_id", "WIREHUB_NODE_ID", "server.node_id"),
    ("--processes", "processes", "WIREHUB_PROCESSES", "server.processes"),
)
#: what Kubernetes puts in <SERVICE>_PORT for a Service named "wirehub" (and Docker links likewise)
_SERVICE_LINK = re.compile(r"^(tcp|udp|sctp)://")


def serve_overrides(args: argparse.Namespace | None) -> dict[str, Reference]:
    """The config keys set by ``serve``'s options, else by their environment variables (option > environment
    > config file > built-in default). The values are validated by the config loader like the file's."""
    overrides: dict[str, Reference] = {}
    for option, dest, env, key in SERVE_OVERRIDES:
        value = getattr(args, dest, None) if args is not None else None
        if value is not None:
            overrides[key] = Reference(value, option)
            continue
        value = os.environ.get(env)
        if not value:
            continue
        if env == "WIREHUB_PORT" and _SERVICE_LINK.match(value):
            # a Service named wirehub in the same namespace (without enableServiceLinks: false): not ours
            print(f"wirehub: ignoring {env}={value}: it is a Kubernetes service link, not a port number "
                  "(set enableServiceLinks: false in the pod spec, or pass --port)", file=sys.stderr)
            continue
        overrides[key] = Reference(value, f"${env}")
    return overrides


def _load(args: argparse.Namespace, path: str | None) -> Config:
    return load_config(path, serve_overrides(args))


async def _serve(config: Config, worker: Worker | None = None) -> int:
    from wirehub.app import Wirehub

    setup_logging(config.logging.level, config.logging.format, worker.index if worker is not None else None)
    app = Wirehub.build(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        app.begin_drain()
        stop.set()

    def mark_draining(signum: int, frame: object) -> None:
        # The Python-level handler runs in the main thread right after the signal, before the event loop
        # handles any request that arrived after it: /readyz is 503 and upgrades are refused from the
        # first moment. Only a plain attribute store is safe here; the loop callback does the rest.
        app.draining = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)  # wakes the loop (its wakeup fd) and runs on_signal there
        signal.signal(sig, mark_draining)  # replaces asyncio's no-op Python-level handler; the wakeup fd stays
    # a worker is forked with them blocked, so that one forwarded during its start waits for these handlers
    signal.pthread_sigmask(signal.SIG_UNBLOCK, (signal.SIGTERM, signal.SIGINT))
    try:
        await app.start(worker.sockets if worker is not None else None)
    except Exception as exc:
        log.error("startup failed: %s", exc)
        await app.stop()
        return EXIT_FAILURE
    snapshots = heartbeat = None
    if worker is not None:
        from wirehub.workers import HeartbeatWriter, stalled_siblings

        heartbeat = HeartbeatWriter(worker.heartbeats, worker.index)
        heartbeat.start()
        beats, index, limit, node = worker.heartbeats, worker.index, config.server.worker_stall_timeout, app.node
        app.stalled_workers = lambda: stalled_siblings(beats, index, limit, node)
        if config.metrics.enabled:  # /metrics answers for the pod: this worker's series and its siblings'
            from wirehub.workers import snapshot_task

            share, index, own = worker.share, worker.index, app.metrics.render
            app.render_metrics = lambda: share.pod_exposition(index, own())
            snapshots = snapshot_task(share, index, own)
        worker.listening()
    collector = CollectorPolicy(config.server)
    collector.start()
    log.info("config %s; send SIGTERM to drain", config.source)
    await stop.wait()
    log.info("signal received: draining")
    if snapshots is not None:
        snapshots.cancel()
    if heartbeat is not None:
        heartbeat.stop()
    await app.drain()
    collector.close()
    log.info("stopped")
    return EXIT_OK


@dataclass(frozen=True)
class Worker:
    """What a worker process of ``server.processes`` > 1 serves with (service/workers.py)."""

    index: int
    #: the listening sockets it serves
    sockets: list[socket.socket] | None
    #: called once it listens (the supervisor tells a startup failure from a crash by it)
    listening: Callable[[], None]
    share: MetricsShare
    #: its loop's heartbeat, and its siblings' that its probes check
    heartbeats: Heartbeats


def _run(config: Config, worker: Worker | None = None) -> int:
    from wirehub.event_loop import pick_loop

    _, factory = pick_loop(config.server.event_loop)
    # asyncio.run on the configured loop (Python 3.11's asyncio.run takes no loop factory)
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(_serve(config, worker))


def _run_worker(config: Config, index: int, sockets: list[socket.socket] | None, listening: Callable[[], None],
                share: MetricsShare, heartbeats: Heartbeats) -> int:
    return _run(config, Worker(index, sockets, listening, share, heartbeats))


def cmd_serve(args: argparse.Namespace) -> int:
    from wirehub.app import Wirehub
    from wirehub.event_loop import pick_loop
    from wirehub.workers import Supervisor, worker_count

    config = _load(args, args.config)
    count = worker_count(config)
    if count == 1:
        return _run(config)
    # every plugin and the event loop are checked once here, so that a bad config fails as exit 2 before a fork
    Wirehub.build(config)
    pick_loop(config.server.event_loop)
    setup_logging(config.logging.level, config.logging.format)
    return Supervisor(config, count, _run_worker).run()


# -- check-config and plugins ----------------------------------------------------------------------------------


def cmd_check_config(args: argparse.Namespace) -> int:
    from wirehub.app import Wirehub
    from wirehub.event_loop import pick_loop

    config = _load(args, args.file or args.config)  # with WIREHUB_HOST/PORT/NODE_ID/PROCESSES, as serve would run
    app = Wirehub.build(config)
    loop, _ = pick_loop(config.server.event_loop)  # serve fails the same way on a loop that is not installed
    print(f"{config.source}: OK (auth {config.auth.plugin}, bus {config.bus.plugin}, "
          f"endpoints {', '.join(ep.path for ep in config.endpoints)}, {len(app.hooks.describe())} plugins, "
          f"event loop {loop})")
    return EXIT_OK


def cmd_plugins(args: argparse.Namespace) -> int:
    from wirehub.plugins import build_plugin_manager

    config = load_config(args.config)
    host = build_plugin_manager(config.plugins)
    infos = host.describe()
    if args.json:
        print(json.dumps([{"name": p.name, "source": p.source, "module": p.module, "hooks": list(p.hooks),
                           "registers": {k: list(v) for k, v in p.registers.items()}} for p in infos], indent=2))
        return EXIT_OK
    for p in infos:
        print(f"{p.name}  [{p.source}]")
        for kind, names in p.registers.items():
            print(f"    registers {kind}: {', '.join(names)}")
        print(f"    hooks: {', '.join(p.hooks) or '(none)'}")
    return EXIT_OK


# -- token, listen, send (implemented by the JWT plugin and the Python client) ----------------------------------


def cmd_token(args: argparse.Namespace) -> int:
    from wirehub.builtins.auth.jwt import mint_token_from_config

    config = load_config(args.config)
    print(mint_token_from_config(config, sub=args.sub, rooms=args.rooms, ttl=args.ttl, name=args.name))
    return EXIT_OK


def cmd_listen(args: argparse.Namespace) -> int:
    from wirehub.client import listen_main

    return int(listen_main(args))


def cmd_send(args: argparse.Namespace) -> int:
    from wirehub.client import send_main

    return int(send_main(args))


def _port(text: str) -> str:
    """argparse type of ``--port``: a number 0-65535 (kept as text; the config loader converts it)."""
    if not text.strip().isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"expected a port number 0-65535, got {text!r}")
    return text


def cmd_plugin_new(args: argparse.Namespace) -> int:
    dest = Path(args.dir if args.dir is not None else args.name)
    try:
        written = create(args.name, dest)
    except ScaffoldError as exc:
        return _fail(str(exc), EXIT_CONFIG)
    for path in written:
        print(f"created {path}")
    print(f"next: cd {dest} && pip install -e '.[test]' && python -m pytest")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    config_help = ("YAML config file (default: $WIREHUB_CONFIG, else the built-in defaults that config/wirehub.yaml "
                   "lists: memory bus, anonymous auth, 127.0.0.1:8080)")
    parser = argparse.ArgumentParser(
        prog="wirehub", description="A real-time WebSocket service: rooms, presence, history and game state on "
        "one port, scaled out over Redis or NATS, extended with plugins.",
        epilog="Exit codes: 0 success, 1 runtime failure, 2 bad config or plugin. 'wirehub COMMAND --help' "
        "describes each command. Docs: docs/configuration.md, docs/clients.md, docs/operations.md.")
    parser.add_argument("--version", action="version", version=f"wirehub {__version__}")
    parser.add_argument("--config", "-c", default=None, help=config_help)
    # `wirehub serve --config F` and `wirehub --config F serve` both work: the option is on every
    # subcommand too, without a default there so it never overwrites the one given before.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", "-c", default=argparse.SUPPRESS, help=config_help)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add_parser(name: str, helptext: str, description: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], help=helptext, description=description)

    p = add_parser("serve", "run the service", "Run the service until SIGTERM/SIGINT, then drain and exit 0. "
                   "Options override the config file; each option's environment variable overrides it when the "
                   "option is not given (option > environment > config file > built-in default).")
    p.add_argument("--host", default=None, help="address to listen on, overrides server.host (default: "
                   "$WIREHUB_HOST, else the config's, else 127.0.0.1; 0.0.0.0 = every interface)")
    p.add_argument("--port", default=None, type=_port, help="port for HTTP and WebSocket, overrides "
                   "server.port (default: $WIREHUB_PORT, else the config's, else 8080)")
    p.add_argument("--node-id", default=None, help="replica name in welcome frames, presence and logs, overrides "
                   "server.node_id (default: $WIREHUB_NODE_ID, else the config's, else $POD_NAME, else the hostname)")
    p.add_argument("--processes", default=None, help="worker processes on the port, overrides server.processes "
                   "(default: $WIREHUB_PROCESSES, else the config's, else 1; 0 = the CPUs available; more than 1 "
                   "needs the redis or nats bus)")
    p.set_defaults(func=cmd_serve)

    p = add_parser("check-config", "validate a config file and its plugins without starting",
                   "Load the config (with $WIREHUB_HOST, $WIREHUB_PORT, $WIREHUB_NODE_ID and $WIREHUB_PROCESSES "
                   "applied, as serve would), build every plugin it names, print a summary; exit 2 naming the "
                   "dotted key of the first problem.")
    p.add_argument("file", nargs="?", default=None, help="the config file (default: --config, $WIREHUB_CONFIG, "
                   "else the built-in defaults)")
    p.set_defaults(func=cmd_check_config)

    p = add_parser("plugins", "list loaded plugins, their sources, hooks and registered names",
                   "List every registered plugin (built-in, entry point of group 'wirehub', plugins.load of the "
                   "config) with its hooks and the buses, authenticators and handlers it registers.")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of text")
    p.set_defaults(func=cmd_plugins)

    p = add_parser("token", "print a JWT signed with the configured HMAC secret (development)",
                   "Mint a JWT with the config's auth.jwt HMAC secret (development and tests; docs/auth.md).")
    p.add_argument("--sub", required=True, help="user id")
    p.add_argument("--rooms", default="*", help="comma-separated glob patterns, e.g. 'lobby,team-*' (default: *)")
    p.add_argument("--ttl", default="1h", help="lifetime: 30s, 15m, 1h, 7d (default: 1h)")
    p.add_argument("--name", default=None, help="display name")
    p.set_defaults(func=cmd_token)

    p = add_parser("plugin", "start a plugin package", "Tools for plugin authors (docs/plugin-tutorial.md).")
    plugin_sub = p.add_subparsers(dest="plugin_command", required=True, metavar="ACTION",
                                  help="new: scaffold a plugin package")
    p = plugin_sub.add_parser("new", help="scaffold a plugin package", description="Write a plugin package into "
                              "./NAME (or --dir): pyproject.toml with the 'wirehub' entry point, a handler skeleton, "
                              "and tests on wirehub.testing that pass as generated. Exits 2 for an invalid NAME or a "
                              "folder that is not empty.")
    p.add_argument("name", help="the distribution name: lower case, words joined by '-' or '_' (e.g. wirehub-shout)")
    p.add_argument("--dir", default=None, help="the folder to create (default: ./NAME)")
    p.set_defaults(func=cmd_plugin_new)

    url = os.environ.get("WIREHUB_URL") or "ws://localhost:8080/ws/chat"
    for name, helptext, description in (
        ("listen", "print a room's messages as JSON lines",
         "Join ROOM and print its messages as JSON lines on stdout (status lines on stderr) until SIGINT/SIGTERM "
         "or --count messages. Exits 1 at once when no server answers at --url (unless --retry); after a first "
         "connection it reconnects by itself and recovers what it missed."),
        ("send", "publish one JSON value to a room",
         "Publish one JSON value to ROOM and print {room, offset} once acknowledged. Exits 1 at once when no "
         "server answers at --url (unless --retry), 2 when DATA is not JSON."),
    ):
        p = add_parser(name, helptext, description)
        p.add_argument("room", help="the room")
        if name == "send":
            p.add_argument("data", help="a JSON value (quote strings: '\"hi\"')")
            p.add_argument("--timeout", type=float, default=10.0,
                           help="seconds to wait for the connection and the ack (default: 10)")
        else:
            p.add_argument("--count", type=int, default=0, help="exit 0 after this many messages (default: 0 = never)")
        p.add_argument("--url", default=url, help="the chat endpoint (default: $WIREHUB_URL, else "
                       "ws://localhost:8080/ws/chat)")
        p.add_argument("--token", default=os.environ.get("WIREHUB_TOKEN"),
                       help="bearer token for a JWT setup (default: $WIREHUB_TOKEN)")
        p.add_argument("--retry", action="store_true", help="keep trying when no server answers yet (with "
                       "backoff), instead of exiting 1 at once")
        p.set_defaults(func=cmd_listen if name == "listen" else cmd_send)
    return parser


def _stdout_closed() -> int:
    """stdout's reader went away (``| head``): no traceback, and none at exit when Python flushes stdout."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return EXIT_FAILURE  # as Python itself exits on EPIPE


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.config is None and getattr(args, "file", None) is None:
        args.config = os.environ.get("WIREHUB_CONFIG") or None
    try:
        code = args.func(args)
        sys.stdout.flush()  # inside the try: a closed pipe shows here, not at interpreter exit
    except BrokenPipeError:
        code = _stdout_closed()
    except (ConfigError, PluginError) as exc:
        code = _fail(str(exc), EXIT_CONFIG)
    except KeyboardInterrupt:
        code = EXIT_FAILURE
    sys.exit(code)


if __name__ == "__main__":
    main()
