"""State that every worker must see the same way: circuit breakers, rate limits, pauses, counters.

One seam, three real implementations: Redis (production; every process on every machine shares
it), the database (when the broker is not Redis, as on the zero-setup default: every process that
uses the same database shares it), and an in-process store (one process's threads; for tests and
tools that run alone). Keys are prefixed ``genline:`` in Redis.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, cast

if TYPE_CHECKING:
    from genline.storage.db import Database

PREFIX = "genline:"

# A token bucket: seconds to wait (0 = a token was taken). ``floor``: tokens this taker must leave
# in the bucket (a lower priority leaves room for a higher one); ``max_wait``: a taker that would
# wait at most this long takes its token now, on credit (the bucket goes below its floor, so the
# next taker waits behind it); one that would wait longer takes nothing. ``cap``: a lower rate the
# provider's answers asked for (empty: none).
_BUCKET = """
local function level(key, rate, burst, now)
  local state = redis.call('HMGET', key, 'tokens', 'at')
  local tokens, at = tonumber(state[1]) or burst, tonumber(state[2]) or now
  return math.min(burst, tokens + (now - at) * rate)
end
local function keep(key, tokens, rate, burst, now)
  redis.call('HSET', key, 'tokens', tokens, 'at', now)
  redis.call('EXPIRE', key, math.ceil(burst / rate) + 60)
end
local function capped(rate, cap)
  local c = tonumber(cap)
  if c and c > 0 and c < rate then return c end
  return rate
end
local function take(key, rate, burst, now, floor, max_wait)
  floor, max_wait = floor or 0, max_wait or 0
  local tokens = level(key, rate, burst, now)
  local wait = 0
  if tokens - 1 >= floor then tokens = tokens - 1
  else
    wait = (floor + 1 - tokens) / rate
    if wait <= max_wait then tokens = tokens - 1 end
  end
  keep(key, tokens, rate, burst, now)
  return wait
end
"""

# Token bucket in one round trip.
_TAKE_TOKEN = _BUCKET + "return tostring(take(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])))"

# ``admit`` in one round trip. ARGV: the parts asked for ('p'ause, 'r'ate, 'b'reaker, in that order),
# now, rate, burst, probe ttl in ms, the rate's floor and longest wait on credit, '1' when a rate
# cap key follows the bucket; KEYS: the parts' keys in that order. Stops at the first part
# that refuses or waits, as the stages would. Returns the parts looked at, the pause reason, the
# slow-down, the token wait, and 0/1 for breaker open, tripped and probe granted.
_ADMIT_BODY = """
local parts, now = ARGV[1], tonumber(ARGV[2])
local n = 0
local function nextkey() n = n + 1; return KEYS[n] end
local seen, paused, slow, wait, open, tripped, probe = '', '', '0', '0', 0, 0, 0
local function answer() return {seen, paused, slow, wait, open, tripped, probe} end
if string.find(parts, 'p', 1, true) then
  seen = seen .. 'p'
  paused = redis.call('GET', nextkey()) or ''
  if paused ~= '' then return answer() end
end
if string.find(parts, 'r', 1, true) then
  seen = seen .. 'r'
  slow = redis.call('GET', nextkey()) or '0'
  local bucket, rate = nextkey(), tonumber(ARGV[3])
  if ARGV[8] == '1' then rate = capped(rate, redis.call('GET', nextkey())) end
  local w = take(bucket, rate, tonumber(ARGV[4]), now, tonumber(ARGV[6]), tonumber(ARGV[7]))
  wait = tostring(w)
  if w > 0 or (tonumber(slow) or 0) > 0 then return answer() end
end
if string.find(parts, 'b', 1, true) then
  seen = seen .. 'b'
  local open_key, tripped_key, probe_key = nextkey(), nextkey(), nextkey()
  if redis.call('GET', open_key) then open = 1; return answer() end
  if redis.call('GET', tripped_key) then
    tripped = 1
    if redis.call('SET', probe_key, '1', 'PX', ARGV[5], 'NX') then probe = 1 end
  end
end
return answer()
"""
_ADMIT = _BUCKET + _ADMIT_BODY

# Up to ARGV[4] tokens at once, leaving ARGV[5] in the bucket (KEYS: slow-down, bucket, cap):
# nothing while the provider asked us to slow down. Returns the tokens taken and, when fewer than
# asked, the seconds until the next one.
_TAKE_UP_TO = (
    _BUCKET
    + """
