"""The poller's hot path: reading job states, thousands of GETs a second from one event loop.

httpx stays the client for every other provider call. For the poller's status reads it is not:
its async pool scans every connection per request, so it slows down as connections are added,
and a poller wants many. aiohttp does not, but builds a request object, joins URLs and runs its
cookie, header, timer and tracing machinery for every GET, which made it the largest CPU cost of
a poll once the database side was cheap.

``HttpTaskReader`` (the default) therefore reads job states over ``http_reader``'s small HTTP/1.1
client: the request bytes are prepared once, and only what a status read needs is parsed. The
figures behind that choice, and the alternatives measured (aiohttp, and the ``h11`` parser on the
same transports), are in docs/POLL_READER.md. When the environment names a proxy,
``make_task_reader`` picks ``AiohttpTaskReader`` instead, which speaks to proxies.

Both readers read an answer the same way: at most ``MAX_BODY_BYTES`` of body, counted on the wire
and once decoded (``http_reader.decode_body``), then ``client.read_answer``, as every other provider
call. Transport exceptions become ours here, at the boundary, always ``raise ... from``: no
answer in time is a ``ProviderTimeout``, no connection (or one lost mid-answer) a
``ProviderConnectionError``, bytes that are not an answer we read a ``ProviderBadResponse``.
"""

from __future__ import annotations

import re
import ssl
import urllib.request
from collections.abc import Mapping
from urllib.parse import quote, urlsplit

import aiohttp

from genline.config.errors import ProviderBadResponse, ProviderConnectionError, ProviderError, ProviderTimeout
from genline.config.settings import Settings
from genline.provider.client import Answer, answer_of, read_answer, request_headers
from genline.provider.http_reader import MAX_BODY_BYTES, ConnectionPool, HttpProtocolError, decode_body
from genline.provider.wire import TaskState, parse_task

_PLAIN_ID = re.compile(r"[A-Za-z0-9._~-]+")  # a task id that needs no quoting in a path


def read_task(
    status: int, headers: Mapping[str, str], raw: bytes, *, path: str, task_id: str
) -> tuple[TaskState, Answer]:
    """A status read's answer, from its status, headers (names in any case) and body as it came on
    the wire: decoded within the limit, read as every answer is (``client.read_answer``), parsed."""
    try:
        raw = decode_body(raw, headers.get("content-encoding"))
    except HttpProtocolError as exc:
        err = ProviderBadResponse(f"The provider's answer for {path} could not be read: {exc}.", status_code=status)
        err.answer = answer_of(status, headers)
        raise err from exc
    body, answer = read_answer(status, headers, raw)
    try:
        return parse_task(body, task_id=task_id), answer
    except ProviderError as err:
        err.answer = answer
        raise


def _unreadable(path: str, exc: Exception) -> ProviderBadResponse:
    return ProviderBadResponse(f"The provider's answer for {path} could not be read: {exc}.")


class HttpTaskReader:
    """``get_task`` for the poller over ``http_reader``'s HTTP/1.1 client (see the module's notes).
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
        lines = [f"Host: {host}"] + [f"{k}: {v}" for k, v in request_headers(settings.provider_api_key).items()]
        if any("\r" in line or "\n" in line for line in lines):
            raise ValueError("a provider header holds a line break")
        self._tail = (" HTTP/1.1\r\n" + "\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        self._read_timeout_s = settings.http_timeout_s
        self._connect_timeout_s = settings.http_connect_timeout_s
        self._limit = max_connections
        self._pool: ConnectionPool | None = None

    def _path(self, task_id: str) -> str:
        return self._prefix + (task_id if _PLAIN_ID.fullmatch(task_id) else quote(task_id, safe="/:@!$&'()*+,;="))

    async def get_task(self, task_id: str) -> tuple[TaskState, Answer]:
        path = self._path(task_id)
        try:
            status, headers, raw = await self._get(path)
        except TimeoutError as exc:
            raise ProviderTimeout(f"The provider did not answer {path} in time.") from exc
        except HttpProtocolError as exc:
            raise _unreadable(path, exc) from exc
        except OSError as exc:
            raise ProviderConnectionError(
                f"The provider could not be reached for {path} ({type(exc).__name__})."
            ) from exc
        return read_task(status, headers, raw, path=path, task_id=task_id)

    async def _get(self, path: str) -> tuple[int, Mapping[str, str], bytes]:
        if self._pool is None:
            self._pool = ConnectionPool(
                self._url,
                limit=self._limit,
                connect_timeout_s=self._connect_timeout_s,
                read_timeout_s=self._read_timeout_s,
                ssl_context=self._ssl_context,
            )
        return await self._pool.get(b"GET " + path.encode("ascii") + self._tail)

    async def aclose(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None


def make_task_reader(settings: Settings, *, max_connections: int) -> HttpTaskReader | AiohttpTaskReader:
    """The poller's reader: ``HttpTaskReader``, unless the environment routes the provider through
    a proxy (``HTTPS_PROXY`` and friends, which httpx honours for every other provider call): then
    aiohttp, which speaks to proxies, so status reads take the same way out as submits."""
    host = urlsplit(settings.provider_base_url).hostname or ""
    if urllib.request.getproxies() and not urllib.request.proxy_bypass(host):
        return AiohttpTaskReader(settings, max_connections=max_connections, trust_env=True)
    return HttpTaskReader(settings, max_connections=max_connections)


class AiohttpTaskReader:
    """``get_task`` for the poller on one pooled aiohttp session (created on first use, inside the
    poller's event loop): the reader when a proxy is configured, and a drop-in otherwise
    (``Poller(rt, client=AiohttpTaskReader(settings))``). aiohttp frames the answer; the body is
    read within the limit and decoded by ``read_task``, as ``HttpTaskReader``'s is."""

    def __init__(self, settings: Settings, *, max_connections: int = 64, trust_env: bool = False) -> None:
        self._trust_env = trust_env
        self._base = settings.provider_base_url
        self._headers = request_headers(settings.provider_api_key)
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
                auto_decompress=False,  # decoded by read_task, within the limit
            )
        return self._session

    async def get_task(self, task_id: str) -> tuple[TaskState, Answer]:
        path = f"v1/tasks/{task_id}"
        try:
            async with self._http().get(path) as response:
                status, headers = response.status, response.headers
                raw = await _read_within(response, MAX_BODY_BYTES)
        except TimeoutError as exc:
            raise ProviderTimeout(f"The provider did not answer /{path} in time.") from exc
        except (aiohttp.ClientResponseError, HttpProtocolError) as exc:  # bytes that are not an answer
            raise _unreadable("/" + path, exc) from exc
        except aiohttp.ClientError as exc:
            raise ProviderConnectionError(
                f"The provider could not be reached for /{path} ({type(exc).__name__})."
            ) from exc
        return read_task(status, headers, raw, path="/" + path, task_id=task_id)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


async def _read_within(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """The body, refused once it passes ``limit`` bytes (aiohttp's ``read`` takes any length)."""
    if response.content_length is not None and response.content_length > limit:
        raise HttpProtocolError("the answer is too large")
    parts: list[bytes] = []
    size = 0
    while chunk := await response.content.readany():
        size += len(chunk)
        if size > limit:
            raise HttpProtocolError("the answer is too large")
        parts.append(chunk)
    return b"".join(parts)
