"""Outbound HTTP on someone else's say-so: only to public addresses, with size and time limits.

genline fetches URLs it did not choose (the provider's result links), POSTs to URLs a user chose
(``callback_url``) and hands a user's image URL to the provider. Each of them could point inside
our network (the cloud metadata service, a database's admin page, the provider simulator). Every
such URL passes this module:

- **http(s) only** (the scheme compared case-insensitively, as every parser does), **no userinfo**
  (``user:pass@``: never a way to send credentials, and a classic way to confuse parsers), no
  backslashes, spaces or control characters, and the host must read the same to ``urllib`` and
  to httpx (a URL two parsers read differently is refused, not guessed at).
- **The host is resolved once and the connection pinned to that address.** ``SafeTransport``
  hands httpcore a network backend whose ``connect_tcp`` resolves the name, refuses it unless
  every address is public, and connects to exactly the addresses it checked (an IP literal is
  handed to the socket, so nothing is resolved twice: no DNS-rebinding window). TLS still
  verifies the certificate against the name (httpcore passes the URL's host as SNI), and the
  ``Host`` header is the URL's. Connections are pooled by name, so a kept-alive connection only
  ever serves the name it was checked for.
- **Refused ranges** (``refusal``): loopback, private (RFC 1918, ``fc00::/7``), link-local
  (``169.254/16`` — the metadata service — and ``fe80::/10``), shared/CGNAT, multicast, reserved,
  unspecified (``0.0.0.0``, ``::``), documentation and benchmarking nets, and any IPv6 address
  that carries an IPv4 one (IPv4-mapped ``::ffff:a.b.c.d``, NAT64 ``64:ff9b::/96``, 6to4, Teredo)
  judged by the IPv4 address inside. The stdlib's ``ipaddress`` flags are the base; an explicit
  list is checked as well, because their meaning moved between Python releases (3.11.7 does not
  look inside an IPv4-mapped address).
- **Host names that are local by definition** are refused by name, whether or not they resolve
  here: ``localhost`` (and ``localhost.``, ``*.localhost``), ``*.local``, ``*.internal``,
  ``*.localdomain``, ``*.home.arpa``, ``*.lan``, ``*.intranet``, ``*.corp``, ``*.home``, and any
  single-label name (``metadata``, ``db``: resolved through the search domains, so internal) —
  unless the allow-list names them, or they resolve only into allowed networks (``localhost``
  when ``127.0.0.1`` is allowed).
- **IPv4 written in an unusual form** (decimal ``2130706433``, hex ``0x7f000001``, octal
  ``0177.0.0.1``, short ``127.1``) is decoded the way the C resolver does and judged by what it
  decodes to; such a spelling of a public address is refused as malformed (nobody writes one
  honestly, and parsers disagree about it). A host whose last label is numeric but decodes to
  nothing is malformed too.
- **Every redirect hop** goes through the same transport, so it is checked again (the client
  follows at most ``MAX_REDIRECTS``); a callback follows none.
- **The one exception** is ``GENLINE_ALLOW_PRIVATE_HOSTS``: host names (matched exactly, case and
  a trailing dot ignored) and addresses or CIDR networks whose private addresses may be reached
  (the simulator on ``127.0.0.1`` in the demo and tests; an S3-compatible server inside a VPC).
  Empty by default.
- **Limits.** A request through ``SafeTransport`` has an overall deadline (``DEADLINE_EXTENSION``
  in its extensions, else the transport's default): every socket read and write waits at most
  what is left of it, and one that starts after it fails with ``DeadlineExceeded``, so a server
  that drips its headers or its body one byte at a time is cut off at the deadline, not at the
  read timeout times the number of bytes. Sizes are the caller's to check as it reads
  (``storage/transfer.py`` does, per kind: ``DownloadLimit``).

**At submit time** (``check_url``), a user's URL is checked the same way, except that a name that
does not resolve from here is accepted: the provider fetches a user's image, not genline, and a
name genline cannot resolve cannot lead genline anywhere (a callback to it is checked again, and
pinned, when genline POSTs). Resolution at submit waits at most ``SUBMIT_RESOLVE_TIMEOUT_S`` and a
name still unresolved then is treated alike. Literal private addresses in any spelling, local
names, and names that resolve to a refused range are refused. What a name resolved to at submit
is remembered for a minute (a failure for 15 s: ``ResolveCache``, in ``name_resolution.py`` with
``resolve``), since producers send the same few CDN hosts again and again; the checks themselves
still run on every call. Only ``check_url`` uses that memory: ``SafeTransport`` resolves at every
connect, because the address it checks must be the address it connects to.

httpx-secure (reviewed for this) checks the connected address, but for httpx's async clients only;
genline's downloads use a sync ``httpx.Client``, so this module does the same for it, on httpcore's
public network-backend interface.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import ipaddress
import math
import socket
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NoReturn
from urllib.parse import urlsplit

import httpcore
import httpx

from genline.provider.name_resolution import SUBMIT_RESOLUTIONS, IPAddress, ResolveCache, resolve

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Reason = Literal["scheme", "credentials", "malformed", "not_public"]

MAX_REDIRECTS = 5
SUBMIT_RESOLVE_TIMEOUT_S = 2.0
DEADLINE_EXTENSION = "genline.deadline"  # absolute time.monotonic() by which the request must be done
DEFAULT_DEADLINE_S = 60.0

_LOCAL_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})
_LOCAL_SUFFIXES = ("localhost", "local", "internal", "localdomain", "home.arpa", "lan", "intranet", "corp", "home")
_BAD_CHARS = frozenset("\\ \t\r\n\x0b\x0c") | {chr(c) for c in range(0x20)} | {"\x7f"}

# Checked besides ipaddress's own flags (whose meaning changed between Python releases).
_REFUSED_NETWORKS: tuple[tuple[IPNetwork, str], ...] = tuple(
    (ipaddress.ip_network(net), what)
    for net, what in (
        ("0.0.0.0/8", "unspecified"),
        ("10.0.0.0/8", "private"),
        ("100.64.0.0/10", "shared (carrier-grade NAT)"),
        ("127.0.0.0/8", "loopback"),
        ("169.254.0.0/16", "link-local"),
        ("172.16.0.0/12", "private"),
        ("192.0.0.0/24", "reserved"),
        ("192.0.2.0/24", "reserved"),
        ("192.88.99.0/24", "reserved"),
        ("192.168.0.0/16", "private"),
        ("198.18.0.0/15", "reserved"),
        ("198.51.100.0/24", "reserved"),
        ("203.0.113.0/24", "reserved"),
        ("224.0.0.0/4", "multicast"),
        ("240.0.0.0/4", "reserved"),
        ("::/128", "unspecified"),
        ("::1/128", "loopback"),
        ("64:ff9b:1::/48", "reserved"),
        ("100::/64", "reserved"),
        ("2001::/23", "reserved"),
        ("2001:db8::/32", "reserved"),
        ("fc00::/7", "private"),
        ("fe80::/10", "link-local"),
        ("fec0::/10", "private"),
        ("ff00::/8", "multicast"),
    )
)
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


class UnsafeURL(httpx.TransportError):
    """A URL genline will not fetch, POST to or hand on. ``reason`` is one of ``scheme``,
    ``credentials``, ``malformed`` or ``not_public``; ``message`` is a plain sentence that never
    repeats the URL's userinfo, path or query."""

    def __init__(self, message: str, *, reason: Reason) -> None:
        super().__init__(message)
        self.message = message
        self.reason: Reason = reason