local rate, burst, now = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local n, floor = tonumber(ARGV[4]), tonumber(ARGV[5])
local slow = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
if slow > 0 then return {0, tostring(slow)} end
rate = capped(rate, redis.call('GET', KEYS[3]))
local tokens = level(KEYS[2], rate, burst, now)
local got = math.max(0, math.min(n, math.floor(tokens - floor)))
tokens = tokens - got
keep(KEYS[2], tokens, rate, burst, now)
local wait = 0
if got < n then wait = math.max(0, floor + 1 - tokens) / rate end
return {got, tostring(wait)}
"""
)

# Tokens taken and not used go back (never above the burst).
_GIVE_BACK = (
    _BUCKET
    + """
local burst, now, n = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
if not state[1] then return 0 end
local tokens = math.min(burst, tonumber(state[1]) + n)
redis.call('HSET', KEYS[1], 'tokens', tokens)
return 1
"""
)

# Delete those of KEYS that exist (no write when none does); returns their 1-based positions.
_DELETE_EXISTING = """
local gone = {}
for i, key in ipairs(KEYS) do
  if redis.call('EXISTS', key) == 1 then redis.call('DEL', key); table.insert(gone, i) end
end
return gone
"""

_PARTS = ("pause", "rate", "breaker")


@dataclass(frozen=True)
class BudgetKeys:
    """A request budget's keys: the slow-down (seconds, while set), the bucket, the rate cap."""

    slow: str
    bucket: str
    cap: str


@dataclass(frozen=True)
class Drawn:
    """``take_up_to``'s answer: tokens taken, and seconds until the next one when fewer than asked."""

    granted: int
    wait_s: float = 0.0


@dataclass
class Admission:
    """What the stages read before a paid call, asked in one go (one round trip with Redis).

    The parts are looked at in this order, stopping at the first that refuses or waits, exactly
    as the stages would one after another: the pause; the rate limit (the slow-down key, then a
    token from the bucket); the model's breaker (open? tripped? then claim the one probe).
    """

    pause_key: str | None = None
    rate_keys: tuple[str, str] | None = None  # slow-down, bucket
    rate_per_s: float = 1.0
    burst: float = 1.0
    rate_cap_key: str | None = None  # a lower rate the provider's answers asked for, when set
    rate_floor: float = 0.0  # tokens this call must leave in the bucket (its priority)
    rate_max_wait_s: float = 0.0  # a token this close is taken now, on credit (the caller waits)
    breaker_keys: tuple[str, str, str] | None = None  # open, tripped, probe
    probe_ttl_s: float = 1.0

    def parts(self) -> list[str]:
        wanted = (self.pause_key, self.rate_keys, self.breaker_keys)
        return [part for part, value in zip(_PARTS, wanted, strict=True) if value is not None]

    def can_add(self, part: str) -> bool:
        """A part joins only after those already asked for, so the order above is kept."""
        return all(_PARTS.index(asked) < _PARTS.index(part) for asked in self.parts())


