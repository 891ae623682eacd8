"""Where a part genline stands on fails the operator's way: one translation, used at both of
genline's front doors (the ``genline`` command's group in cli/main.py, the ``Genline`` class in
pipelines/api.py), from the exceptions the database driver, Redis/kombu, boto3 and the provider
raise into a ``ConfigError`` with a stable code and one sentence naming the setting to fix.

    code                          what is wrong (the setting named in the sentence)
    database_url_invalid          GENLINE_DATABASE_URL is no URL genline can use
    database_unreachable          no database server answers there (or the SQLite file cannot be opened)
    database_missing              the server answers, but has no database of that name
    database_login_failed         the server refused the user or password
    broker_unreachable            GENLINE_BROKER_URL's Redis (or AMQP) server does not answer
    bucket_missing                GENLINE_STORAGE_URL's bucket does not exist
    storage_credentials_invalid   the object store refused (or found no) AWS credentials
    storage_unreachable           GENLINE_S3_ENDPOINT_URL (or AWS) does not answer
    provider_key_invalid          the provider answered 401 to APIMART_API_KEY

The CLI prints ``error [code]: sentence`` (or ``{"error": {...}}`` with ``--json``) and exits 2;
the Python API raises the ``ConfigError`` (``raise ... from`` the original, for a debugger).
``check_ready`` makes the same checks at start-up, before anything is created.
"""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, ParamSpec, TypeVar
from urllib.parse import urlsplit, urlunsplit

from genline.config.errors import AuthenticationFailed, ConfigError, GenlineError, StorageError
from genline.config.logging import get_logger

if TYPE_CHECKING:
    from genline.config.settings import Settings

BROKER_UNREACHABLE = "broker_unreachable"
PROVIDER_KEY_INVALID = "provider_key_invalid"
_BROKER_LIBRARIES = ("redis", "kombu", "amqp")

_log = get_logger("genline.start")

P = ParamSpec("P")
R = TypeVar("R")
C = TypeVar("C", bound=type)


def shown(url: str) -> str:
    """A URL fit for a message: its password, if any, masked."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
    except ValueError:
        return "(an unreadable URL)"
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def config_error(exc: BaseException, settings: Settings | None = None) -> ConfigError | None:
    """The operator's error behind ``exc``, or None when ``exc`` is not one of the operator's
    settings (a bug, a request's own error, a provider hiccup: the caller's to report)."""
    if isinstance(exc, ConfigError):
        return exc
    if isinstance(exc, AuthenticationFailed):
        return provider_key_error(exc)
    if isinstance(exc, StorageError):
        from genline.storage.factory import storage_config_error

        return storage_config_error(exc)
    if isinstance(exc, GenlineError):
        return None
    library = type(exc).__module__.split(".", 1)[0]
    if library == "sqlalchemy":
        from genline.storage.db import database_error

        return database_error(exc, settings.database_url if settings else None)
    if library in _BROKER_LIBRARIES or (library == "celery" and _caused_by_broker(exc)):
        return broker_error(exc, settings.broker_url if settings else None)
    if library == "botocore":
        return _storage_error(exc, settings)
    return None


def provider_key_error(exc: AuthenticationFailed) -> ConfigError:
    return ConfigError(
        "The provider refused the API key (HTTP 401): set APIMART_API_KEY (or APIMART_API_KEY_FILE) to a "
        "valid key; paid work stays paused until then (`genline provider status`).",
        code=PROVIDER_KEY_INVALID,
    )


def broker_error(exc: BaseException, url: str | None) -> ConfigError:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0].rstrip(".")
    where = f" at {shown(url)}" if url else ""
    return ConfigError(
        f"The broker{where} (GENLINE_BROKER_URL) cannot be reached: {first}. Check the URL and that the "
        "server is running.",
        code=BROKER_UNREACHABLE,
    )


def _caused_by_broker(exc: BaseException) -> bool:
    cause = exc.__cause__ or exc.__context__
    return cause is not None and type(cause).__module__.split(".", 1)[0] in _BROKER_LIBRARIES


def _storage_error(exc: BaseException, settings: Settings | None) -> ConfigError | None:
    """A botocore exception that escaped the store's own translation (storage/s3.py)."""
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    where = f" ({shown(settings.storage_url)})" if settings else ""
    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code") or "")
        if code == "NoSuchBucket":
            return ConfigError(
                f"The bucket of GENLINE_STORAGE_URL{where} does not exist: create it, or fix the URL.",
                code="bucket_missing",
            )
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken"):
            return ConfigError(
                f"The object store{where} refused genline's AWS credentials ({code}).",
                code="storage_credentials_invalid",
            )
        return None
    if isinstance(exc, NoCredentialsError):
        return ConfigError(
            f"No AWS credentials for the object store{where}; set them in boto3's usual places.",
            code="storage_credentials_invalid",
        )
    if isinstance(exc, EndpointConnectionError):
        return ConfigError(
            f"The object store{where} cannot be reached (GENLINE_S3_ENDPOINT_URL): {exc}.",
            code="storage_unreachable",
        )
    return None


