"""The socket of an established WebSocket connection, served without Tornado's IOStream.

After the handshake a connection mostly sits idle, answers a ping every ``ping_interval`` and now and
then gets a frame. Through ``IOStream`` each of those costs a read Future, a task step and the stream's
read-buffer machinery. :class:`SocketStream` takes the socket over from the stream once the upgrade is
done (as Tornado's own ``start_tls`` does): it registers the file descriptor with the asyncio loop itself,
and its read callback hands what ``socket.recv`` returned straight to the frame parser
(:meth:`wirehub.frames.Protocol.on_readable`). Writes go to the kernel with ``socket.send``; only what
the kernel does not take is queued (a ``bytearray``, the session's send queue that the 4008 cap is
checked against) and sent when the socket is writable again, in order.

It offers what Tornado's WebSocket protocol uses of a stream (``write`` returning a Future, ``close``,
``closed``, ``io_loop``, ``set_nodelay``) and the non-blocking :meth:`send` the transport and the keepalive
use. The Tornado stream stays the owner of the file for the connection table (``service/accept.py``):
closing a ``SocketStream`` closes it, which closes the socket and leaves the table.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from typing import Any, Protocol

from tornado.ioloop import IOLoop
from tornado.iostream import IOStream, SSLIOStream, StreamClosedError

log = logging.getLogger("wirehub.transport")


class Reader(Protocol):
    """Who reads a :class:`SocketStream` (:class:`wirehub.frames.Protocol`)."""

    def on_readable(self) -> None:
        """The socket has input (called while reading is on)."""

    def on_stream_closed(self) -> None:
        """The stream closed; called once, in a later loop iteration than the close."""


_done: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Future[None]] = weakref.WeakKeyDictionary()


def done_future() -> asyncio.Future[None]:
    """A completed Future of the running loop, shared: for an API that wants an awaitable where there is
    nothing to wait for (``asyncio.ensure_future`` passes a Future through; a coroutine would get a Task)."""
    loop = asyncio.get_running_loop()
    future = _done.get(loop)
    if future is None:
        future = _done[loop] = loop.create_future()
        future.set_result(None)
    return future


def can_take_over(stream: Any) -> bool:
    """A plain, open socket stream with nothing left to write (SSL streams keep Tornado's path)."""
    return (isinstance(stream, IOStream) and not isinstance(stream, SSLIOStream) and not stream.closed()
            and not stream._write_buffer and not stream._connecting and stream._read_future is None)


class SocketStream:
    """An established connection's socket, read and written without IOStream (module docstring)."""

    __slots__ = ("_closed", "_edge", "_fd", "_loop", "_out", "_owner", "_reading", "_waiters", "error", "socket")

    def __init__(self, edge: IOStream, owner: Reader) -> None:
        """Take ``edge``'s socket over (see :func:`can_take_over`) for ``owner``."""
        assert can_take_over(edge)
        self._edge = edge
        self.socket = edge.socket
        self._fd = self.socket.fileno()
        self._loop = asyncio.get_running_loop()
        if edge._state is not None:  # Tornado may still listen on the fd (its idle close detection)
            edge.io_loop.remove_handler(self._fd)
            edge._state = None
        edge._close_callback = None
        self._owner: Reader | None = owner
        #: what the kernel did not take yet (None: nothing)
        self._out: bytearray | None = None
        #: Futures of write() calls waiting for the queue to drain
        self._waiters: list[asyncio.Future[None]] | None = None
        self._reading = False
        self._closed = False
        self.error: BaseException | None = None

    def take_input(self) -> bytes:
        """What Tornado read past the request head (a client may send frames right after it)."""
        edge = self._edge
        if not edge._read_buffer_size:
            return b""
        data = bytes(edge._read_buffer[:edge._read_buffer_size])
        edge._read_buffer = bytearray()
        edge._read_buffer_size = 0
        return data

    # -- what Tornado's WebSocket protocol uses ---------------------------------------------------------

    @property
    def io_loop(self) -> IOLoop:
        return self._edge.io_loop

    def closed(self) -> bool:
        return self._closed

    def set_nodelay(self, value: bool) -> None:
        if not self._closed:
            self._edge.set_nodelay(value)

    def write(self, data: bytes | memoryview) -> asyncio.Future[None]:
        """Send ``data`` (a Close frame, a pong); the Future resolves once the kernel has taken it."""
        if self._closed:
            raise StreamClosedError(real_error=self.error)
        self.send(data)
        future: asyncio.Future[None] = self._loop.create_future()
        if self._out is None:
            future.set_result(None)
        elif self._waiters is None:
            self._waiters = [future]
        else:
            self._waiters.append(future)
        return future

    def close(self, exc_info: Any = False) -> None:
        if self._closed:
            return
        self._closed = True
        if isinstance(exc_info, BaseException):
            self.error = exc_info
        self.reading(False)
        if self._out is not None:
            self._out = None
            self._loop.remove_writer(self._fd)
        self._edge.close()  # closes the socket and leaves the connection table
        waiters, self._waiters = self._waiters, None
        for future in waiters or ():
            if not future.done():
                future.set_exception(StreamClosedError(real_error=self.error))
                future.exception()  # retrieved: nobody need await a write's Future
        owner, self._owner = self._owner, None
        if owner is not None:  # as IOStream: not from inside whatever closed the stream
            self._loop.call_soon(owner.on_stream_closed)

    # -- the fast paths ---------------------------------------------------------------------------------

    def buffered(self) -> int:
        """Bytes handed to :meth:`send` that the kernel has not taken yet."""
        out = self._out
        return len(out) if out is not None else 0

    def send(self, data: bytes | bytearray | memoryview) -> None:
        """Hand ``data`` to the kernel now; queue what it does not take (sent in order when writable)."""
        out = self._out
        if out is not None:  # never set on a closed stream
            out += data
            return
        if self._closed:
            return
        try:
            sent = self.socket.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self.close(exc)
            return
        if sent < len(data):
            self._out = bytearray(memoryview(data)[sent:])
            self._loop.add_writer(self._fd, self._on_writable)

    def reading(self, on: bool) -> None:
        """Call the owner's ``on_readable`` when input arrives (on), or leave the input in the kernel (off:
        backpressure while the handler works on a frame)."""
        if on == self._reading or (on and self._owner is None):
            return
        self._reading = on
        if on:
            assert self._owner is not None
            self._loop.add_reader(self._fd, self._owner.on_readable)
        else:
            self._loop.remove_reader(self._fd)

    def _on_writable(self) -> None:
        out = self._out
        if out is None:
            return
        try:
            sent = self.socket.send(out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.close(exc)
            return
        del out[:sent]
        if out:
            return
        self._out = None
        self._loop.remove_writer(self._fd)
        waiters, self._waiters = self._waiters, None
        for future in waiters or ():
            if not future.done():
                future.set_result(None)


def send_now(stream: Any, data: bytes | bytearray | memoryview) -> None:
    """Send ``data`` on a connection's stream without waiting: a :class:`SocketStream`, or the Tornado
    stream before the takeover (what the kernel does not take goes to its write buffer)."""
    if isinstance(stream, SocketStream):
        stream.send(data)
        return
    if stream.closed():
        return
    if not stream._write_buffer and not stream._connecting and not isinstance(stream, SSLIOStream):
        try:
            sent = stream.socket.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            stream.close(exc_info=True)
            return
        if sent == len(data):
            return
        data = memoryview(data)[sent:]
    with contextlib.suppress(StreamClosedError):
        stream.write(data)


def buffered(stream: Any) -> int:
    """Bytes queued on a connection's stream (either kind, see :func:`send_now`)."""
    if isinstance(stream, SocketStream):
        return stream.buffered()
    buf = stream._write_buffer
    return len(buf) if buf is not None else 0
