"""The simulator's knobs and its ways of going wrong.

- ``SimConfig``: every setting of the simulated provider (timings, sizes, shapes, fault rates, prices),
  validated on creation and on each runtime change (``update``), so a misspelled knob fails loudly.
- ``ScriptedFault`` / ``FaultScript``: faults a test asks for explicitly, consumed in order by the
  requests they match, before any random fault is drawn.
- ``draw_request_fault``: the seeded random draw of a 429 / 500 / 503 / hang for one request.
- ``RateWindow``: the per-key one-second request window behind the ``x-ratelimit-*`` headers.
- ``error_response`` / ``SimError``: an answer in the provider's OpenAI-style error shape.
- ``make_gate``: the middleware every non-admin request passes: latency, rate-limit window (per key
  presented), auth, window exhausted, scripted fault, random fault, in that order; with
  ``stamp_headers`` it puts ``x-request-id`` (and ``x-ratelimit-*`` on /v1) on every answer.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import fnmatch
import functools
import hashlib
import hmac
import json
import math
import random
import types
import typing
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web
from aiohttp.typedefs import Middleware

from genline.provider.simulator.media import MP4_MIN_SIZE

DEFAULT_CATALOG = Path(__file__).resolve().parents[2] / "config" / "catalog.json"
SHAPES = ("by_model", "list", "object")
URL_SHAPES = ("by_model", "string", "list")
FAULT_WORDS = ("timeout", "non_json", "missing_fields")


def load_prices(path: str | Path = DEFAULT_CATALOG) -> dict[str, dict[str, Any]]:
    """Each model's rates from a catalog file, as the provider bills today: a model's flat rates,
    overlaid by its newest dated entry (``prices``) already in effect."""
    models = json.loads(Path(path).read_text())["models"]
    if not isinstance(models, dict):
        raise ValueError(f"{path}: 'models' is not an object")
    today = datetime.date.today().isoformat()
    billed: dict[str, dict[str, Any]] = {}
    for name, entry in models.items():
        dated = sorted(
            (p for p in entry.get("prices", []) if str(p.get("effective_from", "")) <= today),
            key=lambda p: str(p["effective_from"]),
        )
        billed[name] = {**{k: v for k, v in entry.items() if k != "prices"}, **(dated[-1] if dated else {})}
    return billed


@dataclass
class SimConfig:
    """Settings of the simulated provider; all of them may be changed at runtime (``update``).

    Times are seconds. ``image_seconds`` / ``video_seconds``: submit to completed (0: done at the first
    poll). ``latency_s``: added to every /v1 answer. ``url_ttl_s``: life of a result URL after completion;
    ``short_url_ttl_rate`` of jobs get ``short_url_ttl_s`` instead. ``rate_*``: share of /v1 requests
    answered 429 / 500 / 503 or hung for ``timeout_hang_s`` (after the work is done). Jobs end failed
    with ``job_failure_rate`` or sit at 99% for ``stall_seconds`` more with ``job_stall_rate``; ``seed``
    makes every draw reproducible. ``submit_shape``: list | object | by_model (images list, videos
    object); ``url_shape``: string | list | by_model (images list, videos string). ``prices``: the
    ``models`` map of config/catalog.json.
    """

    api_key: str | None = field(default=None, repr=False)  # never shown, never echoed
    image_seconds: float = 3.0
    video_seconds: float = 8.0
    latency_s: float = 0.0
    url_ttl_s: float = 86400.0
    download_bytes_per_s: float = 0.0  # how fast a video result streams; 0: as fast as it can
    poisoned_link_every: int = (
        0  # every Nth video's result link points where nothing answers (and lives short_url_ttl_s)
    )
    video_bytes: int = 262144
    image_px: int = 64
    rate_429: float = 0.0
    rate_500: float = 0.0
    rate_503: float = 0.0
    rate_timeout: float = 0.0
    timeout_hang_s: float = 60.0
    job_failure_rate: float = 0.0
    job_stall_rate: float = 0.0
    stall_seconds: float = 600.0
    short_url_ttl_rate: float = 0.0
    short_url_ttl_s: float = 60.0
    retry_after_s: float = 1.0
    seed: int = 0
    submit_shape: str = "by_model"
    url_shape: str = "by_model"
    rate_limit_per_s: int = 1000
    # Render times by model: nominal seconds submit -> completed per model (others: image_seconds /
    # video_seconds). Each job's own time is drawn around it in two parts: ``render_spread_*``
    # (a factor the provider knows: its ``estimated_time`` says it), then ``render_jitter_*`` (a
    # factor it does not: the job finishes that much before or after its estimate). All 1: exact.
    render_seconds: dict[str, float] = field(default_factory=dict)
    render_spread_low: float = 1.0
    render_spread_high: float = 1.0
    render_jitter_low: float = 1.0
    render_jitter_high: float = 1.0
    honour_idempotency: bool = True  # False imitates a provider that ignores Idempotency-Key
    prices: dict[str, dict[str, Any]] = field(default_factory=load_prices, repr=False)

    def __post_init__(self) -> None:
        _check_types(self)
        for name in (
            "rate_429",
            "rate_500",
            "rate_503",
            "rate_timeout",
            "job_failure_rate",
            "job_stall_rate",
            "short_url_ttl_rate",
        ):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1")
        if self.rate_429 + self.rate_500 + self.rate_503 + self.rate_timeout > 1.0:
            raise ValueError("rate_429 + rate_500 + rate_503 + rate_timeout must not exceed 1")
        for name in (
            "image_seconds",
            "video_seconds",
            "latency_s",
            "url_ttl_s",
            "timeout_hang_s",
            "stall_seconds",
            "short_url_ttl_s",
            "retry_after_s",
            "download_bytes_per_s",
        ):
            if getattr(self, name) < 0 or math.isnan(getattr(self, name)):
                raise ValueError(f"{name} must not be negative")
        if self.video_bytes < MP4_MIN_SIZE:
            raise ValueError(f"video_bytes must be at least {MP4_MIN_SIZE}")
        if not 1 <= self.image_px <= 4096:
            raise ValueError("image_px must be between 1 and 4096")
        for low, high in (("render_spread_low", "render_spread_high"), ("render_jitter_low", "render_jitter_high")):
            if not 0 < getattr(self, low) <= getattr(self, high):
                raise ValueError(f"{low} must be above 0 and at most {high}")
        for model, seconds in self.render_seconds.items():
            if not isinstance(seconds, int | float) or isinstance(seconds, bool) or not 0 <= seconds < 1e6:
                raise ValueError(f"render_seconds[{model!r}] must be a number of seconds")
        if self.rate_limit_per_s < 1:
            raise ValueError("rate_limit_per_s must be at least 1")
        if self.poisoned_link_every < 0:
            raise ValueError("poisoned_link_every must not be negative")
        if self.submit_shape not in SHAPES:
            raise ValueError(f"submit_shape must be one of {', '.join(SHAPES)}")
        if self.url_shape not in URL_SHAPES:
            raise ValueError(f"url_shape must be one of {', '.join(URL_SHAPES)}")
        for name, entry in self.prices.items():
            if not isinstance(entry, dict) or entry.get("kind") not in ("chat", "image", "video"):
                raise ValueError(f"prices[{name!r}] needs a kind of chat, image or video")

    def update(self, changes: dict[str, Any]) -> list[str]:
        """Apply ``changes`` all-or-nothing; ``ValueError`` names an unknown field or a bad value."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise ValueError(f"unknown config field(s): {', '.join(unknown)}")
        checked = dataclasses.replace(self, **changes)  # runs __post_init__ on the result
        for name in changes:
            setattr(self, name, getattr(checked, name))
        return sorted(changes)

    def public(self) -> dict[str, Any]:
        """The settings as JSON, with the API key reduced to whether one is set."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("api_key", "prices")}
        out["api_key_set"] = self.api_key is not None
        out["models"] = sorted(self.prices)
        return out


@functools.cache
def _hints() -> dict[str, Any]:
    return typing.get_type_hints(SimConfig)


def _check_types(config: SimConfig) -> None:
    hints = _hints()
    for f in dataclasses.fields(config):
        value, hint = getattr(config, f.name), hints[f.name]
        if isinstance(hint, types.UnionType):  # str | None
            ok = value is None or isinstance(value, str)
        elif hint is bool:
            ok = isinstance(value, bool)
        elif hint is float:
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            if ok:
                setattr(config, f.name, float(value))
        elif hint is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif hint is str:
            ok = isinstance(value, str)
        else:
            ok = isinstance(value, dict)
        if not ok:
            raise ValueError(f"{f.name} has the wrong type ({type(value).__name__})")


# --- scripted and random faults --------------------------------------------------------------------


@dataclass
class ScriptedFault:
    """One scripted fault: answer ``status`` to the next ``times`` requests matching method and path.

    ``path`` is exact or an fnmatch pattern (``/v1/tasks/*``); ``method`` ``"*"`` matches any.
    ``status`` is an HTTP error code, ``"timeout"`` (the request is handled, then the answer hangs),
    ``"non_json"`` (200 with an HTML page) or ``"missing_fields"`` (200 ``{"code":200,"data":{}}``).
    """

    method: str
    path: str
    status: int | str
    times: int = 1
    retry_after: float | None = None

    @classmethod
    def parse(cls, raw: Any) -> ScriptedFault:
        if not isinstance(raw, dict):
            raise ValueError("each script entry must be an object")
        extra = set(raw) - {"method", "path", "status", "times", "retry_after"}
        if extra:
            raise ValueError(f"unknown script field(s): {', '.join(sorted(extra))}")
        status, times, retry = raw.get("status"), raw.get("times", 1), raw.get("retry_after")
        if not (isinstance(status, int) and 400 <= status <= 599) and status not in FAULT_WORDS:
            raise ValueError(f"status must be an HTTP error code or one of {', '.join(FAULT_WORDS)}")
        if not isinstance(raw.get("path"), str) or not raw["path"].startswith("/"):
            raise ValueError("path must be a string starting with /")
        if not isinstance(times, int) or times < 1:
            raise ValueError("times must be a positive integer")
        if retry is not None and (not isinstance(retry, int | float) or retry < 0):
            raise ValueError("retry_after must be a non-negative number")
        method = str(raw.get("method", "*")).upper()
        return cls(method, raw["path"], status, times, None if retry is None else float(retry))

    def matches(self, method: str, path: str) -> bool:
        return self.method in ("*", method) and (self.path == path or fnmatch.fnmatchcase(path, self.path))

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class FaultScript:
    """Scripted faults in the order they were added."""

    def __init__(self) -> None:
        self.entries: list[ScriptedFault] = []

    def add(self, raw_entries: Any, *, replace: bool = False) -> None:
        if not isinstance(raw_entries, list):
            raise ValueError("script must be a list")
        parsed = [ScriptedFault.parse(e) for e in raw_entries]
        self.entries = parsed if replace else self.entries + parsed

    def take(self, method: str, path: str) -> ScriptedFault | None:
        """The first entry matching this request, with one use consumed."""
        for entry in self.entries:
            if entry.matches(method, path):
                entry.times -= 1
                if entry.times <= 0:
                    self.entries.remove(entry)
                return entry
        return None

    def clear(self) -> None:
        self.entries = []


def draw_request_fault(config: SimConfig, rng: random.Random) -> int | str | None:
    """One seeded draw per request: 429, 500, 503, ``"timeout"`` or nothing."""
    u = rng.random()
    for outcome, rate in (
        (429, config.rate_429),
        (500, config.rate_500),
        (503, config.rate_503),
        ("timeout", config.rate_timeout),
    ):
        if u < rate:
            return outcome
        u -= rate
    return None


class RateWindow:
    """Requests per key in the current one-second window (windows start on whole seconds)."""

    def __init__(self) -> None:
        self._windows: dict[str, tuple[int, int]] = {}

    def hit(self, key: str, limit: int, now: float) -> tuple[bool, int, float]:
        """Count a request; ``(allowed, remaining, seconds until the window resets)``."""
        second = int(now)
        start, used = self._windows.get(key, (second, 0))
        if start != second:
            start, used = second, 0
        allowed = used < limit
        if allowed:
            used += 1
        self._windows[key] = (start, used)
        return allowed, max(0, limit - used), max(0.0, start + 1 - now)

    def clear(self) -> None:
        self._windows.clear()


# --- error answers ---------------------------------------------------------------------------------

_ERROR_KINDS: dict[int, tuple[str, str, str]] = {
    400: ("invalid_request_error", "invalid_request", "The request is invalid."),
    401: ("authentication_error", "invalid_api_key", "Incorrect API key provided."),
    402: ("insufficient_quota", "insufficient_balance", "Your account balance is insufficient."),
    403: ("permission_error", "forbidden", "You are not allowed to do this."),
    404: ("not_found_error", "not_found", "The requested resource does not exist."),
    405: ("invalid_request_error", "method_not_allowed", "Method not allowed."),
    429: ("rate_limit_error", "rate_limit_exceeded", "Rate limit reached; please slow down."),
    500: ("server_error", "internal_error", "The server had an error while processing your request."),
    502: ("server_error", "bad_gateway", "Bad gateway."),
    503: ("server_error", "service_unavailable", "The service is temporarily overloaded."),
    504: ("server_error", "gateway_timeout", "The upstream timed out."),
}


def format_seconds(seconds: float) -> str:
    """``Retry-After`` text: whole seconds when whole, else up to three decimals."""
    return str(int(seconds)) if float(seconds).is_integer() else f"{seconds:.3f}".rstrip("0")


def error_response(
    status: int,
    message: str | None = None,
    *,
    type_: str | None = None,
    code: str | None = None,
    param: str | None = None,
    retry_after: float | None = None,
) -> web.Response:
    """``{"error": {"message", "type", "code", "param"}}`` with the given status (and Retry-After)."""
    kind = _ERROR_KINDS.get(
        status, ("server_error" if status >= 500 else "invalid_request_error", f"http_{status}", f"HTTP {status}.")
    )
    body = {"error": {"message": message or kind[2], "type": type_ or kind[0], "code": code or kind[1], "param": param}}
    response = web.json_response(body, status=status)
    if status == 429:
        response.headers["Retry-After"] = format_seconds(1.0 if retry_after is None else retry_after)
    return response


class SimError(Exception):
    """An error answer in the provider's shape, raised anywhere in a handler."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str | None = None,
        code: str | None = None,
        param: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type_, self.code = status, message, type_, code
        self.param, self.retry_after = param, retry_after

    def response(self) -> web.Response:
        return error_response(
            self.status, self.message, type_=self.type_, code=self.code, param=self.param, retry_after=self.retry_after
        )


# --- the gate every request passes -----------------------------------------------------------------


class GateState(Protocol):
    """What the gate needs of the simulator's state."""

    config: SimConfig
    clock: Callable[[], float]
    rng: random.Random
    script: FaultScript
    window: RateWindow
    requests_by_status: Counter[int]
    requests_by_route: Counter[str]

    async def hang(self, seconds: float) -> None: ...


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _request_key(name: str, kind: type) -> Any:
    """A typed request-storage key (``web.RequestKey`` is aiohttp 3.14+; older ones take plain strings)."""
    maker = getattr(web, "RequestKey", None)
    return name if maker is None else maker(name, kind)


REQUEST_ID = _request_key("sim_request_id", str)
RATELIMIT = _request_key("sim_ratelimit", tuple)
HANG = _request_key("sim_hang", float)
_request_bits = random.Random().getrandbits  # its own generator: the seeded fault draws stay as they were
_HTML = "<html><head><title>502 Bad Gateway</title></head><body><h1>502 Bad Gateway</h1></body></html>"


def _bearer(request: web.Request) -> str | None:
    value = request.headers.get("Authorization", "")
    return value[7:].strip() if value[:7].lower() == "bearer " else None


async def _guard(request: web.Request, handler: Handler, state: GateState) -> web.StreamResponse:
    config = state.config
    is_v1 = request.path.startswith("/v1/")
    if is_v1:
        if config.latency_s > 0:
            await asyncio.sleep(config.latency_s)
        token = _bearer(request)
        who = hashlib.sha256(token.encode()).hexdigest()[:16] if token else "anonymous"
        allowed, remaining, reset = state.window.hit(who, config.rate_limit_per_s, state.clock())
        request[RATELIMIT] = (config.rate_limit_per_s, remaining, reset)
        if config.api_key is not None and not hmac.compare_digest((token or "").encode(), config.api_key.encode()):
            raise SimError(401, "Incorrect API key provided.", code="invalid_api_key")
        if not allowed:
            raise SimError(
                429,
                f"Rate limit of {config.rate_limit_per_s} requests per second reached.",
                retry_after=max(1, math.ceil(reset)),
            )
    scripted = state.script.take(request.method, request.path)
    fault = scripted.status if scripted else draw_request_fault(config, state.rng) if is_v1 else None
    if fault == "timeout":
        request[HANG] = config.timeout_hang_s  # the work is done; the answer does not come in time
    elif fault == "non_json":
        return web.Response(text=_HTML, content_type="text/html")
    elif fault == "missing_fields":
        return web.json_response({"code": 200, "data": {}})
    elif isinstance(fault, int):
        retry = scripted.retry_after if scripted and scripted.retry_after is not None else config.retry_after_s
        raise SimError(fault, f"Simulated provider fault (HTTP {fault}).", retry_after=retry)
    return await handler(request)


def _route(path: str) -> str:
    """What the stats count a request under: ``/v1/<resource>`` or ``/files`` (no ids)."""
    return "/files" if path.startswith("/files/") else "/".join(path.split("/", 3)[:3])


def make_gate(state: GateState) -> Middleware:
    """The middleware for ``state``; admin routes (``/_sim/``) pass straight through."""

    @web.middleware
    async def gate(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith("/_sim/"):
            try:
                return await handler(request)
            except SimError as exc:
                return exc.response()
        # Unique, not secret: secrets.token_hex (a getrandom call) was 15% of a status read here.
        request[REQUEST_ID] = f"req_{_request_bits(96):024x}"
        request[HANG] = 0.0
        try:
            response = await _guard(request, handler, state)
        except SimError as exc:
            response = exc.response()
        except web.HTTPException as exc:  # the router's own 404 / 405
            response = error_response(exc.status, exc.reason)
        if request[HANG] > 0:
            await state.hang(request[HANG])
        state.requests_by_status[response.status] += 1
        state.requests_by_route[_route(request.path)] += 1
        return response

    return gate


async def hang_before_streaming(request: web.Request, state: GateState) -> None:
    """A streamed answer cannot be held back once started, so its scripted hang happens first."""
    if request.get(HANG, 0) > 0:
        seconds, request[HANG] = request[HANG], 0.0
        await state.hang(seconds)


async def stamp_headers(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare`` hook: ``x-request-id`` and ``x-ratelimit-*`` on every answer, streamed too."""
    if REQUEST_ID in request:
        response.headers["x-request-id"] = request[REQUEST_ID]
    if RATELIMIT in request:
        limit, remaining, reset = request[RATELIMIT]
        response.headers["x-ratelimit-limit"] = str(limit)
        response.headers["x-ratelimit-remaining"] = str(remaining)
        response.headers["x-ratelimit-reset"] = f"{reset:.3f}"