class DeadlineExceeded(httpx.TimeoutException):
    """The request's overall deadline passed before it was done (a slow or dripping server)."""


# --- the allow-list ---------------------------------------------------------------------------
@dataclass(frozen=True)
class AddressPolicy:
    """What may be reached although private: ``GENLINE_ALLOW_PRIVATE_HOSTS``, already parsed
    (``config/settings.py``) into host names and networks."""

    names: frozenset[str] = frozenset()
    networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def from_entries(cls, entries: Iterable[str | IPNetwork]) -> AddressPolicy:
        names: set[str] = set()
        networks: list[IPNetwork] = []
        for entry in entries:
            if isinstance(entry, str):
                names.add(_norm_name(entry))
            else:
                networks.append(entry)
        return cls(frozenset(names), tuple(networks))

    def name_allowed(self, host: str) -> bool:
        return _norm_name(host) in self.names

    def address_allowed(self, ip: IPAddress) -> bool:
        candidates = [ip, *_embedded_v4(ip)]
        return any(c.version == n.version and c in n for c in candidates for n in self.networks)


STRICT = AddressPolicy()


def _norm_name(host: str) -> str:
    return host.strip().lower().rstrip(".")


# --- judging one address or name --------------------------------------------------------------
def _embedded_v4(ip: IPAddress) -> list[ipaddress.IPv4Address]:
    """The IPv4 address an IPv6 one carries (mapped, NAT64, 6to4, Teredo), if any."""
    if not isinstance(ip, ipaddress.IPv6Address):
        return []
    found: list[ipaddress.IPv4Address] = []
    if ip.ipv4_mapped is not None:
        found.append(ip.ipv4_mapped)
    if ip in _NAT64:
        found.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    if ip.sixtofour is not None:
        found.append(ip.sixtofour)
    if ip.teredo is not None:
        found.extend(ip.teredo)
    if int(ip) >> 32 == 0 and int(ip) > 1:  # IPv4-compatible ::a.b.c.d (deprecated)
        found.append(ipaddress.IPv4Address(int(ip)))
    return found


