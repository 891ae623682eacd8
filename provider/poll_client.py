"""The poller's hot path: reading job states, thousands of GETs a second from one event loop.

httpx stays the client for every other provider call. For the poller's status reads it is not:
measured here against the same simulator, httpx's async pool managed 1,000-1,250 GET/s and fell to
~120/s at 64 connections (its pool scans every connection per request), while aiohttp did
9,000-13,000/s. aiohttp in turn spends ~60-100 µs of CPU on one GET (building a request object,
URL joining, cookie and header machinery, timers, tracing hooks), which made it the largest cost
of a poll once the database side was cheap.

``HttpTaskReader`` (the default) therefore speaks the little HTTP/1.1 a status read needs, directly
on asyncio's transports: one ``GET`` at a time on each pooled keep-alive connection, the request
bytes prepared once, the answer framed by ``Content-Length``, chunked transfer coding or the
connection's end. ~35-45 µs of CPU a GET here, against ~80-100 µs for aiohttp (same simulator, same
concurrency). What it keeps: TLS for https (the default context: certificates and host names
checked), a connect timeout and a read timeout (``http_timeout_s``, from the request sent to the
answer read, checked by one shared timer), at most ``max_connections`` connections, gzip or deflate
bodies understood should a server compress unasked, no proxies: when the environment names one,
``make_task_reader`` picks aiohttp instead. What it does not do: follow redirects (a 3xx is an
unexpected answer, as with the httpx client) or pipeline requests. A pooled connection the server
had closed (a keep-alive timeout on its side) is replaced and the GET sent again, once, if not one
byte of an answer had come. ``AiohttpTaskReader`` remains as the reference and a drop-in.

Requests and answers are read exactly as ``provider.client`` reads them; only the transport
differs. Transport exceptions become ours here, at the boundary.
"""

from __future__ import annotations

import asyncio
import json
import re
import ssl
import urllib.request
import zlib
from collections import deque
from typing import Any
from urllib.parse import quote, urlsplit

import aiohttp

from genline.config.errors import ProviderBadResponse, ProviderConnectionError, ProviderError, ProviderTimeout
from genline.config.settings import Settings
from genline.provider.client import Answer, _headers
from genline.provider.wire import TaskState, error_for_status, parse_task

MAX_HEAD_BYTES = 64 * 1024
MAX_BODY_BYTES = 16 * 1024 * 1024
_MISSING: Any = object()
_PLAIN_ID = re.compile(r"[A-Za-z0-9._~-]+")  # a task id that needs no quoting in a path


def read_task_answer(status: int, headers: Any, raw: bytes, *, path: str, task_id: str) -> tuple[TaskState, Answer]:
    """A status read's answer, as ``provider.client.read_answer`` reads one: an HTTP error becomes
    the matching ProviderError (carrying the answer, for the audit), a body that is not JSON a
    ``ProviderBadResponse``. ``headers`` is anything with a case-insensitive ``get``."""
    remaining = headers.get("x-ratelimit-remaining")
    answer = Answer(
        status_code=status,
        request_id=headers.get("x-request-id"),
        ratelimit_remaining=int(remaining) if remaining and remaining.isdigit() else None,
    )
    body: Any
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        body = None
    err: ProviderError | None = None
    if status >= 400:
        err = error_for_status(status, body, retry_after=headers.get("retry-after"), request_id=answer.request_id)
    elif body is None:
        err = ProviderBadResponse(
            "The provider answered with something that is not JSON.",
            status_code=status,
            request_id=answer.request_id,
        )
    if err is not None:
        err.answer = answer  # type: ignore[attr-defined]  # read by the gateway's audit
        raise err
    return parse_task(body, task_id=task_id), answer


