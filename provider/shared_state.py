"""State that every worker must see the same way: circuit breakers, rate limits, pauses, counters.

One seam, two real implementations: Redis (production; every process on every machine shares it)
and an in-process store for the zero-setup default, where it is shared by the threads of one
process only (the README says so). Keys are prefixed ``genline:``.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Protocol

PREFIX = "genline:"

# Token bucket in one round trip: returns seconds to wait (0 = a token was taken).
_TAKE_TOKEN = """
local key, rate, burst, now = KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local state = redis.call('HMGET', key, 'tokens', 'at')
local tokens, at = tonumber(state[1]) or burst, tonumber(state[2]) or now
tokens = math.min(burst, tokens + (now - at) * rate)
local wait = 0
if tokens >= 1 then tokens = tokens - 1 else wait = (1 - tokens) / rate end
redis.call('HSET', key, 'tokens', tokens, 'at', now)
redis.call('EXPIRE', key, math.ceil(burst / rate) + 60)
return tostring(wait)
"""


class SharedState(Protocol):
    def get(self, key: str) -> str | None: ...

    def set(self, key: str, value: str, ttl_s: float) -> None: ...

    def set_if_absent(self, key: str, value: str, ttl_s: float) -> bool: ...

    def delete(self, *keys: str) -> None: ...

    def incr(self, key: str, ttl_s: float) -> int:
        """Add one; the counter expires ``ttl_s`` after it was created."""
        ...

    def take_token(self, key: str, rate_per_s: float, burst: float) -> float:
        """Take a token from a bucket refilled at ``rate_per_s``; seconds to wait when empty."""
        ...


class LocalSharedState:
    """Shared by the threads of one process; expiries honoured lazily."""

    def __init__(self, clock: Any = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._values: dict[str, tuple[str, float]] = {}
        self._buckets: dict[str, tuple[float, float]] = {}

    def _live(self, key: str) -> str | None:
        item = self._values.get(key)
        if item is None or item[1] <= self._clock():
            self._values.pop(key, None)
            return None
        return item[0]

    def get(self, key: str) -> str | None:
        with self._lock:
            return self._live(key)

    def set(self, key: str, value: str, ttl_s: float) -> None:
        with self._lock:
            self._values[key] = (value, self._clock() + ttl_s)

    def set_if_absent(self, key: str, value: str, ttl_s: float) -> bool:
        with self._lock:
            if self._live(key) is not None:
                return False
            self._values[key] = (value, self._clock() + ttl_s)
            return True

    def delete(self, *keys: str) -> None:
        with self._lock:
            for key in keys:
                self._values.pop(key, None)

    def incr(self, key: str, ttl_s: float) -> int:
        with self._lock:
            current = self._live(key)
            count = int(current or 0) + 1
            expires = self._values[key][1] if current is not None else self._clock() + ttl_s
            self._values[key] = (str(count), expires)
            return count

    def take_token(self, key: str, rate_per_s: float, burst: float) -> float:
        with self._lock:
            now = self._clock()
            tokens, at = self._buckets.get(key, (burst, now))
            tokens = min(burst, tokens + (now - at) * rate_per_s)
            wait = 0.0
            if tokens >= 1:
                tokens -= 1
            else:
                wait = (1 - tokens) / rate_per_s
            self._buckets[key] = (tokens, now)
            return wait


class RedisSharedState:
    """Every process on every machine sees the same breakers, limits and pauses.

    If Redis cannot be reached (a restart, a network blip) every operation fails open: no
    breaker trips, no limit waits, no pause holds. Work goes on, and the gap is logged once.
    """

    def __init__(self, url: str) -> None:
        import redis

        self._errors = (redis.RedisError, OSError)
        self._redis = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2, decode_responses=True)
        self._take = self._redis.register_script(_TAKE_TOKEN)
        self._warned = False

    def _fail_open(self, fallback: Any, fn: Any, *args: Any, **kw: Any) -> Any:
        try:
            return fn(*args, **kw)
        except self._errors as exc:
            if not self._warned:
                from config.logging import get_logger

                get_logger("genline.shared_state").warning("shared_state_unreachable", error=type(exc).__name__)
                self._warned = True
            return fallback

    def get(self, key: str) -> str | None:
        value = self._fail_open(None, self._redis.get, PREFIX + key)
        return None if value is None else str(value)

    def set(self, key: str, value: str, ttl_s: float) -> None:
        self._fail_open(None, self._redis.set, PREFIX + key, value, px=max(1, int(ttl_s * 1000)))

    def set_if_absent(self, key: str, value: str, ttl_s: float) -> bool:
        return bool(self._fail_open(True, self._redis.set, PREFIX + key, value, px=max(1, int(ttl_s * 1000)), nx=True))

    def delete(self, *keys: str) -> None:
        if keys:
            self._fail_open(None, self._redis.delete, *(PREFIX + k for k in keys))

    def incr(self, key: str, ttl_s: float) -> int:
        def run() -> int:
            pipe = self._redis.pipeline()
            pipe.incr(PREFIX + key)
            pipe.expire(PREFIX + key, max(1, int(ttl_s)), nx=True)
            count, _ = pipe.execute()
            return int(count)

        return int(self._fail_open(0, run))

    def take_token(self, key: str, rate_per_s: float, burst: float) -> float:
        return float(self._fail_open(0.0, self._take, keys=[PREFIX + key], args=[rate_per_s, burst, time.time()]))


def shared_state_for(broker_url: str, *, embedded: bool) -> SharedState:
    """Redis when the broker is Redis (the same server); in-process otherwise."""
    if not embedded and broker_url.startswith(("redis://", "rediss://")):
        return RedisSharedState(broker_url)
    return LocalSharedState()
