"""The store a storage URL names: ``file:///abs/path`` (storage/local.py) or ``s3://bucket/prefix``
(storage/s3.py). Kept apart from the seam (storage/objects.py), which both backends import."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit
from urllib.request import url2pathname

from genline.config.errors import ConfigError
from genline.storage.local import LocalObjectStore
from genline.storage.objects import ObjectStore, key_problem


def open_store(url: str, *, endpoint_url: str | None = None, region: str = "us-east-1") -> ObjectStore:
    """The store named by ``url``: ``file:///abs/path`` or ``s3://bucket/optional/prefix``.

    ``endpoint_url`` and ``region`` only matter for S3 (an S3-compatible server such as MinIO or
    moto; None for AWS itself). Raises ``ConfigError`` for anything else. No network call is made.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "file":
        return _open_local(parts.netloc, parts.path, parts.query, parts.fragment)
    if scheme == "s3":
        return _open_s3(parts.netloc, parts.path, parts.query, parts.fragment, endpoint_url, region)
    raise ConfigError(f"GENLINE_STORAGE_URL must be file:///path or s3://bucket/prefix (got scheme {scheme!r}).")


def _open_local(netloc: str, path: str, query: str, fragment: str) -> ObjectStore:
    if netloc not in ("", "localhost") or query or fragment:
        raise ConfigError("GENLINE_STORAGE_URL file:// must be a local path like file:///var/genline/objects.")
    root = Path(url2pathname(path))
    if not root.is_absolute():
        raise ConfigError("GENLINE_STORAGE_URL file:// must hold an absolute path, e.g. file:///var/genline/objects.")
    return LocalObjectStore(root)


def _open_s3(netloc: str, path: str, query: str, fragment: str, endpoint_url: str | None, region: str) -> ObjectStore:
    # Late: boto3 is imported only by a process that uses S3, not by every zero-setup command.
    from genline.storage.s3 import S3ObjectStore, make_s3_client, valid_bucket_name

    if "@" in netloc:
        raise ConfigError("GENLINE_STORAGE_URL must not carry credentials; use the AWS credential chain.")
    if not valid_bucket_name(netloc) or query or fragment:
        raise ConfigError("GENLINE_STORAGE_URL s3:// must name a valid bucket, e.g. s3://genline-outputs/videos.")
    prefix = path.strip("/")
    if prefix and key_problem(prefix) is not None:
        raise ConfigError(f"GENLINE_STORAGE_URL has an invalid key prefix {prefix!r}.")
    client = make_s3_client(endpoint_url=endpoint_url or None, region=region)
    return S3ObjectStore(netloc, prefix, client)