# --- the HTTP/1.1 transport ----------------------------------------------------------------------
class HttpProtocolError(Exception):
    """The server's bytes were not an HTTP/1.1 answer we can read."""


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
        self.length = -1  # body bytes expected; -1: until the connection ends
        self.chunked = False
        self.chunks: list[bytes] = []
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
        if self.headers is not None and self.length < 0 and not self.chunked:  # framed by the end
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
                if len(buffer) > MAX_HEAD_BYTES:
                    raise HttpProtocolError("answer headers too long")
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
            raise HttpProtocolError("answer too long")

    def _read_head(self, head: bytes) -> None:
        lines = head.decode("latin-1").split("\r\n")
        status_line = lines[0]
        if not status_line.startswith("HTTP/1.") or len(status_line) < 12 or not status_line[9:12].isdigit():
            raise HttpProtocolError("not an HTTP/1.x status line")
        status = int(status_line[9:12])
        if 100 <= status < 200:
            return  # an interim answer (100 Continue, 103 Early Hints): the real one follows
        headers = Headers()
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                raise HttpProtocolError("a header line without a colon")
            key = name.strip().lower()
            value = value.strip()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        connection = headers.get("connection", "").lower()
        self.keep_alive = "close" not in connection if status_line[7] == "1" else "keep-alive" in connection
        self.status = status
        self.headers = headers
        coding = headers.get("transfer-encoding", "").lower()
        if status in (204, 304):
            self.length = 0
        elif coding:
            if not coding.endswith("chunked"):
                raise HttpProtocolError(f"transfer coding {coding!r}")
            self.chunked = True
        elif "content-length" in headers:
            length = headers["content-length"]
            if not length.isdigit() or int(length) > MAX_BODY_BYTES:
                raise HttpProtocolError("a bad Content-Length")
            self.length = int(length)
        else:
            self.keep_alive = False  # the body ends with the connection

    def _read_chunks(self) -> None:
        buffer = self.buffer
        while True:
            line_end = buffer.find(b"\r\n")
            if line_end < 0:
                if len(buffer) > MAX_HEAD_BYTES:
                    raise HttpProtocolError("a chunk header too long")
                return
            if self.length == -2:  # after the last chunk: trailer lines until an empty one
                del buffer[: line_end + 2]
                if line_end == 0:
                    self._finish(b"".join(self.chunks))
                    return
                continue
            size_text = bytes(buffer[:line_end]).split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise HttpProtocolError("a bad chunk size") from None
            if size == 0:
                del buffer[: line_end + 2]
                self.length = -2
                continue
            if len(buffer) < line_end + 2 + size + 2:
                if sum(map(len, self.chunks)) + size > MAX_BODY_BYTES:
                    raise HttpProtocolError("answer too long")
                return
            start = line_end + 2
            if buffer[start + size : start + size + 2] != b"\r\n":
                raise HttpProtocolError("a chunk not ended by CRLF")
            self.chunks.append(bytes(buffer[start : start + size]))
            del buffer[: start + size + 2]


class _Pool:
    """At most ``limit`` connections to one origin; idle ones are reused last-in first-out."""

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
        # One timer for all read timeouts, not one per request (a TimerHandle per GET cost ~8% of
        # the poller's CPU): it looks at the connections waiting for an answer every quarter of
        # the timeout (at most a second), so a read times out within 25% (or 1 s) of it.
        self.tick_s = min(1.0, max(0.01, read_timeout_s / 4))
        self._ticker: asyncio.TimerHandle | None = None

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
                    _Connection,
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