def refusal(ip: IPAddress) -> str | None:
    """Why ``ip`` is not a public address ("loopback", "private", ...), or None if it is."""
    for candidate in (*_embedded_v4(ip), ip):
        for net, what in _REFUSED_NETWORKS:
            if candidate.version == net.version and candidate in net:
                return what
        if candidate.is_loopback:
            return "loopback"
        if candidate.is_link_local:
            return "link-local"
        if candidate.is_multicast:
            return "multicast"
        if candidate.is_unspecified:
            return "unspecified"
        if candidate.is_private:
            return "private"
        if candidate.is_reserved or not candidate.is_global:
            return "reserved"
    return None


def _literal(host: str) -> IPAddress | None:
    """``host`` as an IP address, in any spelling the C resolver accepts, or None for a name.
    Raises UnsafeURL for a host that looks numeric but is no address."""
    bare = host.strip("[]").rstrip(".")
    try:
        return ipaddress.ip_address(bare.split("%", 1)[0])
    except ValueError:
        pass
    last = bare.rsplit(".", 1)[-1].lower()
    if not last or not (last.isdigit() or (last.startswith("0x") and _is_hex(last[2:]))):
        return None  # an ordinary name (no top-level domain starts with a digit)
    try:
        return ipaddress.IPv4Address(socket.inet_aton(bare))
    except (OSError, ValueError):
        raise UnsafeURL(f"The host {bare[:60]!r} is neither a name nor an IP address.", reason="malformed") from None


def _is_hex(text: str) -> bool:
    return text == "" or all(c in "0123456789abcdef" for c in text)


def check_host(host: str, policy: AddressPolicy) -> IPAddress | None:
    """Refuse a literal address that is not public (in any spelling) or a malformed host, before
    any resolution. Returns the address when ``host`` is a literal one, None for a name."""
    name = _norm_name(host)
    if not name:
        raise UnsafeURL("The URL has no host.", reason="malformed")
    ip = _literal(host)
    if ip is not None:
        why = refusal(ip)
        if why is not None and not policy.address_allowed(ip):
            raise UnsafeURL(f"The address {ip} is {why}, not a public address.", reason="not_public")
        if why is None and not _canonical(name):
            raise UnsafeURL(
                f"The host {name[:60]!r} is an IP address written in an unusual form; write it as {ip}.",
                reason="malformed",
            )
        return ip
    return None


def check_local_name(host: str, addresses: Sequence[IPAddress] | None, policy: AddressPolicy) -> None:
    """Refuse a name that is local by definition (``localhost``, ``*.internal``, a single label,
    ...), unless the allow-list names it, or it resolved (``addresses``) only to allowed networks
    (``localhost`` when 127.0.0.1 is allowed). Unresolved, it is refused: elsewhere, the provider
    say, it names that machine's own inside."""
    name = _norm_name(host)
    if policy.name_allowed(name):
        return
    if not (name in _LOCAL_NAMES or "." not in name or any(name.endswith("." + s) for s in _LOCAL_SUFFIXES)):
        return
    if addresses and all(policy.address_allowed(ip) for ip in addresses):
        return
    raise UnsafeURL(f"The host {name[:60]!r} names a local or internal machine.", reason="not_public")


