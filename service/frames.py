"""The WebSocket protocol of a connection: Tornado's, with a frame reader of our own and RFC 6455's
close codes where Tornado drops the TCP connection.

Tornado's reader awaits a Future per frame part (header, length, mask, payload: four per frame).
:meth:`Protocol._receive_frame_loop` reads what the socket has (one ``read_bytes(partial=True)``)
and parses every whole frame in it in a plain loop; a frame bigger than what arrived is completed
with one exact read. The order and the backpressure stay Tornado's: a frame is handled only after
the handler's work for the previous one completed (``busy`` is set meanwhile, see
:class:`wirehub.keepalive.Keepalive`).

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
from collections.abc import Awaitable
from typing import TYPE_CHECKING

from tornado.concurrent import Future
from tornado.iostream import StreamClosedError
from tornado.util import _websocket_mask
from tornado.websocket import WebSocketProtocol13

from wirehub.protocol import CloseCode

if TYPE_CHECKING:
    from wirehub.session import Session

#: close codes a peer may send (RFC 6455 section 7.4); anything else fails the connection with 1002
_VALID_CLOSE = frozenset((1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014))
#: as Tornado: yield to the loop after this much input handled without a pause (a frame counts 1 KiB)
_YIELD_THRESHOLD = 256 * 1024
_FRAME_COST = 1024
_READ_CHUNK = 65536


def _valid_close_code(code: int) -> bool:
    return code in _VALID_CLOSE or 3000 <= code <= 4999


class Protocol(WebSocketProtocol13):
    """One connection's protocol; ``handler`` is the endpoint's :class:`~wirehub.websocket.WirehubSocket`."""

    #: True while the handler's work for a frame is pending (the next frame is not read meanwhile)
    busy = False
    #: the keepalive slice this connection is pinged in (-1: none)
    keepalive_slice = -1

    def _session(self) -> Session | None:
        return getattr(self.handler, "session", None)

    async def _receive_frame_loop(self, opened: Awaitable[None] | None = None) -> None:
        """Read and handle frames until the connection ends (first awaiting ``opened``, the rest of the
        open hooks). One coroutine, no helper awaited per frame: each suspended coroutine frame costs
        memory for the connection's whole life."""
        try:
            if opened is not None:
                await opened
            stream = self.stream
            max_size = self.params.max_message_size
            mask_fn = _websocket_mask
            buf = b""
            frag: bytearray | None = None
            frag_opcode = 0
            work = 0
            while not self.client_terminated:
                chunk = await stream.read_bytes(_READ_CHUNK, partial=True)
                buf = buf + chunk if buf else chunk
                n = len(buf)
                pos = 0
                while n - pos >= 2 and not self.client_terminated:
                    b0 = buf[pos]
                    b1 = buf[pos + 1]
                    opcode = b0 & 0x0F
                    length = b1 & 0x7F
                    if b0 & 0x70 or (opcode & 0x8 and length >= 126):  # reserved bits; a long control frame
                        self._protocol_error()
                        return
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
                        return
                    masked = b1 & 0x80
                    start = head + 4 if masked else head
                    end = start + length
                    if end > n:  # a frame bigger than what arrived: read exactly the rest of it
                        if start > n:
                            break
                        buf = buf[pos:] + await stream.read_bytes(end - n)
                        start, head, end, pos = start - pos, head - pos, end - pos, 0
                        n = len(buf)
                    data = mask_fn(buf[head:start], buf[start:end]) if masked else buf[start:end]
                    pos = end
                    if opcode & 0x8:
                        if not b0 & 0x80:  # a fragmented control frame
                            self._protocol_error()
                            return
                    elif opcode == 0:
                        if frag is None:  # a continuation with nothing to continue
                            self._protocol_error()
                            return
                        frag.extend(data)
                        if not b0 & 0x80:
                            work += _FRAME_COST
                            continue
                        opcode, data, frag = frag_opcode, bytes(frag), None
                    elif frag is not None:  # a new message before the fragmented one is complete
                        self._protocol_error()
                        return
                    elif not b0 & 0x80:
                        frag, frag_opcode = bytearray(data), opcode
                        work += _FRAME_COST
                        continue
                    handled = self._handle_message(opcode, data)
                    work += _FRAME_COST + length
                    if handled is not None:
                        work = 0
                        self.busy = True
                        try:
                            await handled
                        finally:
                            self.busy = False
                    elif work >= _YIELD_THRESHOLD:  # one busy client must not starve the others
                        work = 0
                        await asyncio.sleep(0)
                buf = buf[pos:] if pos < n else b""
        except StreamClosedError:
            self._abort()
        finally:
            self.handler.on_ws_connection_close(self.close_code, self.close_reason)

    def _protocol_error(self) -> None:
        """RFC 6455 wants a 1002 Close frame before the TCP close (Tornado only aborts); once our Close
        frame is out, or the stream is gone, a plain abort."""
        if not self.server_terminated and not self.stream.closed():
            self.client_terminated = True  # read nothing more: close the TCP connection right after ours
            self._fail(CloseCode.PROTOCOL_ERROR, "protocol error")
        else:
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
