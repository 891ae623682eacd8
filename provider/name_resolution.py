"""Looking host names up for ``safe_http``: ``resolve``, and ``check_url``'s short memory of it.

``resolve`` is getaddrinfo with a timeout; ``SafeTransport`` (``_PinnedBackend.connect_tcp``) calls
it at every connect and ``check_url`` through ``ResolveCache``. ``SUBMIT_RESOLUTIONS`` is the
process's one ``ResolveCache``, ``check_url``'s default: what a name resolved to at submit is
remembered for a minute (a failure for 15 s), since producers send the same few CDN hosts again
and again. Nothing here judges an address; ``safe_http`` does, on every call, with whatever this
module answers.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def resolve(host: str, port: int, timeout: float | None) -> list[IPAddress]:
    """Every address ``host`` resolves to, in the resolver's order, waiting at most ``timeout``
    (getaddrinfo has no timeout of its own: it runs in a daemon thread). Raises OSError
    (``socket.gaierror``) when the name does not resolve, TimeoutError when it took too long."""
    result: list[Any] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            result.extend(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except BaseException as exc:  # noqa: BLE001  # handed to the waiting thread
            error.append(exc)

    if timeout is None:
        run()
    else:
        thread = threading.Thread(target=run, name="genline-resolve", daemon=True)
        thread.start()
        thread.join(max(timeout, 0.0))
        if thread.is_alive():
            raise TimeoutError(f"resolving {host[:60]!r} took longer than {timeout:g} s")
    if error:
        raise error[0]
    addresses: list[IPAddress] = []
    for _family, _type, _proto, _name, sockaddr in result:
        ip = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        if ip not in addresses:
            addresses.append(ip)
    if not addresses:
        raise socket.gaierror(f"{host[:60]!r} resolved to no address")
    return addresses


class ResolveCache:
    """What names resolved to at submit, for a short while: ``check_url``'s memory, and only its.

    A submit resolves its image URL's host; producers send the same few CDN hosts over and over,
    and each resolution costs a round trip to the resolver (offline, a name that does not resolve
    took ~50 ms of a 59 ms submit: docs/PERFORMANCE.md). An entry, keyed on (host lowercased, port),
    holds the addresses, or None for a name that did not resolve or timed out; the policy checks
    are not cached, they run on every call with the remembered addresses (the policy may differ
    from one call to the next). The trailing dot is kept in the key: ``cdn.example`` may go
    through the search domains where ``cdn.example.`` does not, so they are different questions.

    - **Answers live 60 s.** getaddrinfo gives no TTL; 60 s is at or below what CDNs usually set
      on their records, so an answer is seldom held longer than a resolver would hold it, and a
      record that changes is judged by its old answer for a minute at most.
    - **Failures (no such name, resolver error, timeout) live 15 s.** They are more often passing
      (a resolver that hiccupped, a name just created), and what the name resolves to once it
      does is the more useful thing to judge; 15 s still spares a stream of submits from waiting
      up to ``safe_http.SUBMIT_RESOLVE_TIMEOUT_S`` each while a resolver is down.
    - **At most 1,024 entries**; when full, expired entries go first, then the oldest.
    - **Thread-safe**: one lock around the dict; resolving happens outside it (two threads
      missing at once both resolve, and the later answer is kept).

    Staleness is safe here because it cannot reach genline's own connections: ``SafeTransport``
    (``_PinnedBackend.connect_tcp``) never reads this cache and resolves at every connect, so the
    address it checks is the address it connects to (DNS rebinding gets no window); a name handed
    to the provider is the provider's to resolve.

    Hand-written rather than ``cachetools.TTLCache``: cachetools is not a dependency (nor
    installed), and two TTLs, a bound and a lock come to ~20 lines, not worth a new dependency.
    """

    def __init__(
        self,
        *,
        ttl_s: float = 60.0,
        failure_ttl_s: float = 15.0,
        max_entries: int = 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl_s = ttl_s
        self.failure_ttl_s = failure_ttl_s
        self.max_entries = max_entries
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple[str, int], tuple[float, tuple[IPAddress, ...] | None]] = OrderedDict()

    def resolve(self, host: str, port: int, timeout: float | None) -> tuple[IPAddress, ...] | None:
        """``host``'s addresses (from memory if fresh, else from ``resolve``), or None if it does
        not resolve or took longer than ``timeout``."""
        key = (host.strip().lower(), port)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry[0] > self._clock():
                return entry[1]
        try:
            found: tuple[IPAddress, ...] | None = tuple(resolve(host, port, timeout))
        except (OSError, TimeoutError, UnicodeError):
            found = None
        with self._lock:
            now = self._clock()
            if key not in self._entries and len(self._entries) >= self.max_entries:
                for stale in [k for k, (expires, _) in self._entries.items() if expires <= now]:
                    del self._entries[stale]
                while len(self._entries) >= self.max_entries:
                    self._entries.popitem(last=False)
            self._entries[key] = (now + (self.ttl_s if found is not None else self.failure_ttl_s), found)
            self._entries.move_to_end(key)
        return found

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


#: The process's memory of submit-time resolutions (``check_url``'s default; nothing else reads it).
SUBMIT_RESOLUTIONS = ResolveCache()