def _canonical(name: str) -> bool:
    try:
        ipaddress.ip_address(name.strip("[]").split("%", 1)[0])
    except ValueError:
        return False
    return True


def check_addresses(host: str, addresses: Sequence[IPAddress], policy: AddressPolicy) -> None:
    """Refuse unless every address ``host`` resolved to is public, or allowed."""
    if policy.name_allowed(host):
        return
    for ip in addresses:
        why = refusal(ip)
        if why is not None and not policy.address_allowed(ip):
            raise UnsafeURL(
                f"The host {_norm_name(host)[:60]!r} resolves to a {why} address, not a public one.",
                reason="not_public",
            )


@functools.lru_cache(maxsize=4096)
def check_url_form(url: str, policy: AddressPolicy) -> tuple[str, int, IPAddress | None]:
    """The checks that need no network: scheme, userinfo, odd characters, parser agreement, and
    the host by name or literal address. Returns (host, port, literal address or None).
    A pure function of its arguments, so the answers for URLs that pass are kept (a refusal is an
    exception, never kept): the three parses cost ~60-110 µs of a ~1.6 ms submit, and a producer
    sends the same few image URLs over and over."""
    if any(c in _BAD_CHARS for c in url):
        raise UnsafeURL("The URL contains spaces, backslashes or control characters.", reason="malformed")
    try:
        split = urlsplit(url)
        parsed = httpx.URL(url)
    except (ValueError, httpx.InvalidURL):
        raise UnsafeURL("The URL cannot be parsed.", reason="malformed") from None
    scheme = split.scheme.lower()
    if scheme not in ("http", "https") or parsed.scheme not in ("http", "https"):
        raise UnsafeURL(
            f"Only http:// and https:// URLs are allowed, not {scheme or 'a URL without a scheme'}"
            f"{'://' if scheme else ''}.",
            reason="scheme",
        )
    if "@" in split.netloc or parsed.userinfo:
        raise UnsafeURL("The URL must not carry a user name or password (user:pass@).", reason="credentials")
    host = parsed.host
    if not host or not split.hostname:
        raise UnsafeURL("The URL has no host.", reason="malformed")
    if "%" in split.netloc or not _same_host(split.hostname, parsed):
        raise UnsafeURL("The URL's host cannot be read unambiguously.", reason="malformed")
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    if not 0 < port < 65536:
        raise UnsafeURL(f"The URL's port {port} does not exist.", reason="malformed")
    return host, port, check_host(host, policy)


def _same_host(hostname: str, parsed: httpx.URL) -> bool:
    """Whether urllib's reading of the host is httpx's (both as the ASCII name sent on the wire)."""
    try:
        return httpx.URL("http://h/").copy_with(host=hostname).raw_host.lower() == parsed.raw_host.lower()
    except (ValueError, httpx.InvalidURL):
        return False


def check_url(
    url: str,
    policy: AddressPolicy,
    *,
    resolve_timeout_s: float = SUBMIT_RESOLVE_TIMEOUT_S,
    resolutions: ResolveCache = SUBMIT_RESOLUTIONS,
) -> None:
    """Check a URL a user gave (at submit): raises UnsafeURL. See the module's notes for why a
    name that does not resolve from here is accepted. The name's resolution may come from
    ``resolutions`` (``ResolveCache``); the checks of it run on every call."""
    host, port, literal = check_url_form(url, policy)
    if literal is not None:
        return
    addresses = resolutions.resolve(host, port, resolve_timeout_s)
    if addresses is None:
        check_local_name(host, None, policy)
        return  # cannot be resolved from genline: cannot lead genline anywhere
    check_local_name(host, addresses, policy)
    check_addresses(host, addresses, policy)


# --- the transport: resolve once, check, connect to what was checked ----------------------------
_DEADLINE: contextvars.ContextVar[float | None] = contextvars.ContextVar("genline_http_deadline", default=None)


def _left(timeout: float | None) -> float | None:
    """``timeout`` shortened to what is left of the current request's deadline."""
    deadline = _DEADLINE.get()
    if deadline is None:
        return timeout
    left = deadline - time.monotonic()
    if left <= 0:
        raise DeadlineExceeded("The download took longer than its deadline and was cut off.")
    return left if timeout is None else min(timeout, left)


