"""``wirehub serve | check-config | plugins | token | listen | send``; the only place that exits.

Exit codes: 0 success, 1 runtime failure, 2 bad config or plugin (the message names the dotted key).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import logging
import os
import re
import signal
import sys
from collections.abc import Sequence
from typing import Any

from service.config import ConfigError, load_config
from service.plugins import PluginError

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

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

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


def setup_logging(level: str, fmt: str) -> None:
    """Log to stderr as ``fmt`` (``text`` or ``json``) from ``level`` up, replacing any earlier handler."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Tornado's own access log prints full URIs (query strings carry tokens); ours replaces it.
    logging.getLogger("tornado.access").disabled = True


def _fail(message: str, code: int) -> int:
    print(f"wirehub: {message}", file=sys.stderr)
    return code


# -- serve -----------------------------------------------------------------------------------------------------


async def _serve(config_path: str | None) -> int:
    from service.app import Wirehub

    config = load_config(config_path)
    setup_logging(config.logging.level, config.logging.format)
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
    try:
        await app.start()
    except Exception as exc:
        log.error("startup failed: %s", exc)
        await app.stop()
        return EXIT_FAILURE
    log.info("config %s; send SIGTERM to drain", config.source)
    await stop.wait()
    log.info("signal received: draining")
    await app.drain()
    log.info("stopped")
    return EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    return asyncio.run(_serve(args.config))


# -- check-config and plugins ----------------------------------------------------------------------------------


def cmd_check_config(args: argparse.Namespace) -> int:
    from service.app import Wirehub

    config = load_config(args.file or args.config)
    app = Wirehub.build(config)
    print(f"{config.source}: OK (auth {config.auth.plugin}, bus {config.bus.plugin}, "
          f"endpoints {', '.join(ep.path for ep in config.endpoints)}, {len(app.hooks.describe())} plugins)")
    return EXIT_OK


def cmd_plugins(args: argparse.Namespace) -> int:
    from service.plugins import build_plugin_manager

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
    from plugins.auth.jwt import mint_token_from_config

    config = load_config(args.config)
    print(mint_token_from_config(config, sub=args.sub, rooms=args.rooms, ttl=args.ttl, name=args.name))
    return EXIT_OK


def cmd_listen(args: argparse.Namespace) -> int:
    from service.client import listen_main

    return int(listen_main(args))


def cmd_send(args: argparse.Namespace) -> int:
    from service.client import send_main

    return int(send_main(args))


def build_parser() -> argparse.ArgumentParser:
    config_help = "YAML config file (default: $WIREHUB_CONFIG, else the embedded default config)"
    parser = argparse.ArgumentParser(prog="wirehub", description="A real-time WebSocket service.")
    parser.add_argument("--config", "-c", default=None, help=config_help)
    # `wirehub serve --config F` and `wirehub --config F serve` both work: the option is on every
    # subcommand too, without a default there so it never overwrites the one given before.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", "-c", default=argparse.SUPPRESS, help=config_help)
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser = functools.partial(sub.add_parser, parents=[common])

    p = add_parser("serve", help="run the service")
    p.set_defaults(func=cmd_serve)

    p = add_parser("check-config", help="validate a config file and its plugins without starting")
    p.add_argument("file", nargs="?", default=None)
    p.set_defaults(func=cmd_check_config)

    p = add_parser("plugins", help="list loaded plugins, their sources, hooks and registered names")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plugins)

    p = add_parser("token", help="print a JWT signed with the configured HMAC secret (development)")
    p.add_argument("--sub", required=True, help="user id")
    p.add_argument("--rooms", default="*", help="comma-separated glob patterns, e.g. 'lobby,team-*'")
    p.add_argument("--ttl", default="1h", help="lifetime: 30s, 15m, 1h, 7d")
    p.add_argument("--name", default=None, help="display name")
    p.set_defaults(func=cmd_token)

    for name, helptext in (("listen", "print a room's messages as JSON lines"),
                           ("send", "publish one JSON value to a room")):
        p = add_parser(name, help=helptext)
        p.add_argument("room")
        if name == "send":
            p.add_argument("data", help="a JSON value")
        p.add_argument("--url", default=os.environ.get("WIREHUB_URL", "ws://localhost:8080/ws/chat"))
        p.add_argument("--token", default=os.environ.get("WIREHUB_TOKEN"))
        p.set_defaults(func=cmd_listen if name == "listen" else cmd_send)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.config is None and getattr(args, "file", None) is None:
        args.config = os.environ.get("WIREHUB_CONFIG") or None
    try:
        code = args.func(args)
    except (ConfigError, PluginError) as exc:
        code = _fail(str(exc), EXIT_CONFIG)
    except KeyboardInterrupt:
        code = EXIT_FAILURE
    sys.exit(code)


if __name__ == "__main__":
    main()