class HttpTaskReader:
    """``get_task`` for the poller over its own small HTTP/1.1 client (see the module's notes).
    The connection pool is created on first use, inside the poller's event loop."""

    def __init__(
        self, settings: Settings, *, max_connections: int = 64, ssl_context: ssl.SSLContext | None = None
    ) -> None:
        parts = urlsplit(settings.provider_base_url)
        self._url = settings.provider_base_url
        self._ssl_context = ssl_context  # https only; None: the default context (certificates checked)
        self._prefix = parts.path.rstrip("/") + "/v1/tasks/"
        default_port = 443 if parts.scheme == "https" else 80
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        if parts.port and parts.port != default_port:
            host = f"{host}:{parts.port}"
        lines = [f"Host: {host}"] + [f"{k}: {v}" for k, v in _headers(settings.provider_api_key).items()]
        if any("\r" in line or "\n" in line for line in lines):
            raise ValueError("a provider header holds a line break")
        self._tail = (" HTTP/1.1\r\n" + "\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        self._read_timeout_s = settings.http_timeout_s
        self._connect_timeout_s = settings.http_connect_timeout_s
        self._limit = max_connections
        self._pool: _Pool | None = None

    def _path(self, task_id: str) -> str:
        return self._prefix + (task_id if _PLAIN_ID.fullmatch(task_id) else quote(task_id, safe="/:@!$&'()*+,;="))

    async def get_task(self, task_id: str) -> tuple[TaskState, Answer]:
        path = self._path(task_id)
        try:
            status, headers, raw = await self._get(path)
        except TimeoutError as exc:
            raise ProviderTimeout(f"The provider did not answer {path} in time.") from exc
        except (OSError, HttpProtocolError) as exc:
            raise ProviderConnectionError(
                f"The provider could not be reached for {path} ({type(exc).__name__})."
            ) from exc
        encoding = headers.get("content-encoding")
        if encoding and encoding != "identity":
            raw = _decode(raw, encoding)
        return read_task_answer(status, headers, raw, path=path, task_id=task_id)

    async def read(self, task_id: str) -> tuple[int, bytes]:
        """One status read's HTTP status and body, not interpreted (the benchmark's yardstick)."""
        status, _headers, raw = await self._get(self._path(task_id))
        return status, raw

    async def _get(self, path: str) -> tuple[int, Headers, bytes]:
        if self._pool is None:
            self._pool = _Pool(
                self._url,
                limit=self._limit,
                connect_timeout_s=self._connect_timeout_s,
                read_timeout_s=self._read_timeout_s,
                ssl_context=self._ssl_context,
            )
        pool = self._pool
        loop = asyncio.get_running_loop()
        request = b"GET " + path.encode("ascii") + self._tail
        while True:
            conn, reused = await pool.acquire()
            conn.deadline = loop.time() + self._read_timeout_s
            waiter = conn.send(request, loop)
            pool.watch(loop)
            try:
                return await waiter
            except ServerDisconnected as exc:
                if reused and not exc.answered:
                    continue  # the server had closed this idle connection: once more on a new one
                raise
            finally:
                pool.release(conn)

    async def aclose(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None


def _decode(raw: bytes, encoding: str) -> bytes:
    """We ask for no compression; a server that compresses anyway is still understood (gzip,
    deflate). Anything else is left as is, and fails as a body that is not JSON."""
    try:
        if encoding in ("gzip", "x-gzip"):
            return zlib.decompress(raw, 16 + zlib.MAX_WBITS)
        if encoding == "deflate":
            try:
                return zlib.decompress(raw)
            except zlib.error:
                return zlib.decompress(raw, -zlib.MAX_WBITS)
    except zlib.error:
        return b""
    return raw


def make_task_reader(settings: Settings, *, max_connections: int) -> HttpTaskReader | AiohttpTaskReader:
    """The poller's reader: ``HttpTaskReader``, unless the environment routes the provider through
    a proxy (``HTTPS_PROXY`` and friends, which httpx honours for every other provider call): then
    aiohttp, which speaks to proxies, so status reads take the same way out as submits."""
    host = urlsplit(settings.provider_base_url).hostname or ""
    if urllib.request.getproxies() and not urllib.request.proxy_bypass(host):
        return AiohttpTaskReader(settings, max_connections=max_connections, trust_env=True)
    return HttpTaskReader(settings, max_connections=max_connections)


# --- the reference: aiohttp ------------------------------------------------------------------------
class AiohttpTaskReader:
    """``get_task`` for the poller, on one pooled aiohttp session (created on first use, inside
    the poller's event loop). Slower than ``HttpTaskReader``; kept as the reference it is measured
    against and as a drop-in (``Poller(rt, client=AiohttpTaskReader(settings))``)."""

    def __init__(self, settings: Settings, *, max_connections: int = 64, trust_env: bool = False) -> None:
        self._trust_env = trust_env
        self._base = settings.provider_base_url
        self._headers = _headers(settings.provider_api_key)
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=settings.http_connect_timeout_s, sock_read=settings.http_timeout_s
        )
        self._limit = max_connections
        self._session: aiohttp.ClientSession | None = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                base_url=self._base + "/",
                headers=self._headers,
                timeout=self._timeout,
                connector=aiohttp.TCPConnector(limit=self._limit, ttl_dns_cache=300),
                trust_env=self._trust_env,
            )
        return self._session

    async def get_task(self, task_id: str) -> tuple[TaskState, Answer]:
        path = f"v1/tasks/{task_id}"
        try:
            async with self._http().get(path) as response:
                raw = await response.read()
                status, headers = response.status, response.headers
        except TimeoutError as exc:
            raise ProviderTimeout(f"The provider did not answer /{path} in time.") from exc
        except aiohttp.ClientError as exc:
            raise ProviderConnectionError(
                f"The provider could not be reached for /{path} ({type(exc).__name__})."
            ) from exc
        return read_task_answer(status, headers, raw, path=path, task_id=task_id)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
