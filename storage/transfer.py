"""Copying a provider result into our object storage: streamed, size-checked, deadline-aware.

The download goes through the runtime's ``SafeClient`` (``provider/safe_http.py``): public
addresses only, checked after resolution and on every redirect hop, with a largest size and an
overall deadline per kind of result (``GENLINE_MAX_*_DOWNLOAD_MB``, ``GENLINE_*_DOWNLOAD_DEADLINE_S``).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from datetime import datetime
from urllib.parse import urlsplit

import httpx

from genline.config.clock import utcnow
from genline.config.errors import ResultExpired, RetryableStorageError, StorageError
from genline.provider.safe_http import DeadlineExceeded, DownloadLimit, UnsafeURL, deadline_in, limit_for
from genline.storage.objects import ObjectStore, StoredObjectInfo

CHUNK = 1 << 20
_MAY_PASS = (408, 425, 429)  # a 4xx that says "later", not "never"


def copy_url_to_store(
    http: httpx.Client,
    store: ObjectStore,
    url: str,
    key: str,
    *,
    expires_at: datetime | None,
    expect_type: str,
) -> StoredObjectInfo:
    """Stream ``url`` into ``store`` at ``key`` in constant memory and verify it landed whole.

    ``expect_type`` is the content-type family (``video`` or ``image``) the result must be.

    What can never work fails at once (``StorageError``, not retried): a link that is not http(s),
    an answer the link will always give (a 4xx other than those of an expired link, 408 and 429),
    a result of the wrong type. What may pass (5xx, timeouts, resets, an early 403) is a
    ``RetryableStorageError``; a link past its expiry is a ``ResultExpired``.

    A link to a private, loopback or link-local address (or redirected to one) is refused
    (``result_link_blocked``); a result larger than its kind's limit fails (``result_too_large``);
    a download still running at its kind's deadline is cut off and may be tried again
    (``result_download_too_slow``).
    """
    scheme = urlsplit(url).scheme.lower()
    if scheme not in ("http", "https"):
        raise StorageError(
            f"The provider's result link is not an http(s) URL (scheme {scheme or 'missing'!r}); it cannot be copied.",
            code="result_link_unusable",
        )
    if expires_at is not None and utcnow() >= expires_at:
        raise ResultExpired(
            f"The provider's result link expired at {expires_at:%Y-%m-%d %H:%M:%S} UTC before it could be copied."
        )
    limit = limit_for(http, expect_type)
    started = time.monotonic()
    try:
        with http.stream("GET", url, extensions=deadline_in(limit.deadline_s)) as response:
            if response.status_code in (401, 403, 404, 410):
                if expires_at is None or utcnow() >= expires_at:
                    raise ResultExpired(
                        f"The provider's result link no longer works (HTTP {response.status_code}); it has expired."
                    )
                raise RetryableStorageError(f"The result link answered HTTP {response.status_code} before it expired.")
            if 400 <= response.status_code < 500 and response.status_code not in _MAY_PASS:
                raise StorageError(
                    f"The provider's result link answers HTTP {response.status_code}; it cannot be copied.",
                    code="result_link_refused",
                )
            if response.status_code >= 400:
                raise RetryableStorageError(f"Downloading the result failed with HTTP {response.status_code}.")
            content_type = response.headers.get("content-type", "application/octet-stream").split(";")[0].strip()
            if not content_type.startswith(expect_type + "/"):
                raise StorageError(
                    f"The provider's result is {content_type}, not the {expect_type} that was asked for.",
                    code="result_wrong_type",
                )
            length = response.headers.get("content-length")
            expected = int(length) if length and length.isdigit() else None
            if expected is not None and expected > limit.max_bytes:
                raise _too_large(expect_type, limit)
            chunks = _bounded(response.iter_bytes(CHUNK), expect_type, limit, started)
            return store.put_stream(key, chunks, content_type=content_type, expected_size=expected)
    except UnsafeURL as exc:
        raise StorageError(
            f"The provider's result link was not followed: {exc.message}", code="result_link_blocked"
        ) from exc
    except DeadlineExceeded as exc:
        raise RetryableStorageError(
            f"Downloading the result took longer than {limit.deadline_s:g} s and was cut off.",
            code="result_download_too_slow",
        ) from exc
    except httpx.TooManyRedirects as exc:
        raise StorageError(
            "The provider's result link redirects too many times; it cannot be copied.", code="result_link_refused"
        ) from exc
    except httpx.TimeoutException as exc:
        raise RetryableStorageError("Downloading the result timed out.") from exc
    except httpx.TransportError as exc:
        raise RetryableStorageError(f"Downloading the result failed ({type(exc).__name__}).") from exc


def _too_large(kind: str, limit: DownloadLimit) -> StorageError:
    return StorageError(
        f"The provider's {kind} is larger than the {limit.max_bytes / 1048576:g} MiB allowed for one; it was not kept.",
        code="result_too_large",
    )


def _bounded(chunks: Iterable[bytes], kind: str, limit: DownloadLimit, started: float) -> Iterator[bytes]:
    """The chunks, cut off past the size limit or the deadline (the safe client enforces the
    deadline on every socket read too; this catches any other client)."""
    size = 0
    for chunk in chunks:
        size += len(chunk)
        if size > limit.max_bytes:
            raise _too_large(kind, limit)
        if time.monotonic() - started > limit.deadline_s:
            raise DeadlineExceeded("The download took longer than its deadline and was cut off.")
        yield chunk