@contextmanager
def translated(settings: Settings | None = None) -> Iterator[None]:
    """Inside, an exception that is the operator's settings' fault leaves as its ``ConfigError``
    (``raise ... from`` the original); every other exception leaves unchanged."""
    try:
        yield
    except Exception as exc:
        err = config_error(exc, settings)
        if err is None or err is exc:
            raise
        raise err from exc


def guarded(method: Callable[P, R]) -> Callable[P, R]:
    """A public method of an object with a ``runtime`` (``Genline``): its infrastructure failures
    leave as ``ConfigError`` (``translated`` with the runtime's settings)."""

    @functools.wraps(method)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        runtime = getattr(args[0], "runtime", None) if args else None
        with translated(getattr(runtime, "settings", None)):
            return method(*args, **kwargs)

    return wrapper


def guard_public_methods(cls: C) -> C:
    """Every public method of ``cls`` (a name without a leading underscore, defined in its body)
    is ``guarded``: a method added later is covered without anyone remembering to."""
    for name, member in list(vars(cls).items()):
        if not name.startswith("_") and inspect.isfunction(member):
            setattr(cls, name, guarded(member))
    return cls


# --- start-up checks ---------------------------------------------------------------------------
def check_broker(settings: Settings) -> None:
    """The broker answers (one PING for Redis, one connection for AMQP); the embedded broker is a
    SQLite file of genline's own and needs no check. Raises ``ConfigError`` (broker_unreachable)."""
    url = settings.broker_url
    if settings.embedded_broker:
        return
    try:
        if url.startswith(("redis://", "rediss://")):
            import redis

            client = redis.Redis.from_url(url, socket_timeout=3, socket_connect_timeout=3)
            try:
                client.ping()
            finally:
                client.close()
        else:
            from kombu.connection import Connection

            with Connection(url, connect_timeout=3) as conn:  # type: ignore[no-untyped-call]
                conn.ensure_connection(max_retries=1)
    except Exception as exc:
        if type(exc).__module__.split(".", 1)[0] not in _BROKER_LIBRARIES and not isinstance(exc, OSError):
            raise
        raise broker_error(exc, url) from exc


def check_provider_key(settings: Settings) -> None:
    """One free read (the status of a job that does not exist) tells whether the provider takes
    APIMART_API_KEY: a 401 is ``provider_key_invalid``; any other answer, or none (the provider
    down), is left to the gateway's own handling when work comes."""
    from genline.config.errors import ProviderError
    from genline.provider.client import ProviderClient, Request

    client = ProviderClient(settings.with_overrides(http_timeout_s=min(settings.http_timeout_s, 5.0)))
    try:
        client.send(Request("GET", "/v1/tasks/genline-key-check"))
    except AuthenticationFailed as exc:
        raise provider_key_error(exc) from exc
    except ProviderError:
        pass  # 404 (the key works), or the provider is not answering now
    finally:
        client.close()


def check_ready(settings: Settings, *, broker: bool = True, store: bool = True, provider_key: bool = False) -> None:
    """Start-up checks of what a command or a ``Genline`` object is about to use, so a wrong
    setting is one plain ``ConfigError`` before anything is created: the broker answers, the
    bucket exists and takes the credentials, and (for a worker or a poller, which call the
    provider) the provider takes the key. (The database is checked by storage/migrate.py
    ``require_current``, which every such caller runs first.)"""
    if broker:
        check_broker(settings)
    if store:
        from genline.storage.factory import check_store

        check_store(settings.storage_url, endpoint_url=settings.s3_endpoint_url, region=settings.s3_region)
    if provider_key and settings.provider_api_key is not None:
        check_provider_key(settings)


# codes of a part that is there but not answering yet (restarting with us), as against a wrong setting
NOT_ANSWERING = frozenset({BROKER_UNREACHABLE, "database_unreachable", "storage_unreachable"})


def wait_until_ready(check: Callable[[], None], wait_s: float, *, sleep: Callable[[float], None] = time.sleep) -> None:
    """Run ``check`` (a long-running part's start-up checks) until it passes, retrying for up to
    ``wait_s`` seconds while what fails is a part that does not answer (``NOT_ANSWERING``): a
    worker started while Redis or PostgreSQL restarts waits for it, as Celery's own consumer does
    (``broker_connection_retry_on_startup``), instead of exiting. A wrong setting, or a part still
    silent when the time is up, raises the ``ConfigError`` as before. Tries back off from 0.5 s to 5 s."""
    deadline = time.monotonic() + wait_s
    pause = 0.5
    while True:
        try:
            check()
            return
        except ConfigError as err:
            left = deadline - time.monotonic()
            if err.code not in NOT_ANSWERING or left <= 0:
                raise
            _log.warning(
                "start_waiting_for", code=err.code, retry_in_s=round(min(pause, left), 1), left_s=round(left, 1)
            )
            sleep(min(pause, left))
            pause = min(pause * 2, 5.0)