@dataclass(frozen=True)
class Admitted:
    """``admit``'s answers; a part not ``*_checked`` was not looked at (one before it stopped)."""

    paused: str | None = None  # the pause's reason
    rate_checked: bool = False
    slow_s: float = 0.0  # the slow-down the provider's low quota asked for
    token_wait_s: float = 0.0  # 0 = a token was taken
    breaker_checked: bool = False
    breaker_open: bool = False
    tripped: bool = False
    probe_granted: bool = False

    @classmethod
    def all_clear(cls, admission: Admission) -> Admitted:
        """Every part asked for looked at and found clear (failing open)."""
        return cls(rate_checked=admission.rate_keys is not None, breaker_checked=admission.breaker_keys is not None)


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

    def take_up_to(self, keys: BudgetKeys, n: int, rate_per_s: float, burst: float, floor: float) -> Drawn:
        """Up to ``n`` tokens at once, leaving ``floor`` in the bucket; none while slowed down."""
        ...

    def give_back(self, bucket: str, n: int, burst: float) -> None:
        """Return ``n`` tokens taken and not used."""
        ...

    def admit(self, admission: Admission) -> Admitted:
        """Everything a paid call's stages read before it is sent, in one go (see ``Admission``)."""
        ...

    def delete_existing(self, *keys: str) -> list[str]:
        """Delete those of ``keys`` that exist (writing nothing when none does); returns them."""
        ...

    def close(self) -> None: ...


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
            return self._set_if_absent(key, value, ttl_s)

    def _set_if_absent(self, key: str, value: str, ttl_s: float) -> bool:
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
            return self._take_token(key, rate_per_s, burst)

    def _level(self, key: str, rate_per_s: float, burst: float) -> float:
        now = float(self._clock())
        tokens, at = self._buckets.get(key, (burst, now))
        return min(burst, tokens + (now - at) * rate_per_s)

    def _capped(self, rate_per_s: float, cap_key: str | None) -> float:
        cap = float(self._live(cap_key) or 0.0) if cap_key is not None else 0.0
        return cap if 0 < cap < rate_per_s else rate_per_s

    def _take_token(
        self, key: str, rate_per_s: float, burst: float, floor: float = 0.0, max_wait_s: float = 0.0
    ) -> float:
        tokens = self._level(key, rate_per_s, burst)
        wait = 0.0
        if tokens - 1 >= floor:
            tokens -= 1
        else:
            wait = (floor + 1 - tokens) / rate_per_s
            if wait <= max_wait_s:  # on credit: the caller waits, the next taker waits behind it
                tokens -= 1
        self._buckets[key] = (tokens, self._clock())
        return wait

    def take_up_to(self, keys: BudgetKeys, n: int, rate_per_s: float, burst: float, floor: float) -> Drawn:
        with self._lock:
            return self._take_up_to(keys, n, rate_per_s, burst, floor)

    def _take_up_to(self, keys: BudgetKeys, n: int, rate_per_s: float, burst: float, floor: float) -> Drawn:
        slow = float(self._live(keys.slow) or 0.0)
        if slow > 0:
            return Drawn(0, slow)
        rate = self._capped(rate_per_s, keys.cap)
        tokens = self._level(keys.bucket, rate, burst)
        got = max(0, min(n, int(tokens - floor)))
        tokens -= got
        self._buckets[keys.bucket] = (tokens, self._clock())
        return Drawn(got, max(0.0, floor + 1 - tokens) / rate if got < n else 0.0)

    def give_back(self, bucket: str, n: int, burst: float) -> None:
        with self._lock:
            self._give_back(bucket, n, burst)

    def _give_back(self, bucket: str, n: int, burst: float) -> None:
        if bucket in self._buckets:
            tokens, at = self._buckets[bucket]
            self._buckets[bucket] = (min(burst, tokens + n), at)

    def admit(self, admission: Admission) -> Admitted:
        with self._lock:
            if admission.pause_key is not None and (paused := self._live(admission.pause_key)):
                return Admitted(paused=paused)
            slow = wait = 0.0
            if admission.rate_keys is not None:
                slow_key, bucket_key = admission.rate_keys
                slow = float(self._live(slow_key) or 0.0)
                rate = self._capped(admission.rate_per_s, admission.rate_cap_key)
                wait = self._take_token(
                    bucket_key, rate, admission.burst, admission.rate_floor, admission.rate_max_wait_s
                )
                if wait > 0 or slow > 0:
                    return Admitted(rate_checked=True, slow_s=slow, token_wait_s=wait)
            rate_checked = admission.rate_keys is not None
            if admission.breaker_keys is None:
                return Admitted(rate_checked=rate_checked, slow_s=slow, token_wait_s=wait)
            open_key, tripped_key, probe_key = admission.breaker_keys
            if self._live(open_key):
                return Admitted(rate_checked=rate_checked, breaker_checked=True, breaker_open=True)
            tripped = bool(self._live(tripped_key))
            granted = tripped and self._set_if_absent(probe_key, "1", admission.probe_ttl_s)
            return Admitted(rate_checked=rate_checked, breaker_checked=True, tripped=tripped, probe_granted=granted)

    def delete_existing(self, *keys: str) -> list[str]:
        with self._lock:
            present = [key for key in keys if self._live(key) is not None]
            for key in present:
                del self._values[key]
            return present

    def close(self) -> None:
        pass


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
        self._take_up_to = self._redis.register_script(_TAKE_UP_TO)
        self._give_back = self._redis.register_script(_GIVE_BACK)
        self._admit = self._redis.register_script(_ADMIT)
        self._delete_existing = self._redis.register_script(_DELETE_EXISTING)
        self._warned = False

    def _fail_open(self, fallback: Any, fn: Any, *args: Any, **kw: Any) -> Any:
        try:
            return fn(*args, **kw)
        except self._errors as exc:
            if not self._warned:
                from genline.config.logging import get_logger

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

    def take_up_to(self, keys: BudgetKeys, n: int, rate_per_s: float, burst: float, floor: float) -> Drawn:
        raw = self._fail_open(
            None,
            self._take_up_to,
            keys=[PREFIX + keys.slow, PREFIX + keys.bucket, PREFIX + keys.cap],
            args=[rate_per_s, burst, time.time(), n, floor],
        )
        if raw is None:  # fail open: every poll due is read
            return Drawn(n)
        return Drawn(int(raw[0]), float(raw[1]))

    def give_back(self, bucket: str, n: int, burst: float) -> None:
        if n > 0:
            self._fail_open(None, self._give_back, keys=[PREFIX + bucket], args=[burst, time.time(), n])

    def close(self) -> None:
        self._redis.close()

    def admit(self, admission: Admission) -> Admitted:
        keys: list[str] = []
        if admission.pause_key is not None:
            keys.append(admission.pause_key)
        capped = admission.rate_keys is not None and admission.rate_cap_key is not None
        if admission.rate_keys is not None:
            keys += admission.rate_keys
            if admission.rate_cap_key is not None:
                keys.append(admission.rate_cap_key)
        if admission.breaker_keys is not None:
            keys += admission.breaker_keys
        if not keys:
            return Admitted()
        parts = "".join(part[0] for part in admission.parts())
        probe_ms = max(1, int(admission.probe_ttl_s * 1000))
        args = [
            parts,
            time.time(),
            admission.rate_per_s,
            admission.burst,
            probe_ms,
            admission.rate_floor,
            admission.rate_max_wait_s,
            "1" if capped else "0",
        ]
        raw = self._fail_open(None, self._admit, keys=[PREFIX + k for k in keys], args=args)
        if raw is None:
            return Admitted.all_clear(admission)
        seen, paused, slow, wait, is_open, tripped, probe = raw
        return Admitted(
            paused=str(paused) or None,
            rate_checked="r" in seen,
            slow_s=float(slow or 0.0),
            token_wait_s=float(wait),
            breaker_checked="b" in seen,
            breaker_open=bool(int(is_open)),
            tripped=bool(int(tripped)),
            probe_granted=bool(int(probe)),
        )

    def delete_existing(self, *keys: str) -> list[str]:
        if not keys:
            return []
        gone = self._fail_open([], self._delete_existing, keys=[PREFIX + k for k in keys])
        return [keys[int(i) - 1] for i in gone]


