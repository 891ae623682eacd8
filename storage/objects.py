"""The object-storage seam: where finished outputs are kept, and how they are checked.

Two real implementations stand behind one protocol, switched by configuration only
(``GENLINE_STORAGE_URL``): ``file:///abs/path`` for the zero-setup footprint (storage/local.py) and
``s3://bucket/prefix`` for production (storage/s3.py).

Every store streams uploads in constant memory, computes size and sha256 on the way, refuses a
stream whose size differs from the one announced (leaving nothing behind), and checks what the store
holds before it answers. Errors are ``StorageError`` (permanent) or ``RetryableStorageError``.

Keys are relative, ``/``-separated paths such as ``videos/2024/pl-123/out.mp4``; the same key is
valid on every backend.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from genline.config.errors import StorageError

MAX_KEY_BYTES = 1024  # S3's limit; enforced everywhere so keys stay portable
SIDECAR_SUFFIX = ".meta.json"  # the local store keeps an object's metadata beside it under this name


@dataclass(frozen=True)
class StoredObjectInfo:
    """What a store holds under one key.

    ``sha256`` is the hex digest of the whole object, or ``""`` when the store does not keep it
    (see each backend's docstring). ``location`` is an absolute file path (local) or
    ``s3://bucket/key`` (S3).
    """

    key: str
    size: int
    sha256: str
    content_type: str
    location: str


@runtime_checkable
class ObjectStore(Protocol):
    """A place to keep objects. Implementations: LocalObjectStore, S3ObjectStore."""

    def put_stream(
        self,
        key: str,
        chunks: Iterable[bytes],
        *,
        content_type: str,
        expected_size: int | None = None,
    ) -> StoredObjectInfo:
        """Store the concatenation of ``chunks`` under ``key``, replacing what was there.

        Chunks may be of any size; memory stays bounded. If ``expected_size`` is given and the
        stream's size differs, raises ``StorageError(code="size_mismatch")`` and leaves no object
        (nor partial upload) behind. Exceptions raised by ``chunks`` itself propagate unchanged,
        also leaving nothing behind.
        """
        ...

    def head(self, key: str) -> StoredObjectInfo | None:
        """What is stored under ``key``, or None when nothing is."""
        ...

    def open_stream(self, key: str, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        """The object's bytes in chunks; raises ``StorageError(code="object_not_found")`` at once
        when the key holds nothing."""
        ...

    def read_bytes(self, key: str) -> bytes:
        """The whole object in memory (for small objects only)."""
        ...

    def delete(self, key: str) -> None:
        """Remove the object; a missing object is not an error."""
        ...

    def location(self, key: str) -> str:
        """Where the object lives, for records and humans (path or ``s3://`` URI)."""
        ...

    def presigned_url(self, key: str, expires_s: int = 3600) -> str:
        """A URL that reads the object without credentials (``file://`` for local storage)."""
        ...

    def abort_stale_uploads(self, older_than_s: float, *, dry_run: bool = False) -> int:
        """Clear writes left unfinished for more than ``older_than_s`` seconds (S3: multipart
        uploads under the store's prefix, aborted; local: hidden temporary files of a killed
        process, removed); returns how many. ``dry_run``: only count them."""
        ...


def validate_key(key: str) -> str:
    """Return ``key`` if it is a safe, portable object key; else raise ``StorageError(invalid_key)``.

    Refused: empty keys, absolute paths, ``.`` or ``..`` segments, empty segments (``a//b``,
    trailing ``/``), backslashes, control characters, keys longer than 1024 UTF-8 bytes and keys
    ending in the local store's reserved sidecar suffix.
    """
    reason = key_problem(key)
    if reason is not None:
        raise StorageError(f"Object key {key!r} is not allowed: {reason}.", code="invalid_key")
    return key


def key_problem(key: str) -> str | None:
    if not isinstance(key, str) or not key:
        return "it is empty"
    if key.startswith("/"):
        return "it must be relative, not start with '/'"
    if "\\" in key:
        return "use '/' to separate folders, not '\\'"
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in key):
        return "it contains control characters"
    if len(key.encode("utf-8")) > MAX_KEY_BYTES:
        return f"it is longer than {MAX_KEY_BYTES} bytes"
    segments = key.split("/")
    if any(segment == "" for segment in segments):
        return "it has an empty folder name ('//' or a trailing '/')"
    if any(segment in (".", "..") for segment in segments):
        return "'.' and '..' are not allowed as folder names"
    if key.endswith(SIDECAR_SUFFIX):
        return f"the suffix {SIDECAR_SUFFIX!r} is reserved"
    return None


def validate_content_type(content_type: str) -> str:
    """Return ``content_type`` if it looks like ``type/subtype``; else ``StorageError``."""
    if (
        not isinstance(content_type, str)
        or "/" not in content_type
        or any(ord(ch) < 32 or ord(ch) == 127 for ch in content_type)
    ):
        raise StorageError(
            f"Content type {content_type!r} is not a media type like 'video/mp4'.",
            code="invalid_content_type",
        )
    return content_type


def check_size(key: str, expected_size: int | None, size: int, *, final: bool) -> None:
    """Raise ``StorageError(size_mismatch)`` when ``size`` cannot match ``expected_size``.

    While streaming (``final=False``) only an overrun is an error; at the end any difference is.
    """
    if expected_size is None:
        return
    if size > expected_size or (final and size != expected_size):
        got = f"{size} bytes" if final else f"more than {expected_size} bytes"
        raise StorageError(
            f"Object {key!r} was announced as {expected_size} bytes but the stream held {got}; nothing was stored.",
            code="size_mismatch",
        )
