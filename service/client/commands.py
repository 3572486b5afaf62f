"""``wirehub listen ROOM`` and ``wirehub send ROOM JSON``: the CLI helpers built on the client."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
from typing import Any

from wirehub.client.client import Client
from wirehub.client.policy import ClientError
from wirehub.protocol import CloseCode


def _print_line(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def _note(text: str) -> None:
    print(f"wirehub: {text}", file=sys.stderr, flush=True)


def _fail_fast(args: argparse.Namespace, **options: Any) -> Client:
    """A client for ``listen``/``send`` that gives up when the first connection fails (no server there),
    unless ``--retry``; once connected, it reconnects like any client."""
    client = Client(args.url, args.token or None, reconnect=bool(getattr(args, "retry", False)), **options)
    client.on("welcome", lambda _frame: setattr(client, "auto_reconnect", True))
    return client


def _connect_failure(client: Client, url: str) -> str | None:
    """Why no connection was ever made (no server, not a wirehub endpoint), or None."""
    if client.connections or client.last_close is None or client.last_close[0] in (CloseCode.FORBIDDEN, 4401):
        return None  # refused for good (403, 401): the client's own error says so
    reason = str(client.last_close[1] or "").removeprefix("connect failed: ")
    if "refused" in reason.lower():
        return f"connection refused: no wirehub server at {url}"
    return f"cannot connect to {url}: {reason}"


async def _listen(args: argparse.Namespace) -> int:
    client = _fail_fast(args, backoff_max=float(getattr(args, "backoff_max", 10.0) or 10.0))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    count = int(getattr(args, "count", 0) or 0)
    seen = 0
    broken_pipe = False

    def on_message(frame: dict[str, Any]) -> None:
        nonlocal seen, broken_pipe
        try:
            _print_line(frame)
        except BrokenPipeError:  # stdout's reader is gone (| head): stop, the CLI exits quietly
            broken_pipe = True
            stop.set()
            return
        seen += 1
        if count and seen >= count:
            stop.set()

    def on_joined(info: dict[str, Any]) -> None:
        what = "rejoined" if info["rejoin"] else "joined"
        _note(f"{what} {info['room']} (offset {info['offset']}, recovered {str(info['recovered']).lower()})")

    def on_close(c: dict[str, Any]) -> None:
        if client.connections or c["reconnect"]:  # else _connect_failure says it, once
            _note(f"{'disconnected' if client.connections else 'cannot connect'} ({c['code']} {c['reason'] or ''}); "
                  + (f"reconnecting in {c['delay']:.2f}s" if c["reconnect"] else "giving up"))

    client.on("close", on_close)
    client.on("status", lambda s: stop.set() if s in ("stopped", "closed") else None)
    try:
        joining = asyncio.ensure_future(client.join(args.room, on_message, on_joined=on_joined))
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait({joining, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if joining.done():
            joining.result()  # raises a refused join
            await stopping
        else:
            joining.cancel()
            with contextlib.suppress(asyncio.CancelledError, ClientError):
                await joining
        stopping.cancel()
        if broken_pipe:
            raise BrokenPipeError
        failure = _connect_failure(client, args.url)
        if failure:
            _note(failure)
            return 1
        if client.status == "stopped":
            _note(f"refused by the server: {client.last_close}")
            return 1
        return 0
    except ClientError as exc:
        _note(_connect_failure(client, args.url) or f"listen failed: {exc}")
        return 1
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await client.close()


def listen_main(args: argparse.Namespace) -> int:
    """``wirehub listen ROOM``: print the room's messages as JSON lines until interrupted.

    Status lines (joined, reconnecting) go to stderr. Exit 0 on SIGINT/SIGTERM or after ``--count``
    messages, 1 when refused or when no server answers the first connection (unless ``--retry``).
    """
    return asyncio.run(_listen(args))


async def _send(args: argparse.Namespace) -> int:
    try:
        data = json.loads(args.data)
    except ValueError:
        _note(f"not valid JSON: {args.data!r} (quote strings: '\"hi\"')")
        return 2
    timeout = float(getattr(args, "timeout", 10.0) or 10.0)
    client = _fail_fast(args, backoff_max=2.0, ack_timeout=timeout)
    try:
        await client.connect(timeout)
        await client.join(args.room, lambda _frame: None)
        offset = await client.publish(args.room, data)
        _print_line({"room": args.room, "offset": offset})
        return 0
    except ClientError as exc:
        _note(_connect_failure(client, args.url) or f"send failed: {exc}")
        return 1
    finally:
        await client.close()


def send_main(args: argparse.Namespace) -> int:
    """``wirehub send ROOM JSON``: publish one JSON value; prints ``{"room", "offset"}``.

    Exit 0 once acked, 1 on failure (refused, no server at the URL unless ``--retry``, timeout),
    2 when the data is not JSON.
    """
    return asyncio.run(_send(args))
