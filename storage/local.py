"""Local-file object storage: the zero-setup footprint, a real store behind the same seam as S3.

An object ``a/b.mp4`` lives at ``<root>/a/b.mp4``. Writes go to a temporary file in the destination
folder, are fsynced and then ``os.replace``-d into place, so a reader sees the old object or the new
one, never half a file. Interrupted writes remove their temporary file; a process killed mid-write
may leave a hidden ``.<name>.*.tmp`` file beside the object, never a partial object.

Metadata lives in a sidecar ``<root>/a/b.mp4.meta.json`` holding ``content_type``, ``sha256`` and
``size``. It is replaced after the data file, so for an instant after a crash the two may disagree:
``head`` trusts the sidecar only when its size matches the file, and otherwise reports
``sha256=""`` and a content type guessed from the file name.
"""

from __future__ import annotations

import errno
import hashlib
import json
import mimetypes
import os
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, BinaryIO

from genline.config.errors import RetryableStorageError, StorageError
from genline.storage.objects import (
    SIDECAR_SUFFIX,
    StoredObjectInfo,
    check_size,
    validate_content_type,
    validate_key,
)

# errno values that retrying cannot fix: the operator has to change something first.
_PERMANENT_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENAMETOOLONG, errno.EISDIR, errno.ENOTDIR}


