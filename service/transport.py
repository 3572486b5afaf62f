"""Writing pre-framed WebSocket messages to a Tornado IOStream, cheaply.

Fan-out writes the same :class:`~service.session.OutFrame` to many sockets. Tornado's
``write_message`` frames the payload again for every recipient and allocates a Future per write;
here a frame is built once and, when the stream has nothing queued, handed straight to the
kernel with ``socket.send``. Only what the kernel does not take goes through ``IOStream.write``,
whose buffer is the session's send queue (its size is what the 4008 cap is checked against).

This reads ``IOStream._write_buffer``; setup.cfg pins Tornado below 7 for that reason and
tests/test_transport.py fails if the attribute changes.
"""

from __future__ import annotations

import contextlib
import errno
import logging

from tornado.iostream import IOStream, StreamClosedError
from tornado.websocket import WebSocketProtocol

from service.session import OutFrame

log = logging.getLogger("wirehub.transport")

_RETRY = (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR)


class StreamTransport:
    """:class:`service.session.Transport` over a WebSocket connection's stream."""

    __slots__ = ("_close", "_direct", "_protocol", "_stream")

    def __init__(self, protocol: WebSocketProtocol, close: object) -> None:
        self._protocol = protocol
        self._stream: IOStream = protocol.stream  # type: ignore[attr-defined,assignment]
        self._close = close
        # SSL streams must go through their own write path.
        self._direct = type(self._stream) is IOStream

    @property
    def closed(self) -> bool:
        # Once our Close frame is out (whoever sent it: us, Tornado on 1009 or a ping timeout),
        # no data frame may follow it (RFC 6455 section 5.5.1).
        return self._protocol.server_terminated or self._stream.closed()

    def buffered(self) -> int:
        buf = self._stream._write_buffer
        return len(buf) if buf is not None else 0

    def send_frame(self, frame: OutFrame) -> None:
        stream = self._stream
        if self._protocol.server_terminated or stream.closed():
            return
        data: bytes | memoryview = frame.wire
        if self._direct and not stream._write_buffer and not stream._connecting:
            try:
                sent = stream.socket.send(data)
            except OSError as exc:
                if exc.errno not in _RETRY:
                    stream.close(exc_info=True)
                    return
                sent = 0
            if sent == len(data):
                return
            data = memoryview(data)[sent:]
        with contextlib.suppress(StreamClosedError):
            stream.write(data)

    def close(self, code: int, reason: str) -> None:
        close = self._close
        assert callable(close)
        close(code, reason)