class DatabaseSharedState:
    """Shared by every process that uses the same database (the zero-setup default's workers, its
    poller and the ``genline`` command alike), so one 401 pauses them all at once.

    Each operation is one transaction over the rows of the keys it touches: SQLite's
    ``BEGIN IMMEDIATE`` (storage/db.py), or a transaction-scoped advisory lock on PostgreSQL,
    runs them one at a time. The rows are loaded into a ``LocalSharedState`` view, the operation
    runs there (the same rules as the in-process store), and what changed is written back. Like
    Redis, it fails open when the database cannot be reached: no pause holds, no limit waits.
    """

    _PURGE_EVERY_S = 60.0

    def __init__(self, db: Database, clock: Any = time.time) -> None:
        from sqlalchemy import Table, bindparam, delete, select

        from genline.storage.models import SharedEntry

        self._db, self._clock = db, clock
        table = cast(Table, SharedEntry.__table__)
        self._select = select(table.c.key, table.c.value, table.c.expires_at).where(
            table.c.key.in_(bindparam("keys", expanding=True))
        )
        self._delete = delete(table).where(table.c.key.in_(bindparam("keys", expanding=True)))
        self._insert = table.insert()
        self._purge = delete(table).where(table.c.expires_at < bindparam("now"))
        self._purged_at = 0.0
        self._warned = False

    def _run(self, keys: list[str], buckets: list[str], op: Callable[[LocalSharedState], Any], fallback: Any) -> Any:
        from sqlalchemy import text
        from sqlalchemy.exc import OperationalError

        try:
            with self._db.engine.begin() as conn:
                if self._db.is_postgres:
                    conn.execute(text("SELECT pg_advisory_xact_lock(hashtext('genline:shared_state'))"))
                now = self._clock()
                view = LocalSharedState(lambda: now)
                for key, value, expires in conn.execute(self._select, {"keys": keys + buckets}):
                    if key in buckets:
                        tokens, at = value.split(",")
                        view._buckets[key] = (float(tokens), float(at))
                    elif expires > now:
                        view._values[key] = (value, expires)
                values, buckets_before = dict(view._values), dict(view._buckets)
                result = op(view)
                changed = [k for k in keys if view._values.get(k) != values.get(k)]
                changed += [k for k in buckets if view._buckets.get(k) != buckets_before.get(k)]
                if changed:
                    conn.execute(self._delete, {"keys": changed})
                    rows = []
                    for k in changed:
                        if k in view._values:
                            value, expires = view._values[k]
                            rows.append({"key": k, "value": value, "expires_at": expires})
                        elif k in view._buckets:
                            left, at = view._buckets[k]
                            rows.append({"key": k, "value": f"{left!r},{at!r}", "expires_at": at + 3600})
                    if rows:
                        conn.execute(self._insert, rows)
                if now - self._purged_at > self._PURGE_EVERY_S:
                    conn.execute(self._purge, {"now": now})
                    self._purged_at = now
                return result
        except OperationalError as exc:
            if not self._warned:
                from genline.config.logging import get_logger

                get_logger("genline.shared_state").warning("shared_state_unreachable", error=type(exc).__name__)
                self._warned = True
            return fallback

    def get(self, key: str) -> str | None:
        return cast(str | None, self._run([key], [], lambda v: v.get(key), None))

    def set(self, key: str, value: str, ttl_s: float) -> None:
        self._run([key], [], lambda v: v.set(key, value, ttl_s), None)

    def set_if_absent(self, key: str, value: str, ttl_s: float) -> bool:
        return bool(self._run([key], [], lambda v: v.set_if_absent(key, value, ttl_s), True))

    def delete(self, *keys: str) -> None:
        if keys:
            self._run(list(keys), [], lambda v: v.delete(*keys), None)

    def incr(self, key: str, ttl_s: float) -> int:
        return int(self._run([key], [], lambda v: v.incr(key, ttl_s), 0))

    def take_token(self, key: str, rate_per_s: float, burst: float) -> float:
        return float(self._run([], [key], lambda v: v.take_token(key, rate_per_s, burst), 0.0))

    def take_up_to(self, keys: BudgetKeys, n: int, rate_per_s: float, burst: float, floor: float) -> Drawn:
        return cast(
            Drawn,
            self._run(
                [keys.slow, keys.cap],
                [keys.bucket],
                lambda v: v.take_up_to(keys, n, rate_per_s, burst, floor),
                Drawn(n),
            ),
        )

    def give_back(self, bucket: str, n: int, burst: float) -> None:
        if n > 0:
            self._run([], [bucket], lambda v: v.give_back(bucket, n, burst), None)

    def admit(self, admission: Admission) -> Admitted:
        keys = [k for k in (admission.pause_key,) if k is not None]
        buckets: list[str] = []
        if admission.rate_keys is not None:
            keys.append(admission.rate_keys[0])
            buckets.append(admission.rate_keys[1])
            if admission.rate_cap_key is not None:
                keys.append(admission.rate_cap_key)
        if admission.breaker_keys is not None:
            keys += admission.breaker_keys
        if not keys and not buckets:
            return Admitted()
        return cast(Admitted, self._run(keys, buckets, lambda v: v.admit(admission), Admitted.all_clear(admission)))

    def delete_existing(self, *keys: str) -> list[str]:
        if not keys:
            return []
        return cast(list[str], self._run(list(keys), [], lambda v: v.delete_existing(*keys), []))

    def close(self) -> None:
        self._db.dispose()


def shared_state_for(broker_url: str, *, embedded: bool, db: Database | None = None) -> SharedState:
    """Redis when the broker is Redis (the same server); else the database, when there is one."""
    if not embedded and broker_url.startswith(("redis://", "rediss://")):
        return RedisSharedState(broker_url)
    if db is not None:
        return DatabaseSharedState(db)
    return LocalSharedState()
