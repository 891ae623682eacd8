"""The little HTTP/1.1 client under the poller's status reads (``poll_client.HttpTaskReader``).

It speaks only what a status read needs, directly on asyncio's transports: one ``GET`` at a time on
each pooled keep-alive connection, the request bytes prepared by the caller, the answer framed by
``Content-Length``, chunked transfer coding or the connection's end. Why hand-written rather than
aiohttp or h11, and what that costs and saves, is measured in docs/POLL_READER.md.

It is strict where leniency would cost memory or time, and refuses at once (``HttpProtocolError``)
what it does not read:

- at most ``MAX_HEAD_BYTES`` of status line and headers, at most ``MAX_BODY_BYTES`` of body, counted
  on the wire and again once decoded (a small gzip body can inflate a thousandfold);
- transfer codings: ``chunked`` only (``identity`` ignored); a body coded any other way is refused,
  as its length could not be known;
- content codings: ``gzip`` (``x-gzip``) and ``deflate`` (zlib-wrapped or raw), in any case;
  anything else is refused;
- lines end in CRLF; a bare LF (in the head or a chunk line) is refused as soon as it is seen,
  rather than waited past until the read timeout; so is an obs-folded header line (one starting
  with white space), and a header name with white space in it.

It keeps TLS for https (the default context: certificates and host names checked), a connect
timeout and a read timeout (from the request sent to the answer read, checked by one shared timer),
and at most ``limit`` connections. It does not follow redirects (a 3xx is the caller's to judge),
pipeline requests or speak to proxies. A pooled connection the server had closed (a keep-alive
timeout on its side) is replaced and the GET sent again, once, if not one byte of an answer came.
"""

from __future__ import annotations

import asyncio
import ssl
import zlib
from collections import deque
from typing import Any
from urllib.parse import urlsplit

MAX_HEAD_BYTES = 64 * 1024
MAX_BODY_BYTES = 16 * 1024 * 1024  # of the body as decoded; the wire bytes may not exceed it either
_MISSING: Any = object()


class HttpProtocolError(Exception):
    """The server's bytes were not an HTTP/1.1 answer we read."""


class ServerDisconnected(ConnectionError):
    """The connection ended before the whole answer came."""

    def __init__(self, message: str, *, answered: bool) -> None:
        super().__init__(message)
        self.answered = answered  # some bytes of an answer had arrived


class Headers(dict[str, str]):
    """An answer's headers, names lower-cased (``get`` takes them in any case)."""

    def get(self, name: str, default: Any = None) -> Any:
        value = super().get(name, _MISSING)  # names are mostly asked for in lower case already
        return super().get(name.lower(), default) if value is _MISSING else value


def _bare_lf(data: bytes | bytearray) -> bool:
    return data.count(b"\n") != data.count(b"\r\n")


