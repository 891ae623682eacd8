"""The copy step's response cache: the same question to the same model gets the answer it got before.

A chat answer is reused when everything that shapes it is the same: the model, the messages (the
prompt template filled with the seller's description), the generation parameters and the prompt
template's version. ``copy_key`` hashes those into one sha256 key. A hit costs nothing: no
provider call, no rate-limit token; the copy step records it in the audit log as a hit (``cache_hit``,
cost 0, held and committed with the step like a paid call's row) so the log still counts every copy
answered. Entries live for ``GENLINE_COPY_CACHE_TTL_S``; a request's ``no_cache`` skips the lookup
(the fresh, paid answer then replaces the entry).

One seam, two real backends, chosen as the shared state is (``provider/shared_state.py``): Redis
on the production footprint (``RedisCopyCache``, keys ``genline:copy:<sha256>``, expiry by Redis),
else the database (``DatabaseCopyCache``, the ``copy_cache`` table; an expired row reads as a miss
and is overwritten by the next answer, and expired rows are purged now and then).

The database backend costs the step no transaction of its own: the copy step's ``prepare`` hook
(``prepare_copy``) reads the candidates' entries in the engine's claiming transaction, and a paid
answer is written with the step's completion (``Done.write``), so an answer whose completion rolls
back is not kept either. Redis is asked directly (a GET, and a SET after a paid answer).

The cache is never in the way: a Redis that cannot be reached answers "miss" and drops a put,
logging the gap once per outage, and the step asks the provider as it would without a cache. (The
database backend works in the step's own transactions: when they fail, the step does anyway.)
Only the key is ever logged (its first characters), never the messages.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol, cast

from sqlalchemy import Connection, Table, bindparam, delete, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from genline.config.clock import utcnow
from genline.config.logging import get_logger
from genline.pipelines.prompts import COPY_PROMPT, copy_messages
from genline.provider.gateway import CallContext, CallRecord
from genline.provider.metrics import observe_cache_lookup
from genline.provider.shared_state import PREFIX, RedisSharedState, SharedState
from genline.storage.models import CopyCacheEntry

if TYPE_CHECKING:
    from genline.config.settings import Settings
    from genline.pipelines.context import StepContext
    from genline.pipelines.runtime import Runtime
    from genline.storage.db import Database

log = get_logger("genline.copy_cache")

COPY_CACHE_PREFIX = PREFIX + "copy:"  # Redis keys: genline:copy:<sha256 hex>
KEY_VERSION = 1  # the layout of the key's material and of a cached answer; bump to start afresh


@dataclass(frozen=True)
class CachedCopy:
    """A paid copy answer, as much of it as a hit needs to stand in for the call."""

    model: str
    text: str
    prompt_tokens: int
    completion_tokens: int


def copy_key(
    model: str,
    messages: list[dict[str, str]],
    *,
    max_tokens: int,
    prompt: str,
    temperature: float | None = None,
) -> str:
    """sha256 (hex) over a canonical JSON of what shapes the answer. ``temperature`` goes in when
    the caller sets one (the copy step sends none of its own today: the client's default)."""
    material: dict[str, Any] = {
        "v": KEY_VERSION,
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "prompt": prompt,
    }
    if temperature is not None:
        material["temperature"] = temperature
    canonical = json.dumps(material, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class CopyPlan:
    """What the copy step asks, and of which models in turn, each with its cache key."""

    messages: list[dict[str, str]]
    max_tokens: int
    prompt: str
    keys: dict[str, str]  # model -> key, in the order the models are tried


def copy_plan(ctx: StepContext) -> CopyPlan:
    """The one place the copy request is built, for the step and for its cache lookup alike."""
    messages = copy_messages(ctx.description)  # the description as quoted data in a fixed template
    max_tokens, prompt = ctx.profile.copy_max_tokens, COPY_PROMPT
    models = ctx.candidates("copy", ctx.profile.copy_models)
    keys = {model: copy_key(model, messages, max_tokens=max_tokens, prompt=prompt) for model in models}
    return CopyPlan(messages, max_tokens, prompt, keys)


@dataclass(frozen=True)
class Prefetched:
    """The database backend's live entries among a step's keys, read in its claiming transaction."""

    entries: dict[str, CachedCopy] = field(default_factory=dict)
    latency_ms: float = 0.0  # the read's own time


def hit_record(ctx: CallContext, hit: CachedCopy, latency_ms: float) -> CallRecord:
    """The audit row of an answer the cache gave: a chat that cost nothing, sent nothing, with the
    tokens of the paid answer it reuses."""
    return CallRecord(
        ctx=ctx,
        operation="chat",
        ts=utcnow(),
        latency_ms=round(latency_ms, 3),
        prompt_tokens=hit.prompt_tokens,
        completion_tokens=hit.completion_tokens,
        cache_hit=True,
    )


class CopyCache(Protocol):
    def get(self, key: str) -> CachedCopy | None:
        """The live entry under ``key``; None on a miss, an expired entry, or a backend out of reach."""
        ...

    def put(self, key: str, value: CachedCopy, ttl_s: float) -> None:
        """Keep ``value`` under ``key`` for ``ttl_s`` seconds (replacing what was there); a backend
        out of reach drops it."""
        ...

    def close(self) -> None: ...


class _Gap:
    """Logs a backend's first failure after a success (not every one of an outage), and its return."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.down = False

    def failed(self, operation: str, exc: BaseException) -> None:
        if not self.down:
            log.warning("copy_cache_unreachable", backend=self.backend, operation=operation, error=type(exc).__name__)
            self.down = True

    def worked(self) -> None:
        if self.down:
            log.info("copy_cache_reachable", backend=self.backend)
            self.down = False


class RedisCopyCache:
    """Entries as JSON strings under ``prefix + key``, expiring by Redis's own TTL. The client is
    set up as the shared state's is (2 s socket and connect timeouts), on the same server."""

    def __init__(self, url: str, *, prefix: str = COPY_CACHE_PREFIX) -> None:
        import redis

        self._errors: tuple[type[BaseException], ...] = (redis.RedisError, OSError)
        self._redis = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2, decode_responses=True)
        self.prefix = prefix
        self._gap = _Gap("redis")

    def get(self, key: str) -> CachedCopy | None:
        try:
            raw = self._redis.get(self.prefix + key)
        except self._errors as exc:
            self._gap.failed("get", exc)
            return None
        self._gap.worked()
        if raw is None:
            return None
        try:
            return CachedCopy(**json.loads(cast(str, raw)))
        except (ValueError, TypeError):  # not an entry this code wrote: a miss, overwritten later
            log.warning("copy_cache_bad_entry", backend="redis", key=key[:12])
            return None

    def put(self, key: str, value: CachedCopy, ttl_s: float) -> None:
        body = json.dumps(asdict(value), ensure_ascii=False)
        try:
            self._redis.set(self.prefix + key, body, px=max(1, int(ttl_s * 1000)))
        except self._errors as exc:
            self._gap.failed("put", exc)
            return
        self._gap.worked()

    def close(self) -> None:
        self._redis.close()


_TABLE = cast(Table, CopyCacheEntry.__table__)
# the bound times take the column's type (UTCDateTime): aware UTC in, naive UTC stored
_SELECT = select(_TABLE.c.key, _TABLE.c.model, _TABLE.c.text, _TABLE.c.prompt_tokens, _TABLE.c.completion_tokens).where(
    _TABLE.c.key.in_(bindparam("keys", expanding=True)), _TABLE.c.expires_at > bindparam("now")
)
_PURGE = delete(_TABLE).where(_TABLE.c.expires_at <= bindparam("now"))


class DatabaseCopyCache:
    """The ``copy_cache`` table: one row per key; a row past ``expires_at`` is a miss, and the next
    answer under its key overwrites it (an upsert, ``INSERT ... ON CONFLICT DO UPDATE``). Every
    ``PURGE_EVERY_S`` a put also deletes the rows that have expired, so keys seen once do not pile up.

    ``lookup`` and ``put_in`` work in the caller's transaction (the step's claim and completion);
    ``get`` and ``put`` each in one of their own."""

    PURGE_EVERY_S = 600.0

    def __init__(self, db: Database) -> None:
        self._db = db
        self._gap = _Gap("database")
        self._purged_at = 0.0

    def lookup(self, conn: Connection, keys: list[str]) -> dict[str, CachedCopy]:
        """The live entries among ``keys``, read in the caller's transaction."""
        rows = conn.execute(_SELECT, {"keys": keys, "now": utcnow()})
        return {key: CachedCopy(model, text, prompt, completion) for key, model, text, prompt, completion in rows}

    def put_in(self, conn: Connection, key: str, value: CachedCopy, ttl_s: float) -> None:
        """Write ``value`` under ``key`` in the caller's transaction."""
        now = utcnow()
        conn.execute(_upsert(conn.dialect.name, key, value, now, now + timedelta(seconds=ttl_s)))
        if time.monotonic() - self._purged_at > self.PURGE_EVERY_S:
            conn.execute(_PURGE, {"now": now})
            self._purged_at = time.monotonic()

    def get(self, key: str) -> CachedCopy | None:
        try:
            with self._db.engine.begin() as conn:
                found = self.lookup(conn, [key])
        except SQLAlchemyError as exc:
            self._gap.failed("get", exc)
            return None
        self._gap.worked()
        return found.get(key)

    def put(self, key: str, value: CachedCopy, ttl_s: float) -> None:
        try:
            with self._db.engine.begin() as conn:
                self.put_in(conn, key, value, ttl_s)
        except SQLAlchemyError as exc:
            self._gap.failed("put", exc)
            return
        self._gap.worked()

    def close(self) -> None:
        pass  # the runtime's database: the runtime disposes of it


def _upsert(dialect: str, key: str, value: CachedCopy, now: datetime, expires_at: datetime) -> Any:
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    fresh = {
        "model": value.model,
        "text": value.text,
        "prompt_tokens": value.prompt_tokens,
        "completion_tokens": value.completion_tokens,
        "created_at": now,
        "expires_at": expires_at,
    }
    statement = insert(_TABLE).values(key=key, **fresh)
    return statement.on_conflict_do_update(
        index_elements=[_TABLE.c.key], set_={name: statement.excluded[name] for name in fresh}
    )


def copy_cache_for(settings: Settings, shared: SharedState, db: Database) -> CopyCache | None:
    """Where the shared state is, the cache is: Redis when the shared state is (the broker is Redis),
    else the database. None when ``GENLINE_COPY_CACHE_TTL_S`` is 0 (the cache is off)."""
    if settings.copy_cache_ttl_s <= 0:
        return None
    if isinstance(shared, RedisSharedState):
        return RedisCopyCache(settings.broker_url)
    return DatabaseCopyCache(db)


# --- the copy step's use of it ---------------------------------------------------------------------
def prepare_copy(s: Session, rt: Runtime, ctx: StepContext) -> Prefetched | None:
    """The copy step's ``prepare`` hook: with the database backend, the candidates' live entries,
    read in the claiming transaction (no transaction of its own). None: nothing was read here (the
    cache is off, the request said ``no_cache``, or the cache is in Redis: the step asks it)."""
    cache = rt.copy_cache
    if not isinstance(cache, DatabaseCopyCache) or ctx.no_cache:
        return None
    started = time.perf_counter()
    entries = cache.lookup(s.connection(), list(copy_plan(ctx).keys.values()))
    return Prefetched(entries, (time.perf_counter() - started) * 1000)


def cached_answer(rt: Runtime, ctx: StepContext, key: str) -> tuple[CachedCopy, float] | None:
    """The cache's answer to ``key`` and the lookup's milliseconds; None on a miss, when the cache
    is off, or when the request said ``no_cache``."""
    cache = rt.copy_cache
    if cache is None or ctx.no_cache:
        return None
    if isinstance(ctx.prepared, Prefetched):  # read in the claim already
        hit, latency_ms = ctx.prepared.entries.get(key), ctx.prepared.latency_ms
    else:
        started = time.perf_counter()
        hit = cache.get(key)
        latency_ms = (time.perf_counter() - started) * 1000
    observe_cache_lookup(hit is not None)  # hits and misses, for Prometheus (provider/metrics.py)
    return None if hit is None else (hit, latency_ms)


def keep_answer(rt: Runtime, key: str, answer: CachedCopy) -> Callable[[Session], None] | None:
    """Keep a paid answer: in Redis now; in the database with the step's completion (the returned
    ``Done.write``). None when there is nothing for the completion to write."""
    cache, ttl_s = rt.copy_cache, rt.settings.copy_cache_ttl_s
    if isinstance(cache, DatabaseCopyCache):
        return lambda s: cache.put_in(s.connection(), key, answer, ttl_s)
    if cache is not None:
        cache.put(key, answer, ttl_s)
    return None
