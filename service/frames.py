"""The WebSocket protocol of a connection: Tornado's, with a frame reader of our own and RFC 6455's
close codes where Tornado drops the TCP connection.

Tornado's reader awaits a Future per frame part (header, length, mask, payload: four per frame) in a
coroutine that lives as long as the connection. Here :meth:`Protocol._receive_frame_loop` takes the
socket over from Tornado's stream once the connection is open (:class:`wirehub.stream.SocketStream`)
and returns: from then on the loop calls :meth:`Protocol.on_readable` when input arrives, which reads
it with one ``recv`` and parses every whole frame in it in a plain loop (a frame bigger than what
arrived waits, unparsed, until it is whole). An idle connection has no coroutine, Task or Future.
The order and the backpressure stay Tornado's: a frame is handled only after the handler's work for
the previous one completed; meanwhile nothing is parsed and further input stays in the kernel (``busy``
is set, see :class:`wirehub.keepalive.Keepalive`). The pause is lazy: the read callback is unregistered
only when input arrives during it (most ops that suspend see none). After 256 KiB of work in one callback the parse
stops for a loop iteration, so one busy client cannot starve the others.

RFC 6455 wants a Close frame where Tornado aborts or echoes: 1002 for a protocol violation
(a control frame over 125 bytes or fragmented, reserved bits or opcodes, a continuation with
nothing to continue, an invalid close frame), 1007 for invalid UTF-8 (Autobahn cases 7.9.x, 7.3.2,
7.5.1 and 6.x). Once the server has sent its Close frame, data frames are dropped unread: the echo
and the fan-out write through :class:`~wirehub.transport.StreamTransport`, which Tornado's closing
state does not stop, and nothing may follow a Close frame (section 5.5.1). tests/test_autobahn.py
checks all this. Every frame read sets ``_received_pong``: the keepalive takes any frame as a sign
of life.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeGuard

from tornado.concurrent import Future
from tornado.iostream import IOStream, SSLIOStream, StreamClosedError
from tornado.util import _websocket_mask
from tornado.websocket import WebSocketProtocol13

from wirehub.protocol import CloseCode
from wirehub.stream import SocketStream, can_take_over, done_future

if TYPE_CHECKING:
    from wirehub.session import Session

#: close codes a peer may send (RFC 6455 section 7.4); anything else fails the connection with 1002
_VALID_CLOSE = frozenset((1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014))
#: as Tornado: yield to the loop after this much input handled without a pause (a frame counts 1 KiB)
_YIELD_THRESHOLD = 256 * 1024
_FRAME_COST = 1024
_READ_CHUNK = 65536

log = logging.getLogger("wirehub.session")


def _plain(stream: object) -> TypeGuard[IOStream]:
    return isinstance(stream, IOStream) and not isinstance(stream, SSLIOStream)


def _set_done(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _valid_close_code(code: int) -> bool:
    return code in _VALID_CLOSE or 3000 <= code <= 4999


class Protocol(WebSocketProtocol13):
    """One connection's protocol; ``handler`` is the endpoint's :class:`~wirehub.websocket.WirehubSocket`."""

    #: True while the handler's work for a frame is pending (the next frame is not read meanwhile)
    busy = False
    #: the keepalive slice this connection is pinged in (-1: none)
    keepalive_slice = -1
    #: input not parsed yet (None: none); the bytes it needs before a parse can make progress (0: parse now)
    _rest: bytearray | None = None
    _need = 0
    #: a parse stopped and waits for a Future (the handler's work, or a turn for the others). The read
    #: callback stays registered meanwhile: removing and adding it around every op that suspends cost
    #: about 10 % of a Redis or NATS join. Only input that arrives while waiting unregisters it (that
    #: input stays in the kernel, the backpressure), and :meth:`_resume` registers it again.
    _held = False
    #: a fragmented message being collected, and its opcode
    _frag: bytearray | None = None
    _frag_opcode = 0

    def _session(self) -> Session | None:
        return getattr(self.handler, "session", None)

    def _receive_frame_loop(self, opened: Awaitable[None] | None = None) -> Awaitable[None]:  # type: ignore[override]
        """Take the socket over from Tornado's stream (:class:`~wirehub.stream.SocketStream`), run what is
        left of the open hooks (``opened``), then read frames from a read callback until the connection
        ends. What it returns is done once reading started; in the usual case (the open hooks completed,
        the 101 is out) that is at once, and no coroutine, Task or Future stays behind per connection."""
        stream = self.stream
        if opened is None and can_take_over(stream):
            self._take_over(stream)
            self._resume()
            return done_future()
        return self._open_then_read(opened)

    async def _open_then_read(self, opened: Awaitable[None] | None) -> None:
        stream = self.stream
        taken = False
        try:
            while _plain(stream) and stream._write_buffer and not stream.closed():
                await stream.write(b"")  # the 101 is still queued: the takeover sends nothing of Tornado's
            if not can_take_over(stream):  # closed meanwhile (a TLS stream never gets here: no TLS is served)
                if not stream.closed():
                    log.error("cannot read frames from %r: not a plain socket stream", stream)
                self.on_stream_closed()
                return
            self._take_over(stream)
            taken = True
            if opened is not None:
                await opened
        except StreamClosedError:  # gone before the takeover
            self.on_stream_closed()
            return
        except BaseException:  # cancelled: close the connection (a taken-over stream's close callback ends it)
            self._abort()
            if not taken:
                self.handler.on_ws_connection_close(self.close_code, self.close_reason)
            raise
        self._resume()

    def _take_over(self, stream: IOStream) -> None:
        own = SocketStream(stream, self)
        early = own.take_input()
        self.stream = own  # type: ignore[assignment]  # what Tornado's protocol uses of a stream
        if early:  # frames the client sent right behind its request head
            self._rest = bytearray(early)

    def on_stream_closed(self) -> None:
        """The socket is closed (by the peer, an error or us): end the connection, once."""
        self._abort()
        self.handler.on_ws_connection_close(self.close_code, self.close_reason)

    def on_readable(self) -> None:
        """The read callback of a :class:`~wirehub.stream.SocketStream`: one ``recv``, every whole frame in
        it handled."""
        stream: SocketStream = self.stream  # type: ignore[assignment]  # set with this callback
        if self._held:  # input while the handler works: now unregister, and leave it in the kernel
            stream.reading(False)
            return
        try:
            data = stream.socket.recv(_READ_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            stream.close(exc)
            return
        if len(data) == 6 and data[0] == 0x8A and data[1] == 0x80 and self._rest is None:
            # the keepalive's answer, alone (an empty masked Pong): most of what an idle connection reads
            self._received_pong = True
            return
        if not data:  # the peer closed the TCP connection
            stream.close()
            return
        try:
            paused = self._parse(data) if self._rest is None else self._feed(data)
        except Exception:
            log.exception("reading frames failed: closing the connection")
            self._abort()
            return
        if paused is not None:  # parse nothing more until the handler is done (reading stays registered)
            self._held = True
            paused.add_done_callback(self._resume)

    def _resume(self, _: object = None) -> None:
        """Handle what arrived while reading was paused, then read again."""
        self._held = False
        try:
            paused = self._continue()
        except Exception:
            log.exception("reading frames failed: closing the connection")
            self._abort()
            return
        if paused is not None:
            self._held = True
            paused.add_done_callback(self._resume)
            return
        stream = self.stream
        if isinstance(stream, SocketStream) and not stream.closed() and not self.client_terminated:
            stream.reading(True)

    def _continue(self) -> asyncio.Future[None] | None:
        """The handler is done with its frame: parse the whole frames that are waiting (see :meth:`_parse`)."""
        self.busy = False
        rest = self._rest
        if rest is None or self._need or self.client_terminated or self.stream.closed():
            return None
        self._rest = None
        return self._parse(bytes(rest))

    def _feed(self, data: bytes) -> asyncio.Future[None] | None:
        """Input from the socket: parsed once the frame it completes is whole (see :meth:`_parse`)."""
        rest = self._rest
        if rest is not None:
            rest += data
            if len(rest) < self._need:  # a big frame still arriving: no parse per chunk
                return None
            data = bytes(rest)
            self._rest = None
        return self._parse(data)

    def _parse(self, buf: bytes) -> asyncio.Future[None] | None:
        """Handle every whole frame in ``buf``; keep the rest in ``_rest``. Returns a Future when the
        parse stopped before the end (a handler still working on a frame, or a turn for the other
        connections): nothing more is read until it is done."""
        n = len(buf)
        # One whole masked text frame of 1 to 125 bytes, final, reserved bits clear, and nothing after it: a
        # client's usual request (a join, a small publish). What the loop below does for it, in fewer steps
        # (``buf[1]`` is the mask bit plus the length, ``n - 6``; max_message_size is at least 125).
        if 6 < n < 132 and buf[1] == n + 0x7A and buf[0] == 0x81 and self._frag is None and \
                not self.client_terminated and n - 6 <= self.params.max_message_size:
            handled = self._handle_message(0x1, _websocket_mask(buf[2:6], buf[6:]))
            if handled is not None:
                self.busy = True
            return handled
        max_size = self.params.max_message_size
        mask_fn = _websocket_mask
        frag = self._frag
        pos = 0
        need = 0
        work = 0
        paused: asyncio.Future[None] | None = None
        while n - pos >= 2 and not self.client_terminated:
            b0 = buf[pos]
            b1 = buf[pos + 1]
            opcode = b0 & 0x0F
            length = b1 & 0x7F
            if b0 & 0x70 or (opcode & 0x8 and length >= 126):  # reserved bits; a long control frame
                self._protocol_error()
                return None
            head = pos + 2
            if length == 126:
                if n - pos < 4:
                    break
                length = int.from_bytes(buf[head:head + 2], "big")
                head += 2
            elif length == 127:
                if n - pos < 10:
                    break
                length = int.from_bytes(buf[head:head + 8], "big")
                head += 8
            if length + (len(frag) if frag is not None else 0) > max_size:
                self.close(CloseCode.TOO_BIG, "message too big")
                self._abort()
                return None
            masked = b1 & 0x80
            start = head + 4 if masked else head
            end = start + length
            if end > n:  # not all of it arrived: parse again once it has
                need = end - pos
                break
            data = mask_fn(buf[head:start], buf[start:end]) if masked else buf[start:end]
            pos = end
            if opcode & 0x8:
                if not b0 & 0x80:  # a fragmented control frame
                    self._protocol_error()
                    return None
            elif opcode == 0:
                if frag is None:  # a continuation with nothing to continue
                    self._protocol_error()
                    return None
                frag.extend(data)
                if not b0 & 0x80:
                    work += _FRAME_COST
                    continue
                opcode, data, frag = self._frag_opcode, bytes(frag), None
                self._frag = None
            elif frag is not None:  # a new message before the fragmented one is complete
                self._protocol_error()
                return None
            elif not b0 & 0x80:
                frag = self._frag = bytearray(data)
                self._frag_opcode = opcode
                work += _FRAME_COST
                continue
            handled = self._handle_message(opcode, data)
            work += _FRAME_COST + length
            if handled is not None:
                self.busy = True
                paused = handled
                break
            if work >= _YIELD_THRESHOLD and pos < n:  # one busy client must not starve the others
                paused = asyncio.get_running_loop().create_future()
                asyncio.get_running_loop().call_soon(_set_done, paused)
                break
        if pos < n and not self.client_terminated:
            self._rest = bytearray(memoryview(buf)[pos:])
            self._need = need if paused is None else 0
        return paused

    def _protocol_error(self) -> None:
        """RFC 6455 wants a 1002 Close frame before the TCP close (Tornado only aborts); once our Close
        frame is out, or the stream is gone, a plain abort."""
        if not self.server_terminated and not self.stream.closed():
            self.client_terminated = True  # read nothing more: close the TCP connection right after ours
            self._fail(CloseCode.PROTOCOL_ERROR, "protocol error")
        else:
            self._abort()

    def _run_callback(self, callback: Callable[..., Any], *args: Any, **kwargs: Any) -> Future[Any] | None:
        """Tornado's, without its wrappers for a handler that suspended (every join on Redis and NATS): the
        handler's Task is what the parse waits for (one loop hop at its end, not two: no Future of
        Tornado's settled by a callback, no ``convert_yielded`` dispatch, no closure per frame). A failure
        escaping it is logged and aborts the connection, as in Tornado."""
        try:
            result = callback(*args, **kwargs)
        except (Exception, asyncio.CancelledError):
            self.handler.log_exception(*sys.exc_info())
            self._abort()
            return None
        if result is None:
            return None
        if not isinstance(result, asyncio.Future):  # another awaitable: Tornado's way
            return super()._run_callback(lambda: result)
        result.add_done_callback(self._callback_done)
        return result

    def _callback_done(self, task: asyncio.Future[Any]) -> None:
        try:
            task.result()
        except (Exception, asyncio.CancelledError):
            self.handler.log_exception(*sys.exc_info())
            self._abort()

    def _handle_message(self, opcode: int, data: bytes) -> Future[None] | None:
        if self.client_terminated:
            return None
        # Tornado's "pong since the last ping" flag; here any frame counts (see Keepalive)
        self._received_pong = True
        if opcode == 0x1:
            if self.server_terminated:
                return None  # our Close frame is out: no reply may follow it
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                self._fail(1007, "invalid UTF-8")
                return None
            self._message_bytes_in += len(data)
            return self._run_callback(self.handler.on_message, text)
        if opcode == 0xA:
            return None
        if opcode == 0x8:
            problem = len(data) == 1
            if len(data) >= 2:
                problem = not _valid_close_code(int.from_bytes(data[:2], "big"))
                try:
                    data[2:].decode("utf-8")
                except UnicodeDecodeError:
                    problem = True
            if problem:
                self.client_terminated = True  # the peer is done: close the TCP connection right after ours
                self._fail(CloseCode.PROTOCOL_ERROR, "invalid close frame")
                return None
        elif opcode not in (0x2, 0x9):  # a reserved opcode: Tornado would abort with no Close frame
            self.client_terminated = True
            self._fail(CloseCode.PROTOCOL_ERROR, "reserved opcode")
            return None
        elif opcode == 0x2 and self.server_terminated:
            return None
        return super()._handle_message(opcode, data)

    def close(self, code: int | None = None, reason: str | None = None) -> None:
        # Every Close frame, Tornado's own too (the reply to the client's, 1009, a keepalive drop),
        # goes after what the session corked in this loop iteration (transport.py's promise).
        session = self._session()
        if session is not None and not self.server_terminated:
            flush = getattr(session.transport, "flush", None)
            if flush is not None:
                flush()
        super().close(code, reason)

    def _fail(self, code: int, reason: str) -> None:
        """Send a Close frame with ``code`` through the session, when there is one, so the session
        counts as closed at once: no room fan-out is written after the Close frame, and
        ``wirehub_session_closed`` reports ``code``."""
        session = self._session()
        if session is not None and not session.closed:
            session.close(code, reason)
        else:
            self.close(code, reason)