class _Connection(asyncio.Protocol):
    """One keep-alive connection: one request at a time, its answer parsed as the bytes come."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future[tuple[int, Headers, bytes]] | None = None
        self.closed = False
        self.reusable = False
        self.answered = False
        self.deadline = 0.0  # loop.time() by which the answer must have come
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.headers: Headers | None = None
        self.length = -1  # body bytes expected; -1: until the connection ends; -2: chunked trailer
        self.chunked = False
        self.chunks: list[bytes] = []
        self.received = 0  # body bytes of the chunks so far
        self.keep_alive = True

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.waiter is None:  # bytes nobody asked for: this connection cannot be trusted again
            self.abort()
            return
        self.answered = True
        self.buffer += data
        try:
            self._parse()
        except HttpProtocolError as exc:
            self._fail(exc)

    def eof_received(self) -> bool:
        return False  # close our side too; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is None or self.waiter.done():
            return
        if self.headers is not None and self.length == -1 and not self.chunked:  # framed by the end
            self._finish(bytes(self.buffer))
            return
        self.waiter.set_exception(
            ServerDisconnected("the provider closed the connection mid-answer", answered=self.answered)
        )

    # the request
    def send(self, request: bytes, loop: asyncio.AbstractEventLoop) -> asyncio.Future[tuple[int, Headers, bytes]]:
        assert self.transport is not None
        self.waiter = loop.create_future()
        self.answered = False
        self.reusable = False
        self.transport.write(request)
        return self.waiter

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def _fail(self, exc: BaseException) -> None:
        waiter = self.waiter
        self.abort()
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    def _finish(self, body: bytes) -> None:
        waiter, headers = self.waiter, self.headers
        assert waiter is not None and headers is not None
        status, keep_alive = self.status, self.keep_alive
        self.waiter = None
        self._reset()
        if self.buffer:  # more than one answer to one request
            keep_alive = False
        self.reusable = keep_alive and not self.closed
        if not keep_alive:
            self.abort()
        if not waiter.done():
            waiter.set_result((status, headers, body))

    def _parse(self) -> None:
        buffer = self.buffer
        while self.headers is None:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                if _bare_lf(buffer):
                    raise HttpProtocolError("a line of the answer's head ends in a bare LF")
                if len(buffer) > MAX_HEAD_BYTES:
                    raise HttpProtocolError("the answer's head is too large")
                return
            self._read_head(bytes(buffer[:end]))
            del buffer[: end + 4]
        if self.chunked:
            self._read_chunks()
        elif self.length >= 0:
            if len(buffer) >= self.length:
                body = bytes(buffer[: self.length])
                del buffer[: self.length]
                self._finish(body)
        elif len(buffer) > MAX_BODY_BYTES:
            raise HttpProtocolError("the answer is too large")

    def _read_head(self, head: bytes) -> None:
        if len(head) > MAX_HEAD_BYTES:
            raise HttpProtocolError("the answer's head is too large")
        if _bare_lf(head):
            raise HttpProtocolError("a line of the answer's head ends in a bare LF")
        lines = head.decode("latin-1").split("\r\n")
        status_line = lines[0]
        if (
            not status_line.startswith("HTTP/1.")
            or len(status_line) < 12
            or status_line[8] != " "
            or not status_line[9:12].isdigit()
        ):
            raise HttpProtocolError("not an HTTP/1.x status line")
        status = int(status_line[9:12])
        if 100 <= status < 200:
            return  # an interim answer (100 Continue, 103 Early Hints): the real one follows
        headers = Headers()
        for line in lines[1:]:
            if line[:1] in (" ", "\t"):
                raise HttpProtocolError("a folded (obs-fold) header line")
            name, sep, value = line.partition(":")
            if not sep or not name or name != name.strip() or " " in name or "\t" in name:
                raise HttpProtocolError("a malformed header line")
            key = name.lower()
            value = value.strip()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        connection = headers.get("connection", "").lower()
        self.keep_alive = "close" not in connection if status_line[7] == "1" else "keep-alive" in connection
        self.status = status
        self.headers = headers
        codings = headers.get("transfer-encoding")
        if status in (204, 304):
            self.length = 0
        elif codings is not None and _transfer_codings(codings):
            self.chunked = True
        elif "content-length" in headers:
            length = headers["content-length"]
            if not length.isdigit():
                raise HttpProtocolError("a malformed Content-Length")
            if int(length) > MAX_BODY_BYTES:
                raise HttpProtocolError("the answer is too large")
            self.length = int(length)
        else:
            self.keep_alive = False  # the body ends with the connection

    def _read_chunks(self) -> None:
        buffer = self.buffer
        while True:
            lf = buffer.find(b"\n")
            if lf < 0:
                if len(buffer) > MAX_HEAD_BYTES:
                    raise HttpProtocolError("a chunk header is too large")
                return
            if lf == 0 or buffer[lf - 1] != 13:
                raise HttpProtocolError("a chunk line ends in a bare LF")
            line_end = lf - 1
            if self.length == -2:  # after the last chunk: trailer lines until an empty one
                del buffer[: line_end + 2]
                if line_end == 0:
                    self._finish(b"".join(self.chunks))
                    return
                continue
            size_text = bytes(buffer[:line_end]).split(b";", 1)[0].strip()
            try:
                if not size_text.isalnum():
                    raise ValueError(size_text)
                size = int(size_text, 16)
            except ValueError:
                raise HttpProtocolError("a malformed chunk size") from None
            if self.received + size > MAX_BODY_BYTES:
                raise HttpProtocolError("the answer is too large")
            if size == 0:
                del buffer[: line_end + 2]
                self.length = -2
                continue
            start = line_end + 2
            if len(buffer) < start + size + 2:
                return
            if buffer[start + size : start + size + 2] != b"\r\n":
                raise HttpProtocolError("a chunk not ended by CRLF")
            self.chunks.append(bytes(buffer[start : start + size]))
            self.received += size
            del buffer[: start + size + 2]


def _transfer_codings(value: str) -> bool:
    """True for chunked; False for none (``identity`` alone); anything else is refused."""
    codings = [c for c in (part.strip().lower() for part in value.split(",")) if c and c != "identity"]
    if not codings:
        return False
    if codings != ["chunked"]:
        raise HttpProtocolError(f"the transfer coding {value!r} is not one we read (chunked only)")
    return True


def decode_body(raw: bytes, coding: str | None, limit: int = MAX_BODY_BYTES) -> bytes:
    """``raw`` with its content coding undone, at most ``limit`` bytes of it. We ask for no compression;
    a server that compresses anyway is still understood (gzip, deflate, in any case)."""
    name = (coding or "").strip().lower()
    if not name or name == "identity":
        return raw
    if name in ("gzip", "x-gzip"):
        wbits = 16 + zlib.MAX_WBITS
    elif name == "deflate":
        wrapped = len(raw) >= 2 and raw[0] & 0x0F == 8 and (raw[0] << 8 | raw[1]) % 31 == 0  # a zlib header
        wbits = zlib.MAX_WBITS if wrapped else -zlib.MAX_WBITS  # zlib-wrapped, or raw deflate as some send
    else:
        raise HttpProtocolError(f"the content coding {coding!r} is not one we read (gzip, deflate)")
    out = bytearray()
    data = raw
    try:
        while data:  # gzip allows members one after the other
            inflater = zlib.decompressobj(wbits)
            out += inflater.decompress(data, limit + 1 - len(out))
            if len(out) > limit or inflater.unconsumed_tail:
                raise HttpProtocolError("the answer is too large once decoded")
            if not inflater.eof:
                raise HttpProtocolError(f"the {name} body is cut short")
            data = inflater.unused_data
            if wbits != 16 + zlib.MAX_WBITS:
                break  # one deflate stream; what follows it is ignored, as zlib does
    except zlib.error as exc:
        raise HttpProtocolError(f"the {name} body is not valid") from exc
    return bytes(out)


class ConnectionPool:
    """At most ``limit`` keep-alive connections to one origin (idle ones reused last-in first-out),
    and ``get``: one GET on one of them. Created inside the event loop that uses it."""

    connection_class: type[_Connection] = _Connection  # what parses answers (lab/bench_http.py swaps it)

    def __init__(
        self,
        url: str,
        *,
        limit: int,
        connect_timeout_s: float,
        read_timeout_s: float,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.ssl: ssl.SSLContext | None = None
        if parts.scheme == "https":
            self.ssl = ssl_context or ssl.create_default_context()
        self.limit = max(1, limit)
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self.idle: list[_Connection] = []
        self.conns: set[_Connection] = set()
        self.open = 0
        self.waiters: deque[asyncio.Future[None]] = deque()
        # One timer for all read timeouts, not one per request (a TimerHandle per GET was a
        # noticeable share of the poller's CPU): it looks at the connections waiting for an answer
        # every quarter of the timeout (at most a second), so a read times out within 25% (or 1 s).
        self.tick_s = min(1.0, max(0.01, read_timeout_s / 4))
        self._ticker: asyncio.TimerHandle | None = None

    async def get(self, request: bytes) -> tuple[int, Headers, bytes]:
        """Send ``request`` (a whole GET) and return the answer's status, headers and body as it
        came on the wire (content coding not undone: see ``decode_body``)."""
        loop = asyncio.get_running_loop()
        while True:
            conn, reused = await self.acquire()
            conn.deadline = loop.time() + self.read_timeout_s
            waiter = conn.send(request, loop)
            self.watch(loop)
            try:
                return await waiter
            except ServerDisconnected as exc:
                if reused and not exc.answered:
                    continue  # the server had closed this idle connection: once more on a new one
                raise
            finally:
                self.release(conn)

    async def acquire(self) -> tuple[_Connection, bool]:
        """A connection, and whether it was used before (so may have been closed by the server)."""
        while True:
            while self.idle:
                conn = self.idle.pop()
                if not conn.closed and conn.reusable:
                    return conn, True
                self._drop(conn)
            if self.open < self.limit:
                break
            waiter = asyncio.get_running_loop().create_future()
            self.waiters.append(waiter)
            try:
                await waiter
            except BaseException:
                if not waiter.cancelled():
                    waiter.cancel()
                self._wake()  # pass a wake-up this waiter will not use on
                raise
        self.open += 1
        try:
            loop = asyncio.get_running_loop()
            async with asyncio.timeout(self.connect_timeout_s):
                _, conn = await loop.create_connection(
                    self.connection_class,
                    self.host,
                    self.port,
                    ssl=self.ssl,
                    server_hostname=self.host if self.ssl is not None else None,
                )
        except BaseException:
            self.open -= 1
            self._wake()
            raise
        self.conns.add(conn)
        return conn, False

    def watch(self, loop: asyncio.AbstractEventLoop) -> None:
        """Make sure the read-timeout timer runs (a request was just sent)."""
        if self._ticker is None:
            self._ticker = loop.call_later(self.tick_s, self._tick, loop)

    def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        self._ticker = None
        now = loop.time()
        waiting = False
        for conn in list(self.conns):
            waiter = conn.waiter
            if waiter is None or waiter.done():
                continue
            if conn.deadline <= now:
                conn._fail(TimeoutError())
            else:
                waiting = True
        if waiting:
            self.watch(loop)

    def release(self, conn: _Connection) -> None:
        if conn.closed or not conn.reusable:
            self._drop(conn)
        else:
            self.idle.append(conn)
            self._wake()

    def _drop(self, conn: _Connection) -> None:
        if not conn.closed:
            conn.abort()
        self.conns.discard(conn)
        self.open -= 1
        self._wake()

    def _wake(self) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def close(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None
        for conn in self.conns:
            conn.abort()
        self.conns.clear()
        self.idle.clear()
