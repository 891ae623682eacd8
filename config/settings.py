"""Typed settings, read from the environment once and validated loudly.

Every setting is listed in ``SETTINGS`` below with its variable, default and meaning; the README's
configuration table is generated from the same list (``genline config --markdown``). A variable
that starts with ``GENLINE_`` or ``APIMART_`` but is not a known setting is an error, not a silent
no-op: a misspelled setting must never fall back to a default unnoticed.
"""

from __future__ import annotations

import base64
import binascii
import difflib
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from ipaddress import IPv4Network, IPv6Network, ip_network
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from genline.config.errors import ConfigError
from genline.config.logging import register_secret

PRODUCTION_BASE_URL = "https://api.apimart.ai"
EMBEDDED_BROKER = "embedded"


class Secret:
    """A string that never shows itself in a repr, a log line, an error or a traceback."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True)
class Setting:
    env: str
    attr: str
    default: str | None
    help: str
    parse: Callable[[str], Any] = str


def _positive_float(raw: str) -> float:
    value = float(raw)
    if not value > 0:
        raise ValueError("must be greater than zero")
    return value


def _positive_int(raw: str) -> int:
    value = int(raw)
    if value < 1:
        raise ValueError("must be 1 or more")
    return value


def _non_negative_seconds(raw: str) -> float:
    value = float(raw)
    if not 0 <= value <= 10 * 365 * 86400:  # also refuses nan and inf
        raise ValueError("must be a number of seconds from 0 to 315360000 (ten years)")
    return value


def _poll_schedule(raw: str) -> str:
    value = raw.lower()
    if value not in {"expected", "fixed"}:
        raise ValueError("must be expected or fixed")
    return value


def _log_level(raw: str) -> str:
    level = raw.upper()
    if level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        raise ValueError("must be one of DEBUG, INFO, WARNING, ERROR")
    return level


def _http_url(raw: str) -> str:
    parts = urlsplit(raw)
    if parts.scheme not in {"http", "https"} or not parts.netloc:
        raise ValueError("must be an http(s) URL such as https://api.apimart.ai")
    return raw.rstrip("/")


def _optional(raw: str) -> str | None:
    return raw or None


PrivateHost = str | IPv4Network | IPv6Network


def _private_hosts(raw: str) -> tuple[PrivateHost, ...]:
    """Comma-separated host names (lower-cased, trailing dot dropped) and IP addresses or CIDR
    networks (an address is its own /32 or /128); no schemes, ports, paths or wildcards."""
    entries: list[PrivateHost] = []
    for part in raw.split(","):
        entry = part.strip()
        if not entry:
            continue
        if "/" in entry:
            try:
                entries.append(ip_network(entry, strict=True))
            except ValueError as exc:
                raise ValueError(f"{entry!r} is not a CIDR network ({exc})") from None
            continue
        try:
            entries.append(ip_network(entry.strip("[]")))
            continue
        except ValueError:
            pass
        name = entry.lower().rstrip(".")
        labels = name.split(".")
        if not all(_HOST_LABEL.match(label) for label in labels) or labels[-1].isdigit():
            raise ValueError(
                f"{entry!r} is not a host name, an IP address or a CIDR network "
                "(write hosts without scheme, port or path, e.g. 127.0.0.1,10.0.0.0/8,minio.internal)"
            )
        entries.append(name)
    return tuple(entries)


_HOST_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


def _folders(raw: str) -> tuple[Path, ...] | None:
    """Folders separated by ``os.pathsep`` (``:``), resolved now; empty for the default."""
    folders = tuple(Path(part.strip()).expanduser().resolve() for part in raw.split(os.pathsep) if part.strip())
    return folders or None


def _webhook_url(raw: str) -> str | None:
    """An http(s) URL kept exactly as written (a receiver's path may end in a slash); empty: none."""
    if not raw:
        return None
    parts = urlsplit(raw)
    if parts.scheme not in {"http", "https"} or not parts.netloc:
        raise ValueError("must be an http(s) URL such as https://ops.example.com/hooks/genline")
    return raw


WEBHOOK_SECRET_PREFIX = "whsec_"


def webhook_secrets(raw: str | None) -> tuple[Secret, ...]:
    """GENLINE_WEBHOOK_SECRET: one or more ``whsec_<base64>`` secrets (Standard Webhooks), separated
    by spaces or commas; each decodes to 24 to 64 random bytes. The first signs; all sign while a
    rotation is under way. A bad one is named by its position, never shown."""
    secrets: list[Secret] = []
    for n, part in enumerate((raw or "").replace(",", " ").split(), start=1):
        where = f"GENLINE_WEBHOOK_SECRET's secret number {n}"
        if not part.startswith(WEBHOOK_SECRET_PREFIX):
            raise ConfigError(f"{where} does not start with {WEBHOOK_SECRET_PREFIX} (write whsec_ then base64).")
        body = part[len(WEBHOOK_SECRET_PREFIX) :]
        try:
            key = base64.b64decode(body + "=" * (-len(body) % 4), validate=True)  # padding optional
        except (binascii.Error, ValueError):
            raise ConfigError(f"{where} is not base64 after its whsec_ prefix.") from None
        if not 24 <= len(key) <= 64:
            raise ConfigError(
                f"{where} decodes to {len(key)} bytes; the Standard Webhooks scheme wants 24 to 64 random bytes "
                "(e.g. whsec_ followed by the output of `openssl rand -base64 32`)."
            )
        secrets.append(Secret(part))
    return tuple(secrets)


SETTINGS: tuple[Setting, ...] = (
    Setting(
        "GENLINE_VAR_DIR",
        "var_dir",
        "var/genline",
        "Folder for the zero-setup default's files (SQLite databases, local objects, logs).",
    ),
    Setting(
        "GENLINE_DATABASE_URL",
        "database_url",
        None,
        "SQLAlchemy URL of the state database. Default: SQLite in the var folder. "
        "Production: postgresql+psycopg://user@host/db.",
    ),
    Setting(
        "GENLINE_BROKER_URL",
        "broker_url",
        EMBEDDED_BROKER,
        "Celery broker. `embedded` is a SQLite-backed broker in the var folder that needs no server; "
        "production: redis://host:6379/0 (no options after `?`; rediss:// takes the ssl_* certificate options).",
    ),
    Setting(
        "GENLINE_STORAGE_URL",
        "storage_url",
        None,
        "Where finished outputs are kept: file:///path (default: the var folder's objects/) or s3://bucket/prefix.",
    ),
    Setting(
        "GENLINE_S3_ENDPOINT_URL",
        "s3_endpoint_url",
        "",
        "Endpoint of an S3-compatible server (MinIO, moto); empty for AWS itself. "
        "Credentials come from boto3's usual chain (AWS_ACCESS_KEY_ID, ...).",
        _optional,
    ),
    Setting("GENLINE_S3_REGION", "s3_region", "us-east-1", "Region for the S3 client."),
    Setting(
        "GENLINE_UPLOAD_DIRS",
        "upload_dirs",
        None,
        "Folders (separated by `:`) a request may name a local image in; any other path is refused "
        "(`image_path_not_allowed`). Default: the var folder's uploads/. The CLI's own `--image PATH` "
        "and images passed as bytes need none.",
        _folders,
    ),
    Setting(
        "APIMART_BASE_URL",
        "provider_base_url",
        PRODUCTION_BASE_URL,
        "Base URL of the AI provider (the simulator's address in the demo and tests).",
        _http_url,
    ),
    Setting(
        "APIMART_API_KEY",
        "provider_api_key",
        "",
        "The provider's API key. Never logged, stored or sent to a task.",
        _optional,
    ),
    Setting(
        "APIMART_API_KEY_FILE",
        "provider_api_key_file",
        "",
        "A file holding the provider's API key, instead of APIMART_API_KEY.",
        _optional,
    ),
    Setting(
        "GENLINE_CATALOG_FILE",
        "catalog_file",
        "",
        "JSON price catalog and profiles; empty for the built-in one (config/catalog.json).",
        _optional,
    ),
    Setting(
        "GENLINE_POLL_INTERVAL_S",
        "poll_interval_s",
        "2",
        "Seconds between two polls of one provider job.",
        _positive_float,
    ),
    Setting(
        "GENLINE_POLL_SCHEDULE",
        "poll_schedule",
        "expected",
        "expected: a job's first poll comes near its expected finish (the provider's estimate, else "
        "the model's recent median render time), its progress then says when it finishes, and past "
        "that it is polled every GENLINE_POLL_INTERVAL_S; fixed: every GENLINE_POLL_INTERVAL_S from the "
        "submit on (less often only early in a render far longer than that, or long past its estimate).",
        _poll_schedule,
    ),
    Setting(
        "GENLINE_HTTP_TIMEOUT_S",
        "http_timeout_s",
        "30",
        "Read timeout of one provider call, in seconds.",
        _positive_float,
    ),
    Setting(
        "GENLINE_HTTP_CONNECT_TIMEOUT_S",
        "http_connect_timeout_s",
        "5",
        "Connect timeout of one provider call, in seconds.",
        _positive_float,
    ),
    Setting(
        "GENLINE_ALLOW_PRIVATE_HOSTS",
        "allow_private_hosts",
        "",
        "Host names, IP addresses and CIDR networks (comma-separated) that genline may reach although "
        "they are private, loopback or link-local (e.g. the simulator's 127.0.0.1). Empty: only public "
        "addresses, for result downloads, callbacks and users' image URLs alike.",
        _private_hosts,
    ),
    Setting(
        "GENLINE_MAX_IMAGE_DOWNLOAD_MB",
        "max_image_download_mb",
        "20",
        "Largest image result genline copies from the provider, in MiB; a larger one fails the copy.",
        _positive_float,
    ),
    Setting(
        "GENLINE_MAX_VIDEO_DOWNLOAD_MB",
        "max_video_download_mb",
        "2048",
        "Largest video result genline copies from the provider, in MiB; a larger one fails the copy.",
        _positive_float,
    ),
    Setting(
        "GENLINE_IMAGE_DOWNLOAD_DEADLINE_S",
        "image_download_deadline_s",
        "120",
        "Longest one image download may take in all, in seconds (a slow or dripping link is cut off "
        "and the copy tried again).",
        _positive_float,
    ),
    Setting(
        "GENLINE_VIDEO_DOWNLOAD_DEADLINE_S",
        "video_download_deadline_s",
        "900",
        "Longest one video download may take in all, in seconds (a slow or dripping link is cut off "
        "and the copy tried again).",
        _positive_float,
    ),
    Setting(
        "GENLINE_PROVIDER_MAX_ATTEMPTS",
        "provider_max_attempts",
        "4",
        "Tries of one retryable provider call (429, 5xx, timeouts) before the step gives up.",
        _positive_int,
    ),
    Setting(
        "GENLINE_PROVIDER_BACKOFF_S",
        "provider_backoff_s",
        "0.5",
        "First backoff between retries; doubles each time, with jitter.",
        _positive_float,
    ),
    Setting(
        "GENLINE_PROVIDER_BACKOFF_CAP_S",
        "provider_backoff_cap_s",
        "8",
        "Longest single backoff between retries.",
        _positive_float,
    ),
    Setting(
        "GENLINE_STEP_MAX_ATTEMPTS",
        "step_max_attempts",
        "8",
        "Runs of one step (each with its own provider retries) before it fails; a copy to storage "
        "is retried until its link expires instead.",
        _positive_int,
    ),
    Setting(
        "GENLINE_STEP_RETRY_BACKOFF_S",
        "step_retry_backoff_s",
        "2",
        "Wait before a failed step runs again; doubles with each run, with jitter (a copy waits at "
        "most half the time its link has left).",
        _positive_float,
    ),
    Setting(
        "GENLINE_STEP_RETRY_BACKOFF_CAP_S",
        "step_retry_backoff_cap_s",
        "60",
        "Longest wait before a failed step runs again.",
        _positive_float,
    ),
    Setting(
        "GENLINE_PROVIDER_RATE_PER_S",
        "provider_rate_per_s",
        "50",
        "Requests a second the provider allows genline's key. Every call draws from one budget shared "
        "by every process (Redis, else the database): chats, submits, cancels and result downloads "
        "first, polls next, batch work last; genline keeps 10% below it, and a 429 or a low "
        "x-ratelimit-remaining tightens it for a while.",
        _positive_float,
    ),
    Setting(
        "GENLINE_BREAKER_THRESHOLD",
        "breaker_threshold",
        "5",
        "Provider failures in a row (5xx, timeouts) that open a model's circuit breaker.",
        _positive_int,
    ),
    Setting(
        "GENLINE_BREAKER_COOLDOWN_S",
        "breaker_cooldown_s",
        "30",
        "Seconds a model's breaker stays open before one probe call is let through.",
        _positive_float,
    ),
    Setting(
        "GENLINE_PAUSE_S",
        "pause_s",
        "300",
        "Seconds paid work is paused after the provider answers 401 or 402 (then one call probes).",
        _positive_float,
    ),
    Setting(
        "GENLINE_COPY_RISK_MARGIN_S",
        "copy_risk_margin_s",
        "900",
        "A copy still not done this close to its link's expiry raises a copy_at_risk alert.",
        _positive_float,
    ),
    Setting(
        "GENLINE_POLLER_BATCH",
        "poller_batch",
        "2000",
        "Most due provider jobs one poller claims per round.",
        _positive_int,
    ),
    Setting(
        "GENLINE_POLLER_CONCURRENCY",
        "poller_concurrency",
        "128",
        "Most polls one poller has in flight at once.",
        _positive_int,
    ),
    Setting(
        "GENLINE_LEASE_S",
        "lease_s",
        "30",
        "How long a claim lasts unless renewed: a worker's on a running step (renewed every third of "
        "it while the step runs, so a killed worker's step runs again within about this long) and a "
        "poller's on a job it reads.",
        _positive_float,
    ),
    Setting(
        "GENLINE_SWEEP_AFTER_S",
        "sweep_after_s",
        "60",
        "A queued step not started this long after its nudge is nudged again by the sweeper (the "
        "nudge was lost); a step refused before it reached the provider (a pause) waits this long.",
        _positive_float,
    ),
    Setting(
        "GENLINE_STARTUP_WAIT_S",
        "startup_wait_s",
        "30",
        "How long a worker or poller waits at start for a broker, database or object store that does "
        "not answer yet (one restarting alongside it) before it exits with the error; 0 exits at once. "
        "A wrong setting (an unknown database, refused credentials, a missing bucket) exits at once.",
        _non_negative_seconds,
    ),
    Setting(
        "GENLINE_VISIBILITY_TIMEOUT_S",
        "visibility_timeout_s",
        "1800",
        "Redis broker: seconds before an unacknowledged message is delivered again. Longer than "
        "any one step (steps never wait on the provider; the poller does).",
        _positive_int,
    ),
    Setting("GENLINE_WORKER_CONCURRENCY", "worker_concurrency", "2", "Processes per Celery worker.", _positive_int),
    Setting(
        "GENLINE_BATCH_MAX_RUNNING",
        "batch_max_running",
        "2",
        "Most steps of batch pipelines (priority batch, `genline batch`) running at once across all "
        "workers; the others wait their turn, so interactive work keeps its workers.",
        _positive_int,
    ),
    Setting(
        "GENLINE_BATCH_THROTTLE_S",
        "batch_throttle_s",
        "5",
        "How long a batch step waits (with jitter) when GENLINE_BATCH_MAX_RUNNING batch steps are "
        "already running; the sweeper sends it again then.",
        _positive_float,
    ),
    Setting(
        "GENLINE_RESULT_TTL_S",
        "result_ttl_s",
        "86400",
        "Assumed life of a provider result URL when it gives no expires_at.",
        _positive_float,
    ),
    Setting(
        "GENLINE_COPY_CACHE_TTL_S",
        "copy_cache_ttl_s",
        "604800",
        "How long a copy answer is reused for the same model, prompt and parameters (7 days); 0 turns "
        "the copy cache off. Redis on the production footprint, else the database.",
        _non_negative_seconds,
    ),
    Setting(
        "GENLINE_WEBHOOK_SECRET",
        "webhook_secrets",
        "",
        "Signing secret(s) of the callbacks and alerts genline POSTs (Standard Webhooks: `whsec_` and "
        "24-64 base64 bytes). Several, separated by spaces or commas, during a rotation: each signs, "
        "the first is the new one. Empty: sent unsigned (docs/WEBHOOKS.md).",
        _optional,
    ),
    Setting(
        "GENLINE_ALERT_WEBHOOK_URL",
        "alert_webhook_url",
        "",
        "Operators' URL that alerts are POSTed to (paused account, copy at risk, spend cap reached), "
        "signed and retried like callbacks. Empty: alerts are log lines only.",
        _webhook_url,
    ),
    Setting(
        "GENLINE_WEBHOOK_RETRY_FOR_S",
        "webhook_retry_for_s",
        "86400",
        "How long a callback or alert that is not answered with a 2xx is tried again (5 s, 5 min, "
        "30 min, 2 h, 5 h, 10 h, ... after its first try), before it is marked failed for good.",
        _non_negative_seconds,
    ),
    Setting(
        "GENLINE_RETENTION_EVERY_S",
        "retention_every_s",
        "3600",
        "Seconds between retention passes of the pollers' sweeper (one pass across all pollers): "
        "stored outputs and audit rows past their feature's outputs_days / audit_days go, and "
        "multipart uploads left unfinished for a day are aborted (`genline retention`).",
        _positive_float,
    ),
    Setting(
        "GENLINE_METRICS_DIR",
        "metrics_dir",
        "",
        "Folder where workers and pollers keep their Prometheus counters for `genline metrics` "
        "(one subfolder per process tree, cleared when it starts; share it between the machines' "
        "processes and the exporter). Default: the metrics folder in GENLINE_VAR_DIR.",
        _optional,
    ),
    Setting(
        "GENLINE_FLOWER_BASIC_AUTH",
        "flower_basic_auth",
        "",
        "`user:password` that `genline flower` asks for (HTTP basic auth; several separated by commas). "
        "A secret: never printed. Required to listen beyond loopback unless Flower's OAuth is set "
        "(docs/OPERATORS.md).",
        _optional,
    ),
    Setting("GENLINE_LOG_LEVEL", "log_level", "INFO", "DEBUG, INFO, WARNING or ERROR.", _log_level),
)

KNOWN_ENV = frozenset(s.env for s in SETTINGS)
_PREFIXES = ("GENLINE_", "APIMART_")


@dataclass(frozen=True)
class Settings:
    var_dir: Path
    database_url: str
    broker_url: str
    storage_url: str
    s3_endpoint_url: str | None
    s3_region: str
    upload_dirs: tuple[Path, ...]
    provider_base_url: str
    provider_api_key: Secret | None = field(repr=False)
    catalog_file: str | None
    poll_interval_s: float
    poll_schedule: str
    http_timeout_s: float
    http_connect_timeout_s: float
    allow_private_hosts: tuple[PrivateHost, ...]
    max_image_download_mb: float
    max_video_download_mb: float
    image_download_deadline_s: float
    video_download_deadline_s: float
    provider_max_attempts: int
    provider_backoff_s: float
    provider_backoff_cap_s: float
    step_max_attempts: int
    step_retry_backoff_s: float
    step_retry_backoff_cap_s: float
    provider_rate_per_s: float
    breaker_threshold: int
    breaker_cooldown_s: float
    pause_s: float
    copy_risk_margin_s: float
    poller_batch: int
    poller_concurrency: int
    lease_s: float
    sweep_after_s: float
    visibility_timeout_s: int
    worker_concurrency: int
    batch_max_running: int
    batch_throttle_s: float
    result_ttl_s: float
    copy_cache_ttl_s: float
    webhook_secrets: tuple[Secret, ...] = field(repr=False)
    alert_webhook_url: str | None
    webhook_retry_for_s: float
    log_level: str
    flower_basic_auth: tuple[Secret, ...] = field(default=(), repr=False)
    metrics_dir: str | None = None  # GENLINE_METRICS_DIR; None: <var_dir>/metrics (provider/metrics.py)
    retention_every_s: float = 3600.0  # GENLINE_RETENTION_EVERY_S (pipelines/retention.py)
    startup_wait_s: float = 30.0  # GENLINE_STARTUP_WAIT_S (config/boundary.py wait_until_ready)

    @property
    def embedded_broker(self) -> bool:
        return self.broker_url == EMBEDDED_BROKER

    def with_overrides(self, **changes: Any) -> Settings:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        return Settings(**values)

    def child_env(self) -> dict[str, str]:
        """Environment for a child process that must see these same settings (key excluded:
        children read it from the parent's environment or key file like this process did)."""
        env = {
            "GENLINE_VAR_DIR": str(self.var_dir),
            "GENLINE_DATABASE_URL": self.database_url,
            "GENLINE_BROKER_URL": self.broker_url,
            "GENLINE_STORAGE_URL": self.storage_url,
            "GENLINE_S3_REGION": self.s3_region,
            "GENLINE_UPLOAD_DIRS": os.pathsep.join(str(folder) for folder in self.upload_dirs),
            "APIMART_BASE_URL": self.provider_base_url,
            "GENLINE_POLL_INTERVAL_S": repr(self.poll_interval_s),
            "GENLINE_POLL_SCHEDULE": self.poll_schedule,
            "GENLINE_LOG_LEVEL": self.log_level,
        }
        if self.s3_endpoint_url:
            env["GENLINE_S3_ENDPOINT_URL"] = self.s3_endpoint_url
        if self.catalog_file:
            env["GENLINE_CATALOG_FILE"] = self.catalog_file
        return env


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Read and validate every setting. Raises ConfigError naming each bad variable."""
    env = os.environ if environ is None else environ
    problems: list[str] = []
    for name in sorted(env):
        if name.startswith(_PREFIXES) and name not in KNOWN_ENV:
            guess = difflib.get_close_matches(name, KNOWN_ENV, n=1)
            hint = f" Did you mean {guess[0]}?" if guess else ""
            problems.append(f"{name} is not a genline setting.{hint}")

    values: dict[str, Any] = {}
    for s in SETTINGS:
        raw = env.get(s.env, s.default)
        if raw is None:
            values[s.attr] = None
            continue
        try:
            values[s.attr] = s.parse(raw.strip())
        except ValueError as exc:
            problems.append(f"{s.env}={raw!r} is invalid: {exc}.")

    if problems:
        raise ConfigError("Bad configuration: " + " ".join(problems), code="invalid_config")

    var_dir = Path(values.pop("var_dir")).expanduser().resolve()
    values["var_dir"] = var_dir
    if values["database_url"] is None:
        values["database_url"] = f"sqlite:///{var_dir / 'genline.db'}"
    if values["storage_url"] is None:
        values["storage_url"] = (var_dir / "objects").as_uri()
    if values["upload_dirs"] is None:
        values["upload_dirs"] = (var_dir / "uploads",)
    _check_urls(values)

    key_file = values.pop("provider_api_key_file")
    key = values.pop("provider_api_key")
    if key and key_file:
        raise ConfigError("Set APIMART_API_KEY or APIMART_API_KEY_FILE, not both.")
    if key_file:
        try:
            key = Path(key_file).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"APIMART_API_KEY_FILE cannot be read: {exc.strerror}.") from None
        if not key:
            raise ConfigError("APIMART_API_KEY_FILE is empty.")
    values["provider_api_key"] = Secret(key) if key else None
    # Scrubbed from every log line and every stored or shown error text (config/logging.py).
    register_secret(key)
    for name in ("database_url", "broker_url", "storage_url", "s3_endpoint_url", "provider_base_url"):
        register_secret(url_password(values[name]))
    values["webhook_secrets"] = webhook_secrets(values["webhook_secrets"])
    for secret in values["webhook_secrets"]:  # never in a log line, a row or an error text
        register_secret(secret.reveal())
        register_secret(secret.reveal()[len(WEBHOOK_SECRET_PREFIX) :])
    register_secret(url_password(values["alert_webhook_url"]))
    values["flower_basic_auth"] = flower_credentials(values["flower_basic_auth"])
    for credential in values["flower_basic_auth"]:  # its password: never in a log line or an error text
        register_secret(credential.reveal().partition(":")[2])
    return Settings(**values)


def flower_credentials(raw: str | None) -> tuple[Secret, ...]:
    """GENLINE_FLOWER_BASIC_AUTH: ``user:password`` entries separated by commas (Flower's own
    format); the error names the entry by number, never its text."""
    credentials: list[Secret] = []
    for n, entry in enumerate(raw.split(",") if raw else [], start=1):
        user, colon, password = entry.strip().partition(":")
        if not (user and colon and password):
            raise ConfigError(
                f"GENLINE_FLOWER_BASIC_AUTH's entry number {n} is not user:password "
                "(a user name, a colon, then a password; entries separated by commas)."
            )
        credentials.append(Secret(entry.strip()))
    return tuple(credentials)


def url_password(url: str | None) -> str | None:
    """The password in a URL's ``user:password@``, if any."""
    if not url or "@" not in url:
        return None
    try:
        return urlsplit(url).password
    except ValueError:
        return None


def _check_urls(values: dict[str, Any]) -> None:
    db = urlsplit(values["database_url"]).scheme
    if not (db.startswith("sqlite") or db.startswith("postgresql")):
        raise ConfigError(
            f"GENLINE_DATABASE_URL must be sqlite:///... or postgresql+psycopg://..., not {db or 'empty'}://."
        )
    broker = values["broker_url"]
    scheme = urlsplit(broker).scheme
    if broker != EMBEDDED_BROKER and scheme.startswith("sqla+"):
        # kombu's SQLAlchemy transport hands every transport option (genline's visibility timeout
        # among them) to create_engine, so each nudge would fail; genline runs it itself as `embedded`.
        raise ConfigError(
            f"GENLINE_BROKER_URL {scheme}://... is kombu's SQLAlchemy transport, which genline runs itself: "
            "set GENLINE_BROKER_URL=embedded (a SQLite broker in GENLINE_VAR_DIR), or use redis://host:port/db."
        )
    if broker != EMBEDDED_BROKER and scheme not in {"redis", "rediss", "amqp"}:
        raise ConfigError("GENLINE_BROKER_URL must be `embedded`, redis://host:port/db or amqp://...")
    _check_redis_url_options(broker)
    store = urlsplit(values["storage_url"])
    if store.scheme not in {"file", "s3"}:
        raise ConfigError("GENLINE_STORAGE_URL must be file:///path or s3://bucket/prefix.")
    if store.scheme == "s3" and not store.netloc:
        raise ConfigError("GENLINE_STORAGE_URL s3://... must name a bucket, e.g. s3://genline-outputs/videos.")


# What a Redis broker URL may carry after "?": read alike by kombu (the broker) and by redis-py
# (shared state, nudges). Anything else, kombu's transport options above all, would reach
# redis-py's connection as an unknown argument and fail every call to it, not at start-up.
_REDIS_URL_OPTIONS = {
    "redis": frozenset(),
    "rediss": frozenset({"ssl_cert_reqs", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile"}),
}


def _check_redis_url_options(broker: str) -> None:
    url = urlsplit(broker)
    allowed = _REDIS_URL_OPTIONS.get(url.scheme)
    if allowed is None or not url.query:
        return
    extra = sorted({part.split("=", 1)[0] for part in url.query.split("&") if part} - allowed)
    if extra:
        takes = f"only {', '.join(sorted(allowed))}" if allowed else "none"
        raise ConfigError(
            f"GENLINE_BROKER_URL has options genline cannot pass on: {', '.join(extra)}. genline sets "
            f"Celery's transport options itself (GENLINE_VISIBILITY_TIMEOUT_S, for one); a {url.scheme}:// "
            f"URL takes {takes} after '?'."
        )


def source_checkout() -> Path | None:
    """The repository this genline runs from when it is installed from a checkout (``make
    install`` does ``pip install -e .``): its ``.venv/bin/genline`` is the installed command and
    ``make demo`` keeps its state in its ``var/genline``. None for an ordinary install."""
    root = Path(__file__).resolve().parent.parent  # config/ is a folder of the checkout's root
    if (root / "pyproject.toml").is_file() and (root / "Makefile").is_file():
        return root
    return None


def settings_table_markdown() -> str:
    rows = ["| variable | default | what it does |", "| --- | --- | --- |"]
    for s in SETTINGS:
        default = s.default if s.default not in (None, "") else "(none)"
        rows.append(f"| `{s.env}` | `{default}` | {s.help} |")
    return "\n".join(rows)