@contextlib.contextmanager
def _deadline_wins() -> Iterator[None]:
    """A wait that timed out because the deadline came (not its own timeout) says so."""
    try:
        yield
    except httpcore.TimeoutException as exc:
        deadline = _DEADLINE.get()
        if deadline is not None and time.monotonic() >= deadline - 0.01:
            raise DeadlineExceeded("The download took longer than its deadline and was cut off.") from exc
        raise


class _DeadlineStream(httpcore.NetworkStream):
    """A connection whose every read and write waits at most what the deadline leaves."""

    def __init__(self, inner: httpcore.NetworkStream) -> None:
        self._inner = inner

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        with _deadline_wins():
            return self._inner.read(max_bytes, _left(timeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        with _deadline_wins():
            self._inner.write(buffer, _left(timeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self, ssl_context: Any, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.NetworkStream:
        with _deadline_wins():
            return _DeadlineStream(self._inner.start_tls(ssl_context, server_hostname, _left(timeout)))

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _PinnedBackend(httpcore.NetworkBackend):
    """Resolves a name once, refuses it unless all its addresses are allowed, and connects to
    those very addresses (as IP literals: the socket resolves nothing again). It resolves at
    every connect and never reads ``SUBMIT_RESOLUTIONS``: a remembered answer could be an
    address other than the one it connects to (DNS rebinding)."""

    def __init__(self, policy: AddressPolicy) -> None:
        self._policy = policy
        self._sockets = httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        literal = check_host(host, self._policy)
        if literal is not None:
            addresses: list[IPAddress] = [literal]
        else:
            try:
                addresses = resolve(host, port, _left(timeout))
            except TimeoutError as exc:
                raise httpcore.ConnectTimeout(str(exc)) from None
            except (OSError, UnicodeError) as exc:
                check_local_name(host, None, self._policy)
                raise httpcore.ConnectError(f"the name {host[:60]!r} does not resolve ({exc})") from None
            check_local_name(host, addresses, self._policy)
            check_addresses(host, addresses, self._policy)
        last: Exception | None = None
        for ip in addresses:
            try:
                with _deadline_wins():
                    stream = self._sockets.connect_tcp(str(ip), port, _left(timeout), local_address, socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                last = exc
                continue
            return _DeadlineStream(stream)
        assert last is not None
        raise last

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.NetworkStream:
        raise httpcore.ConnectError("unix sockets are not reachable through genline's safe client")

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


_EXCEPTIONS: tuple[tuple[type[Exception], type[httpx.HTTPError]], ...] = (
    (httpcore.ConnectTimeout, httpx.ConnectTimeout),
    (httpcore.ReadTimeout, httpx.ReadTimeout),
    (httpcore.WriteTimeout, httpx.WriteTimeout),
    (httpcore.PoolTimeout, httpx.PoolTimeout),
    (httpcore.TimeoutException, httpx.TimeoutException),
    (httpcore.ConnectError, httpx.ConnectError),
    (httpcore.ReadError, httpx.ReadError),
    (httpcore.WriteError, httpx.WriteError),
    (httpcore.NetworkError, httpx.NetworkError),
    (httpcore.ProxyError, httpx.ProxyError),
    (httpcore.UnsupportedProtocol, httpx.UnsupportedProtocol),
    (httpcore.RemoteProtocolError, httpx.RemoteProtocolError),
    (httpcore.LocalProtocolError, httpx.LocalProtocolError),
    (httpcore.ProtocolError, httpx.ProtocolError),
)


def _reraise(exc: Exception) -> NoReturn:
    """Raise httpcore's exception as httpx's (as httpx's own transport does); others as they are."""
    for theirs, ours in _EXCEPTIONS:
        if isinstance(exc, theirs):
            raise ours(str(exc)) from exc
    raise exc


class _Body(httpx.SyncByteStream):
    """The response body, read under the request's deadline, httpcore's errors made httpx's."""

    def __init__(self, inner: Iterable[bytes], deadline: float) -> None:
        self._inner = inner
        self._deadline = deadline

    def __iter__(self) -> Iterator[bytes]:
        chunks = iter(self._inner)
        while True:
            token = _DEADLINE.set(self._deadline)
            try:
                chunk = next(chunks)
            except StopIteration:
                return
            except Exception as exc:  # noqa: BLE001  # httpcore's errors made httpx's; others re-raised as they are
                _reraise(exc)
            finally:
                _DEADLINE.reset(token)
            yield chunk

    def close(self) -> None:
        close = getattr(self._inner, "close", None)
        if close is not None:
            close()


class SafeTransport(httpx.BaseTransport):
    """An httpx transport that reaches public addresses only (see the module's notes)."""

    def __init__(
        self,
        policy: AddressPolicy = STRICT,
        *,
        default_deadline_s: float = DEFAULT_DEADLINE_S,
        max_connections: int = 20,
        verify: Any = True,
    ) -> None:
        self.policy = policy
        self.default_deadline_s = default_deadline_s
        self._pool = httpcore.ConnectionPool(
            ssl_context=httpx.create_ssl_context(verify=verify),
            max_connections=max_connections,
            max_keepalive_connections=max_connections,
            keepalive_expiry=5.0,
            network_backend=_PinnedBackend(policy),
        )

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        check_url_form(str(request.url), self.policy)
        deadline = request.extensions.get(DEADLINE_EXTENSION)
        if not isinstance(deadline, float | int) or not math.isfinite(deadline):
            deadline = time.monotonic() + self.default_deadline_s
        assert isinstance(request.stream, httpx.SyncByteStream)
        core = httpcore.Request(
            method=request.method,
            url=httpcore.URL(
                scheme=request.url.raw_scheme,
                host=request.url.raw_host,
                port=request.url.port,
                target=request.url.raw_path,
            ),
            headers=request.headers.raw,
            content=request.stream,
            extensions={k: v for k, v in request.extensions.items() if k != DEADLINE_EXTENSION},
        )
        token = _DEADLINE.set(float(deadline))
        try:
            answer = self._pool.handle_request(core)
        except Exception as exc:  # noqa: BLE001  # httpcore's errors made httpx's; others re-raised as they are
            _reraise(exc)
        finally:
            _DEADLINE.reset(token)
        assert isinstance(answer.stream, Iterable)
        return httpx.Response(
            status_code=answer.status,
            headers=answer.headers,
            stream=_Body(answer.stream, float(deadline)),
            extensions=answer.extensions,
        )

    def close(self) -> None:
        self._pool.close()


# --- the client genline uses --------------------------------------------------------------------
@dataclass(frozen=True)
class DownloadLimit:
    """The most one download of a kind may be, in bytes, and take, in seconds overall."""

    max_bytes: int
    deadline_s: float


#: Used where a client carries no limits of its own (a plain httpx.Client in a benchmark).
DEFAULT_LIMITS: Mapping[str, DownloadLimit] = {
    "image": DownloadLimit(20 * 1024 * 1024, 120.0),
    "video": DownloadLimit(2048 * 1024 * 1024, 900.0),
}


class SafeClient(httpx.Client):
    """``httpx.Client`` on ``SafeTransport``, with the download limits per kind."""

    def __init__(
        self,
        policy: AddressPolicy = STRICT,
        *,
        limits: Mapping[str, DownloadLimit] | None = None,
        timeout: httpx.Timeout | float = 30.0,
        default_deadline_s: float = DEFAULT_DEADLINE_S,
    ) -> None:
        super().__init__(
            transport=SafeTransport(policy, default_deadline_s=default_deadline_s),
            timeout=timeout,
            follow_redirects=True,
            max_redirects=MAX_REDIRECTS,
            trust_env=False,  # no proxy from the environment: the transport connects itself
        )
        self.policy = policy
        self.download_limits: dict[str, DownloadLimit] = {**DEFAULT_LIMITS, **(limits or {})}


def limit_for(http: httpx.Client, kind: str) -> DownloadLimit:
    """The limit of one download of ``kind`` with ``http``: its own if it is a SafeClient."""
    limits = http.download_limits if isinstance(http, SafeClient) else DEFAULT_LIMITS
    return limits.get(kind) or DEFAULT_LIMITS.get(kind) or DownloadLimit(20 * 1024 * 1024, DEFAULT_DEADLINE_S)


def deadline_in(seconds: float) -> dict[str, float]:
    """Request extensions giving a request ``seconds`` in all, redirects included."""
    return {DEADLINE_EXTENSION: time.monotonic() + seconds}
