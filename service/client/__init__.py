"""An asyncio client for wirehub's chat and game endpoints, and the ``wirehub listen | send`` helpers.

The same semantics as ``/static/wirehub.js`` (docs/clients.md)::

    client = Client("ws://localhost:8080/ws/chat", token=get_token)   # str, or a (async) callable
    await client.connect()
    await client.join("lobby", lambda msg: print(msg["from"], msg["data"]))
    offset = await client.publish("lobby", {"text": "hi"})            # waits for the ack
    await client.close()

    game = Client("ws://localhost:8080/ws/game")
    board = await game.join_game("board", lambda change: print(change["version"], change["state"]))
    version = await board.update([{"op": "add", "path": "/3-4", "value": "me"}])

- Reconnects by itself after a drop, with exponential backoff and full jitter, honouring the
  close codes: 1001 and 4008 reconnect after the server's ``retry_ms`` hint, 4001 fetches a new
  token first, 4003 stops for good, 4029 backs off longer. A refused upgrade (HTTP 401) fetches a
  new token too; HTTP 403 stops.
- Rejoins every room with its last ``{offset, epoch}``, in the upgrade URL (``url_joins``; join frames for
  rooms joined while connected, and with a server that ignores or refuses them); :attr:`Subscription.recovered` (and the
  ``on_joined`` callback) says whether the server replayed everything missed meanwhile. Messages
  reach ``on_message`` once, in order, including replayed ones (this client's own publishes are
  not given back when a recovery replays them).
- Requests (``publish``, ``presence``, ``history``, ...) made while disconnected wait for the next
  connection; every request has a timeout. A request sent on a connection that dropped before
  the reply fails with ``disconnected`` (a publish may or may not have happened).
- With a token callable and a token that expires (``welcome.expires_at``), sends
  ``refresh {token}`` ``refresh_margin`` seconds before the expiry.

Callbacks are plain functions called on the event loop, in order; a callback that returns a
coroutine has it scheduled as a task (it must not block the reading of the connection).

Modules: :mod:`~wirehub.client.client` (:class:`Client`), :mod:`~wirehub.client.connection` (the
connection it keeps alive), :mod:`~wirehub.client.rooms` (what it joined), :mod:`~wirehub.client.policy`
(reconnect policy, errors), :mod:`~wirehub.client.commands` (``wirehub listen | send``). Import from
``wirehub.client``.
"""

from wirehub.client.client import Client
from wirehub.client.commands import listen_main, send_main
from wirehub.client.connection import Connection
from wirehub.client.policy import (
    Callback,
    ClientError,
    ClosePolicy,
    TokenSource,
    backoff_delay,
    close_policy,
    parse_retry_ms,
)
from wirehub.client.rooms import GameRoom, Subscription, apply_presence_event, take_presence_snapshot

__all__ = [
    "Callback",
    "Client",
    "ClientError",
    "ClosePolicy",
    "Connection",
    "GameRoom",
    "Subscription",
    "TokenSource",
    "apply_presence_event",
    "backoff_delay",
    "close_policy",
    "listen_main",
    "parse_retry_ms",
    "send_main",
    "take_presence_snapshot",
]