class LocalObjectStore:
    """Objects as files under ``root`` (created on first write)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    # --- writing -------------------------------------------------------------------------------
    def put_stream(
        self,
        key: str,
        chunks: Iterable[bytes],
        *,
        content_type: str,
        expected_size: int | None = None,
    ) -> StoredObjectInfo:
        """Stream ``chunks`` into ``key`` atomically; see ``ObjectStore.put_stream``."""
        validate_key(key)
        validate_content_type(content_type)
        path = self._path(key)
        temps: list[Path] = []
        try:
            with self._os_errors(key, "write"):
                path.parent.mkdir(parents=True, exist_ok=True)
                data_tmp, out = self._temp_file(path)
                temps.append(data_tmp)
            with out:
                size, sha256 = self._copy(key, chunks, out, expected_size)
                check_size(key, expected_size, size, final=True)
                with self._os_errors(key, "write"):
                    out.flush()
                    os.fsync(out.fileno())
            meta = {"content_type": content_type, "sha256": sha256, "size": size}
            with self._os_errors(key, "write"):
                meta_tmp, meta_out = self._temp_file(_sidecar(path))
                temps.append(meta_tmp)
                with meta_out:
                    meta_out.write(json.dumps(meta).encode("utf-8"))
                    meta_out.flush()
                    os.fsync(meta_out.fileno())
                os.replace(data_tmp, path)
                os.replace(meta_tmp, _sidecar(path))
                temps.clear()
                _fsync_dir(path.parent)
        finally:
            for tmp in temps:
                tmp.unlink(missing_ok=True)
        return self._verify(key, size, sha256, content_type)

    def _copy(self, key: str, chunks: Iterable[bytes], out: BinaryIO, expected_size: int | None) -> tuple[int, str]:
        """Write every chunk to ``out``; errors raised by ``chunks`` propagate unchanged."""
        digest = hashlib.sha256()
        size = 0
        for chunk in chunks:
            size += len(chunk)
            check_size(key, expected_size, size, final=False)
            digest.update(chunk)
            with self._os_errors(key, "write"):
                out.write(chunk)
        return size, digest.hexdigest()

    def _verify(self, key: str, size: int, sha256: str, content_type: str) -> StoredObjectInfo:
        info = self.head(key)
        if info is None or info.size != size or info.sha256 != sha256 or info.content_type != content_type:
            raise RetryableStorageError(
                f"Object {key!r} did not read back as written under {self.root}; try again.",
                code="verify_failed",
            )
        return info

    # --- reading -------------------------------------------------------------------------------
    def head(self, key: str) -> StoredObjectInfo | None:
        """Size, sha256 and content type of ``key`` from its sidecar, or None when missing."""
        validate_key(key)
        path = self._path(key)
        with self._os_errors(key, "read"):
            try:
                st = path.stat()
            except (FileNotFoundError, NotADirectoryError):
                return None
        if not path.is_file():
            return None
        meta = _read_sidecar(_sidecar(path))
        if meta is not None and meta.get("size") == st.st_size:
            content_type, sha256 = str(meta.get("content_type", "")), str(meta.get("sha256", ""))
        else:  # no sidecar, or a crash between the two replaces: report what we can see
            content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
            sha256 = ""
        return StoredObjectInfo(key=key, size=st.st_size, sha256=sha256, content_type=content_type, location=str(path))

    def open_stream(self, key: str, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        """The object's bytes in chunks of at most ``chunk_size``; the file is opened now."""
        validate_key(key)
        path = self._path(key)
        try:
            handle = path.open("rb")
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as exc:
            raise StorageError(f"No object {key!r} under {self.root}.", code="object_not_found") from exc
        except OSError as exc:
            raise self._translate(exc, key, "read") from exc
        return self._chunks(handle, key, chunk_size)

    def _chunks(self, handle: BinaryIO, key: str, chunk_size: int) -> Iterator[bytes]:
        with handle:
            while True:
                with self._os_errors(key, "read"):
                    chunk = handle.read(chunk_size)
                if not chunk:
                    return
                yield chunk

    def read_bytes(self, key: str) -> bytes:
        """The whole object in memory."""
        return b"".join(self.open_stream(key))

    # --- other ---------------------------------------------------------------------------------
    def delete(self, key: str) -> None:
        """Remove the object and its sidecar; missing is fine."""
        validate_key(key)
        path = self._path(key)
        with self._os_errors(key, "delete"):
            for target in (path, _sidecar(path)):
                with suppress(FileNotFoundError, NotADirectoryError):
                    target.unlink()

    def location(self, key: str) -> str:
        """The object's absolute file path."""
        return str(self._path(validate_key(key)))

    def presigned_url(self, key: str, expires_s: int = 3600) -> str:
        """A ``file://`` URI; local files have no expiry, so ``expires_s`` is ignored."""
        return self._path(validate_key(key)).absolute().as_uri()

    def abort_stale_uploads(self, older_than_s: float, *, dry_run: bool = False) -> int:
        """Remove the hidden temporary files (``.<name>.*.tmp``) of writes a killed process left,
        untouched for more than ``older_than_s`` seconds; returns how many (``dry_run``: would)."""
        if not self.root.is_dir():
            return 0
        cutoff = time.time() - older_than_s
        removed = 0
        for path in self.root.rglob(".*.tmp"):
            with suppress(FileNotFoundError):
                if path.is_file() and path.stat().st_mtime < cutoff:
                    if not dry_run:
                        path.unlink()
                    removed += 1
        return removed

    # --- helpers -------------------------------------------------------------------------------
    def _path(self, key: str) -> Path:
        return self.root.joinpath(*key.split("/"))

    @staticmethod
    def _temp_file(target: Path) -> tuple[Path, BinaryIO]:
        fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        return Path(name), os.fdopen(fd, "wb")

    @contextmanager
    def _os_errors(self, key: str, action: str) -> Iterator[None]:
        """Turn an ``OSError`` from our own file operations into a StorageError."""
        try:
            yield
        except OSError as exc:
            raise self._translate(exc, key, action) from exc

    def _translate(self, exc: OSError, key: str, action: str) -> StorageError:
        reason = exc.strerror or type(exc).__name__
        message = f"Could not {action} object {key!r} under {self.root}: {reason}."
        if exc.errno in _PERMANENT_ERRNOS:
            return StorageError(message, code="storage_rejected")
        return RetryableStorageError(message + " Try again.", code="storage_unavailable")


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + SIDECAR_SUFFIX)


def _read_sidecar(path: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def _fsync_dir(folder: Path) -> None:
    """Make the renames durable (POSIX); a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
